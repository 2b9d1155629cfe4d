//! [`FunctionError`]: everything that can go wrong loading or calling a
//! function, each naming the function (or module path) and what happened.

use std::path::PathBuf;
use std::time::Duration;

/// An error from the function runtime.
#[derive(thiserror::Error, Debug)]
pub enum FunctionError {
    /// The WASM engine could not be set up (bad cache directory, …).
    #[error("cannot set up the WASM engine: {reason}")]
    Engine {
        /// What failed.
        reason: String,
    },
    /// A module could not be read, compiled, or does not implement the
    /// `fogline:function/function` world.
    #[error("cannot load WASM module {}: {reason}", path.display())]
    Load {
        /// The module file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Instantiation failed, or the function's `init` rejected its config.
    #[error("function `{function}` failed to start: {message}")]
    Init {
        /// The function's name in the config.
        function: String,
        /// What the function (or the runtime) said.
        message: String,
    },
    /// The function trapped (a panic, `unreachable`, an out-of-bounds access).
    /// The instance is restarted before its next call.
    #[error("function `{function}` trapped: {message}")]
    Trap {
        /// The function's name in the config.
        function: String,
        /// The trap and, if the guest panicked, its panic message.
        message: String,
    },
    /// The call ran past its deadline and was interrupted. The instance is
    /// restarted before its next call.
    #[error("function `{function}` exceeded its call deadline of {limit:?} and was interrupted")]
    Timeout {
        /// The function's name in the config.
        function: String,
        /// The deadline (`Limits::call_timeout`).
        limit: Duration,
    },
    /// The function tried to grow its memory past its cap and trapped. The
    /// instance is restarted before its next call.
    #[error(
        "function `{function}` ran out of memory: it asked for {requested_bytes} bytes, \
         the limit is {limit_bytes} bytes"
    )]
    MemoryLimit {
        /// The function's name in the config.
        function: String,
        /// `Limits::memory_bytes`.
        limit_bytes: usize,
        /// The memory size the failed growth asked for.
        requested_bytes: usize,
    },
    /// The function returned `Err` for the whole call. The instance stays
    /// usable.
    #[error("function `{function}` failed: {message}")]
    Failed {
        /// The function's name in the config.
        function: String,
        /// What the function said.
        message: String,
    },
    /// The function returned something the host refuses: an out-of-range or
    /// duplicate rejection index, an invalid stream, an oversized payload,
    /// too many messages. The instance is restarted before its next call.
    #[error("function `{function}` returned invalid output: {reason}")]
    InvalidOutput {
        /// The function's name in the config.
        function: String,
        /// What was wrong.
        reason: String,
    },
}

impl FunctionError {
    /// Whether a call that failed with this error poisoned the instance
    /// (trap, timeout, memory cap, invalid output), so that it will be
    /// restarted before its next call.
    pub fn restarts_instance(&self) -> bool {
        matches!(
            self,
            FunctionError::Trap { .. }
                | FunctionError::Timeout { .. }
                | FunctionError::MemoryLimit { .. }
                | FunctionError::InvalidOutput { .. }
        )
    }
}
