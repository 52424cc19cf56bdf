//! Checkpoint directories written atomically: a temporary directory, synced, then renamed,
//! with a SHA-256 of every file in `checksums.json`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

const PREFIX: &str = "step-";

/// The file in every checkpoint directory that lists the others with their size and SHA-256.
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// One file's entry in [`CHECKSUMS_FILE`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct FileSum {
    bytes: u64,
    sha256: String,
}

/// Size and SHA-256 (lower-case hex) of a file, read in 1 MiB blocks.
fn file_sum(path: &Path) -> Result<FileSum> {
    let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
    let (mut hasher, mut buf, mut bytes) = (Sha256::new(), vec![0u8; 1 << 20], 0u64);
    loop {
        let n = file.read(&mut buf).map_err(Error::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileSum { bytes, sha256 })
}

/// The files of a checkpoint directory (not its checksum list), by name.
fn checkpoint_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = entry.map_err(Error::io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        if let Some(name) = name.filter(|n| n != CHECKSUMS_FILE && path.is_file()) {
            files.insert(name, path);
        }
    }
    Ok(files)
}

/// A fingerprint of checkpoint `dir`'s contents: the first 8 bytes of the SHA-256 of its
/// [`CHECKSUMS_FILE`] (which holds every file's SHA-256), so two checkpoints of the same step
/// from different runs differ. 0 for a directory without one.
pub(crate) fn checkpoint_fingerprint(dir: &Path) -> Result<u64> {
    let list = dir.join(CHECKSUMS_FILE);
    if !list.is_file() {
        return Ok(0);
    }
    let bytes = std::fs::read(&list).map_err(Error::io(&list))?;
    let digest = Sha256::digest(&bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Ok(u64::from_le_bytes(first))
}

/// Writes [`CHECKSUMS_FILE`] for the files now in `dir`.
fn write_checksums(dir: &Path) -> Result<()> {
    let sums = checkpoint_files(dir)?
        .into_iter()
        .map(|(name, path)| Ok((name, file_sum(&path)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let path = dir.join(CHECKSUMS_FILE);
    let json = serde_json::to_string_pretty(&sums).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, json).map_err(Error::io(&path))
}

/// Checks every file a checkpoint's [`CHECKSUMS_FILE`] lists: present, of its size and of its
/// SHA-256. A checkpoint written before checksums existed (no such file) passes unchecked.
///
/// # Errors
///
/// [`Error::Checkpoint`] naming the first file that is missing, truncated or changed, or the
/// checksum list itself when it does not parse.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    let list = dir.join(CHECKSUMS_FILE);
    let text = match std::fs::read_to_string(&list) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&list)(e)),
    };
    let sums: BTreeMap<String, FileSum> =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: list.clone(),
            reason: format!("unreadable checksum list: {e}"),
        })?;
    for (name, want) in sums {
        let path = dir.join(&name);
        if !path.is_file() {
            return Err(Error::Checkpoint {
                path,
                reason: "missing (listed in checksums.json)".into(),
            });
        }
        let got = file_sum(&path)?;
        if got != want {
            let reason = match got.bytes == want.bytes {
                true => "its SHA-256 differs from checksums.json".to_string(),
                false => format!("{} bytes, checksums.json says {}", got.bytes, want.bytes),
            };
            return Err(Error::Checkpoint { path, reason });
        }
    }
    Ok(())
}

/// The directory name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// Writes a checkpoint directory `root/name` atomically.
///
/// `write` fills a temporary directory beside it; [`CHECKSUMS_FILE`] is added, every file is
/// synced and the directory renamed into place (replacing an older one of the same name). If
/// `write` fails, or the process
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
    if let Err(e) = write(&tmp).and_then(|()| write_checksums(&tmp)) {
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

/// The newest checkpoint under `root` whose files match their checksums
/// ([`verify_checkpoint`]); each newer one that does not is skipped with a warning on standard
/// error naming it and the damage. `None` when there is no checkpoint.
///
/// # Errors
///
/// The newest checkpoint's [`Error::Checkpoint`] when none verifies; I/O errors.
pub fn latest_verified_checkpoint(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    let mut newest_error = None;
    for (step, dir) in list_checkpoints(root)?.into_iter().rev() {
        match verify_checkpoint(&dir) {
            Ok(()) => return Ok(Some((step, dir))),
            Err(e) => {
                eprintln!(
                    "warning: skipping damaged checkpoint {}: {e}",
                    dir.display()
                );
                newest_error.get_or_insert(e);
            }
        }
    }
    newest_error.map_or(Ok(None), Err)
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
