//! The outbox's tables. Additive migrations only: an old file must open.

use rusqlite::Connection;

pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS records (
             seq          INTEGER PRIMARY KEY,
             stream       TEXT    NOT NULL,
             timestamp_ms INTEGER NOT NULL,
             payload      BLOB    NOT NULL
         );
         CREATE TABLE IF NOT EXISTS dead_letters (
             id           INTEGER PRIMARY KEY,
             created_ms   INTEGER NOT NULL,
             pipeline     TEXT    NOT NULL,
             function     TEXT    NOT NULL,
             error        TEXT    NOT NULL,
             stream       TEXT    NOT NULL,
             timestamp_ms INTEGER NOT NULL,
             payload_size INTEGER NOT NULL,
             payload      BLOB    NOT NULL
         );
         -- Superseded by ingest_sessions (per-sender redelivery state).
         DROP TABLE IF EXISTS ingest_dedup;
         -- Persistent MQTT sessions: opaque to the outbox (ingest gives them
         -- meaning), committed with the outputs of the packets that changed them.
         CREATE TABLE IF NOT EXISTS ingest_sessions (
             key  TEXT PRIMARY KEY,
             meta BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS ingest_session_log (
             id    INTEGER PRIMARY KEY,
             key   TEXT NOT NULL,
             entry BLOB NOT NULL
         );
         CREATE INDEX IF NOT EXISTS ingest_session_log_by_key ON ingest_session_log (key, id);
         -- What the uplink found wrong with the aggregator's view of this
         -- outbox (cursor ahead or behind), for status and operators.
         CREATE TABLE IF NOT EXISTS alarms (
             id     INTEGER PRIMARY KEY,
             at_ms  INTEGER NOT NULL,
             kind   TEXT    NOT NULL,
             detail TEXT    NOT NULL
         );
         CREATE TABLE IF NOT EXISTS meta (
             key   TEXT PRIMARY KEY,
             value INTEGER NOT NULL
         );
         INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1);
         -- Identifies this outbox file: a wiped or replaced outbox gets a new
         -- one, so the aggregator's cursor for an older file is never taken
         -- as a statement about this one's records.
         INSERT OR IGNORE INTO meta (key, value) VALUES ('incarnation', random());
         -- A random id made at every daemon start, with the seq numbering
         -- starts from: an older copy of this file restarting is told apart
         -- from the file that moved on (its numbering would silently fork).
         INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', 0);
         INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch_start', 1);
         -- The node's ingest clock never goes back, across restarts too.
         INSERT OR IGNORE INTO meta (key, value) VALUES ('clock_high_water_ms', 0);
         -- Functions' durable state, per `pipeline/function` and version
         -- generation, committed with the outputs of the batch that changed it.
         CREATE TABLE IF NOT EXISTS function_state (
             owner      TEXT    NOT NULL,
             generation INTEGER NOT NULL,
             key        BLOB    NOT NULL,
             value      BLOB    NOT NULL,
             PRIMARY KEY (owner, generation, key)
         ) WITHOUT ROWID;
         -- Which version of each function runs, and the last one refused.
         CREATE TABLE IF NOT EXISTS function_versions (
             owner           TEXT PRIMARY KEY,
             generation      INTEGER NOT NULL,
             module_sha256   TEXT    NOT NULL,
             config_sha256   TEXT    NOT NULL,
             config_json     TEXT    NOT NULL,
             since_ms        INTEGER NOT NULL,
             rejected_module TEXT,
             rejected_config TEXT,
             rejected_reason TEXT,
             rejected_ms     INTEGER
         );
         INSERT OR IGNORE INTO meta (key, value) VALUES ('next_generation', 1);
         -- Inputs parked behind a function's open circuit breaker, in order.
         CREATE TABLE IF NOT EXISTS held (
             id           INTEGER PRIMARY KEY,
             owner        TEXT    NOT NULL,
             step         INTEGER NOT NULL,
             stream       TEXT    NOT NULL,
             timestamp_ms INTEGER NOT NULL,
             payload      BLOB    NOT NULL
         );
         CREATE INDEX IF NOT EXISTS held_by_owner ON held (owner, id);",
    )?;
    // Columns added to older files.
    add_column(
        conn,
        "dead_letters",
        "reason",
        "TEXT NOT NULL DEFAULT 'rejected'",
    )?;
    add_column(
        conn,
        "dead_letters",
        "stage",
        "TEXT NOT NULL DEFAULT 'input'",
    )?;
    add_column(conn, "dead_letters", "replay", "INTEGER NOT NULL DEFAULT 0")?;
    // Bounds and loss accounting (I-32, I-33): each record's lane (its
    // pipeline), usage per lane moved with the rows, commit times by seq
    // (for max_age), and what was lost, by stream and reason.
    add_column(conn, "records", "lane", "INTEGER NOT NULL DEFAULT 1")?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS records_by_lane ON records (lane, seq);
         CREATE TABLE IF NOT EXISTS lanes (
             id   INTEGER PRIMARY KEY,
             name TEXT NOT NULL UNIQUE
         );
         INSERT OR IGNORE INTO lanes (id, name) VALUES (0, '$fogline/loss'), (1, '(before lanes)');
         CREATE TABLE IF NOT EXISTS lane_usage (
             lane    INTEGER PRIMARY KEY,
             records INTEGER NOT NULL,
             bytes   INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS seq_marks (
             first_seq INTEGER PRIMARY KEY,
             at_ms     INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS losses (
             stream    TEXT    NOT NULL,
             reason    TEXT    NOT NULL,
             records   INTEGER NOT NULL,
             bytes     INTEGER NOT NULL,
             first_seq INTEGER,
             last_seq  INTEGER,
             first_ms  INTEGER NOT NULL,
             last_ms   INTEGER NOT NULL,
             PRIMARY KEY (stream, reason)
         ) WITHOUT ROWID;",
    )?;
    // The highest seq the uplink read (sent) since its last session start.
    conn.execute_batch("INSERT OR IGNORE INTO meta (key, value) VALUES ('sent_seq', 0);")?;
    // What was sent out of order, per lane (I-35): protected across a
    // restart until a cursor passes it.
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS sent_marks (
             lane    INTEGER PRIMARY KEY,
             after   INTEGER NOT NULL,
             live_lo INTEGER,
             live_hi INTEGER
         );",
    )?;
    super::local::migrate(conn)?;
    let counted: bool = conn
        .prepare("SELECT 1 FROM meta WHERE key = 'usage_counted'")?
        .exists([])?;
    if !counted {
        super::retention::rebuild_usage(conn)?;
    }
    Ok(())
}

fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let exists: bool = conn.query_row(
        &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
        [column],
        |r| r.get(0),
    )?;
    if !exists {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}
