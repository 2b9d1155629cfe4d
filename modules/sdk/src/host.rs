//! The host imports, and a stand-in for them when the SDK is built for the
//! host (unit tests): there, what a call hands the host is captured so tests
//! can read it back.

use crate::bindings::fogline::function::types::{Emission, Rejection, StateWrite};

#[cfg(target_arch = "wasm32")]
pub(crate) fn emit(e: &[Emission], r: &[Rejection], s: &[StateWrite], b: &[u8]) {
    crate::bindings::fogline::function::host::emit(e, r, s, b);
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn log(level: crate::log::Level, text: &str) {
    crate::bindings::fogline::function::host::log(level, text);
}

/// One `emit` call, as captured outside a component.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone, Default)]
#[allow(dead_code)] // read by the SDK's own tests
pub(crate) struct Flushed {
    pub(crate) emissions: Vec<Emission>,
    pub(crate) rejected: Vec<Rejection>,
    pub(crate) state: Vec<StateWrite>,
    pub(crate) bytes: Vec<u8>,
}

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    pub(crate) static CAPTURED: std::cell::RefCell<Vec<Flushed>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn emit(e: &[Emission], r: &[Rejection], s: &[StateWrite], b: &[u8]) {
    CAPTURED.with(|c| {
        c.borrow_mut().push(Flushed {
            emissions: e.to_vec(),
            rejected: r.to_vec(),
            state: s.to_vec(),
            bytes: b.to_vec(),
        })
    });
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn log(level: crate::log::Level, text: &str) {
    eprintln!("[{level:?}] {text}");
}
