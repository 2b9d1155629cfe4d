//! What this node did for each rollout, on disk (`<data_dir>/deployments.json`):
//! the record that makes a resent `Deploy` a no-op (exactly once) and lets
//! a restarted daemon go on following a build on probation.

use std::path::{Path, PathBuf};

use fogline_protocol::deploy::{DeployState, DeploymentReport, MAX_REPORTED_DEPLOYMENTS};
use serde::{Deserialize, Serialize};

use super::DeployError;

/// Entries kept (the newest); older ones' kept builds are deleted.
const KEEP: usize = 64;

/// One deployment on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What the aggregator is told.
    pub report: DeploymentReport,
    /// The function's module file.
    pub module: PathBuf,
    /// SHA-256 of the build installed (empty when refused).
    pub sha256: String,
    /// A copy of the module that ran before, to revert to.
    pub previous: Option<PathBuf>,
    /// A copy of its signature, if it had one.
    pub previous_sig: Option<PathBuf>,
    /// When the build was installed (ms since the Unix epoch).
    pub installed_at_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    entries: Vec<Entry>,
}

/// The journal, loaded.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Journal {
    /// Reads the journal at `path` (none yet: empty). A file that does not
    /// parse is moved aside (`.corrupt`) with a warning: the aggregator
    /// resends what it still wants, and a rollout's install is checked
    /// against the module file before it is redone.
    pub fn open(path: &Path) -> Result<Self, DeployError> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) => f.entries,
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    tracing::warn!(path = %path.display(), error = %e, aside = %aside.display(), "The deployment journal does not parse; moved aside, starting empty.");
                    std::fs::rename(path, &aside).map_err(|e| DeployError::Journal {
                        path: path.to_path_buf(),
                        source: e,
                    })?;
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(DeployError::Journal {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The entry of `rollout` for `function`.
    pub fn find(&self, rollout: u64, function: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.report.rollout == rollout && e.report.function == function)
    }

    /// Entries still on probation (to follow after a restart).
    pub fn on_probation(&self) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| e.report.state == DeployState::Probation)
            .cloned()
            .collect()
    }

    /// Puts `entry` in (replacing the one of its rollout and function) and
    /// writes the journal durably before returning.
    pub fn put(&mut self, entry: Entry) -> Result<(), DeployError> {
        let (rollout, function) = (entry.report.rollout, entry.report.function.clone());
        self.entries
            .retain(|e| !(e.report.rollout == rollout && e.report.function == function));
        self.entries.push(entry);
        let extra = self.entries.len().saturating_sub(KEEP);
        for old in self.entries.drain(..extra) {
            for p in [old.previous, old.previous_sig].into_iter().flatten() {
                let _ = std::fs::remove_file(p);
            }
        }
        self.save()
    }

    /// Forgets the entry of `rollout` for `function` (an install that a
    /// crash interrupted before the module was replaced: it did not happen).
    pub fn forget(&mut self, rollout: u64, function: &str) -> Result<(), DeployError> {
        self.entries
            .retain(|e| !(e.report.rollout == rollout && e.report.function == function));
        self.save()
    }

    fn save(&self) -> Result<(), DeployError> {
        let bytes = serde_json::to_vec_pretty(&File {
            entries: self.entries.clone(),
        })
        .map_err(|e| DeployError::Journal {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        super::files::write_atomic(&self.path, &bytes).map_err(|e| DeployError::Journal {
            path: self.path.clone(),
            source: e,
        })
    }

    /// What the status says: the newest reports, newest last.
    pub fn reports(&self) -> Vec<DeploymentReport> {
        let skip = self.entries.len().saturating_sub(MAX_REPORTED_DEPLOYMENTS);
        self.entries
            .iter()
            .skip(skip)
            .map(|e| e.report.clone())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(rollout: u64, state: DeployState) -> Entry {
        Entry {
            report: DeploymentReport {
                rollout,
                function: "f".into(),
                action: "install".into(),
                state,
                version: "v".into(),
                reason: None,
                at_ms: 1,
            },
            module: "m.wasm".into(),
            sha256: "ab".into(),
            previous: None,
            previous_sig: None,
            installed_at_ms: 1,
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_a_corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deployments.json");
        let mut j = Journal::open(&path).unwrap();
        j.put(entry(1, DeployState::Promoted)).unwrap();
        j.put(entry(2, DeployState::Probation)).unwrap();
        j.put(entry(2, DeployState::RolledBack)).unwrap();
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.reports().len(), 2);
        assert_eq!(
            j.find(2, "f").unwrap().report.state,
            DeployState::RolledBack
        );
        assert!(j.find(2, "g").is_none() && j.on_probation().is_empty());

        std::fs::write(&path, b"{not json").unwrap();
        let j = Journal::open(&path).unwrap();
        assert!(j.reports().is_empty());
        assert!(dir.path().join("deployments.json.corrupt").exists());
    }

    #[test]
    fn the_journal_keeps_the_newest_entries_and_reports_fewer() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.json")).unwrap();
        for r in 1..=(KEEP as u64 + 10) {
            j.put(entry(r, DeployState::Promoted)).unwrap();
        }
        assert!(j.find(10, "f").is_none() && j.find(11, "f").is_some());
        let reports = j.reports();
        assert_eq!(reports.len(), MAX_REPORTED_DEPLOYMENTS);
        assert_eq!(reports.last().unwrap().rollout, KEEP as u64 + 10);
    }
}
