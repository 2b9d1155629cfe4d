//! Logging through the daemon's `tracing`, tagged with the function's name.
//!
//! ```ignore
//! use fogline_sdk::prelude::*;
//! log::info!("window closed: {} readings", count);
//! ```
//!
//! Logging costs a host call per line: log per batch or per event, not per
//! message. stdout and stderr are discarded by the host.

pub use crate::bindings::fogline::function::host::Level;
pub use crate::{debug, error, info, trace, warn};

/// Log `text` at `level`.
pub fn log(level: Level, text: &str) {
    crate::host::log(level, text);
}

/// Log at trace level, `format!`-style.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Trace, &::std::format!($($arg)*)) };
}

/// Log at debug level, `format!`-style.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Debug, &::std::format!($($arg)*)) };
}

/// Log at info level, `format!`-style.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Info, &::std::format!($($arg)*)) };
}

/// Log at warn level, `format!`-style.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Warn, &::std::format!($($arg)*)) };
}

/// Log at error level, `format!`-style.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Error, &::std::format!($($arg)*)) };
}
