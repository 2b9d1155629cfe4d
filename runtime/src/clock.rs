//! Wall-clock time. Gateways often have no RTC: timestamps are what the
//! clock says at ingest, never used for ordering (sequence numbers are).
//! One clock for edge and aggregator: it lives in `fogline_telemetry::clock`.

pub use fogline_telemetry::clock::now_ms;
