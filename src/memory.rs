//! The defence's memory on disk for a single instance (`[state] path`): read at start-up, written every
//! minute and at shutdown (see `security::snapshot` for what it holds). Written atomically: a temporary
//! file beside it, flushed to disk, then renamed over the old one, so that a crash leaves the previous
//! snapshot or the new one, never half of one. A missing file is a first start; a corrupt, truncated,
//! oversized or foreign one is logged and ignored, never fatal.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::security::Defence;
use crate::security::snapshot::{self, MAX_BYTES, SnapshotError};

/// How often the memory is written while serving.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: larger than {MAX_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Snapshot { path: PathBuf, source: SnapshotError },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MemoryError + '_ {
    move |source| MemoryError::Io { path: path.to_owned(), source }
}

/// Reads the snapshot at `path`: None when there is none yet.
pub fn read(path: &Path) -> Result<Option<snapshot::Snapshot>, MemoryError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(MemoryError::TooLarge { path: path.to_owned() });
    }
    snapshot::decode(&bytes).map(Some).map_err(|source| MemoryError::Snapshot { path: path.to_owned(), source })
}

/// Replaces the file at `path` with `bytes`, atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), MemoryError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(io(&temporary))?;
        file.write_all(bytes).map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        std::fs::rename(&temporary, path).map_err(io(path))?;
        // The rename itself reaches the disk with the directory.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// At start-up: takes in what `path` holds, logging what it brought or why it was ignored.
pub fn restore(defence: &Defence, path: &Path) {
    match read(path) {
        Ok(None) => tracing::info!(path = %path.display(), "no defence memory yet (first start)"),
        Ok(Some(snapshot)) => {
            let (bans, prefixes, accounts) = defence.restore(&snapshot);
            tracing::info!(
                event = "defence_restored",
                path = %path.display(),
                bans,
                prefixes,
                accounts,
                "defence memory restored"
            );
        }
        Err(e) => {
            tracing::warn!(event = "defence_memory_ignored", error = %e, "defence memory ignored; starting without it")
        }
    }
}

/// Writes what the defence knows now to `path` (off the async workers: the caller runs it blocking).
pub fn save(defence: &Defence, path: &Path) -> Result<usize, MemoryError> {
    let bytes = snapshot::encode(&defence.snapshot());
    write(path, &bytes)?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("defence-state.json");
        assert!(read(&path).unwrap().is_none(), "no file: a first start");
        let snapshot = snapshot::Snapshot::default();
        write(&path, &snapshot::encode(&snapshot)).unwrap();
        assert_eq!(read(&path).unwrap(), Some(snapshot));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary left: {names:?}");
    }

    #[test]
    fn truncated_and_oversized_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("defence-state.json");
        let bytes = snapshot::encode(&snapshot::Snapshot::default());
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(read(&path), Err(MemoryError::Snapshot { .. })));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_BYTES + 1).unwrap();
        assert!(matches!(read(&path), Err(MemoryError::TooLarge { .. })));
    }
}
