//! Is this SQLite file damaged? One answer for the edge's outbox and the
//! aggregator's store (ARCHITECTURE.md I-31): damage is told apart from a
//! busy, missing or full file, and the check is bounded in time so a large
//! file cannot hold a start hostage.

use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

/// What the integrity check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    /// No damage.
    Ok,
    /// Damage, as SQLite describes it (at most 10 lines).
    Damaged(Vec<String>),
    /// The check did not finish within its time: nothing known.
    Unfinished,
}

/// A damaged file, as opposed to one that is busy, missing or on a full disk.
pub fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// `PRAGMA quick_check` on `conn`, interrupted after `budget`. Errors other
/// than damage (I/O, busy) are returned as they are.
pub fn quick_check(conn: &Connection, budget: Duration) -> rusqlite::Result<Integrity> {
    // Interrupted from another thread when the budget is spent.
    let (done, wait) = channel::<()>();
    let handle = conn.get_interrupt_handle();
    let watchdog = std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(budget) {
            handle.interrupt();
        }
    });
    let rows = conn.prepare("PRAGMA quick_check(10)").and_then(|mut st| {
        st.query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()
    });
    drop(done);
    let _ = watchdog.join();
    match rows {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(Integrity::Ok),
        Ok(rows) => Ok(Integrity::Damaged(rows)),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::OperationInterrupted => {
            Ok(Integrity::Unfinished)
        }
        Err(e) if is_damage(&e) => Ok(Integrity::Damaged(vec![e.to_string()])),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_sound_file_is_ok_and_a_mangled_one_is_damaged() {
        let dir = std::env::temp_dir().join(format!("fogline-integrity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let _ = std::fs::remove_file(&path);
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
                 CREATE INDEX t_v ON t(v);",
            )
            .unwrap();
            let tx = conn.transaction().unwrap();
            for i in 0..2000u32 {
                tx.execute("INSERT INTO t(v) VALUES (?1)", [i.to_le_bytes().repeat(50)])
                    .unwrap();
            }
            tx.commit().unwrap();
            assert_eq!(
                quick_check(&conn, Duration::from_secs(10)).unwrap(),
                Integrity::Ok
            );
        }
        // Scribble over pages past the header: the b-trees no longer hold.
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        for b in &mut bytes[2 * page..6 * page] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let conn = Connection::open(&path).unwrap();
        match quick_check(&conn, Duration::from_secs(10)) {
            Ok(Integrity::Damaged(found)) => assert!(!found.is_empty()),
            Err(e) => assert!(is_damage(&e), "{e}"),
            other => panic!("not found damaged: {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
