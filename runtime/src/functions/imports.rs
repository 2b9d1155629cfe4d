//! What the sandbox's linker offers a guest beyond WASI's defaults: the
//! contract's `host` interface (`log`, `emit`) and WASI's blocking calls
//! replaced by ones that refuse to block.
//!
//! The `host` functions are defined by hand rather than through the
//! generated trait: they take `WasmStr` / `WasmList` arguments, which point
//! into guest memory, so every length is checked before a byte is copied.
//!
//! Why blocking is refused: deadlines are enforced by epoch interruption,
//! which only interrupts guest code. A guest sleeping in `pollable.block`
//! would sit in host code, past its deadline, holding the pipeline thread
//! (and every commit and acknowledgement behind it). Functions have no reason
//! to wait: time comes with the messages and the ticks.

use wasmtime::component::{Linker, Resource, WasmList, WasmStr};
use wasmtime::{AsContextMut, StoreContextMut};
use wasmtime_wasi::p2::DynPollable;

use super::bindings::{Emission, Level, Rejection, StateWrite, PACKAGE_VERSION};
use super::output::{truncate, MAX_GUEST_TEXT};
use super::sandbox::StoreState;

/// WASI's `io` package as wasmtime-wasi registers it (guests importing an
/// earlier 0.2.x resolve to it).
const WASI_IO_POLL: &str = "wasi:io/poll@0.2.12";

/// What a refused blocking call says (and the trap then reports).
pub(crate) const BLOCKING_REFUSED: &str =
    "a function may not block (sleep or wait on a pollable): time comes with messages and ticks";

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    let mut host = linker.instance(&format!("fogline:function/host@{PACKAGE_VERSION}"))?;
    host.func_wrap(
        "log",
        |mut store: StoreContextMut<'_, StoreState>, (level, text): (Level, WasmStr)| {
            log(&mut store, level, &text)
        },
    )?;
    host.func_wrap(
        "emit",
        |mut store: StoreContextMut<'_, StoreState>,
         (emissions, rejected, state, bytes): (
            WasmList<Emission>,
            WasmList<Rejection>,
            WasmList<StateWrite>,
            WasmList<u8>,
        )| emit(&mut store, &emissions, &rejected, &state, &bytes),
    )?;

    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_IO_POLL)?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, StoreState>, _: (Resource<DynPollable>,)| {
            store.data_mut().blocked = true;
            Err::<(), _>(wasmtime::format_err!("{BLOCKING_REFUSED}"))
        },
    )?;
    poll.func_wrap(
        "poll",
        |mut store: StoreContextMut<'_, StoreState>, _: (Vec<Resource<DynPollable>>,)| {
            store.data_mut().blocked = true;
            Err::<(Vec<u32>,), _>(wasmtime::format_err!("{BLOCKING_REFUSED}"))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn log(
    store: &mut StoreContextMut<'_, StoreState>,
    level: Level,
    text: &WasmStr,
) -> wasmtime::Result<()> {
    let data = store.data_mut();
    data.log_calls += 1;
    if data.log_calls > data.log_calls_limit {
        let why = format!(
            "logged more than {} lines in one call (a log flood)",
            data.log_calls_limit
        );
        data.contract = Some(why.clone());
        return Err(wasmtime::format_err!("{why}"));
    }
    let allowed = data.logs.take();
    // The SDK's panic hook logs "panic: …" at error level just before the
    // guest aborts; keep it to explain the trap, even past the rate limit.
    if !allowed && level != Level::Error {
        // Dropped without reading the text: a flood costs the guest, not us.
        return Ok(());
    }
    // Read in place, keep at most 4 KiB: a guest's megabyte line costs it,
    // not the host.
    let text = {
        let full = text.to_str(&*store)?;
        truncate(&full, MAX_GUEST_TEXT).to_string()
    };
    let data = store.data_mut();
    if level == Level::Error && text.starts_with("panic: ") {
        data.last_panic = Some(text.trim_start_matches("panic: ").replace('\n', " "));
    }
    if !allowed {
        return Ok(());
    }
    let function = &*data.function;
    match level {
        Level::Trace => tracing::trace!(target: "fogline::function", function, "{text}"),
        Level::Debug => tracing::debug!(target: "fogline::function", function, "{text}"),
        Level::Info => tracing::info!(target: "fogline::function", function, "{text}"),
        Level::Warn => tracing::warn!(target: "fogline::function", function, "{text}"),
        Level::Error => tracing::error!(target: "fogline::function", function, "{text}"),
    }
    Ok(())
}

fn emit(
    store: &mut StoreContextMut<'_, StoreState>,
    emissions: &WasmList<Emission>,
    rejected: &WasmList<Rejection>,
    state: &WasmList<StateWrite>,
    bytes: &WasmList<u8>,
) -> wasmtime::Result<()> {
    let refuse = |store: &mut StoreContextMut<'_, StoreState>, why: String| {
        store.data_mut().contract = Some(why.clone());
        wasmtime::format_err!("{why}")
    };
    // Counts first: nothing is read before they are within the budget.
    let counts = match &store.data().call {
        None => Err("`emit` called outside `process` or `tick`".to_string()),
        Some(call) => call.check_counts(emissions.len(), rejected.len(), state.len()),
    };
    if let Err(why) = counts {
        return Err(refuse(store, why));
    }
    let emissions: Vec<Emission> = emissions
        .iter(store.as_context_mut())?
        .collect::<wasmtime::Result<_>>()?;
    let rejected: Vec<Rejection> = rejected
        .iter(store.as_context_mut())?
        .collect::<wasmtime::Result<_>>()?;
    let state: Vec<StateWrite> = state
        .iter(store.as_context_mut())?
        .collect::<wasmtime::Result<_>>()?;
    // The byte buffer is read in place; the call's output is taken out of
    // the store meanwhile (the buffer borrows the store).
    let Some(mut call) = store.data_mut().call.take() else {
        return Err(refuse(store, "`emit` called outside a call".into()));
    };
    let taken = call.take(&emissions, &rejected, &state, bytes.as_le_slice(&*store));
    store.data_mut().call = Some(call);
    taken.map_err(|why| refuse(store, why))
}
