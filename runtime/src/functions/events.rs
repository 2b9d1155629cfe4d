//! Telemetry of the function runtime as named events: one type per event,
//! which logs once and moves its metrics. Metric names are the constants
//! below, used by emitters and tests alike.

use std::time::Duration;

use super::FunctionError;

/// Calls into functions, by function and kind (`process`, `tick`).
pub const CALLS_TOTAL: &str = "fogline_function_calls_total";
/// Wall time of a call, by function: a histogram.
pub const CALL_SECONDS: &str = "fogline_function_call_seconds";
/// CPU time of each call, by function: a histogram (its `_sum` is the total
/// CPU time a function used).
pub const CALL_CPU_SECONDS: &str = "fogline_function_call_cpu_seconds";
/// Failed calls, by function and kind (`trap`, `timeout`, `memory`,
/// `blocked`, `invalid_output`, `error`, `state_limit`).
pub const FAILURES_TOTAL: &str = "fogline_function_failures_total";
/// Instance restarts (each a rollback to the last good state), by function.
pub const RESTARTS_TOTAL: &str = "fogline_function_restarts_total";
/// Log lines a function wrote past its rate limit, by function.
pub const LOGS_SUPPRESSED_TOTAL: &str = "fogline_function_logs_suppressed_total";
/// Bytes of durable state, by function.
pub const STATE_BYTES: &str = "fogline_function_state_bytes";

/// HELP texts, registered once per process.
pub fn describe() {
    metrics::describe_counter!(
        CALLS_TOTAL,
        "Calls into WASM functions, by function and kind."
    );
    metrics::describe_histogram!(
        CALL_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of calls into WASM functions (a batch or a tick), by function."
    );
    metrics::describe_histogram!(
        CALL_CPU_SECONDS,
        metrics::Unit::Seconds,
        "CPU time of calls into WASM functions, by function (the sum is the total CPU time used)."
    );
    metrics::describe_counter!(
        FAILURES_TOTAL,
        "Failed function calls, by function and kind (trap, timeout, memory, blocked, invalid_output, error, state_limit)."
    );
    metrics::describe_counter!(
        RESTARTS_TOTAL,
        "Function instance restarts; each rolls the function back to its last good state."
    );
    metrics::describe_counter!(
        LOGS_SUPPRESSED_TOTAL,
        "Log lines functions wrote past their rate limit, dropped."
    );
    metrics::describe_gauge!(
        STATE_BYTES,
        metrics::Unit::Bytes,
        "Bytes of durable state a function holds (keys and values)."
    );
}

/// What a call was.
#[derive(Debug, Clone, Copy)]
pub enum CallKind {
    /// A batch.
    Process,
    /// A timer tick.
    Tick,
}

impl CallKind {
    fn as_str(self) -> &'static str {
        match self {
            CallKind::Process => "process",
            CallKind::Tick => "tick",
        }
    }
}

/// A call finished (or failed).
pub struct FunctionCalled<'a> {
    /// The function's name in the config.
    pub function: &'a str,
    /// Which export.
    pub kind: CallKind,
    /// Wall time.
    pub elapsed: Duration,
    /// CPU time of the calling thread.
    pub cpu: Duration,
    /// Why it failed, if it did.
    pub failure: Option<&'a FunctionError>,
}

impl FunctionCalled<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        let function = self.function.to_string();
        metrics::counter!(CALLS_TOTAL, "function" => function.clone(), "kind" => self.kind.as_str())
            .increment(1);
        metrics::histogram!(CALL_SECONDS, "function" => function.clone())
            .record(self.elapsed.as_secs_f64());
        metrics::histogram!(CALL_CPU_SECONDS, "function" => function.clone())
            .record(self.cpu.as_secs_f64());
        if let Some(e) = self.failure {
            metrics::counter!(FAILURES_TOTAL, "function" => function, "kind" => e.kind())
                .increment(1);
            tracing::debug!(
                function = self.function,
                kind = self.kind.as_str(),
                error = %e,
                "Function call failed."
            );
        }
    }
}

/// An instance was started (at load, or after a failed call).
pub struct FunctionStarted<'a> {
    /// The function's name in the config.
    pub function: &'a str,
    /// Bytes of state it was restored with.
    pub state_bytes: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl FunctionStarted<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::gauge!(STATE_BYTES, "function" => self.function.to_string())
            .set(self.state_bytes as f64);
        tracing::debug!(
            function = self.function,
            state_bytes = self.state_bytes,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "Function instance started."
        );
    }
}

/// An instance is thrown away to be started afresh from its last good state.
pub struct FunctionRestarted<'a> {
    /// The function's name in the config.
    pub function: &'a str,
}

impl FunctionRestarted<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(RESTARTS_TOTAL, "function" => self.function.to_string()).increment(1);
    }
}

/// Log lines dropped by the rate limit during a call.
pub struct FunctionLogsSuppressed<'a> {
    /// The function's name in the config.
    pub function: &'a str,
    /// How many.
    pub lines: u64,
}

impl FunctionLogsSuppressed<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(LOGS_SUPPRESSED_TOTAL, "function" => self.function.to_string())
            .increment(self.lines);
    }
}

/// The CPU time of the calling thread, for measuring a call.
pub struct CpuClock(Option<Duration>);

impl CpuClock {
    /// Read the clock now.
    pub fn start() -> Self {
        Self(thread_cpu())
    }

    /// CPU time since `start` (zero where the clock is unavailable).
    pub fn elapsed(&self) -> Duration {
        match (self.0, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        }
    }
}

fn thread_cpu() -> Option<Duration> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}
