//! [`FunctionError`]: everything that can go wrong loading or calling a
//! function, each naming the function (or module path) and what happened.

use std::path::PathBuf;
use std::time::Duration;

/// An error from the function runtime.
#[derive(thiserror::Error, Debug, Clone)]
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
    /// The function returned `Err` for the whole call. The instance is
    /// rolled back to its state before the call.
    #[error("function `{function}` failed: {message}")]
    Failed {
        /// The function's name in the config.
        function: String,
        /// What the function said.
        message: String,
    },
    /// The function handed the host output that breaks the contract: a span
    /// outside its buffer, an out-of-range or duplicate index, more messages
    /// or bytes than a call may produce. The instance is restarted before its
    /// next call. (A single message with a bad stream name or an oversized
    /// payload is not this: that message's input is dead-lettered.)
    #[error("function `{function}` returned invalid output: {reason}")]
    InvalidOutput {
        /// The function's name in the config.
        function: String,
        /// What was wrong.
        reason: String,
    },
    /// The function tried to block (sleep, wait on a pollable): the call was
    /// stopped. Functions get time from messages and ticks.
    #[error(
        "function `{function}` tried to block (a sleep or a blocking poll), which functions may not do; the call was stopped"
    )]
    Blocked {
        /// The function's name in the config.
        function: String,
    },
    /// The function's durable state would exceed its limit.
    #[error(
        "function `{function}`'s state would be {bytes} bytes, the limit is {limit_bytes} bytes (max_state_mib)"
    )]
    StateLimit {
        /// The function's name in the config.
        function: String,
        /// The state's size after the call.
        bytes: usize,
        /// `Limits::max_state_bytes`.
        limit_bytes: usize,
    },
}

impl FunctionError {
    /// A short, stable name for the kind of failure (metrics label, dead
    /// letter reason).
    pub fn kind(&self) -> &'static str {
        match self {
            FunctionError::Engine { .. } => "engine",
            FunctionError::Load { .. } => "load",
            FunctionError::Init { .. } => "init",
            FunctionError::Trap { .. } => "trap",
            FunctionError::Timeout { .. } => "timeout",
            FunctionError::MemoryLimit { .. } => "memory",
            FunctionError::Failed { .. } => "error",
            FunctionError::InvalidOutput { .. } => "invalid_output",
            FunctionError::Blocked { .. } => "blocked",
            FunctionError::StateLimit { .. } => "state_limit",
        }
    }
}
