//! The CUDA kernels of the fused CZ-NCE op (`src/ops/cuda/cz_nce.cu`) and of the fused encoder
//! ops and AdamW (`src/ops/cuda/ops.cu`), run on the CPU in a small CUDA emulator (`tests/cuda_emu/`)
//! against double-precision references, so that their indexing, masking, reductions and barriers
//! are tested on every machine, GPU or not. The cuBLAS calls and the host code (`cuda.rs`) are
//! covered by `tests/gpu.rs` (needs a GPU).
//!
//! Needs a C++20 compiler (`$CXX`, default `c++`) and POSIX `ucontext`. Without one the tests
//! print why and pass, unless `MLCTL_REQUIRE_CXX=1` (set by `.ci/run`), which makes them fail.
#![cfg(unix)]

use std::path::Path;
use std::process::Command;

/// Builds `tests/cuda_emu/<program>.cpp` and runs it; it must report no failure.
fn run_emulated(program: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let emu = root.join("tests/cuda_emu");
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join(program);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let compiled = Command::new(&cxx)
        .args(["-std=c++20", "-O1"])
        .arg(format!("-I{}", emu.join("include").display()))
        .arg(emu.join(format!("{program}.cpp")))
        .arg("-o")
        .arg(&exe)
        .status();
    let required = std::env::var("MLCTL_REQUIRE_CXX").is_ok_and(|v| v == "1");
    match compiled {
        Ok(s) if s.success() => {}
        other => {
            let why = format!("cannot build the CUDA emulator with `{cxx}`: {other:?}");
            assert!(!required, "{why}");
            eprintln!("skipped: {why} (set CXX to a C++20 compiler)");
            return;
        }
    }
    let out = Command::new(&exe)
        .output()
        .expect("run the emulated checks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "emulated CUDA kernels failed:\n{stdout}"
    );
    assert!(stdout.contains(" 0 failures"), "{stdout}");
}

#[test]
fn cuda_kernels_match_references_in_the_cpu_emulator() {
    run_emulated("check");
}

#[test]
fn cuda_encoder_op_and_adamw_kernels_match_references_in_the_cpu_emulator() {
    run_emulated("check_ops");
}
