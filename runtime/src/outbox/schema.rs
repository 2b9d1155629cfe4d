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
         -- The last delivery per MQTT packet id: a redelivery after a crash
         -- (same packet id, same digest) is recognised and not processed twice.
         CREATE TABLE IF NOT EXISTS ingest_dedup (
             pkid   INTEGER PRIMARY KEY,
             digest INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS meta (
             key   TEXT PRIMARY KEY,
             value INTEGER NOT NULL
         );
         INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1);",
    )
}
