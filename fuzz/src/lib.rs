//! Helpers shared by the fuzz targets: splitting one input into several files, a scratch
//! directory per process, and the repository's fixtures.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Splits `data` at NUL bytes into at most `n` parts (the last part keeps any further NULs).
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0).collect()
}

/// A scratch directory for this process, kept for its lifetime (on `/dev/shm` when there is
/// one, so that writing the input to a file costs no disk I/O).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            if let Ok(dir) = tempfile::Builder::new()
                .prefix("mlctl-fuzz")
                .tempdir_in(shm)
            {
                return dir;
            }
        }
        tempfile::Builder::new()
            .prefix("mlctl-fuzz")
            .tempdir()
            .expect("a temporary directory")
    })
    .path()
}

/// A fresh, empty subdirectory `name` of [`scratch`].
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch subdirectory");
    dir
}

/// A file of the repository's test fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// The tiny BERT fixture's tokenizer.
pub fn tiny_tokenizer() -> &'static mlctl::tokenize::Tokenizer {
    static TOK: OnceLock<mlctl::tokenize::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        mlctl::tokenize::Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))
            .expect("fixture tokenizer")
    })
}

/// Lossy text of some bytes.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// For targets that reach the `tokenizers` crate: a panic that `mlctl` catches at its boundary
/// with the crate (and returns as a typed error) is printed and does not abort, while a panic
/// that reaches the fuzz target still does (libfuzzer-sys aborts on it).
pub fn allow_caught_panics() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic (caught or not): {info}")));
}
