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

struct Fixture {
    rt: FunctionRuntime,
    threshold: Module,
    window_avg: Module,
    hostile: Module,
}

fn fixture() -> &'static Fixture {
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
    assert_eq!(out.messages, harmless());
    assert!(out.rejected.is_empty());
}

// ---------------------------------------------------------------- threshold

#[test]
fn threshold_passes_only_readings_above_the_bound() {
    let mut f = threshold(json!({ "field": "temp", "above": 30.0 }));
    let batch = temps(&[31.0, 29.0, 30.0, 45.5]);
    let out = f.process(&batch).unwrap();
    assert_eq!(out.messages, vec![batch[0].clone(), batch[3].clone()]);
    assert!(out.rejected.is_empty());
}

#[test]
fn threshold_below_and_both_bounds() {
    let batch = temps(&[-10.0, 0.0, 10.0, 20.0]);

    let mut below = threshold(json!({ "field": "temp", "below": 5.0 }));
    let out = below.process(&batch).unwrap();
    assert_eq!(out.messages, batch[..2].to_vec());

    // above > below: an alarm band, outside [0, 15].
    let mut outside = threshold(json!({ "field": "temp", "above": 15.0, "below": 0.0 }));
    let out = outside.process(&batch).unwrap();
    assert_eq!(out.messages, vec![batch[0].clone(), batch[3].clone()]);

    // above < below: a pass band, strictly inside (-5, 15).
    let mut between = threshold(json!({ "field": "temp", "above": -5.0, "below": 15.0 }));
    let out = between.process(&batch).unwrap();
    assert_eq!(out.messages, batch[1..3].to_vec());
}

#[test]
fn threshold_reads_the_configured_field_including_dotted_paths() {
    let batch = vec![
        reading("s", 1, json!({ "temp": 99, "sensor": { "hum": 10 } })),
        reading("s", 2, json!({ "temp": 0, "sensor": { "hum": 80 } })),
    ];
    let mut f = threshold(json!({ "field": "sensor.hum", "above": 50 }));
    let out = f.process(&batch).unwrap();
    assert_eq!(out.messages, vec![batch[1].clone()]);
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
    assert_eq!(out.messages, vec![batch[0].clone(), batch[4].clone()]);
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
    assert!(out.messages.is_empty(), "inputs are consumed");
    assert!(out.rejected.is_empty());

    // Window [0, 1000) is still open at 999.
    assert!(f.tick(999).unwrap().messages.is_empty());

    let out = f.tick(1000).unwrap();
    let got: Vec<(&str, u64, Value)> = out
        .messages
        .iter()
        .map(|m| (m.stream.as_str(), m.timestamp_ms, json_of(m)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "sensors/a/avg",
                1000,
                json!({ "stream": "sensors/a", "window_start_ms": 0, "window_end_ms": 1000,
                        "count": 2, "avg": 21.5, "min": 20.0, "max": 23.0 })
            ),
            (
                "sensors/b/avg",
                1000,
                json!({ "stream": "sensors/b", "window_start_ms": 0, "window_end_ms": 1000,
                        "count": 1, "avg": 5.0, "min": 5.0, "max": 5.0 })
            ),
        ]
    );
    // Emitted once only.
    assert!(f.tick(1000).unwrap().messages.is_empty());

    // A reading for the window already emitted is late; a later one is fine.
    let out = f
        .process(&[
            reading("sensors/a", 950, json!({ "temp": 1 })),
            reading("sensors/a", 1700, json!({ "temp": 40 })),
        ])
        .unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, 0);
    assert!(
        out.rejected[0].error.starts_with("late reading"),
        "{}",
        out.rejected[0].error
    );

    let out = f.tick(2000).unwrap();
    assert_eq!(out.messages.len(), 1);
    assert_eq!(out.messages[0].stream, "sensors/a/avg");
    assert_eq!(json_of(&out.messages[0])["avg"], json!(35.0));
    assert_eq!(json_of(&out.messages[0])["count"], json!(2));
}

#[test]
fn restart_starts_from_init_and_drops_state() {
    let mut f = instance(
        &fixture().window_avg,
        json!({ "field": "temp", "window_ms": 1000, "output_stream": "stats" }),
        Limits::default(),
    );
    f.process(&[reading("s", 1, json!({ "temp": 1 }))]).unwrap();
    f.restart().unwrap();
    assert_eq!(f.restarts(), 1);
    assert!(f.tick(10_000).unwrap().messages.is_empty());

    f.process(&[reading("s", 1, json!({ "temp": 4 }))]).unwrap();
    let out = f.tick(10_000).unwrap();
    assert_eq!(out.messages.len(), 1);
    assert_eq!(out.messages[0].stream, "stats");
}

// ---------------------------------------------------------------- sandbox

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
    assert!(err.restarts_instance());
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
}

/// Each case: a config and a batch that make the hostile module return
/// output the host must refuse, the reason expected, and whether the same
/// instance then works again (after its restart) on a harmless call.
#[test]
fn invalid_output_is_refused_and_the_instance_restarts() {
    let limits = Limits {
        max_output_messages: 8,
        max_payload_bytes: 1000,
        ..Limits::default()
    };
    let one = vec![msg("s", 1, "x")];
    let two = vec![msg("s", 1, "x"), msg("s", 2, "y")];
    let cases = [
        (
            json!({ "mode": "bad-index" }),
            two.clone(),
            "rejected index 2, but the batch has 2 messages",
        ),
        (
            json!({ "mode": "dup-index" }),
            two.clone(),
            "rejected index 0 twice",
        ),
        (
            json!({ "mode": "bad-stream" }),
            one.clone(),
            "message 0: empty stream name",
        ),
        (
            json!({ "mode": "big", "size": 1001 }),
            one.clone(),
            "message 0 on `s`: payload is 1001 bytes, the limit is 1000 bytes",
        ),
        (
            json!({ "mode": "flood", "count": 5 }),
            two.clone(),
            "emitted 10 messages in one call, the limit is 8",
        ),
    ];
    for (config, batch, expected) in cases {
        let mut f = hostile(config.clone(), limits.clone());
        let err = f.process(&batch).unwrap_err();
        assert!(
            matches!(&err, FunctionError::InvalidOutput { reason, .. } if reason == expected),
            "{config}: {err:?}"
        );
        assert!(err.restarts_instance());
        assert!(f.is_poisoned(), "{config}");
        // The modes that forge output do so on every batch; `tick` goes
        // through the SDK and shows the restarted instance works.
        assert_eq!(f.tick(5).unwrap(), Output::default(), "{config}");
        assert_eq!(f.restarts(), 1, "{config}");
    }

    // Within the limits, the same modes are accepted.
    let mut f = hostile(json!({ "mode": "flood", "count": 4 }), limits.clone());
    assert_eq!(f.process(&two).unwrap().messages.len(), 8);
    let mut f = hostile(json!({ "mode": "big", "size": 1000 }), limits);
    assert_eq!(f.process(&one).unwrap().messages[0].payload.len(), 1000);
}

#[test]
fn function_error_fails_the_call_but_keeps_the_instance() {
    let mut f = hostile(json!({ "mode": "fail" }), Limits::default());
    let err = f.process(&harmless()).unwrap_err();
    assert!(
        matches!(&err, FunctionError::Failed { message, .. }
            if message == "hostile: failing the batch as configured"),
        "{err:?}"
    );
    assert!(!err.restarts_instance());
    assert!(!f.is_poisoned());
    assert_eq!(f.restarts(), 0);
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
fn the_sandbox_grants_no_filesystem_environment_or_network() {
    let mut f = hostile(json!({ "mode": "escape" }), Limits::default());
    let out = f.process(&[msg("s", 1, "x")]).unwrap();
    let seen = json_of(&out.messages[0]);
    assert_eq!(seen["fs"], Value::Null, "{seen}");
    assert_eq!(seen["env"], json!([]), "{seen}");
    assert_eq!(seen["args"], json!(0), "{seen}");
    assert_ne!(seen["net"], json!("connected"), "{seen}");
}

#[test]
fn chatty_function_is_throttled_not_failed() {
    let mut f = hostile(json!({ "mode": "log" }), Limits::default());
    let batch: Vec<Message> = (0..500).map(|i| msg("s", i, "x")).collect();
    let out = f.process(&batch).unwrap();
    assert_eq!(out.messages.len(), 500);
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
    assert_eq!(f.process(&temps(&[2.0])).unwrap().messages.len(), 1);

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
