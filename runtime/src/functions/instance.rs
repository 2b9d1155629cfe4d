//! [`FunctionInstance`]: one running function, its store, its limits, the
//! calls into it and the validation of everything it returns.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{self, Level, WitOutput};
use super::engine::Module;
use super::error::FunctionError;
use super::{Limits, Message, Output, Rejection};

/// Longest stream name a function may emit (bytes).
pub const MAX_STREAM_BYTES: usize = 256;
/// Log lines a function may write per call; the rest are counted and
/// reported once, so a chatty guest cannot flood the daemon's log.
const LOG_LINES_PER_CALL: u32 = 100;
/// Longest log line / error text kept from a guest (bytes).
const MAX_GUEST_TEXT: usize = 4096;
/// Most table elements a guest may grow a table to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Per-instance store data.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    function: Arc<str>,
    logs_left: u32,
    logs_suppressed: u64,
    /// Panic message reported through the SDK's panic hook during the
    /// current call, to explain the trap that follows.
    last_panic: Option<String>,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::fogline::function::types::Host for StoreState {}

impl bindings::fogline::function::host::Host for StoreState {
    fn log(&mut self, level: Level, text: String) {
        let text = truncate(&text, MAX_GUEST_TEXT);
        // The SDK's panic hook logs "panic: …" at error level just before
        // the guest aborts; keep it to explain the trap.
        if level == Level::Error && text.starts_with("panic: ") {
            // "panicked at src/lib.rs:1:2: <message>", on one line.
            self.last_panic = Some(text.trim_start_matches("panic: ").replace('\n', " "));
        }
        if self.logs_left == 0 {
            self.logs_suppressed += 1;
            return;
        }
        self.logs_left -= 1;
        let function = &*self.function;
        match level {
            Level::Trace => tracing::trace!(target: "fogline::function", function, "{text}"),
            Level::Debug => tracing::debug!(target: "fogline::function", function, "{text}"),
            Level::Info => tracing::info!(target: "fogline::function", function, "{text}"),
            Level::Warn => tracing::warn!(target: "fogline::function", function, "{text}"),
            Level::Error => tracing::error!(target: "fogline::function", function, "{text}"),
        }
    }
}

/// Caps linear memory (and tables). A refused growth makes `memory.grow`
/// return -1; a Rust guest then aborts, and the recorded request lets the
/// host report the trap as [`FunctionError::MemoryLimit`].
struct MemoryLimiter {
    limit: usize,
    /// Largest refused request during the current call.
    refused: Option<usize>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(self.refused.map_or(desired, |r| r.max(desired)));
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A live instance: its store and its bound exports.
struct Live {
    store: Store<StoreState>,
    exports: bindings::Function,
}

/// One running function: an instance of a [`Module`] with its own memory,
/// state and limits. Reused across batches.
///
/// A trap, timeout, memory-cap hit or invalid output poisons the instance;
/// the next [`process`](Self::process) or [`tick`](Self::tick) restarts it
/// first (fresh store, re-instantiate, re-`init`), so the state it kept is
/// lost. A function that returns `Err` for a call
/// ([`FunctionError::Failed`]) keeps running with its state.
pub struct FunctionInstance {
    name: Arc<str>,
    module: Module,
    config_json: String,
    limits: Limits,
    /// `None` while poisoned.
    live: Option<Live>,
    restarts: u64,
}

/// Which export a call goes to.
enum Call<'a> {
    Process(&'a [Message]),
    Tick(u64),
}

impl FunctionInstance {
    /// Instantiate `module` and call its `init(config_json)`. `name` is the
    /// function's name in the config, used in errors and logs.
    pub fn new(
        rt: &super::FunctionRuntime,
        module: &Module,
        name: &str,
        config_json: &str,
        limits: Limits,
    ) -> Result<Self, FunctionError> {
        // The module already holds the engine and linker of the runtime it
        // was loaded by; `rt` is taken so instances visibly belong to one.
        let _ = rt;
        let mut instance = Self {
            name: Arc::from(name),
            module: module.clone(),
            config_json: config_json.to_string(),
            limits,
            live: None,
            restarts: 0,
        };
        instance.live = Some(instance.start()?);
        Ok(instance)
    }

    /// The function's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module it runs.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// How many times it was restarted (after traps, timeouts, memory-cap
    /// hits, or by [`restart`](Self::restart)).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Whether the last call poisoned the instance (the next call restarts it).
    pub fn is_poisoned(&self) -> bool {
        self.live.is_none()
    }

    /// Run a batch. Rejected messages are listed by index in
    /// [`Output::rejected`]; everything returned has been validated against
    /// the [`Limits`].
    pub fn process(&mut self, batch: &[Message]) -> Result<Output, FunctionError> {
        self.call(Call::Process(batch))
    }

    /// Fire the function's timer with the host's wall clock (ms since the
    /// Unix epoch).
    pub fn tick(&mut self, now_ms: u64) -> Result<Output, FunctionError> {
        self.call(Call::Tick(now_ms))
    }

    /// Throw the instance away and start a fresh one (new store,
    /// re-instantiate, re-`init`). On error the instance stays poisoned and
    /// the next call tries again.
    pub fn restart(&mut self) -> Result<(), FunctionError> {
        self.live = None;
        self.restarts += 1;
        self.live = Some(self.start()?);
        Ok(())
    }

    /// A fresh store and instance, initialised.
    fn start(&self) -> Result<Live, FunctionError> {
        let shared = &self.module.inner.shared;
        // Grants nothing: no preopens, env, args or network (said
        // explicitly, not left to the builder's defaults); stdin is empty
        // and stdout/stderr are discarded (the SDK logs through `host.log`
        // instead). Clocks and random numbers stay available.
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut store = Store::new(
            &shared.engine,
            StoreState {
                wasi,
                table: ResourceTable::new(),
                limiter: MemoryLimiter {
                    limit: self.limits.memory_bytes,
                    refused: None,
                },
                function: Arc::clone(&self.name),
                logs_left: LOG_LINES_PER_CALL,
                logs_suppressed: 0,
                last_panic: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        arm(&mut store, shared.epoch_tick, &self.limits);

        let init_err = |message: String| FunctionError::Init {
            function: self.name.to_string(),
            message,
        };
        let exports = match self.module.inner.pre.instantiate(&mut store) {
            Ok(exports) => exports,
            Err(e) => {
                return Err(match classify(&self.name, &self.limits, &mut store, e) {
                    // Not a trap of the guest's code: an instantiation failure.
                    FunctionError::Trap { message, .. } => init_err(format!(
                        "instantiating {}: {message}",
                        self.module.path().display()
                    )),
                    other => other,
                });
            }
        };
        let result = exports.call_init(&mut store, &self.config_json);
        finish_call(&mut store, &self.name);
        match result {
            Ok(Ok(())) => Ok(Live { store, exports }),
            Ok(Err(message)) => Err(init_err(truncate(&message, MAX_GUEST_TEXT).to_string())),
            Err(e) => Err(match classify(&self.name, &self.limits, &mut store, e) {
                FunctionError::Trap { message, .. } => init_err(format!("init trapped: {message}")),
                other => other,
            }),
        }
    }

    fn call(&mut self, call: Call<'_>) -> Result<Output, FunctionError> {
        if self.live.is_none() {
            self.restart()?;
        }
        let Some(live) = self.live.as_mut() else {
            // `restart` either filled `live` or returned an error above.
            return Err(FunctionError::Trap {
                function: self.name.to_string(),
                message: "instance unavailable after restart".into(),
            });
        };
        arm(
            &mut live.store,
            self.module.inner.shared.epoch_tick,
            &self.limits,
        );
        let (result, batch_len) = match call {
            Call::Process(batch) => (
                live.exports.call_process(&mut live.store, batch),
                batch.len(),
            ),
            Call::Tick(now_ms) => (live.exports.call_tick(&mut live.store, now_ms), 0),
        };
        finish_call(&mut live.store, &self.name);
        match result {
            Ok(Ok(output)) => {
                let validated = validate(output, batch_len, &self.limits, &self.name);
                if validated.is_err() {
                    // The guest broke the contract: its state (and the
                    // memory it grew to build that output) is suspect.
                    self.live = None;
                }
                validated
            }
            Ok(Err(message)) => Err(FunctionError::Failed {
                function: self.name.to_string(),
                message: truncate(&message, MAX_GUEST_TEXT).to_string(),
            }),
            Err(e) => {
                // After a trap the component instance must not be entered
                // again: drop it, restart lazily on the next call.
                let err = classify(&self.name, &self.limits, &mut live.store, e);
                self.live = None;
                Err(err)
            }
        }
    }
}

/// Reset the per-call budgets: deadline, memory report, log quota.
fn arm(store: &mut Store<StoreState>, epoch_tick: Duration, limits: &Limits) {
    let tick = epoch_tick.as_nanos().max(1);
    // +1: the current epoch tick is already partly over, so this makes the
    // deadline at least `call_timeout`.
    let ticks = limits.call_timeout.as_nanos().div_ceil(tick) + 1;
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    let data = store.data_mut();
    data.limiter.refused = None;
    data.logs_left = LOG_LINES_PER_CALL;
    data.last_panic = None;
}

/// After a call: report log lines that were dropped.
fn finish_call(store: &mut Store<StoreState>, name: &str) {
    let data = store.data_mut();
    if data.logs_suppressed > 0 {
        tracing::warn!(
            target: "fogline::function",
            function = name,
            suppressed = data.logs_suppressed,
            "Function logged more than {LOG_LINES_PER_CALL} lines in one call; the rest were dropped."
        );
        data.logs_suppressed = 0;
    }
}

/// Turn a wasmtime error from a call into the right [`FunctionError`].
fn classify(
    name: &str,
    limits: &Limits,
    store: &mut Store<StoreState>,
    e: wasmtime::Error,
) -> FunctionError {
    let data = store.data_mut();
    classify_plain(
        name,
        limits,
        data.limiter.refused,
        data.last_panic.take(),
        e,
    )
}

fn classify_plain(
    name: &str,
    limits: &Limits,
    refused: Option<usize>,
    panic: Option<String>,
    e: wasmtime::Error,
) -> FunctionError {
    let function = name.to_string();
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return FunctionError::Timeout {
            function,
            limit: limits.call_timeout,
        };
    }
    if let Some(requested_bytes) = refused {
        return FunctionError::MemoryLimit {
            function,
            limit_bytes: limits.memory_bytes,
            requested_bytes,
        };
    }
    // The full error (with the wasm backtrace) is for debugging; the error
    // itself, which ends up in dead-letter rows, stays one line.
    tracing::debug!(target: "fogline::function", function, error = ?e, "Function trapped.");
    let what = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    let message = match panic {
        Some(panic) => format!("{panic} ({what})"),
        None => what,
    };
    FunctionError::Trap { function, message }
}

/// Check everything a function returned against the limits and the batch.
fn validate(
    output: WitOutput,
    batch_len: usize,
    limits: &Limits,
    name: &str,
) -> Result<Output, FunctionError> {
    let invalid = |reason: String| FunctionError::InvalidOutput {
        function: name.to_string(),
        reason,
    };
    let WitOutput { messages, rejected } = output;
    if messages.len() > limits.max_output_messages {
        return Err(invalid(format!(
            "emitted {} messages in one call, the limit is {}",
            messages.len(),
            limits.max_output_messages
        )));
    }
    for (i, msg) in messages.iter().enumerate() {
        if let Err(problem) = check_stream(&msg.stream) {
            return Err(invalid(format!("message {i}: {problem}")));
        }
        if msg.payload.len() > limits.max_payload_bytes {
            return Err(invalid(format!(
                "message {i} on `{}`: payload is {} bytes, the limit is {} bytes",
                msg.stream,
                msg.payload.len(),
                limits.max_payload_bytes
            )));
        }
    }
    if rejected.len() > batch_len {
        return Err(invalid(format!(
            "rejected {} messages of a batch of {batch_len}",
            rejected.len()
        )));
    }
    let mut seen = HashSet::with_capacity(rejected.len());
    let mut out = Vec::with_capacity(rejected.len());
    for r in rejected {
        let index = r.index as usize;
        if index >= batch_len {
            return Err(invalid(format!(
                "rejected index {index}, but the batch has {batch_len} messages"
            )));
        }
        if !seen.insert(index) {
            return Err(invalid(format!("rejected index {index} twice")));
        }
        out.push(Rejection {
            index,
            error: truncate(&r.error, MAX_GUEST_TEXT).to_string(),
        });
    }
    Ok(Output {
        messages,
        rejected: out,
    })
}

/// A stream name is non-empty, at most [`MAX_STREAM_BYTES`], and a valid
/// MQTT topic name (no wildcards, no NUL) so it can be routed and
/// republished.
fn check_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty() {
        return Err("empty stream name".into());
    }
    if stream.len() > MAX_STREAM_BYTES {
        return Err(format!(
            "stream name is {} bytes, the limit is {MAX_STREAM_BYTES} (`{}…`)",
            stream.len(),
            truncate(stream, 64)
        ));
    }
    if let Some(c) = stream.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Err(format!(
            "stream name `{}` contains {c:?}, which a topic name cannot",
            stream.escape_debug()
        ));
    }
    Ok(())
}

/// At most `max` bytes of `s`, cut at a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
