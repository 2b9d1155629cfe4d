//! The process-wide Prometheus recorder, shared by every Fogline component
//! in a process (the demo runs edge and aggregator in one).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the recorder on first use and return a handle that renders the
/// Prometheus text format.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours just
            // renders nothing, which is visible and harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
