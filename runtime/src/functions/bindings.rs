//! Host bindings generated from `modules/wit/function.wit`.
//!
//! Only the exports and the types are used from here: the `host` imports
//! (`log`, `emit`) are defined by hand in [`super::imports`], so that they
//! read guest memory in place (`WasmList`, `WasmStr`) and check every length
//! before copying anything.

// The generated code implements unsafe traits (`ComponentType`, `Lower`,
// `Lift`) whose invariants the macro upholds; no hand-written unsafe here.
#![allow(unsafe_code, missing_docs, clippy::all)]

wasmtime::component::bindgen!({
    path: "../modules/wit",
    world: "fogline:function/function",
    additional_derives: [PartialEq, Eq],
});

pub use fogline::function::host::Level;
pub use fogline::function::types::{Emission, Rejection, Span, StateWrite};

/// The contract's package, as guests import it (`fogline:function/host@…`).
pub const PACKAGE_VERSION: &str = "0.2.0";
