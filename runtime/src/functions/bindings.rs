//! Host bindings generated from `modules/wit/function.wit`.
//!
//! The generated `Message` record *is* [`crate::message::Message`]: the
//! pipeline's batches lower straight into guest memory with no intermediate
//! copy.

// The generated code implements unsafe traits (`ComponentType`, `Lower`,
// `Lift`) whose invariants the macro upholds; no hand-written unsafe here.
#![allow(unsafe_code, missing_docs, clippy::all)]

wasmtime::component::bindgen!({
    path: "../modules/wit",
    world: "fogline:function/function",
    additional_derives: [PartialEq, Eq, Hash],
});

pub use fogline::function::host::Level;
// `Message` and `Output` are already at the root (the world `use`s them).
pub use Output as WitOutput;
