//! A pipeline's chain of functions, run over one batch.

use crate::functions::{FunctionError, FunctionInstance, Output};
use crate::message::Message;
use crate::outbox::DeadLetter;

/// What one batch (or tick) through a chain produced.
#[derive(Debug, Default)]
pub struct ChainResult {
    /// Records for the outbox.
    pub outputs: Vec<Message>,
    /// Inputs refused or lost to a failing function.
    pub dead_letters: Vec<DeadLetter>,
}

/// One pipeline: a name and its functions, in order.
pub struct Chain {
    /// The pipeline's name.
    pub name: String,
    functions: Vec<FunctionInstance>,
}

fn dead(pipeline: &str, function: &str, error: String, message: Message) -> DeadLetter {
    DeadLetter {
        pipeline: pipeline.to_string(),
        function: function.to_string(),
        error,
        payload_size: message.payload.len(),
        message,
    }
}

impl Chain {
    /// A chain over already-initialised instances.
    pub fn new(name: String, functions: Vec<FunctionInstance>) -> Self {
        Self { name, functions }
    }

    /// Run `batch` through every function from `from` on.
    ///
    /// A function that fails (trap, deadline, error, invalid output) fails the
    /// batch at that step: its input goes to dead letters with the error, and
    /// the instance restarts on its next call. Rejected single inputs go to
    /// dead letters; the rest goes on.
    fn run_from(&mut self, from: usize, mut batch: Vec<Message>, result: &mut ChainResult) {
        for f in self.functions.iter_mut().skip(from) {
            if batch.is_empty() {
                return;
            }
            match f.process(&batch) {
                Ok(out) => batch = take_output(&self.name, f.name(), batch, out, result),
                Err(e) => {
                    fail_batch(&self.name, f.name(), &e, batch, result);
                    return;
                }
            }
        }
        result.outputs.append(&mut batch);
    }

    /// Process one batch of inputs.
    pub fn process(&mut self, batch: Vec<Message>, result: &mut ChainResult) {
        self.run_from(0, batch, result);
    }

    /// Call every function's `tick`; what function `i` emits goes through
    /// functions `i+1..`.
    pub fn tick(&mut self, now_ms: u64, result: &mut ChainResult) {
        for i in 0..self.functions.len() {
            let f = &mut self.functions[i];
            let out = match f.tick(now_ms) {
                Ok(out) => out,
                Err(e) => {
                    metrics::counter!("fogline_function_failures_total", "function" => f.name().to_string()).increment(1);
                    tracing::warn!(pipeline = %self.name, function = %f.name(), error = %e, "Function tick failed.");
                    continue;
                }
            };
            let name = f.name().to_string();
            let emitted = take_output(&self.name, &name, Vec::new(), out, result);
            self.run_from(i + 1, emitted, result);
        }
    }
}

fn take_output(
    pipeline: &str,
    function: &str,
    inputs: Vec<Message>,
    out: Output,
    result: &mut ChainResult,
) -> Vec<Message> {
    if !out.rejected.is_empty() {
        metrics::counter!("fogline_pipeline_dead_letters_total", "pipeline" => pipeline.to_string(), "function" => function.to_string())
            .increment(out.rejected.len() as u64);
        let mut inputs: Vec<Option<Message>> = inputs.into_iter().map(Some).collect();
        for r in out.rejected {
            if let Some(m) = inputs.get_mut(r.index).and_then(Option::take) {
                tracing::debug!(pipeline, function, stream = %m.stream, error = %r.error, "Input rejected.");
                result
                    .dead_letters
                    .push(dead(pipeline, function, r.error, m));
            }
        }
    }
    out.messages
}

fn fail_batch(
    pipeline: &str,
    function: &str,
    e: &FunctionError,
    batch: Vec<Message>,
    result: &mut ChainResult,
) {
    metrics::counter!("fogline_function_failures_total", "function" => function.to_string())
        .increment(1);
    metrics::counter!("fogline_pipeline_dead_letters_total", "pipeline" => pipeline.to_string(), "function" => function.to_string())
        .increment(batch.len() as u64);
    tracing::warn!(pipeline, function, error = %e, inputs = batch.len(), "Function failed; batch sent to dead letters.");
    let error = e.to_string();
    for m in batch {
        result
            .dead_letters
            .push(dead(pipeline, function, error.clone(), m));
    }
}
