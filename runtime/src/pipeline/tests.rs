//! Chains of real functions (the example and hostile components): failure
//! isolation, rollback of state, the circuit breaker and probation.
//! (ARCHITECTURE.md I-13, I-22, I-23, I-24.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::functions::tests::fixture;
use crate::functions::{FunctionInstance, Limits, Module};
use crate::message::Message;
use crate::outbox::Stage;

fn version(generation: u64, tag: &str) -> Version {
    Version {
        generation,
        module_sha256: format!("{tag}-module"),
        config_sha256: format!("{tag}-config"),
        config_json: "{}".into(),
    }
}

fn slot(module: &Module, config: Value, limits: Limits, on_open: OnOpen) -> FunctionSlot {
    let json = config.to_string();
    let started =
        FunctionInstance::from_module(module, "f", &json, limits.clone(), BTreeMap::new())
            .map_err(|e| (e, BTreeMap::new()));
    FunctionSlot::new(
        "p",
        "f",
        0,
        Spec {
            module: module.clone(),
            config_json: json,
            limits,
        },
        version(1, "v1"),
        started,
        BreakerConfig {
            failures: 3,
            cooldown: Duration::from_millis(1000),
            max_cooldown: Duration::from_millis(8000),
        },
        on_open,
        0,
    )
}

fn hostile_chain(config: Value) -> Chain {
    let _ = &fixture().rt;
    Chain::new(
        "p".into(),
        vec![slot(
            &fixture().hostile,
            config,
            Limits::default(),
            OnOpen::Hold,
        )],
    )
}

fn msg(payload: &str) -> Message {
    Message {
        stream: "s/1".into(),
        timestamp_ms: 1,
        payload: payload.as_bytes().to_vec(),
    }
}

fn payloads(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

/// The hostile function's `seen` counter, through a tick.
fn seen(chain: &mut Chain, now: u64) -> u64 {
    let mut r = ChainResult::default();
    chain.tick(now, &mut r);
    let v: Value = serde_json::from_slice(&r.outputs[0].payload).unwrap();
    v["seen"].as_u64().unwrap()
}

#[test]
fn one_poison_message_dead_letters_only_itself() {
    let mut chain = hostile_chain(json!({ "mode": "trap" }));
    let mut batch: Vec<Message> = (0..100).map(|i| msg(&format!("m{i}"))).collect();
    batch[37] = msg("boom");
    batch[80] = msg("boom");
    let mut result = ChainResult::default();
    chain.process(batch, 0, &mut result);
    let want: Vec<String> = (0..100)
        .filter(|i| *i != 37 && *i != 80)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(payloads(&result.outputs), want, "neighbours pass, in order");
    assert_eq!(result.dead_letters.len(), 2);
    assert!(result
        .dead_letters
        .iter()
        .all(|d| d.message.payload == b"boom"
            && d.function == "f"
            && d.reason == "trap"
            && d.stage == Stage::Input
            && d.error.contains("trapped")));
    assert!(!chain.slots()[0].breaker.is_tripped());
}

/// I-22: the state a stateful function commits counts exactly the inputs
/// that were not dead-lettered, however often isolation restarted it.
#[test]
fn isolation_rolls_state_back_and_counts_each_good_input_once() {
    let mut chain = hostile_chain(json!({ "mode": "trap", "report": true }));
    let mut batch: Vec<Message> = (0..100).map(|i| msg(&format!("m{i}"))).collect();
    batch[10] = msg("boom");
    batch[55] = msg("boom");
    batch[99] = msg("boom");
    let mut result = ChainResult::default();
    chain.process(batch, 0, &mut result);
    assert_eq!(result.outputs.len(), 97);
    assert_eq!(result.dead_letters.len(), 3);
    assert_eq!(seen(&mut chain, 1), 97);
    // What is committed agrees: the last state write is the count.
    let last = result.state.last().unwrap().changes.last().unwrap();
    assert_eq!(last.value.as_deref(), Some(&b"97"[..]));
}

#[test]
fn a_spinning_message_is_isolated_too() {
    let limits = Limits {
        call_timeout: Duration::from_millis(50),
        timeout_per_message: Duration::ZERO,
        ..Limits::default()
    };
    let mut chain = Chain::new(
        "p".into(),
        vec![slot(
            &fixture().hostile,
            json!({ "mode": "spin", "report": true }),
            limits,
            OnOpen::Hold,
        )],
    );
    let mut batch: Vec<Message> = (0..32).map(|i| msg(&format!("m{i}"))).collect();
    batch[20] = msg("boom");
    let mut result = ChainResult::default();
    chain.process(batch, 0, &mut result);
    assert_eq!(result.outputs.len(), 31);
    assert_eq!(result.dead_letters.len(), 1);
    assert_eq!(result.dead_letters[0].reason, "timeout");
    assert_eq!(seen(&mut chain, 1), 31);
}

#[test]
fn a_function_failing_on_everything_is_bounded_and_loses_nothing_silently() {
    let mut chain = hostile_chain(json!({ "mode": "fail" }));
    let batch: Vec<Message> = (0..1000).map(|i| msg(&format!("m{i}"))).collect();
    let mut result = ChainResult::default();
    chain.process(batch, 0, &mut result);
    assert!(result.outputs.is_empty());
    assert_eq!(result.dead_letters.len(), 1000, "every input accounted for");
    assert!(result.dead_letters.iter().all(|d| d.reason == "error"));
}

/// I-23: after repeated failed batches the breaker opens; inputs are held
/// (in order, durably: they are in the result for the commit), not called;
/// after the cool-down one probe goes; when it succeeds the breaker closes.
#[test]
fn the_breaker_opens_holds_inputs_and_probes_after_the_cooldown() {
    let mut chain = hostile_chain(json!({ "mode": "trap" }));
    let mut now = 0;
    for _ in 0..3 {
        let mut r = ChainResult::default();
        chain.process(vec![msg("boom")], now, &mut r);
        assert_eq!(r.dead_letters.len(), 1);
        now += 10;
    }
    assert!(chain.slots()[0].breaker.is_tripped());
    let mut r = ChainResult::default();
    chain.process(vec![msg("a"), msg("b")], now, &mut r);
    assert!(r.outputs.is_empty() && r.dead_letters.is_empty());
    assert_eq!(
        r.held
            .iter()
            .map(|h| h.message.payload.clone())
            .collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    assert_eq!(chain.slots()[0].held, 2);
    // New inputs queue behind the held ones, even once the probe may go.
    now += 2000;
    let mut r = ChainResult::default();
    chain.process(vec![msg("c")], now, &mut r);
    assert_eq!(r.held.len(), 1, "queued behind the held ones");
    // The worker drains held inputs: a probe of one, then the rest.
    let mut r = ChainResult::default();
    chain.run_from(0, vec![msg("a")], now, true, &mut r);
    assert_eq!(payloads(&r.outputs), vec!["a"]);
    assert!(
        !chain.slots()[0].breaker.is_tripped(),
        "the probe closed it"
    );
}

#[test]
fn with_dead_letter_policy_an_open_breaker_dead_letters_its_inputs() {
    let mut chain = Chain::new(
        "p".into(),
        vec![slot(
            &fixture().hostile,
            json!({ "mode": "trap" }),
            Limits::default(),
            OnOpen::DeadLetter,
        )],
    );
    for now in 0..3 {
        let mut r = ChainResult::default();
        chain.process(vec![msg("boom")], now, &mut r);
    }
    let mut r = ChainResult::default();
    chain.process(vec![msg("a")], 10, &mut r);
    assert_eq!(r.dead_letters.len(), 1);
    assert_eq!(r.dead_letters[0].reason, "circuit_open");
    assert!(
        r.dead_letters[0].error.contains("circuit open"),
        "{}",
        r.dead_letters[0].error
    );
    assert!(r.held.is_empty());
}

/// I-24: a candidate runs in shadow (its outputs dropped), is promoted after
/// its probation, and from then on its outputs are the ones committed.
#[test]
fn a_candidate_is_promoted_after_its_probation() {
    let fx = fixture();
    let mut chain = Chain::new(
        "p".into(),
        vec![slot(
            &fx.threshold,
            json!({ "field": "temp", "above": 30 }),
            Limits::default(),
            OnOpen::Hold,
        )],
    );
    let candidate = FunctionInstance::from_module(
        &fx.threshold,
        "f",
        &json!({ "field": "temp", "above": 10 }).to_string(),
        Limits::default(),
        BTreeMap::new(),
    )
    .unwrap();
    let s = &mut chain.slots_mut()[0];
    s.probation = 2;
    s.candidate = Some(Candidate {
        instance: candidate,
        version: version(2, "v2"),
        passed: 0,
    });
    let reading = |t: f64| Message {
        stream: "s".into(),
        timestamp_ms: 1,
        payload: json!({ "temp": t }).to_string().into_bytes(),
    };
    for _ in 0..2 {
        let mut r = ChainResult::default();
        chain.process(vec![reading(20.0)], 0, &mut r);
        assert!(
            r.outputs.is_empty(),
            "the running version (above 30) decides"
        );
        assert!(chain.slots()[0].version.generation == 1 || !r.lifecycle.is_empty());
    }
    assert_eq!(chain.slots()[0].version.generation, 2, "promoted");
    let mut r = ChainResult::default();
    chain.process(vec![reading(20.0)], 0, &mut r);
    assert_eq!(r.outputs.len(), 1, "now the new version (above 10) decides");
}

#[test]
fn a_failing_candidate_is_rolled_back_and_the_running_version_carries_on() {
    let fx = fixture();
    let mut chain = Chain::new(
        "p".into(),
        vec![slot(
            &fx.hostile,
            json!({ "mode": "ok", "report": true }),
            Limits::default(),
            OnOpen::Hold,
        )],
    );
    let candidate = FunctionInstance::from_module(
        &fx.hostile,
        "f",
        &json!({ "mode": "trap" }).to_string(),
        Limits::default(),
        BTreeMap::new(),
    )
    .unwrap();
    chain.slots_mut()[0].candidate = Some(Candidate {
        instance: candidate,
        version: version(2, "v2"),
        passed: 0,
    });
    let mut r = ChainResult::default();
    chain.process(vec![msg("a"), msg("boom"), msg("b")], 0, &mut r);
    assert_eq!(
        payloads(&r.outputs),
        vec!["a", "boom", "b"],
        "the running version's outputs"
    );
    assert!(
        matches!(&r.lifecycle[..], [Lifecycle::RolledBack { reason, .. }] if reason.contains("trapped"))
    );
    assert!(chain.slots()[0].candidate.is_none());
    assert_eq!(chain.slots()[0].version.generation, 1);
    assert!(chain.slots()[0].refused.is_some());
    assert_eq!(
        seen(&mut chain, 1),
        3,
        "the running version's state is untouched"
    );
}

#[test]
fn window_state_is_committed_with_the_batch() {
    let fx = fixture();
    let mut chain = Chain::new(
        "p".into(),
        vec![slot(
            &fx.window_avg,
            json!({ "field": "t", "window_ms": 1000 }),
            Limits::default(),
            OnOpen::Hold,
        )],
    );
    let mut r = ChainResult::default();
    let m = Message {
        stream: "s".into(),
        timestamp_ms: 500,
        payload: br#"{"t": 2}"#.to_vec(),
    };
    chain.process(vec![m], 500, &mut r);
    assert!(r.outputs.is_empty());
    assert_eq!(r.state.len(), 1);
    assert_eq!(r.state[0].owner, "p/f");
    assert_eq!(r.state[0].generation, 1);
    let keys: Vec<String> = r.state[0]
        .changes
        .iter()
        .map(|c| String::from_utf8_lossy(&c.key).replace('\x1f', "|"))
        .collect();
    assert_eq!(keys, vec![r#"windows|w["s",0]"#]);
}
