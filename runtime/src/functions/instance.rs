//! [`FunctionInstance`]: one running function, its store, its limits, its
//! durable state, and the calls into it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::bindings::{self, Batch, StateEntries};
use super::engine::Module;
use super::error::FunctionError;
use super::events;
use super::imports::BLOCKING_REFUSED;
use super::output::{truncate, CallOutput, MAX_GUEST_TEXT};
use super::sandbox::{StoreState, MAX_COMPONENT_HANDLES};
use super::{Limits, Message, Output, StateChange};

/// Most bytes one `restore` call hands over (state is restored in chunks).
const RESTORE_CHUNK_BYTES: usize = 1 << 20;
/// Most bytes the guest may hand the host in one host call or return value.
const HOSTCALL_FUEL: usize = 96 << 20;

/// A live instance: its store and its bound exports.
struct Live {
    store: Store<StoreState>,
    exports: bindings::Function,
}

/// One running function: an instance of a [`Module`] with its own memory,
/// limits and durable state. Reused across batches.
///
/// **State.** The instance keeps a copy of its durable state as of its last
/// successful call (`state`). Every call that fails — a trap, a missed
/// deadline, a memory-cap hit, a broken output contract, an `Err` for the
/// whole call — *poisons* the instance: its memory may hold changes of the
/// failed call. [`restart`](Self::restart) (done lazily by the next call)
/// starts a fresh instance and restores that state, so the function resumes
/// exactly after its last successful call. The caller commits each call's
/// [`Output::state`] with the call's outputs; after a crash, a new instance
/// [`start`](Self::start)s from the committed state.
pub struct FunctionInstance {
    name: Arc<str>,
    module: Module,
    config_json: String,
    limits: Limits,
    /// `None` while poisoned.
    live: Option<Live>,
    restarts: u64,
    /// Durable state as of the last successful call.
    state: BTreeMap<Vec<u8>, Vec<u8>>,
    state_bytes: usize,
    /// Lowering buffers, reused across calls.
    scratch: Batch,
}

/// Which export a call goes to.
enum Call<'a> {
    Process(&'a [Message]),
    Tick(u64),
}

impl FunctionInstance {
    /// Instantiate `module` with no state and call its `init(config_json)`.
    /// `name` is the function's name in the config, used in errors and logs.
    pub fn new(
        rt: &super::FunctionRuntime,
        module: &Module,
        name: &str,
        config_json: &str,
        limits: Limits,
    ) -> Result<Self, FunctionError> {
        Self::start(rt, module, name, config_json, limits, BTreeMap::new())
    }

    /// Instantiate `module`, call `init(config_json)`, then `restore` with
    /// `state` (the committed entries).
    pub fn start(
        rt: &super::FunctionRuntime,
        module: &Module,
        name: &str,
        config_json: &str,
        limits: Limits,
        state: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<Self, FunctionError> {
        // The module already holds the engine and linker of the runtime it
        // was loaded by; `rt` is taken so instances visibly belong to one.
        let _ = rt;
        Self::from_module(module, name, config_json, limits, state)
    }

    /// [`start`](Self::start) with the runtime the module was loaded by.
    pub fn from_module(
        module: &Module,
        name: &str,
        config_json: &str,
        limits: Limits,
        state: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<Self, FunctionError> {
        let state_bytes = state.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut instance = Self {
            name: Arc::from(name),
            module: module.clone(),
            config_json: config_json.to_string(),
            limits,
            live: None,
            restarts: 0,
            state,
            state_bytes,
            scratch: Batch {
                payloads: Vec::new(),
                payload_ends: Vec::new(),
                timestamps_ms: Vec::new(),
                streams: Vec::new(),
                stream_names: Vec::new(),
                stream_name_ends: Vec::new(),
            },
        };
        instance.live = Some(instance.instantiate()?);
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

    /// The config it was started with (its `init` argument).
    pub fn config_json(&self) -> &str {
        &self.config_json
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many times it was restarted (after failed calls, or by
    /// [`restart`](Self::restart)).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Whether the last call failed (the next call restarts it first).
    pub fn is_poisoned(&self) -> bool {
        self.live.is_none()
    }

    /// Its durable state as of its last successful call.
    pub fn state(&self) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.state
    }

    /// Bytes of durable state (keys and values).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// Linear memory the instance holds, all memories together.
    pub fn memory_bytes(&self) -> usize {
        self.live
            .as_ref()
            .map_or(0, |l| l.store.data().limiter.used())
    }

    /// Run a batch. Everything returned was checked against the
    /// [`Limits`]; the state changes are already applied to
    /// [`state`](Self::state) and are for the caller to commit.
    pub fn process(&mut self, batch: &[Message]) -> Result<Output, FunctionError> {
        self.call(Call::Process(batch))
    }

    /// Fire the function's timer with the node's ingest clock (ms since the
    /// Unix epoch).
    pub fn tick(&mut self, now_ms: u64) -> Result<Output, FunctionError> {
        self.call(Call::Tick(now_ms))
    }

    /// Throw the instance away and start a fresh one from its state as of
    /// the last successful call (new store, re-instantiate, `init`,
    /// `restore`). On error it stays poisoned and the next call tries again.
    pub fn restart(&mut self) -> Result<(), FunctionError> {
        self.live = None;
        self.restarts += 1;
        events::FunctionRestarted {
            function: &self.name,
        }
        .emit();
        self.live = Some(self.instantiate()?);
        Ok(())
    }

    /// A fresh store and instance, initialised and restored.
    fn instantiate(&self) -> Result<Live, FunctionError> {
        let started = Instant::now();
        let shared = &self.module.inner.shared;
        let mut store = Store::new(
            &shared.engine,
            StoreState::new(Arc::clone(&self.name), self.limits.memory_bytes),
        );
        store.limiter(|s| &mut s.limiter);
        store.set_max_component_handles(MAX_COMPONENT_HANDLES);
        store.set_hostcall_fuel(HOSTCALL_FUEL);
        store.epoch_deadline_trap();
        arm(&mut store, shared.epoch_tick, self.limits.init_timeout);

        let init_err = |message: String| FunctionError::Init {
            function: self.name.to_string(),
            message,
        };
        let in_init = |store: &mut Store<StoreState>, e: wasmtime::Error, what: &str| {
            match classify(&self.name, &self.limits, self.limits.init_timeout, store, e) {
                FunctionError::Trap { message, .. } => init_err(format!("{what}: {message}")),
                FunctionError::Timeout { limit, .. } => init_err(format!(
                    "{what} did not return within its deadline of {limit:?} (init_timeout)"
                )),
                FunctionError::MemoryLimit {
                    limit_bytes,
                    requested_bytes,
                    ..
                } => init_err(format!(
                    "{what} ran out of memory: it asked for {requested_bytes} bytes, the limit is {limit_bytes} bytes"
                )),
                other => init_err(format!("{what}: {other}")),
            }
        };
        let exports = match self.module.inner.pre.instantiate(&mut store) {
            Ok(exports) => exports,
            Err(e) => {
                return Err(in_init(
                    &mut store,
                    e,
                    &format!("instantiating {}", self.module.path().display()),
                ))
            }
        };
        store.data_mut().arm(0);
        match exports.call_init(&mut store, &self.config_json) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(init_err(truncate(&message, MAX_GUEST_TEXT).to_string()))
            }
            Err(e) => return Err(in_init(&mut store, e, "init trapped")),
        }
        for chunk in chunks(&self.state) {
            store.data_mut().arm(0);
            match exports.call_restore(&mut store, &chunk) {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    return Err(init_err(format!(
                        "restoring its state: {}",
                        truncate(&message, MAX_GUEST_TEXT)
                    )))
                }
                Err(e) => return Err(in_init(&mut store, e, "restore trapped")),
            }
        }
        report_logs(&mut store);
        events::FunctionStarted {
            function: &self.name,
            state_bytes: self.state_bytes,
            elapsed: started.elapsed(),
        }
        .emit();
        Ok(Live { store, exports })
    }

    fn call(&mut self, call: Call<'_>) -> Result<Output, FunctionError> {
        if self.live.is_none() {
            self.restart()?;
        }
        let (kind, deadline) = match &call {
            Call::Process(batch) => (
                events::CallKind::Process,
                self.limits.call_timeout + self.limits.timeout_per_message * batch.len() as u32,
            ),
            Call::Tick(_) => (events::CallKind::Tick, self.limits.call_timeout),
        };
        let pending = match &call {
            Call::Process(batch) => {
                lower(&mut self.scratch, batch);
                CallOutput::process(
                    batch
                        .iter()
                        .map(|m| (m.stream.len() as u32, m.payload.len() as u32))
                        .collect(),
                    &self.limits,
                )
            }
            Call::Tick(_) => CallOutput::tick(&self.limits),
        };
        let Some(live) = self.live.as_mut() else {
            // `restart` either filled `live` or returned an error above.
            return Err(FunctionError::Trap {
                function: self.name.to_string(),
                message: "instance unavailable after restart".into(),
            });
        };
        let epoch_tick = self.module.inner.shared.epoch_tick;
        arm(&mut live.store, epoch_tick, deadline);
        let inputs = match &call {
            Call::Process(batch) => batch.len(),
            Call::Tick(_) => 0,
        };
        live.store.data_mut().arm(inputs);
        live.store.data_mut().call = Some(pending);
        let cpu = events::CpuClock::start();
        let started = Instant::now();
        let result = match call {
            Call::Process(_) => live.exports.call_process(&mut live.store, &self.scratch),
            Call::Tick(now_ms) => live.exports.call_tick(&mut live.store, now_ms),
        };
        let elapsed = started.elapsed();
        let output = live.store.data_mut().call.take();
        report_logs(&mut live.store);
        let outcome = match result {
            Ok(Ok(())) => match output {
                Some(call) => self.apply_state(call.out),
                None => Err(FunctionError::Trap {
                    function: self.name.to_string(),
                    message: "the call's output went missing".into(),
                }),
            },
            Ok(Err(message)) => Err(FunctionError::Failed {
                function: self.name.to_string(),
                message: truncate(&message, MAX_GUEST_TEXT).to_string(),
            }),
            Err(e) => Err(classify(
                &self.name,
                &self.limits,
                deadline,
                &mut live.store,
                e,
            )),
        };
        events::FunctionCalled {
            function: &self.name,
            kind,
            elapsed,
            cpu: cpu.elapsed(),
            failure: outcome.as_ref().err(),
        }
        .emit();
        if outcome.is_err() {
            // Whatever the call changed in the instance's memory must not
            // outlive it: restart from the state of the last success.
            self.live = None;
        }
        outcome
    }

    /// Apply a successful call's state writes to the instance's copy, within
    /// the state limit; the writes stay in the output for the commit.
    fn apply_state(&mut self, out: Output) -> Result<Output, FunctionError> {
        let mut bytes = self.state_bytes as i64;
        for w in &out.state {
            let old = self
                .state
                .get(&w.key)
                .map_or(0, |v| (w.key.len() + v.len()) as i64);
            let new = w
                .value
                .as_ref()
                .map_or(0, |v| (w.key.len() + v.len()) as i64);
            bytes += new - old;
        }
        let bytes = bytes.max(0) as usize;
        if bytes > self.limits.max_state_bytes {
            return Err(FunctionError::StateLimit {
                function: self.name.to_string(),
                bytes,
                limit_bytes: self.limits.max_state_bytes,
            });
        }
        for StateChange { key, value } in &out.state {
            match value {
                Some(v) => {
                    self.state.insert(key.clone(), v.clone());
                }
                None => {
                    self.state.remove(key);
                }
            }
        }
        self.state_bytes = bytes;
        Ok(out)
    }
}

/// Lower a batch into the columnar record, reusing the buffers.
fn lower(b: &mut Batch, batch: &[Message]) {
    b.payloads.clear();
    b.payload_ends.clear();
    b.timestamps_ms.clear();
    b.streams.clear();
    b.stream_names.clear();
    b.stream_name_ends.clear();
    // Sensor topics repeat within a batch: a small table, searched from the
    // most recent name (runs of one stream are common).
    let mut table: Vec<(usize, usize)> = Vec::new();
    let mut last: Option<(usize, u32)> = None;
    for m in batch {
        b.payloads.extend_from_slice(&m.payload);
        b.payload_ends.push(b.payloads.len() as u32);
        b.timestamps_ms.push(m.timestamp_ms);
        let name = m.stream.as_bytes();
        let idx = match last {
            Some((i, idx)) if &b.stream_names[table[i].0..table[i].1] == name => idx,
            _ => match table
                .iter()
                .position(|&(s, e)| &b.stream_names[s..e] == name)
            {
                Some(i) => i as u32,
                None => {
                    let start = b.stream_names.len();
                    b.stream_names.extend_from_slice(name);
                    b.stream_name_ends.push(b.stream_names.len() as u32);
                    table.push((start, b.stream_names.len()));
                    (table.len() - 1) as u32
                }
            },
        };
        last = Some((idx as usize, idx));
        b.streams.push(idx);
    }
}

/// The state in `restore`-sized chunks.
fn chunks(state: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<StateEntries> {
    let mut out = Vec::new();
    let mut cur = StateEntries {
        keys: Vec::new(),
        key_ends: Vec::new(),
        values: Vec::new(),
        value_ends: Vec::new(),
    };
    for (k, v) in state {
        cur.keys.extend_from_slice(k);
        cur.key_ends.push(cur.keys.len() as u32);
        cur.values.extend_from_slice(v);
        cur.value_ends.push(cur.values.len() as u32);
        if cur.keys.len() + cur.values.len() >= RESTORE_CHUNK_BYTES {
            out.push(std::mem::replace(
                &mut cur,
                StateEntries {
                    keys: Vec::new(),
                    key_ends: Vec::new(),
                    values: Vec::new(),
                    value_ends: Vec::new(),
                },
            ));
        }
    }
    if !cur.key_ends.is_empty() {
        out.push(cur);
    }
    out
}

/// Set the call's deadline.
fn arm(store: &mut Store<StoreState>, epoch_tick: Duration, deadline: Duration) {
    let tick = epoch_tick.as_nanos().max(1);
    // +1: the current epoch tick is already partly over, so this makes the
    // deadline at least `deadline`.
    let ticks = deadline.as_nanos().div_ceil(tick) + 1;
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
}

/// Report log lines the rate limit dropped (at most one line per call).
fn report_logs(store: &mut Store<StoreState>) {
    let data = store.data_mut();
    if data.logs.suppressed > 0 {
        events::FunctionLogsSuppressed {
            function: &data.function,
            lines: data.logs.suppressed,
        }
        .emit();
        data.logs.suppressed = 0;
    }
}

/// Turn a wasmtime error from a call into the right [`FunctionError`].
fn classify(
    name: &str,
    limits: &Limits,
    deadline: Duration,
    store: &mut Store<StoreState>,
    e: wasmtime::Error,
) -> FunctionError {
    let function = name.to_string();
    let data = store.data_mut();
    if data.blocked {
        return FunctionError::Blocked { function };
    }
    if let Some(reason) = data.contract.take() {
        return FunctionError::InvalidOutput { function, reason };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return FunctionError::Timeout {
            function,
            limit: deadline,
        };
    }
    if let Some(requested_bytes) = data.limiter.refused {
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
    let message = match data.last_panic.take() {
        Some(panic) => format!("{panic} ({what})"),
        None if what.contains(BLOCKING_REFUSED) => {
            return FunctionError::Blocked { function };
        }
        None => what,
    };
    FunctionError::Trap { function, message }
}
