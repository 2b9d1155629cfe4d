//! Tests of the function host against the real example components
//! (`modules/examples/*`, built for wasm32-wasip2 by `fogline-modules`).
//!
//! Most tests share one runtime whose compile cache lives in the system temp
//! directory, so that under nextest (one process per test) each process
//! loads the compiled code instead of compiling the modules again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// One runtime and the example modules, shared by the tests of this crate.
pub(crate) struct Fixture {
    pub(crate) rt: FunctionRuntime,
    pub(crate) threshold: Module,
    pub(crate) window_avg: Module,
    pub(crate) hostile: Module,
}

pub(crate) fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = FunctionRuntime::new(RuntimeOptions {
            cache_dir: Some(std::env::temp_dir().join("fogline-functions-tests-cache")),
            ..RuntimeOptions::default()
        })
        .unwrap();
        let load = |path: &Path| rt.load(path).unwrap();
        Fixture {
            threshold: load(fogline_modules::threshold()),
            window_avg: load(fogline_modules::window_avg()),
            hostile: load(fogline_modules::hostile()),
            rt,
        }
    })
}

fn instance(module: &Module, config: Value, limits: Limits) -> FunctionInstance {
    FunctionInstance::new(&fixture().rt, module, "f", &config.to_string(), limits).unwrap()
}

fn threshold(config: Value) -> FunctionInstance {
    instance(&fixture().threshold, config, Limits::default())
}

fn hostile(config: Value, limits: Limits) -> FunctionInstance {
    instance(&fixture().hostile, config, limits)
}

fn msg(stream: &str, timestamp_ms: u64, payload: impl Into<Vec<u8>>) -> Message {
    Message {
        stream: stream.to_string(),
        timestamp_ms,
        payload: payload.into(),
    }
}

fn reading(stream: &str, timestamp_ms: u64, payload: Value) -> Message {
    msg(stream, timestamp_ms, payload.to_string())
}

fn temps(values: &[f64]) -> Vec<Message> {
    values
        .iter()
        .enumerate()
        .map(|(i, t)| reading("sensors/t1", i as u64, json!({ "temp": t })))
        .collect()
}

fn json_of(m: &Message) -> Value {
    serde_json::from_slice(&m.payload).unwrap()
}

/// A batch that the hostile module passes through untouched.
fn harmless() -> Vec<Message> {
    vec![msg("s", 1, "fine"), msg("s", 2, "also fine")]
}

/// The instance is usable again: a harmless batch passes through.
fn assert_works_again(f: &mut FunctionInstance) {
    let out = f.process(&harmless()).unwrap();
    assert_eq!(out.messages(&harmless()), harmless());
    assert!(out.rejected.is_empty());
}

/// What a call emitted, resolved against its inputs.
fn emitted(f: &mut FunctionInstance, batch: &[Message]) -> Vec<Message> {
    f.process(batch).unwrap().messages(batch)
}

fn ticked(f: &mut FunctionInstance, now: u64) -> Vec<Message> {
    f.tick(now).unwrap().messages(&[])
}

// ---------------------------------------------------------------- threshold

#[test]
fn threshold_passes_only_readings_above_the_bound() {
    let mut f = threshold(json!({ "field": "temp", "above": 30.0 }));
    let batch = temps(&[31.0, 29.0, 30.0, 45.5]);
    let out = f.process(&batch).unwrap();
    assert_eq!(
        out.messages(&batch),
        vec![batch[0].clone(), batch[3].clone()]
    );
    assert!(out.rejected.is_empty());
    // A filter hands back indices, not bytes: nothing crossed the boundary.
    assert!(out
        .emitted
        .iter()
        .all(|e| e.payload.is_none() && e.stream.is_none()));
}

#[test]
fn threshold_below_and_both_bounds() {
    let batch = temps(&[-10.0, 0.0, 10.0, 20.0]);

    let mut below = threshold(json!({ "field": "temp", "below": 5.0 }));
    assert_eq!(emitted(&mut below, &batch), batch[..2].to_vec());

    // above > below: an alarm band, outside [0, 15].
    let mut outside = threshold(json!({ "field": "temp", "above": 15.0, "below": 0.0 }));
    assert_eq!(
        emitted(&mut outside, &batch),
        vec![batch[0].clone(), batch[3].clone()]
    );

    // above < below: a pass band, strictly inside (-5, 15).
    let mut between = threshold(json!({ "field": "temp", "above": -5.0, "below": 15.0 }));
    assert_eq!(emitted(&mut between, &batch), batch[1..3].to_vec());
}

#[test]
fn threshold_reads_the_configured_field_including_dotted_paths() {
    let batch = vec![
        reading("s", 1, json!({ "temp": 99, "sensor": { "hum": 10 } })),
        reading("s", 2, json!({ "temp": 0, "sensor": { "hum": 80 } })),
    ];
    let mut f = threshold(json!({ "field": "sensor.hum", "above": 50 }));
    assert_eq!(emitted(&mut f, &batch), vec![batch[1].clone()]);
}

#[test]
fn threshold_rejects_bad_inputs_one_by_one_and_the_batch_goes_on() {
    let mut f = threshold(json!({ "field": "temp", "above": 30 }));
    let batch = vec![
        reading("s", 1, json!({ "temp": 40 })),
        msg("s", 2, "not json at all"),
        reading("s", 3, json!({ "hum": 40 })),
        reading("s", 4, json!({ "temp": "hot" })),
        reading("s", 5, json!({ "temp": 50 })),
    ];
    let out = f.process(&batch).unwrap();
    assert_eq!(
        out.messages(&batch),
        vec![batch[0].clone(), batch[4].clone()]
    );
    let rejected: Vec<(usize, &str)> = out
        .rejected
        .iter()
        .map(|r| (r.index, r.error.as_str()))
        .collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(rejected[0].0, 1);
    assert!(
        rejected[0].1.starts_with("payload is not JSON"),
        "{}",
        rejected[0].1
    );
    assert_eq!(rejected[1], (2, "field `temp` missing"));
    assert_eq!(
        rejected[2],
        (3, "field `temp` is not a number (found a string)")
    );
    // Rejections are not failures: the instance was not restarted.
    assert_eq!(f.restarts(), 0);
    assert!(!f.is_poisoned());
}

#[test]
fn bad_config_fails_init_with_the_functions_message() {
    let fx = fixture();
    let cases = [
        (
            &fx.threshold,
            json!({ "field": "temp", "above": "thirty" }),
            "invalid config: invalid type: string \"thirty\", expected f64",
        ),
        (
            &fx.threshold,
            json!({ "field": "temp" }),
            "invalid config: set `above`, `below` or both",
        ),
        (
            &fx.threshold,
            json!({ "field": "temp", "above": 1, "colour": "red" }),
            "invalid config: unknown field `colour`",
        ),
        (
            &fx.window_avg,
            json!({ "field": "temp", "window_ms": 0 }),
            "invalid config: `window_ms` must be > 0",
        ),
    ];
    for (module, config, expected) in cases {
        let err = FunctionInstance::new(
            &fx.rt,
            module,
            "alarm",
            &config.to_string(),
            Limits::default(),
        )
        .err()
        .unwrap_or_else(|| panic!("{config} was accepted"));
        let text = err.to_string();
        assert!(
            matches!(&err, FunctionError::Init { function, message }
                if function == "alarm" && message.contains(expected)),
            "{config}: {text}"
        );
        assert!(
            text.starts_with("function `alarm` failed to start: "),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------- window-avg

fn window(out: &[Message]) -> Vec<(&str, u64, Value)> {
    out.iter()
        .map(|m| (m.stream.as_str(), m.timestamp_ms, json_of(m)))
        .collect()
}

#[test]
fn window_avg_emits_per_stream_averages_once_the_window_closed() {
    let mut f = instance(
        &fixture().window_avg,
        json!({ "field": "temp", "window_ms": 1000 }),
        Limits::default(),
    );
    let batch = vec![
        reading("sensors/a", 100, json!({ "temp": 20 })),
        reading("sensors/b", 200, json!({ "temp": 5 })),
        reading("sensors/a", 900, json!({ "temp": 23 })),
        reading("sensors/a", 1500, json!({ "temp": 30 })),
    ];
    let out = f.process(&batch).unwrap();
    assert!(out.messages(&batch).is_empty(), "inputs are consumed");
    assert!(out.rejected.is_empty());
    assert!(!out.state.is_empty(), "open windows are durable state");

    // Window [0, 1000) is still open at 999.
    assert!(ticked(&mut f, 999).is_empty());

    let out = ticked(&mut f, 1000);
    assert_eq!(
        window(&out),
        vec![
            (
                "sensors/a/avg",
                1000,
                json!({ "stream": "sensors/a", "window_start_ms": 0, "window_end_ms": 1000,
                        "count": 2, "sum": 43.0, "avg": 21.5, "min": 20.0, "max": 23.0 })
            ),
            (
                "sensors/b/avg",
                1000,
                json!({ "stream": "sensors/b", "window_start_ms": 0, "window_end_ms": 1000,
                        "count": 1, "sum": 5.0, "avg": 5.0, "min": 5.0, "max": 5.0 })
            ),
        ]
    );
    // Emitted once only.
    assert!(ticked(&mut f, 1000).is_empty());

    // With ingest time the watermark is the tick's clock: a reading for an
    // emitted window can only come from a forged timestamp; it is refused.
    let late = [
        reading("sensors/a", 950, json!({ "temp": 1 })),
        reading("sensors/a", 1700, json!({ "temp": 40 })),
    ];
    let out = f.process(&late).unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, 0);
    assert!(
        out.rejected[0].error.starts_with("late reading"),
        "{}",
        out.rejected[0].error
    );

    let out = ticked(&mut f, 2000);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].stream, "sensors/a/avg");
    assert_eq!(json_of(&out[0])["avg"], json!(35.0));
    assert_eq!(json_of(&out[0])["count"], json!(2));
}

#[test]
fn state_survives_a_restart_and_a_new_instance() {
    let config = json!({ "field": "temp", "window_ms": 1000, "output_stream": "stats" });
    let mut f = instance(&fixture().window_avg, config.clone(), Limits::default());
    f.process(&[reading("s", 1, json!({ "temp": 1 }))]).unwrap();
    // A restart (as after a failed call) restores the state of the last
    // success: the open window is still there.
    f.restart().unwrap();
    assert_eq!(f.restarts(), 1);
    f.process(&[reading("s", 2, json!({ "temp": 4 }))]).unwrap();

    // A new instance (a new process) started from the committed state.
    let committed = f.state().clone();
    let mut g = FunctionInstance::start(
        &fixture().rt,
        &fixture().window_avg,
        "f",
        &config.to_string(),
        Limits::default(),
        committed,
    )
    .unwrap();
    let out = ticked(&mut g, 10_000);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].stream, "stats");
    assert_eq!(json_of(&out[0])["count"], json!(2));
    assert_eq!(json_of(&out[0])["sum"], json!(5.0));
    // Closing the window deleted it from the state.
    assert!(
        g.state().keys().all(|k| !k.starts_with(b"windows\x1fw")),
        "{:?}",
        g.state()
    );
}

#[test]
fn a_failed_call_rolls_the_state_back_to_the_last_success() {
    let mut f = hostile(json!({ "mode": "trap", "report": true }), Limits::default());
    f.process(&harmless()).unwrap();
    // Two harmless messages, then a trap in the same call: the two were
    // counted in guest memory, and that must not survive the failure.
    let mut batch = harmless();
    batch.push(msg("s", 3, "boom"));
    assert!(f.process(&batch).is_err());
    f.process(&harmless()).unwrap();
    let out = ticked(&mut f, 1);
    assert_eq!(
        json_of(&out[0]),
        json!({ "seen": 4 }),
        "2 + 2, not 2 + 3 + 2"
    );
}

// ---------------------------------------------------------------- sandbox
// ARCHITECTURE.md I-26: guests are bounded before the host pays; I-22: a
// failed call rolls the instance back.

#[test]
fn trap_fails_the_call_and_the_instance_restarts() {
    let mut f = hostile(json!({ "mode": "trap" }), Limits::default());
    assert_works_again(&mut f);
    let mut batch = harmless();
    batch.push(msg("s", 3, "boom"));
    let err = f.process(&batch).unwrap_err();
    match &err {
        // The SDK's panic hook tells the host what the panic said.
        FunctionError::Trap { function, message } => {
            assert_eq!(function, "f");
            assert!(
                message.contains("hostile: panicking in process as configured"),
                "{message}"
            );
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_eq!(err.kind(), "trap");
    assert!(f.is_poisoned());
    assert_works_again(&mut f);
    assert_eq!(f.restarts(), 1);
    assert!(!f.is_poisoned());
}

#[test]
fn infinite_loop_hits_the_deadline_and_the_instance_restarts() {
    let timeout = Duration::from_millis(200);
    let mut f = hostile(
        json!({ "mode": "spin" }),
        Limits {
            call_timeout: timeout,
            timeout_per_message: Duration::ZERO,
            ..Limits::default()
        },
    );
    let started = Instant::now();
    let err = f.process(&[msg("s", 1, "boom")]).unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, FunctionError::Timeout { limit, .. } if limit == timeout),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("exceeded its call deadline"),
        "{err}"
    );
    // Fires after the deadline, and promptly (one epoch tick late at best;
    // generous slack for a loaded 2-core machine).
    assert!(
        elapsed >= timeout - Duration::from_millis(20),
        "{elapsed:?}"
    );
    assert!(elapsed < timeout + Duration::from_secs(2), "{elapsed:?}");
    assert_works_again(&mut f);
    assert_eq!(f.restarts(), 1);
}

#[test]
fn the_deadline_grows_with_the_batch() {
    let limits = Limits {
        call_timeout: Duration::from_millis(100),
        timeout_per_message: Duration::from_millis(1),
        ..Limits::default()
    };
    let mut f = hostile(json!({ "mode": "spin" }), limits);
    let mut batch: Vec<Message> = (0..400).map(|i| msg("s", i, "x")).collect();
    batch.push(msg("s", 401, "boom"));
    let err = f.process(&batch).unwrap_err();
    assert!(
        matches!(err, FunctionError::Timeout { limit, .. } if limit == Duration::from_millis(501)),
        "{err:?}"
    );
}

#[test]
fn a_sleep_in_a_wasi_call_is_stopped_at_once_not_after_the_sleep() {
    let mut f = hostile(json!({ "mode": "sleep" }), Limits::default());
    let started = Instant::now();
    let err = f.process(&[msg("s", 1, "boom")]).unwrap_err();
    assert!(matches!(err, FunctionError::Blocked { .. }), "{err:?}");
    assert!(err.to_string().contains("tried to block"), "{err}");
    // It slept for an hour in its own view; the host stopped it at once.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_works_again(&mut f);
}

#[test]
fn init_that_never_returns_or_sleeps_fails_the_start_within_its_deadline() {
    let fx = fixture();
    let limits = Limits {
        init_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    for mode in ["init-spin", "init-sleep"] {
        let started = Instant::now();
        let err = FunctionInstance::new(
            &fx.rt,
            &fx.hostile,
            "slow",
            &json!({ "mode": mode }).to_string(),
            limits.clone(),
        )
        .err()
        .unwrap();
        assert!(matches!(err, FunctionError::Init { .. }), "{mode}: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{mode}: {:?}",
            started.elapsed()
        );
        let text = err.to_string();
        assert!(
            text.contains("init_timeout") || text.contains("block"),
            "{mode}: {text}"
        );
    }
}

#[test]
fn memory_bomb_hits_the_memory_cap_and_the_instance_restarts() {
    let limit = 16 << 20;
    let mut f = hostile(
        json!({ "mode": "alloc" }),
        Limits {
            memory_bytes: limit,
            ..Limits::default()
        },
    );
    let err = f.process(&[msg("s", 1, "boom")]).unwrap_err();
    match &err {
        FunctionError::MemoryLimit {
            limit_bytes,
            requested_bytes,
            ..
        } => {
            assert_eq!(*limit_bytes, limit);
            assert!(*requested_bytes > limit, "{err}");
        }
        other => panic!("expected a memory-limit error, got {other:?}"),
    }
    assert!(err.to_string().contains("ran out of memory"), "{err}");
    assert_works_again(&mut f);
    assert_eq!(f.restarts(), 1);
    assert!(f.memory_bytes() <= limit);
}

#[test]
fn wasi_resource_exhaustion_is_stopped_and_the_instance_restarts() {
    let mut f = hostile(json!({ "mode": "resources" }), Limits::default());
    let err = f.process(&[msg("s", 1, "boom")]).unwrap_err();
    assert!(matches!(err, FunctionError::Trap { .. }), "{err:?}");
    assert_works_again(&mut f);
}

/// One memory budget across every memory of the instance: a component whose
/// two core modules each ask for 40 MiB is refused under a 64 MiB cap, though
/// each memory alone would fit.
#[test]
fn the_memory_cap_covers_all_memories_of_a_component() {
    let wat = r#"(component
        (core module $a (memory (export "m") 640))
        (core module $b (memory (export "m") 640))
        (core instance (instantiate $a))
        (core instance (instantiate $b)))"#;
    let bytes = wat::parse_str(wat).unwrap();
    let rt = &fixture().rt;
    let component = wasmtime::component::Component::new(&rt.engine(), &bytes).unwrap();
    let linker = wasmtime::component::Linker::<super::sandbox::StoreState>::new(&rt.engine());
    let attempt = |limit: usize| {
        let mut store = wasmtime::Store::new(
            &rt.engine(),
            super::sandbox::StoreState::new("multi".into(), limit),
        );
        store.limiter(|s| &mut s.limiter);
        linker
            .instantiate(&mut store, &component)
            .map(|_| store.data().limiter.used())
    };
    assert!(
        attempt(64 << 20).is_err(),
        "80 MiB across two memories exceeds 64 MiB"
    );
    assert_eq!(attempt(96 << 20).unwrap(), 80 << 20, "both counted");
}

/// Output that breaks the contract — a span outside the buffer, an index
/// outside the batch, aliased spans worth more than the call's budget, too
/// many messages or state bytes — is refused before it is copied; the
/// instance restarts.
#[test]
fn output_that_breaks_the_contract_is_refused_and_the_instance_restarts() {
    let limits = Limits {
        max_output_messages: 8,
        max_output_bytes: 1 << 20,
        max_state_write_bytes: 1 << 16,
        ..Limits::default()
    };
    let one = vec![msg("s", 1, "x")];
    let two = vec![msg("s", 1, "x"), msg("s", 2, "y")];
    let cases = [
        (
            json!({ "mode": "bad-index" }),
            two.clone(),
            "rejection of input 2 names input 2",
        ),
        (
            json!({ "mode": "dup-index" }),
            two.clone(),
            "rejected index 0 twice",
        ),
        (
            json!({ "mode": "bad-span" }),
            one.clone(),
            "spans bytes 0..1048576, the buffer holds 4",
        ),
        (
            json!({ "mode": "flood", "count": 5 }),
            two.clone(),
            "emitted 10 messages in one call, the limit is 8",
        ),
        // 8 × 1 MiB claimed over one 1 MiB buffer: 8 MiB, not 1.
        (
            json!({ "mode": "alias", "count": 8, "size": 1 << 20 }),
            one.clone(),
            "spans that alias the same bytes count once per use",
        ),
        (
            json!({ "mode": "state-flood", "count": 100, "size": 1000 }),
            one.clone(),
            "state writes of",
        ),
    ];
    for (config, batch, expected) in cases {
        let mut f = hostile(config.clone(), limits.clone());
        let err = f.process(&batch).unwrap_err();
        assert!(
            matches!(&err, FunctionError::InvalidOutput { reason, .. } if reason.contains(expected)),
            "{config}: {err:?}"
        );
        assert!(f.is_poisoned(), "{config}");
        // The forging modes forge on every batch; `tick` goes through the
        // SDK and shows the restarted instance works.
        assert_eq!(f.tick(5).unwrap(), Output::default(), "{config}");
        assert_eq!(f.restarts(), 1, "{config}");
    }

    // Within the limits, the same modes are accepted.
    let mut f = hostile(json!({ "mode": "flood", "count": 4 }), limits.clone());
    assert_eq!(emitted(&mut f, &two).len(), 8);
}

/// A message with a bad stream name or an oversized payload is refused
/// alone: its input is named for the dead-letter table, the rest of the
/// output stands and the instance keeps running.
#[test]
fn one_bad_output_refuses_its_input_only() {
    let limits = Limits {
        max_payload_bytes: 1000,
        ..Limits::default()
    };
    let two = vec![msg("s", 1, "x"), msg("s", 2, "y")];
    let cases = [
        (json!({ "mode": "bad-stream" }), "empty stream name"),
        (
            json!({ "mode": "long-stream", "size": 1025 }),
            "stream name of 1025 bytes, the limit is 1024",
        ),
        (
            json!({ "mode": "big", "size": 1001 }),
            "payload of 1001 bytes, the limit is 1000",
        ),
    ];
    for (config, expected) in cases {
        let mut f = hostile(config.clone(), limits.clone());
        let out = f.process(&two).unwrap();
        assert_eq!(out.refused.len(), 2, "{config}");
        assert_eq!(
            out.refused.iter().map(|r| r.input).collect::<Vec<_>>(),
            vec![Some(0), Some(1)],
            "{config}"
        );
        assert!(
            out.refused[0].error.contains(expected),
            "{config}: {}",
            out.refused[0].error
        );
        assert!(out.messages(&two).is_empty(), "{config}");
        assert!(!f.is_poisoned(), "{config}");
    }
    // At the limit, fine: 1024 bytes is a valid stream name.
    let mut f = hostile(
        json!({ "mode": "long-stream", "size": 1024 }),
        limits.clone(),
    );
    assert_eq!(emitted(&mut f, &two).len(), 2);
    let mut f = hostile(json!({ "mode": "big", "size": 1000 }), limits);
    assert_eq!(emitted(&mut f, &two)[0].payload.len(), 1000);
}

#[test]
fn function_error_fails_the_call_and_rolls_it_back() {
    let mut f = hostile(json!({ "mode": "fail" }), Limits::default());
    let err = f.process(&harmless()).unwrap_err();
    assert!(
        matches!(&err, FunctionError::Failed { message, .. }
            if message == "hostile: failing the batch as configured"),
        "{err:?}"
    );
    assert_eq!(err.kind(), "error");
    assert!(
        f.is_poisoned(),
        "whatever the failed call changed is dropped"
    );
}

#[test]
fn trap_in_init_is_an_init_error() {
    let fx = fixture();
    let err = FunctionInstance::new(
        &fx.rt,
        &fx.hostile,
        "bad",
        &json!({ "mode": "init-trap" }).to_string(),
        Limits::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, FunctionError::Init { function, message }
            if function == "bad" && message.contains("init trapped")
                && message.contains("hostile: panicking in init as configured")),
        "{err:?}"
    );
}

#[test]
fn trap_in_tick_fails_the_tick_and_the_instance_restarts() {
    let mut f = hostile(json!({ "mode": "tick-trap" }), Limits::default());
    let err = f.tick(1).unwrap_err();
    assert!(matches!(err, FunctionError::Trap { .. }), "{err:?}");
    assert_works_again(&mut f);
}

#[test]
fn the_sandbox_grants_no_filesystem_environment_or_network() {
    let mut f = hostile(json!({ "mode": "escape" }), Limits::default());
    let out = emitted(&mut f, &[msg("s", 1, "x")]);
    let seen = json_of(&out[0]);
    assert_eq!(seen["fs"], Value::Null, "{seen}");
    assert_eq!(seen["env"], json!([]), "{seen}");
    assert_eq!(seen["args"], json!(0), "{seen}");
    assert_ne!(seen["net"], json!("connected"), "{seen}");
    // Reading the clock is allowed (it does not block).
    assert!(
        seen["wall_ms"].as_u64().unwrap() > 1_600_000_000_000,
        "{seen}"
    );
}

#[test]
fn chatty_function_is_throttled_not_failed() {
    // 20 lines per message: past the rate limit, dropped, the call is fine.
    let mut f = hostile(
        json!({ "mode": "log-flood", "count": 20 }),
        Limits::default(),
    );
    let batch: Vec<Message> = (0..50).map(|i| msg("s", i, "x")).collect();
    assert_eq!(emitted(&mut f, &batch).len(), 50);
}

#[test]
fn a_log_flood_fails_the_call() {
    // 10,000 lines per message: more host calls than a call may make.
    let mut f = hostile(
        json!({ "mode": "log-flood", "count": 10_000 }),
        Limits::default(),
    );
    let err = f.process(&[msg("s", 1, "x")]).unwrap_err();
    assert!(
        matches!(&err, FunctionError::InvalidOutput { reason, .. } if reason.contains("log flood")),
        "{err:?}"
    );
    // It floods on every message; a tick shows the restarted instance.
    assert_eq!(f.tick(1).unwrap(), Output::default());
    assert_eq!(f.restarts(), 1);
}

// ---------------------------------------------------------------- loading

#[test]
fn second_load_of_a_module_hits_the_compile_cache() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RuntimeOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..RuntimeOptions::default()
    };
    let rt = FunctionRuntime::new(opts.clone()).unwrap();
    let first = rt.load(fogline_modules::threshold()).unwrap();
    assert!(!first.loaded_from_cache());
    let second = rt.load(fogline_modules::threshold()).unwrap();
    assert!(second.loaded_from_cache());
    assert_eq!(rt.cache_stats(), Some((1, 1)));

    // A restarted daemon (a new runtime over the same directory) does not
    // recompile either, and what it loaded runs.
    drop(rt);
    let rt = FunctionRuntime::new(opts).unwrap();
    let module = rt.load(fogline_modules::threshold()).unwrap();
    assert!(module.loaded_from_cache());
    let mut f = FunctionInstance::new(
        &rt,
        &module,
        "t",
        r#"{"field":"temp","above":1}"#,
        Limits::default(),
    )
    .unwrap();
    assert_eq!(emitted(&mut f, &temps(&[2.0])).len(), 1);

    // Without a cache directory nothing is cached.
    let rt = FunctionRuntime::new(RuntimeOptions::default()).unwrap();
    assert!(!rt
        .load(fogline_modules::threshold())
        .unwrap()
        .loaded_from_cache());
    assert_eq!(rt.cache_stats(), None);
}

#[test]
fn loading_something_that_is_not_a_function_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let rt = &fixture().rt;

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "hello").unwrap();
    let err = rt.load(&text).unwrap_err().to_string();
    assert!(
        err.contains("notes.wasm") && err.contains("not a WebAssembly binary"),
        "{err}"
    );

    // A core module (what wasm32-unknown-unknown produces), not a component.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = rt.load(&core).unwrap_err().to_string();
    assert!(
        err.contains("core.wasm") && err.contains("not a component"),
        "{err}"
    );

    let missing = dir.path().join("missing.wasm");
    let err = rt.load(&missing).unwrap_err().to_string();
    assert!(
        err.contains("missing.wasm") && err.contains("reading the file"),
        "{err}"
    );
}

#[test]
fn a_module_built_for_the_old_contract_is_named_as_such() {
    // A component importing the 0.1 host interface.
    let wat = r#"(component
        (import "fogline:function/host@0.1.0" (instance
            (export "log" (func (param "text" string))))))"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.wasm");
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    let err = fixture().rt.load(&path).unwrap_err().to_string();
    assert!(
        err.contains("\"0.1.0\"") && err.contains("rebuild it against the current fogline-sdk"),
        "{err}"
    );
}
