//! Spare space beside the outbox, given back when the filesystem is full so
//! acknowledged records can still be deleted: in WAL mode even a `DELETE`
//! must append to the log first, and on a full disk that fails — the backlog
//! could never shrink. The same idea as CockroachDB's emergency ballast file.
//!
//! The space freed by those deletes stays inside the database file (SQLite
//! reuses its free pages), so ingest resumes in it; the reserve itself is
//! taken back only when the filesystem has room for it twice over.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a missing reserve is looked at again.
const REPLENISH_EVERY: Duration = Duration::from_secs(30);

/// The reserve file of one outbox.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
    last_try: Option<Instant>,
}

impl Reserve {
    /// `bytes` of reserve for the outbox at `outbox` (0: none), kept in
    /// `<outbox>.reserve`.
    pub fn new(outbox: &Path, bytes: u64) -> Self {
        let mut name = outbox.as_os_str().to_owned();
        name.push(".reserve");
        Self {
            path: name.into(),
            bytes,
            last_try: None,
        }
    }

    /// The reserve file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the reserve is in place.
    pub fn present(&self) -> bool {
        self.bytes > 0 && std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.bytes)
    }

    /// Makes the reserve if it is missing and the filesystem has at least
    /// twice its size free (taking the last of the space would only move
    /// the full disk elsewhere). Returns whether it is in place.
    pub fn replenish(&mut self) -> std::io::Result<bool> {
        if self.bytes == 0 {
            self.release();
            return Ok(false);
        }
        if self.present() {
            return Ok(true);
        }
        self.last_try = Some(Instant::now());
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let st = rustix::fs::statvfs(dir)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < self.bytes.saturating_mul(2) {
            return Ok(false);
        }
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let made = allocate(&tmp, self.bytes).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(true)
    }

    /// [`Self::replenish`], at most once per 30 s while it is missing.
    pub fn replenish_now_and_then(&mut self) -> std::io::Result<bool> {
        if self.bytes == 0 || self.last_try.is_some_and(|t| t.elapsed() < REPLENISH_EVERY) {
            return Ok(false);
        }
        self.replenish()
    }

    /// Gives the space back to the filesystem. Returns the bytes released
    /// (0 if there was no reserve).
    pub fn release(&mut self) -> u64 {
        let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if len == 0 || std::fs::remove_file(&self.path).is_err() {
            return 0;
        }
        // Not before a while: the space is what the deletes need now.
        self.last_try = Some(Instant::now());
        len
    }
}

/// Writes a file of `bytes` whose blocks are really allocated (a sparse
/// file would reserve nothing).
fn allocate(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, bytes) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            let chunk = vec![0u8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
        }
        Err(e) => return Err(e.into()),
    }
    f.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn made_released_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("outbox.db");
        let mut r = Reserve::new(&db, 1 << 20);
        assert!(!r.present());
        assert!(r.replenish().unwrap());
        assert!(r.present());
        assert_eq!(std::fs::metadata(r.path()).unwrap().len(), 1 << 20);
        assert_eq!(r.release(), 1 << 20);
        assert!(!r.present());
        assert_eq!(r.release(), 0, "released once");
        assert!(
            !r.replenish_now_and_then().unwrap(),
            "not right after a release"
        );
        assert!(r.replenish().unwrap());
        // Turned off: a reserve left from before is given back.
        let mut none = Reserve::new(&db, 0);
        assert!(!none.replenish().unwrap());
        assert!(!r.path().exists());
    }
}
