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
    /// Rejected single inputs go to dead letters; the rest goes on. A call
    /// that fails (trap, error, invalid output) is retried on each half of
    /// its batch, recursively, so one poison message dead-letters itself and
    /// not its neighbours (see [`call_isolating`]).
    fn run_from(&mut self, from: usize, mut batch: Vec<Message>, result: &mut ChainResult) {
        for f in self.functions.iter_mut().skip(from) {
            if batch.is_empty() {
                return;
            }
            let mut budget = ISOLATION_CALLS;
            batch = call_isolating(&self.name, f, batch, result, &mut budget);
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

/// Extra calls one step may spend isolating failing inputs. Bounds the cost
/// of a function that fails on everything: beyond it, what is left of the
/// failing batch is dead-lettered whole.
const ISOLATION_CALLS: usize = 64;

/// Calls `f` on `batch`. On failure, unless the batch is a single message,
/// the failure was a deadline (each retry would cost another deadline) or
/// the budget is spent, retries each half separately and concatenates what
/// the halves emit, in order. Whatever still fails is dead-lettered with the
/// error. The instance restarts from `init` after a trap, so a stateful
/// function loses its state, as it would on any trap.
fn call_isolating(
    pipeline: &str,
    f: &mut FunctionInstance,
    batch: Vec<Message>,
    result: &mut ChainResult,
    budget: &mut usize,
) -> Vec<Message> {
    let name = f.name().to_string();
    match f.process(&batch) {
        Ok(out) => take_output(pipeline, &name, batch, out, result),
        Err(e)
            if batch.len() > 1 && *budget >= 2 && !matches!(e, FunctionError::Timeout { .. }) =>
        {
            *budget -= 2;
            metrics::counter!("fogline_function_failures_total", "function" => name.clone())
                .increment(1);
            tracing::debug!(pipeline, function = %name, error = %e, inputs = batch.len(), "Function failed; retrying in halves to isolate the failing input.");
            let mut right = batch;
            let left: Vec<Message> = right.drain(..right.len() / 2).collect();
            let mut out = call_isolating(pipeline, f, left, result, budget);
            out.append(&mut call_isolating(pipeline, f, right, result, budget));
            out
        }
        Err(e) => {
            fail_batch(pipeline, &name, &e, batch, result);
            Vec::new()
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
    tracing::warn!(pipeline, function, error = %e, inputs = batch.len(), "Function failed; its input sent to dead letters.");
    let error = e.to_string();
    for m in batch {
        result
            .dead_letters
            .push(dead(pipeline, function, error.clone(), m));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::functions::{FunctionRuntime, Limits, RuntimeOptions};

    fn hostile_chain(mode: &str) -> Chain {
        let rt = FunctionRuntime::new(RuntimeOptions {
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
        })
        .unwrap();
        let module = rt.load(fogline_modules::hostile()).unwrap();
        let config = format!(r#"{{"mode":"{mode}"}}"#);
        let f = FunctionInstance::new(&rt, &module, "crasher", &config, Limits::default()).unwrap();
        Chain::new("p".into(), vec![f])
    }

    fn msg(payload: &str) -> Message {
        Message {
            stream: "s/1".into(),
            timestamp_ms: 1,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn one_poison_message_dead_letters_only_itself() {
        let mut chain = hostile_chain("trap");
        let mut batch: Vec<Message> = (0..100).map(|i| msg(&format!("m{i}"))).collect();
        batch[37] = msg("boom");
        batch[80] = msg("boom");
        let mut result = ChainResult::default();
        chain.process(batch, &mut result);
        let kept: Vec<String> = result
            .outputs
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        let want: Vec<String> = (0..100)
            .filter(|i| *i != 37 && *i != 80)
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(kept, want, "neighbours pass, in order");
        assert_eq!(result.dead_letters.len(), 2);
        assert!(result
            .dead_letters
            .iter()
            .all(|d| d.message.payload == b"boom"
                && d.function == "crasher"
                && d.error.contains("trapped")));
    }

    #[test]
    fn a_function_failing_on_everything_is_bounded_and_loses_nothing_silently() {
        let mut chain = hostile_chain("fail");
        let batch: Vec<Message> = (0..1000).map(|i| msg(&format!("m{i}"))).collect();
        let mut result = ChainResult::default();
        chain.process(batch, &mut result);
        assert!(result.outputs.is_empty());
        assert_eq!(result.dead_letters.len(), 1000, "every input accounted for");
    }
}
