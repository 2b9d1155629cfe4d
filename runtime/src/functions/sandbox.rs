//! What each instance's store holds: a WASI context that grants nothing, a
//! resource table and WASI random source with hard caps, one memory budget
//! across every memory and table of the instance, the log rate limit, and
//! the output of the call in progress.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::output::CallOutput;

/// Most WASI resources (pollables, streams...) an instance may hold.
pub(crate) const MAX_WASI_RESOURCES: usize = 1_000;
/// Most component resource handles an instance may hold.
pub(crate) const MAX_COMPONENT_HANDLES: usize = 1_000;
/// Largest `get-random-bytes` request.
const MAX_RANDOM_BYTES: u64 = 64 * 1024;
/// Most table elements, all tables of an instance together.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most core instances, memories and tables one component may create.
const MAX_INSTANCES: usize = 32;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;

/// `host.log` calls one call may make (plus one per input message): a
/// function that logs more is flooding, and the call fails. (Lines past
/// the rate limit below are dropped cheaply, but each is still a host call.)
pub(crate) const LOG_CALLS_PER_CALL: usize = 1_000;

/// Log lines a function may write: a burst of this many...
const LOG_BURST: f64 = 100.0;
/// ...refilled at this rate per second.
const LOG_PER_SECOND: f64 = 20.0;

/// Per-instance store data.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) function: Arc<str>,
    pub(crate) logs: LogBudget,
    /// Panic message reported through the SDK's panic hook during the
    /// current call, to explain the trap that follows.
    pub(crate) last_panic: Option<String>,
    /// Set when the guest tried to block (a sleep, a blocking poll).
    pub(crate) blocked: bool,
    /// Set when `emit` refused what the guest handed it (the trap's reason).
    pub(crate) contract: Option<String>,
    /// The output of the call in progress (`None` between calls).
    pub(crate) call: Option<CallOutput>,
    /// `host.log` calls in the current call, and how many it may make.
    pub(crate) log_calls: usize,
    pub(crate) log_calls_limit: usize,
}

impl StoreState {
    pub(crate) fn new(function: Arc<str>, memory_bytes: usize) -> Self {
        // Grants nothing: no preopens, env, args or network (said
        // explicitly, not left to the builder's defaults); stdin is empty
        // and stdout/stderr are discarded (the SDK logs through `host.log`
        // instead). Clocks and random numbers stay readable.
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_WASI_RESOURCES);
        Self {
            wasi,
            table,
            limiter: MemoryLimiter {
                limit: memory_bytes,
                used: 0,
                tables_used: 0,
                refused: None,
            },
            function,
            logs: LogBudget::new(),
            last_panic: None,
            blocked: false,
            contract: None,
            call: None,
            log_calls: 0,
            log_calls_limit: LOG_CALLS_PER_CALL,
        }
    }

    /// Clear the per-call reports before a call over `inputs` messages.
    pub(crate) fn arm(&mut self, inputs: usize) {
        self.log_calls = 0;
        self.log_calls_limit = LOG_CALLS_PER_CALL.saturating_add(inputs);
        self.limiter.refused = None;
        self.last_panic = None;
        self.blocked = false;
        self.contract = None;
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One memory budget for the whole instance: every linear memory and table
/// of every core instance inside the component counts against it (a
/// component may carry several memories; a cap per memory would multiply).
/// A refused growth makes `memory.grow` return -1; a Rust guest then aborts,
/// and the recorded request lets the host report the trap as a memory-cap
/// hit.
pub(crate) struct MemoryLimiter {
    limit: usize,
    /// Bytes of linear memory, all memories together.
    used: usize,
    tables_used: usize,
    /// Largest refused total during the current call.
    pub(crate) refused: Option<usize>,
}

impl MemoryLimiter {
    /// Bytes of linear memory the instance holds now.
    pub(crate) fn used(&self) -> usize {
        self.used
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.refused = Some(self.refused.map_or(total, |r| r.max(total)));
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .tables_used
            .saturating_sub(current)
            .saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.tables_used = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// A token bucket for log lines: a burst, then a steady rate; what it drops
/// is counted and reported.
pub(crate) struct LogBudget {
    tokens: f64,
    at: Instant,
    pub(crate) suppressed: u64,
}

impl LogBudget {
    fn new() -> Self {
        Self {
            tokens: LOG_BURST,
            at: Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether one more line may be written now.
    pub(crate) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * LOG_PER_SECOND;
        self.tokens = (self.tokens + refill).min(LOG_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}
