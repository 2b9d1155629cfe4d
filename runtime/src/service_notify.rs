//! Telling the service manager how the daemon is (sd_notify(3), through the
//! `sd-notify` crate): `READY=1` once it listens and serves, `WATCHDOG=1`
//! every half `WatchdogSec` while the pipeline is not wedged, `STOPPING=1`
//! on the way out. Without `NOTIFY_SOCKET` (not started by systemd) every
//! call does nothing.
//!
//! Why the watchdog looks only at a wedged pipeline: a restart is the
//! watchdog's remedy, and it cures a stuck commit or a dead worker, not a
//! full disk (that drains by itself, through the uplink a restart would
//! interrupt), a refused certificate or an unreachable aggregator. Those
//! stay on `/healthz` for alerting.

use std::sync::Arc;
use std::time::Duration;

use fogline_telemetry::health::{Component, Problem, ProblemKind};
use sd_notify::NotifyState;
use tokio::task::JoinHandle;

use crate::daemon::LiveState;

/// Tells the service manager the daemon is up, with a one-line status.
pub fn ready(status: &str) {
    send(
        &[NotifyState::Ready, NotifyState::Status(status)],
        "READY=1",
    );
}

/// Tells the service manager the daemon is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

/// Whether a watchdog ping is deserved: no pipeline problem a restart
/// would cure (see the module's doc).
pub fn pipeline_alive(problems: &[Problem]) -> bool {
    !problems
        .iter()
        .any(|p| p.component == Component::Pipeline && p.kind == ProblemKind::Wedged)
}

/// Pings the watchdog every half of its period while [`pipeline_alive`];
/// `None` when the service manager set no watchdog. Abort the task when the
/// daemon stops.
pub fn spawn_watchdog(live: Arc<LiveState>) -> Option<JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(100));
    tracing::info!(
        watchdog = ?period,
        ping_every = ?every,
        "Pinging the service manager's watchdog while the pipeline is not wedged."
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withheld = false;
        loop {
            tick.tick().await;
            let problems = crate::telemetry::problems(&live, crate::clock::now_ms());
            if pipeline_alive(&problems) {
                if withheld {
                    tracing::info!("The pipeline moves again; watchdog pings resume.");
                    withheld = false;
                }
                send(&[NotifyState::Watchdog], "WATCHDOG=1");
            } else if !withheld {
                withheld = true;
                let why: Vec<String> = problems.iter().map(ToString::to_string).collect();
                tracing::error!(
                    watchdog = ?period,
                    problems = %why.join("; "),
                    "The pipeline is wedged: no more watchdog pings, so the service manager restarts the daemon unless it recovers first."
                );
            }
        }
    }))
}

fn send(state: &[NotifyState], what: &str) {
    if let Err(e) = sd_notify::notify(state) {
        // The daemon works on without its manager knowing; say so once per call.
        tracing::warn!(error = %e, message = what, "Cannot notify the service manager.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wedged_pipeline_withholds_the_ping() {
        let p = |component, kind| Problem::new(component, kind, 0, "x");
        assert!(pipeline_alive(&[]));
        assert!(pipeline_alive(&[
            p(Component::Pipeline, ProblemKind::DiskFull),
            p(Component::Uplink, ProblemKind::Refused),
            p(Component::Function, ProblemKind::Suspended),
        ]));
        assert!(!pipeline_alive(&[p(
            Component::Pipeline,
            ProblemKind::Wedged
        )]));
    }
}
