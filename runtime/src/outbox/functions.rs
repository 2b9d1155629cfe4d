//! What the outbox keeps for functions, in the same transactions as the
//! records: durable state per `pipeline/function` and version generation,
//! which version runs, inputs held behind an open circuit breaker, and the
//! dead letters' listing and replay requests.
//!
//! The outbox gives no meaning to state keys and values: they are opaque
//! bytes the function wrote.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, OptionalExtension, Transaction};

use super::{Commit, DeadLetter, Outbox, OutboxError, Stage};
use crate::functions::StateChange;
use crate::message::Message;

/// One function's state changes from one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCommit {
    /// `pipeline/function`.
    pub owner: String,
    /// The version generation the state belongs to.
    pub generation: u64,
    /// The changes, in order.
    pub changes: Vec<StateChange>,
}

/// An input parked behind an open circuit breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// `pipeline/function`.
    pub owner: String,
    /// The function's position in its pipeline.
    pub step: usize,
    /// The input.
    pub message: Message,
}

/// A held input read back to be run.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldInput {
    /// Its row id (they run in id order).
    pub id: i64,
    /// The step it waits at.
    pub step: usize,
    /// The input.
    pub message: Message,
}

/// A change to which version of a function runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionWrite {
    /// `owner` now runs this version; state of `retire` (if any) goes.
    Activate {
        /// `pipeline/function`.
        owner: String,
        /// Its generation.
        generation: u64,
        /// SHA-256 of the module, hex.
        module_sha256: String,
        /// SHA-256 of the init config, hex.
        config_sha256: String,
        /// The init config itself (JSON), to start this version again.
        config_json: String,
        /// A generation whose state is deleted.
        retire: Option<u64>,
    },
    /// A version was refused (failed on probation): its state goes, and it
    /// is remembered so the same files are not tried again.
    Reject {
        /// `pipeline/function`.
        owner: String,
        /// Its generation.
        generation: u64,
        /// SHA-256 of the module, hex.
        module_sha256: String,
        /// SHA-256 of the init config, hex.
        config_sha256: String,
        /// Why.
        reason: String,
    },
    /// Write a whole state under a generation (a new version starts from
    /// the running one's state).
    Seed {
        /// `pipeline/function`.
        owner: String,
        /// Its generation.
        generation: u64,
        /// Every entry.
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
}

/// Which version of a function the outbox says runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FunctionRecord {
    /// `pipeline/function`.
    pub owner: String,
    /// Its state's generation.
    pub generation: u64,
    /// SHA-256 of the module, hex.
    pub module_sha256: String,
    /// SHA-256 of the init config, hex.
    pub config_sha256: String,
    /// The init config (JSON).
    pub config_json: String,
    /// Since when (ms).
    pub since_ms: u64,
    /// The last version refused: module and config SHA-256, why, when.
    pub rejected: Option<(String, String, String, u64)>,
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredDeadLetter {
    /// Its id.
    pub id: i64,
    /// When (ms).
    pub created_ms: u64,
    /// The pipeline (or `ingest`).
    pub pipeline: String,
    /// The function (or ingest check).
    pub function: String,
    /// Short reason.
    pub reason: String,
    /// `input` or `output`.
    pub stage: String,
    /// Why.
    pub error: String,
    /// The message's stream.
    pub stream: String,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Its payload's full size.
    pub payload_size: u64,
    /// The payload kept (ingest keeps the first KiB of what it refused).
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Whether a replay was asked for.
    pub replay_requested: bool,
}

impl StoredDeadLetter {
    /// Whether its whole payload was kept (a truncated one cannot be
    /// replayed).
    pub fn is_complete(&self) -> bool {
        self.payload.len() as u64 == self.payload_size
    }

    /// Back to a dead letter (for a replay that fails again).
    pub fn to_dead_letter(&self) -> DeadLetter {
        DeadLetter {
            pipeline: self.pipeline.clone(),
            function: self.function.clone(),
            reason: self.reason.clone(),
            stage: Stage::parse(&self.stage),
            error: self.error.clone(),
            payload_size: self.payload_size as usize,
            message: Message {
                stream: self.stream.clone(),
                timestamp_ms: self.timestamp_ms,
                payload: self.payload.clone(),
            },
        }
    }

    /// Whether it is an output of its function.
    pub fn stage(&self) -> Stage {
        Stage::parse(&self.stage)
    }
}

/// Which dead letters a listing or replay means.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only this pipeline.
    pub pipeline: Option<String>,
    /// Only this function.
    pub function: Option<String>,
    /// Only this reason.
    pub reason: Option<String>,
    /// Only these ids.
    pub ids: Vec<i64>,
    /// At most this many (newest first for a listing).
    pub limit: usize,
}

impl DeadLetterFilter {
    fn sql(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value;
        let mut clauses = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some(p) = &self.pipeline {
            args.push(Value::Text(p.clone()));
            clauses.push(format!("pipeline = ?{}", args.len()));
        }
        if let Some(f) = &self.function {
            args.push(Value::Text(f.clone()));
            clauses.push(format!("function = ?{}", args.len()));
        }
        if let Some(r) = &self.reason {
            args.push(Value::Text(r.clone()));
            clauses.push(format!("reason = ?{}", args.len()));
        }
        if !self.ids.is_empty() {
            let list: Vec<String> = self.ids.iter().map(i64::to_string).collect();
            clauses.push(format!("id IN ({})", list.join(",")));
        }
        let filter = if clauses.is_empty() {
            "1".to_string()
        } else {
            clauses.join(" AND ")
        };
        (filter, args)
    }
}

/// The function side of one commit, inside its transaction.
pub(super) fn write(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    for v in &commit.versions {
        match v {
            VersionWrite::Seed {
                owner,
                generation,
                entries,
            } => {
                tx.prepare_cached(
                    "DELETE FROM function_state WHERE owner = ?1 AND generation = ?2",
                )?
                .execute(params![owner, *generation as i64])?;
                let mut put = tx.prepare_cached(
                    "INSERT OR REPLACE INTO function_state (owner, generation, key, value) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (k, v) in entries {
                    put.execute(params![owner, *generation as i64, k, v])?;
                }
            }
            VersionWrite::Activate { .. } | VersionWrite::Reject { .. } => {}
        }
    }
    if !commit.state.is_empty() {
        let mut put = tx.prepare_cached(
            "INSERT OR REPLACE INTO function_state (owner, generation, key, value) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut del = tx.prepare_cached(
            "DELETE FROM function_state WHERE owner = ?1 AND generation = ?2 AND key = ?3",
        )?;
        for s in &commit.state {
            for c in &s.changes {
                match &c.value {
                    Some(v) => put.execute(params![s.owner, s.generation as i64, c.key, v])?,
                    None => del.execute(params![s.owner, s.generation as i64, c.key])?,
                };
            }
        }
    }
    let now = crate::clock::now_ms() as i64;
    for v in &commit.versions {
        match v {
            VersionWrite::Activate {
                owner,
                generation,
                module_sha256,
                config_sha256,
                config_json,
                retire,
            } => {
                tx.prepare_cached(
                    "INSERT INTO function_versions (owner, generation, module_sha256, config_sha256, config_json, since_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (owner) DO UPDATE SET generation = ?2, module_sha256 = ?3,
                         config_sha256 = ?4, config_json = ?5, since_ms = ?6",
                )?
                .execute(params![owner, *generation as i64, module_sha256, config_sha256, config_json, now])?;
                if let Some(old) = retire {
                    tx.prepare_cached(
                        "DELETE FROM function_state WHERE owner = ?1 AND generation = ?2",
                    )?
                    .execute(params![owner, *old as i64])?;
                }
            }
            VersionWrite::Reject {
                owner,
                generation,
                module_sha256,
                config_sha256,
                reason,
            } => {
                tx.prepare_cached(
                    "DELETE FROM function_state WHERE owner = ?1 AND generation = ?2",
                )?
                .execute(params![owner, *generation as i64])?;
                tx.prepare_cached(
                    "UPDATE function_versions SET rejected_module = ?2, rejected_config = ?3,
                         rejected_reason = ?4, rejected_ms = ?5 WHERE owner = ?1",
                )?
                .execute(params![
                    owner,
                    module_sha256,
                    config_sha256,
                    reason,
                    now
                ])?;
            }
            VersionWrite::Seed { .. } => {}
        }
    }
    if !commit.held.is_empty() {
        let mut put = tx.prepare_cached(
            "INSERT INTO held (owner, step, stream, timestamp_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for h in &commit.held {
            put.execute(params![
                h.owner,
                h.step as i64,
                h.message.stream,
                h.message.timestamp_ms as i64,
                h.message.payload
            ])?;
        }
    }
    for (owner, through) in &commit.held_consumed {
        tx.prepare_cached("DELETE FROM held WHERE owner = ?1 AND id <= ?2")?
            .execute(params![owner, through])?;
    }
    if !commit.replayed.is_empty() {
        let mut del = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
        for id in &commit.replayed {
            del.execute([id])?;
        }
    }
    Ok(())
}

impl Outbox {
    fn fsql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> OutboxError + '_ {
        move |source| OutboxError::Sql {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Which version of `owner` runs, as recorded.
    pub fn function_record(&self, owner: &str) -> Result<Option<FunctionRecord>, OutboxError> {
        read_record(&self.conn, owner).map_err(self.fsql("read function version"))
    }

    /// Record that `owner` runs a version (at start, before any batch).
    pub fn activate_version(&mut self, write: VersionWrite) -> Result<(), OutboxError> {
        let commit = Commit {
            versions: vec![write],
            ..Commit::default()
        };
        self.commit(&commit).map(|_| ())
    }

    /// A new, never used generation number.
    pub fn next_generation(&mut self) -> Result<u64, OutboxError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|source| OutboxError::Sql {
            path: path.clone(),
            op: "allocate generation",
            source,
        })?;
        let g: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'next_generation'",
                [],
                |r| r.get(0),
            )
            .map_err(|source| OutboxError::Sql {
                path: path.clone(),
                op: "allocate generation",
                source,
            })?;
        tx.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'next_generation'",
            [],
        )
        .map_err(|source| OutboxError::Sql {
            path: path.clone(),
            op: "allocate generation",
            source,
        })?;
        tx.commit().map_err(|source| OutboxError::Sql {
            path: path.clone(),
            op: "allocate generation",
            source,
        })?;
        Ok(g as u64)
    }

    /// The committed state of `owner` at `generation`.
    pub fn load_state(
        &self,
        owner: &str,
        generation: u64,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, value FROM function_state WHERE owner = ?1 AND generation = ?2",
            )
            .map_err(self.fsql("read function state"))?;
        let rows = stmt
            .query_map(params![owner, generation as i64], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .and_then(|rows| rows.collect::<Result<BTreeMap<_, _>, _>>())
            .map_err(self.fsql("read function state"))?;
        Ok(rows)
    }

    /// Delete state of generations no version runs (a candidate that was on
    /// probation when the daemon stopped; functions removed from the config).
    pub fn prune_state(&mut self, keep: &[(String, u64)]) -> Result<usize, OutboxError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|source| OutboxError::Sql {
            path: path.clone(),
            op: "prune function state",
            source,
        })?;
        let rows: Vec<(String, i64)> = {
            let mut stmt = tx
                .prepare("SELECT DISTINCT owner, generation FROM function_state")
                .map_err(|source| OutboxError::Sql {
                    path: path.clone(),
                    op: "prune function state",
                    source,
                })?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|r| r.collect::<Result<Vec<_>, _>>())
                .map_err(|source| OutboxError::Sql {
                    path: path.clone(),
                    op: "prune function state",
                    source,
                })?;
            rows
        };
        let mut n = 0;
        for (owner, generation) in rows {
            if keep
                .iter()
                .any(|(o, g)| *o == owner && *g as i64 == generation)
            {
                continue;
            }
            n += tx
                .execute(
                    "DELETE FROM function_state WHERE owner = ?1 AND generation = ?2",
                    params![owner, generation],
                )
                .map_err(|source| OutboxError::Sql {
                    path: path.clone(),
                    op: "prune function state",
                    source,
                })?;
        }
        tx.commit().map_err(|source| OutboxError::Sql {
            path: path.clone(),
            op: "prune function state",
            source,
        })?;
        Ok(n)
    }

    /// Held inputs of functions no pipeline runs any more (the config
    /// changed) become dead letters (reason `orphaned`), so they can be
    /// listed and replayed. Returns how many.
    pub fn orphan_held(&mut self, running: &[String]) -> Result<usize, OutboxError> {
        let path = self.path.clone();
        let err = move |source| OutboxError::Sql {
            path: path.clone(),
            op: "dead-letter orphaned held inputs",
            source,
        };
        let tx = self.conn.transaction().map_err(&err)?;
        let owners: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT DISTINCT owner FROM held")
                .map_err(&err)?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .and_then(|r| r.collect::<Result<Vec<String>, _>>())
                .map_err(&err)?;
            rows
        };
        let mut moved = 0;
        let now = crate::clock::now_ms() as i64;
        for owner in owners.iter().filter(|o| !running.contains(o)) {
            let (pipeline, function) = owner.split_once('/').unwrap_or((owner.as_str(), ""));
            moved += tx
                .execute(
                    "INSERT INTO dead_letters (created_ms, pipeline, function, error, stream, timestamp_ms, payload_size, payload, reason, stage)
                     SELECT ?1, ?2, ?3, ?4, stream, timestamp_ms, length(payload), payload, 'orphaned', 'input'
                     FROM held WHERE owner = ?5 ORDER BY id",
                    params![
                        now,
                        pipeline,
                        function,
                        format!("held for function `{function}` of pipeline `{pipeline}`, which the config no longer has"),
                        owner
                    ],
                )
                .map_err(&err)?;
            tx.execute("DELETE FROM held WHERE owner = ?1", [owner])
                .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(moved)
    }

    /// Held inputs per owner: `(count, bytes)`.
    pub fn held_counts(&self) -> Result<HashMap<String, (u64, u64)>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT owner, COUNT(*), COALESCE(SUM(LENGTH(stream) + LENGTH(payload)), 0) FROM held GROUP BY owner",
            )
            .map_err(self.fsql("count held inputs"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                ))
            })
            .and_then(|r| r.collect::<Result<HashMap<_, _>, _>>())
            .map_err(self.fsql("count held inputs"))?;
        Ok(rows)
    }

    /// The oldest `limit` held inputs of `owner`, in order.
    pub fn read_held(&self, owner: &str, limit: usize) -> Result<Vec<HeldInput>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, step, stream, timestamp_ms, payload FROM held WHERE owner = ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(self.fsql("read held inputs"))?;
        let rows = stmt
            .query_map(params![owner, limit as i64], |r| {
                Ok(HeldInput {
                    id: r.get(0)?,
                    step: r.get::<_, i64>(1)? as usize,
                    message: Message {
                        stream: r.get(2)?,
                        timestamp_ms: r.get::<_, i64>(3)? as u64,
                        payload: r.get(4)?,
                    },
                })
            })
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
            .map_err(self.fsql("read held inputs"))?;
        Ok(rows)
    }

    /// Dead letters someone asked to replay, oldest first.
    pub fn replay_requests(&self, limit: usize) -> Result<Vec<StoredDeadLetter>, OutboxError> {
        list(&self.conn, "replay = 1", &[], "ORDER BY id", limit)
            .map_err(self.fsql("read replay requests"))
    }

    /// The node clock's high-water mark.
    pub fn clock_high_water(&self) -> Result<u64, OutboxError> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'clock_high_water_ms'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0).max(0) as u64)
            .map_err(self.fsql("read the clock's high-water mark"))
    }
}

fn read_record(
    conn: &rusqlite::Connection,
    owner: &str,
) -> rusqlite::Result<Option<FunctionRecord>> {
    conn.query_row(
        "SELECT owner, generation, module_sha256, config_sha256, since_ms,
                rejected_module, rejected_config, rejected_reason, rejected_ms, config_json
         FROM function_versions WHERE owner = ?1",
        [owner],
        record_from_row,
    )
    .optional()
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FunctionRecord> {
    let rejected = match (
        r.get::<_, Option<String>>(5)?,
        r.get::<_, Option<String>>(6)?,
        r.get::<_, Option<String>>(7)?,
        r.get::<_, Option<i64>>(8)?,
    ) {
        (Some(m), Some(c), Some(why), Some(at)) => Some((m, c, why, at as u64)),
        _ => None,
    };
    Ok(FunctionRecord {
        owner: r.get(0)?,
        generation: r.get::<_, i64>(1)? as u64,
        module_sha256: r.get(2)?,
        config_sha256: r.get(3)?,
        config_json: r.get(9)?,
        since_ms: r.get::<_, i64>(4)? as u64,
        rejected,
    })
}

fn list(
    conn: &rusqlite::Connection,
    filter: &str,
    args: &[rusqlite::types::Value],
    order: &str,
    limit: usize,
) -> rusqlite::Result<Vec<StoredDeadLetter>> {
    let sql = format!(
        "SELECT id, created_ms, pipeline, function, reason, stage, error, stream, timestamp_ms,
                payload_size, payload, replay
         FROM dead_letters WHERE {filter} {order} LIMIT {limit}"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok(StoredDeadLetter {
                id: r.get(0)?,
                created_ms: r.get::<_, i64>(1)? as u64,
                pipeline: r.get(2)?,
                function: r.get(3)?,
                reason: r.get(4)?,
                stage: r.get(5)?,
                error: r.get(6)?,
                stream: r.get(7)?,
                timestamp_ms: r.get::<_, i64>(8)? as u64,
                payload_size: r.get::<_, i64>(9)? as u64,
                payload: r.get(10)?,
                replay_requested: r.get::<_, i64>(11)? != 0,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Dead letters matching `filter`, newest first (for `dead-letters list`).
pub fn list_dead_letters(
    path: &std::path::Path,
    filter: &DeadLetterFilter,
) -> Result<Vec<StoredDeadLetter>, OutboxError> {
    let conn = super::open_connection(path, crate::config::SyncMode::Full, true)?;
    let (clause, args) = filter.sql();
    list(
        &conn,
        &clause,
        &args,
        "ORDER BY id DESC",
        filter.limit.max(1),
    )
    .map_err(|source| OutboxError::Sql {
        path: path.to_path_buf(),
        op: "list dead letters",
        source,
    })
}

/// Ask the daemon to replay the dead letters matching `filter` (it picks
/// them up within a second, or at its next start). Returns how many were
/// marked, and how many could not be (a payload truncated at ingest).
pub fn request_replay(
    path: &std::path::Path,
    filter: &DeadLetterFilter,
) -> Result<(usize, usize), OutboxError> {
    let conn = super::open_connection(path, crate::config::SyncMode::Full, false)?;
    let err = |op| {
        move |source| OutboxError::Sql {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let (clause, args) = filter.sql();
    let limit = if filter.limit == 0 {
        -1
    } else {
        filter.limit as i64
    };
    let marked = conn
        .execute(
            &format!(
                "UPDATE dead_letters SET replay = 1 WHERE id IN (
                     SELECT id FROM dead_letters WHERE {clause} AND length(payload) = payload_size
                     ORDER BY id LIMIT {limit})"
            ),
            rusqlite::params_from_iter(args.iter()),
        )
        .map_err(err("request replay"))?;
    let truncated: i64 = conn
        .query_row(
            &format!(
                "SELECT COUNT(*) FROM dead_letters WHERE {clause} AND length(payload) != payload_size"
            ),
            rusqlite::params_from_iter(args.iter()),
            |r| r.get(0),
        )
        .map_err(err("request replay"))?;
    Ok((marked, truncated as usize))
}

/// Every function version the outbox records (for `status`).
pub fn function_records(path: &std::path::Path) -> Result<Vec<FunctionRecord>, OutboxError> {
    let conn = super::open_connection(path, crate::config::SyncMode::Full, true)?;
    let err = |source| OutboxError::Sql {
        path: path.to_path_buf(),
        op: "read function versions",
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT owner, generation, module_sha256, config_sha256, since_ms,
                    rejected_module, rejected_config, rejected_reason, rejected_ms, config_json
             FROM function_versions ORDER BY owner",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map([], record_from_row)
        .and_then(|r| r.collect::<Result<Vec<_>, _>>())
        .map_err(|source| OutboxError::Sql {
            path: path.to_path_buf(),
            op: "read function versions",
            source,
        })?;
    Ok(rows)
}
