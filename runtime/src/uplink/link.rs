//! One connection's life: frames in and out, outbox work, timers, probes —
//! whatever the [`ClientSession`] asks for, until it (or the link) ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fogline_protocol::dial::{Attempt, Dialer, Transport};
use fogline_protocol::frame::ErrorCode;
use fogline_protocol::session::client::{ClientAction, ClientSession, CloseReason};
use fogline_protocol::session::resume::Resume;
use fogline_protocol::BatchFrame;
use fogline_transport::client::{ClientTransport, Connected};
use fogline_transport::conn::Connection;
use fogline_transport::TransportError;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::outbox_ops::OpError;
use super::{initial_rtt, Uplink, CERT_CHECK};
use crate::outbox::OutboxIdentity;

/// How a connection's life ended.
pub(super) enum End {
    /// The daemon is stopping.
    Shutdown,
    /// The session is over; reconnect.
    Closed {
        /// Why, for the log.
        reason: String,
        /// Short label for metrics.
        label: &'static str,
    },
    /// A probe found a working connection while this one was silent: use it.
    Switch(Box<Connected>, Attempt),
}

/// What one connection's driver works with.
pub(super) struct Ctx<'a> {
    pub uplink: &'a Uplink,
    pub transport: &'a ClientTransport,
    pub server: &'a str,
    pub addr: SocketAddr,
    pub attempt: Attempt,
    pub id: OutboxIdentity,
}

/// A fresh connection tried alongside the session.
struct Probe<'a> {
    started: Instant,
    attempt: Attempt,
    /// A periodic QUIC retry while on TCP (not a silence probe).
    quic_retry: bool,
    connecting: Pin<Box<dyn Future<Output = Result<Connected, TransportError>> + Send + 'a>>,
}

async fn join_read(
    slot: &mut Option<JoinHandle<Result<Option<BatchFrame>, OpError>>>,
) -> Result<Option<BatchFrame>, String> {
    match slot {
        Some(t) => {
            let r = match t.await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("outbox task failed: {e}")),
            };
            *slot = None;
            r
        }
        None => std::future::pending().await,
    }
}

async fn probe_done<'a>(
    slot: &mut Option<Probe<'a>>,
) -> (Probe<'a>, Result<Connected, TransportError>) {
    match slot {
        Some(p) => {
            let r = (&mut p.connecting).await;
            match slot.take() {
                Some(p) => (p, r),
                None => std::future::pending().await,
            }
        }
        None => std::future::pending().await,
    }
}

/// The status being made, when it is done (`None` if its task failed).
async fn join_status(
    slot: &mut Option<JoinHandle<fogline_protocol::status::NodeStatus>>,
) -> Option<fogline_protocol::status::NodeStatus> {
    match slot {
        Some(t) => {
            let r = t.await.ok();
            *slot = None;
            r
        }
        None => std::future::pending().await,
    }
}

/// Resolves when a deployment's state changed (never without a deployer).
async fn deployed(deployer: &Option<crate::deploy::DeployHandle>) {
    match deployer {
        Some(d) => d.changed.notified().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl<'a> Ctx<'a> {
    fn probe(&self, attempt: Attempt, quic_retry: bool, rtt: Duration) -> Probe<'a> {
        let (transport, addr) = (self.transport, self.addr);
        let name = self.uplink.config.server_name(self.server);
        // Paced by the path's measured RTT: on a fast path the Initial is
        // retransmitted often enough to catch a restart within the attempt.
        let rtt = initial_rtt(Some(rtt));
        if !quic_retry {
            self.uplink.state.probes.fetch_add(1, Ordering::AcqRel);
            metrics::counter!(super::events::PROBES_TOTAL).increment(1);
        }
        Probe {
            started: Instant::now(),
            attempt,
            quic_retry,
            connecting: Box::pin(async move {
                // No early data: the session's Hello is written only if
                // this connection is taken.
                transport
                    .connect(attempt.transport, addr, &name, attempt.timeout, rtt, &[])
                    .await
            }),
        }
    }

    /// Runs `session` over `conn` until it ends.
    pub(super) async fn drive(
        self,
        mut session: ClientSession,
        conn: Connection,
        dialer: &mut Dialer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let Connection {
            mut reader,
            mut writer,
            handle,
        } = conn;
        let up = self.uplink;
        let outbox = &up.outbox;
        let mut read: Option<JoinHandle<Result<Option<BatchFrame>, OpError>>> = None;
        let mut probe: Option<Probe<'a>> = None;
        let mut cert_check = tokio::time::interval(CERT_CHECK);
        cert_check.tick().await;
        let on_tcp = self.attempt.transport == Transport::Tcp;
        let mut sent_records = 0u64;
        // The node's status: once active, then every status_every.
        let mut status_at = up.status.as_ref().map(|_| Instant::now());
        let mut status_task: Option<JoinHandle<fogline_protocol::status::NodeStatus>> = None;

        let end = 'conn: loop {
            while let Some(action) = session.poll_action() {
                match action {
                    ClientAction::Send(frame) => match writer.queue(&frame) {
                        Ok(n) => {
                            if let fogline_protocol::Frame::Batch(b) = &frame {
                                sent_records += u64::from(b.record_count);
                                super::events::BatchSent {
                                    records: b.record_count,
                                    bytes: n,
                                }
                                .emit();
                            }
                        }
                        Err(e) => session.close(CloseReason::Local {
                            detail: format!("encoding a frame: {e}"),
                        }),
                    },
                    ClientAction::Resume {
                        decision,
                        cursor,
                        top,
                    } => {
                        let node = session.node_id().unwrap_or("?").to_string();
                        let r = outbox.resume(&node, self.id, decision, cursor, top).await;
                        match r {
                            Ok((next_seq, regressions)) => {
                                up.state
                                    .cursor_regressions
                                    .fetch_add(regressions, Ordering::AcqRel);
                                if decision != Resume::Ahead {
                                    up.set_connected(true).await;
                                    up.note_ack(cursor);
                                }
                                session.handle_resumed(next_seq, Instant::now());
                                dialer.resumed();
                            }
                            Err(e) => session.close(CloseReason::Local {
                                detail: format!("applying the aggregator's cursor {cursor}: {e}"),
                            }),
                        }
                    }
                    ClientAction::Read {
                        after,
                        max_records,
                        max_bytes,
                    } => {
                        let outbox = outbox.clone();
                        read = Some(tokio::spawn(async move {
                            outbox.read_batch(after, max_records, max_bytes).await
                        }));
                    }
                    ClientAction::Delete { through, batches } => {
                        // The aggregator holds these records: a delete that
                        // fails (full disk, I/O) costs room, not data, and
                        // the next one covers it — the session goes on.
                        match outbox.delete_acked(through, batches).await {
                            Ok(n) => {
                                metrics::counter!(super::events::RECORDS_ACKED_TOTAL)
                                    .increment(n as u64);
                                up.deletes_work();
                            }
                            Err(e) => up.deletes_fail(through, &e),
                        }
                    }
                    ClientAction::Probe => {
                        if probe.as_ref().is_none_or(|p| p.quic_retry) {
                            debug!(
                                server = self.server,
                                "The aggregator is silent; trying a fresh connection alongside."
                            );
                            let attempt = dialer.probe(self.attempt.server, self.attempt.transport);
                            probe = Some(self.probe(attempt, false, handle.rtt()));
                        }
                    }
                    ClientAction::Deploy(d) => match &up.deployer {
                        Some(deployer) => {
                            let (rollout, function) = (d.rollout, d.function.clone());
                            if !deployer.offer(d) {
                                debug!(rollout, %function, "Deployments queue full; the aggregator sends this one again.");
                            }
                        }
                        None => debug!(
                            rollout = d.rollout,
                            "A deployment arrived, and this node takes none."
                        ),
                    },
                    ClientAction::Close(reason) => {
                        close(&mut writer, &handle, reason.code(), &reason.to_string()).await;
                        break 'conn End::Closed {
                            label: reason.label(),
                            reason: reason.to_string(),
                        };
                    }
                }
            }
            if session.is_closed() {
                break End::Closed {
                    reason: "session closed".into(),
                    label: "local",
                };
            }
            up.state
                .in_flight
                .store(session.in_flight() as u64, Ordering::Release);
            let quic_retry_at = if on_tcp && probe.is_none() {
                dialer.quic_retry_due(self.attempt.server)
            } else {
                None
            };
            tokio::select! {
                _ = shutdown.changed() => {
                    close(&mut writer, &handle, ErrorCode::Ok, "node shutting down").await;
                    break End::Shutdown;
                }
                r = writer.flush(), if writer.queued() > 0 => {
                    if let Err(e) = r {
                        break lost(&handle, e);
                    }
                }
                frame = reader.next() => match frame {
                    Ok(frame) => {
                        let acked = session.stats().acked;
                        session.handle_frame(frame, Instant::now());
                        if session.stats().acked > acked {
                            up.note_ack(session.stats().acked);
                            dialer.progressed();
                            up.state.healed();
                        }
                    }
                    Err(TransportError::Decode(e)) => session.close(CloseReason::Violation {
                        detail: format!("malformed frame: {e}"),
                    }),
                    Err(e) => break lost(&handle, e),
                },
                r = join_read(&mut read) => match r {
                    Ok(batch) => session.handle_read(batch, Instant::now()),
                    Err(detail) => session.close(CloseReason::Local { detail }),
                },
                _ = up.committed.notified() => {
                    session.handle_committed(up.committed_seq.load(Ordering::Acquire), Instant::now());
                }
                _ = sleep_until(session.poll_timeout()) => session.handle_timeout(Instant::now()),
                (p, r) = probe_done(&mut probe) => match r {
                    Ok(c) if p.quic_retry => {
                        info!(server = self.server, "QUIC works again; moving over from TCP.");
                        close(&mut writer, &handle, ErrorCode::Ok, "moving to QUIC").await;
                        break End::Switch(Box::new(c), p.attempt);
                    }
                    Ok(c) if session.silent_since().is_some_and(|s| s <= p.started) => {
                        up.state.probe_switches.fetch_add(1, Ordering::AcqRel);
                        metrics::counter!(super::events::PROBE_SWITCHES_TOTAL).increment(1);
                        info!(server = self.server, silent_for = ?p.started.elapsed() + session.silent_since().map_or(Duration::ZERO, |s| p.started.saturating_duration_since(s)), "The old connection is silent but a fresh one works (aggregator restarted?); moving over.");
                        handle.close(ErrorCode::Timeout, "silent; moved to a fresh connection");
                        break End::Switch(Box::new(c), p.attempt);
                    }
                    Ok(c) => c.conn.handle.close(ErrorCode::Ok, "probe not needed"),
                    Err(e) => {
                        debug!(server = self.server, transport = p.attempt.transport.name(), error = %e, "Probe failed.");
                        if p.quic_retry {
                            dialer.quic_retry_failed(self.attempt.server, Instant::now());
                        } else if session.silent_since().is_some_and(|s| s <= p.started) {
                            // Still silent: probe again at once, so a restart is
                            // caught within one Initial retransmission, not a
                            // probe period later. Bounded by silence_timeout.
                            probe = Some(self.probe(p.attempt, false, handle.rtt()));
                        }
                    }
                },
                // A deployment moved: tell the aggregator now, not at the
                // next status_every.
                _ = deployed(&up.deployer), if up.status.is_some() => {
                    status_at = Some(Instant::now());
                }
                _ = sleep_until(status_at), if session.is_active() && status_task.is_none() => {
                    if let Some(source) = up.status.clone() {
                        status_task = Some(tokio::task::spawn_blocking(move || source()));
                    }
                    status_at = Some(Instant::now() + up.config.status_every);
                }
                r = join_status(&mut status_task) => {
                    if let Some(status) = r {
                        session.send_status(status, Instant::now());
                    }
                }
                _ = sleep_until(quic_retry_at) => {
                    let attempt = dialer.probe(self.attempt.server, Transport::Quic);
                    probe = Some(self.probe(attempt, true, handle.rtt()));
                }
                _ = cert_check.tick() => {
                    // An idle session that held is progress too.
                    if dialer.session_productive(Instant::now()) {
                        up.state.healed();
                    }
                    match self.transport.reload_if_changed() {
                    Ok(true) => {
                        // The aggregator checks the certificate at the
                        // handshake: reconnect to present the new one.
                        close(&mut writer, &handle, ErrorCode::Ok, "certificate renewed").await;
                        break End::Closed {
                            reason: "node certificate renewed; reconnecting to present it".into(),
                            label: "certificate",
                        };
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "Node certificate files changed but cannot be loaded; keeping the previous ones."),
                }},
            }
        };
        if let Some(t) = read.take() {
            t.abort();
        }
        if let Some(t) = status_task.take() {
            t.abort();
        }
        debug!(server = self.server, sent_records, "Connection ended.");
        end
    }
}

/// The link failed under us.
fn lost(handle: &fogline_transport::conn::ConnHandle, e: TransportError) -> End {
    let e = handle.explain(e);
    let label = match &e {
        e if e.is_refusal() => "refused",
        TransportError::Closed { code, .. } if *code == ErrorCode::Superseded => "superseded",
        TransportError::Closed { code, .. } if *code == ErrorCode::ShuttingDown => {
            "aggregator_shutdown"
        }
        TransportError::Closed { .. } => "closed_by_aggregator",
        _ => "connection_lost",
    };
    End::Closed {
        reason: e.to_string(),
        label,
    }
}

/// Closes gracefully; the code reaches the aggregator over either transport.
async fn close(
    writer: &mut fogline_transport::framed::FrameWriter<fogline_transport::conn::BoxWrite>,
    handle: &fogline_transport::conn::ConnHandle,
    code: ErrorCode,
    reason: &str,
) {
    fogline_transport::conn::close_with(writer, handle, code, reason, Duration::from_millis(500))
        .await;
}
