//! Module files replaced so that a crash leaves the old file or the new one,
//! never half of either.

use std::io::Write;
use std::path::{Path, PathBuf};

/// `<module>.sig`: where a module's signature lives.
pub fn sig_path(module: &Path) -> PathBuf {
    let mut s = module.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Writes `bytes` over `target` atomically: beside it, fsynced, renamed
/// over it, the directory fsynced (so the rename survives a power cut).
pub fn write_atomic(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "module.wasm".into());
    let tmp = dir.join(format!(".{name}.deploy"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, target)?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Best effort: not every filesystem syncs a directory.
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_leaves_the_new_bytes_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.wasm");
        std::fs::write(&target, b"old").unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(sig_path(&target), dir.path().join("f.wasm.sig"));
    }
}
