//! The unit of data on the edge: what ingest hands the pipeline and what
//! functions emit.

/// One record: a stream (the MQTT topic, or what a function assigned), a
/// timestamp on the node's ingest clock, and an opaque payload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Message {
    /// The MQTT topic it came from, or the stream a function assigned.
    pub stream: String,
    /// Milliseconds since the Unix epoch (the node's ingest clock, which
    /// never goes backwards).
    pub timestamp_ms: u64,
    /// Opaque bytes; JSON by convention.
    pub payload: Vec<u8>,
}
