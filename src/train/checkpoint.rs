//! Checkpoint directories written atomically: a temporary directory, synced, then renamed.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const PREFIX: &str = "step-";

/// The directory name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// Writes a checkpoint directory `root/name` atomically.
///
/// `write` fills a temporary directory beside it; every file is then synced and the directory
/// renamed into place (replacing an older one of the same name). If `write` fails, or the process
/// dies before the rename, no `root/name` appears and the previous checkpoints stay as they were;
/// leftover temporary directories are ignored by [`latest_checkpoint`].
pub fn write_checkpoint_dir(
    root: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(Error::io(root))?;
    let tmp = root.join(format!("{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    for entry in std::fs::read_dir(&tmp).map_err(Error::io(&tmp))? {
        let path = entry.map_err(Error::io(&tmp))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(Error::io(&path))?;
    }
    let target = root.join(name);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(Error::io(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(Error::io(&target))?;
    // Make the rename itself durable.
    std::fs::File::open(root)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(root))?;
    Ok(target)
}

/// Complete checkpoints under `root`, as `(step, path)` sorted by step.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).map_err(Error::io(root))? {
        let entry = entry.map_err(Error::io(root))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The complete checkpoint with the highest step under `root`.
pub fn latest_checkpoint(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list_checkpoints(root)?.pop())
}

/// Deletes all but the `keep` most recent complete checkpoints (at least one is kept).
pub fn prune_checkpoints(root: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(root)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(Error::io(&path))?;
    }
    Ok(())
}
