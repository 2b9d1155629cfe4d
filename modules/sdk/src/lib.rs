//! Write Fogline stream functions in Rust.
//!
//! A Fogline function is a WebAssembly component (`wasm32-wasip2`) that the
//! edge daemon calls with *batches* of messages. This crate hides the WIT
//! contract (`modules/wit/function.wit`) behind one trait, [`Function`], and
//! one macro, [`export_function!`]:
//!
//! ```ignore
//! use fogline_sdk::prelude::*;
//!
//! #[derive(Deserialize)]
//! struct Threshold { field: String, above: f64 }
//!
//! impl Function for Threshold {
//!     fn init(config: Config) -> Result<Self> { config.parse() }
//!     fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
//!         if msg.json_f64(&self.field)? > self.above { out.emit(msg); }
//!         Ok(())
//!     }
//! }
//! export_function!(Threshold);
//! ```
//!
//! # How the host drives a function
//!
//! 1. `init` once per instance, with the function's TOML table as JSON:
//!    [`Function::init`] receives it as a [`Config`]. An `Err` fails the load.
//! 2. `restore` with the function's committed durable state (see
//!    [`state`]): the containers named in [`Function::state`] are filled again.
//! 3. `process` per batch: [`Function::on_message`] runs for every message, in
//!    order. An `Err` from it *rejects that one message*: the host sends it to
//!    the dead-letter table with the error text, and the rest of the batch goes
//!    on. Whatever `on_message` emitted for a message it then rejected is
//!    discarded, so a rejected input never has outputs.
//! 4. `tick` on the host's timer: [`Function::on_tick`] (optional) closes
//!    windows, sends heartbeats.
//!
//! After each `process` and `tick` the SDK hands the host what was emitted
//! and what changed in the durable state; the host commits both in the same
//! outbox transaction as the batch. A panic, an infinite loop or running out
//! of memory traps the instance: the host restarts it from `init` and the
//! committed state, and retries the batch in halves so only the message that
//! fails is dead-lettered.
//!
//! The sandbox grants no filesystem, network, environment or arguments
//! (WASI calls for them fail or return nothing), and nothing may block: a
//! sleep or a blocking poll traps. Use message timestamps and the `now_ms`
//! given to [`Function::on_tick`] for time: they come from the gateway's
//! ingest clock, which never goes backwards.
//!
//! Use [`log`] (the `info!`-style macros) to say something; stdout and stderr
//! are discarded.
#![warn(missing_docs)]

// Lets paths generated below (and in `export_function!`) say
// `fogline_sdk::…` from inside this crate too.
extern crate self as fogline_sdk;

mod batch;
mod function;
#[cfg(not(target_arch = "wasm32"))]
pub mod harness;
mod host;
mod json;
pub mod log;
mod message;
mod output;
pub mod state;
mod window;

pub use function::{Config, Error, Function, Result};
pub use message::Message;
pub use output::Output;
/// Re-exported so functions can build JSON without another dependency.
pub use serde_json;
pub use state::{Durable, Keyed, State, StateEntry, StateSet, StateWriter};
pub use window::{Aggregate, Window, WindowKind, Windows};

/// Everything a function needs: `use fogline_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::log;
    pub use crate::{bail, export_function};
    pub use crate::{
        Aggregate, Config, Error, Function, Keyed, Message, Output, Result, State, StateEntry,
        StateSet, Window, Windows,
    };
    pub use serde::{Deserialize, Serialize};
    pub use serde_json::{json, Value};
}

/// Glue used by [`export_function!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::export;
    pub use crate::bindings::Guest;
    pub use crate::function::{init, process, restore, tick, Instance};
    /// Path handed to the generated `export!` macro.
    pub mod bindings {
        pub use crate::bindings::*;
    }
}

#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "fogline:function/function",
        pub_export_macro: true,
        default_bindings_module: "fogline_sdk::__private::bindings",
        runtime_path: "fogline_sdk::__private_rt",
    });
}

/// The wit-bindgen runtime, re-exported so that function crates need not
/// depend on wit-bindgen themselves.
#[doc(hidden)]
pub use wit_bindgen::rt as __private_rt;

/// Export a [`Function`] implementation as the component's `init`,
/// `process` and `tick`. Use it exactly once per function crate (a
/// `cdylib`).
///
/// ```ignore
/// export_function!(Threshold);
/// ```
#[macro_export]
macro_rules! export_function {
    ($ty:ty) => {
        const _: () = {
            ::std::thread_local! {
                // One instance per component instance: WASM is single-threaded
                // and the host never re-enters a call.
                static STATE: ::core::cell::RefCell<$crate::__private::Instance<$ty>> =
                    const { ::core::cell::RefCell::new($crate::__private::Instance::new()) };
            }

            struct FoglineExport;

            impl $crate::__private::Guest for FoglineExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    STATE.with(|state| $crate::__private::init::<$ty>(state, config))
                }

                fn restore(
                    entries: $crate::__private::bindings::fogline::function::types::StateEntries,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    STATE.with(|state| $crate::__private::restore::<$ty>(state, entries))
                }

                fn process(
                    batch: $crate::__private::bindings::fogline::function::types::Batch,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    STATE.with(|state| $crate::__private::process::<$ty>(state, batch))
                }

                fn tick(now_ms: u64) -> ::core::result::Result<(), ::std::string::String> {
                    STATE.with(|state| $crate::__private::tick::<$ty>(state, now_ms))
                }
            }

            $crate::__private::export! {
                FoglineExport with_types_in $crate::__private::bindings
            }
        };
    };
}

/// Return early with an [`Error`] built like `format!`:
/// `bail!("field `{}` out of range", name)`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::new(::std::format!($($arg)*)))
    };
}
