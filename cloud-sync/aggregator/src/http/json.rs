//! Records as JSON: seqs as strings (u64), the payload as JSON when it is
//! JSON and hex otherwise; a page streamed record by record.

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::store::{RecordPage, StoredRecord};

/// One record.
pub fn record(r: StoredRecord) -> Value {
    let mut v = json!({
        "seq": r.seq.to_string(),
        "stream": r.stream,
        "timestamp_ms": r.timestamp_ms,
        "received_ms": r.received_ms,
    });
    match serde_json::from_slice::<Value>(&r.payload) {
        Ok(p) => v["payload"] = p,
        Err(_) => {
            let hex: String = r.payload.iter().map(|b| format!("{b:02x}")).collect();
            v["payload_hex"] = Value::String(hex);
        }
    }
    v
}

/// `{"node","records":[…],"next_after_seq","more"}`, written one record at
/// a time: the page (bounded in bytes by the query) is never held twice.
pub fn records_page(node: String, page: RecordPage) -> Response {
    let head = format!("{{\"node\":{},\"records\":[", Value::String(node));
    let tail = format!(
        "],\"next_after_seq\":\"{}\",\"more\":{}}}",
        page.next_after_seq, page.more
    );
    let body = std::iter::once(head)
        .chain(page.records.into_iter().enumerate().map(|(i, r)| {
            let sep = if i == 0 { "" } else { "," };
            format!("{sep}{}", record(r))
        }))
        .chain(std::iter::once(tail))
        .map(Ok::<_, std::convert::Infallible>);
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(futures_util::stream::iter(body)),
    )
        .into_response()
}
