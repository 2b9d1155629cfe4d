//! Telemetry of the pipeline as named events; metric names as constants.

/// Times a function's circuit breaker opened, by `pipeline/function`.
pub const BREAKER_OPENED_TOTAL: &str = "fogline_function_breaker_opened_total";
/// Inputs parked behind an open breaker, by `pipeline/function`.
pub const HELD_TOTAL: &str = "fogline_function_held_total";
/// Versions promoted after probation or rolled back, by `pipeline/function`
/// and outcome (`promoted`, `rolled_back`).
pub const SWAPS_TOTAL: &str = "fogline_function_swaps_total";
/// Dead letters written, by pipeline, function and reason.
pub const DEAD_LETTERS_TOTAL: &str = "fogline_pipeline_dead_letters_total";

/// HELP texts, registered once per process.
pub fn describe() {
    metrics::describe_counter!(
        BREAKER_OPENED_TOTAL,
        "Times a function's circuit breaker opened after repeated failures."
    );
    metrics::describe_counter!(
        HELD_TOTAL,
        "Inputs parked in the outbox behind a function's open circuit breaker."
    );
    metrics::describe_counter!(
        SWAPS_TOTAL,
        "New function versions promoted after probation, or rolled back."
    );
    metrics::describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Dead letters written, by pipeline, function and reason."
    );
}

/// A breaker opened.
pub struct BreakerOpened<'a> {
    /// `pipeline/function`.
    pub owner: &'a str,
}

impl BreakerOpened<'_> {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(BREAKER_OPENED_TOTAL, "function" => self.owner.to_string()).increment(1);
    }
}

/// A candidate version was promoted or rolled back.
pub struct Swapped<'a> {
    /// `pipeline/function`.
    pub owner: &'a str,
    /// `promoted` or `rolled_back`.
    pub outcome: &'static str,
}

impl Swapped<'_> {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(SWAPS_TOTAL, "function" => self.owner.to_string(), "outcome" => self.outcome)
            .increment(1);
    }
}
