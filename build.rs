//! With the `cuda` feature, compiles the CUDA kernels to PTX with nvcc: the CZ-NCE kernels
//! (`src/ops/cuda/cz_nce.cu`) into `cz_nce_ptx.rs` and the fused encoder ops and AdamW
//! (`src/ops/cuda/ops.cu`) into `ops_ptx.rs`, both in `OUT_DIR`.
//!
//! The PTX targets the virtual architecture `compute_XX` of `CUDA_COMPUTE_CAP` (default `80`):
//! the driver compiles it for the GPU it runs on, any of that capability or newer (sm_80,
//! sm_86, sm_89, sm_90, ...), once per machine (its compute cache keeps the result). `90a` and
//! other suffixed capabilities are passed as they are and load on that capability only.
//! nvcc is `$NVCC`, else `$CUDA_ROOT/bin/nvcc` (or `CUDA_PATH`, `CUDA_HOME`), else `nvcc` on the
//! `PATH`. Every kernel source, the shared header and these variables re-run this script, and
//! each run compiles afresh: a PTX is never older than what it was built from.

/// Kernel sources, and the module each is written to.
const KERNELS: [(&str, &str, &str); 2] = [
    ("src/ops/cuda/cz_nce.cu", "cz_nce_ptx.rs", "CZ_NCE"),
    ("src/ops/cuda/ops.cu", "ops_ptx.rs", "OPS"),
];

/// Included by every kernel source.
const HEADERS: [&str; 1] = ["src/ops/cuda/common.cuh"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for path in KERNELS.iter().map(|k| k.0).chain(HEADERS) {
        println!("cargo::rerun-if-changed={path}");
    }
    for var in [
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;
    use std::process::Command;

    pub fn build() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let arch = format!("compute_{}", compute_cap());
        let nvcc = nvcc();
        for (source, module, name) in super::KERNELS {
            let stem = std::path::Path::new(source).file_stem().unwrap();
            let ptx = out.join(stem).with_extension("ptx");
            let status = Command::new(&nvcc)
                .args(["--ptx", "-std=c++17", "-O3", &format!("-arch={arch}"), "-o"])
                .arg(&ptx)
                .arg(source)
                .status()
                .unwrap_or_else(|e| {
                    panic!("cannot run {} (see README: GPUs): {e}", nvcc.display())
                });
            assert!(status.success(), "nvcc failed on {source} for {arch}");
            let rust = format!(
                "pub const {name}: &str = include_str!({:?});\n",
                ptx.display().to_string()
            );
            std::fs::write(out.join(module), rust).expect("cannot write to OUT_DIR");
        }
    }

    /// `CUDA_COMPUTE_CAP` as nvcc spells it after `compute_` (`80`, `90`, `90a`), default `80`.
    fn compute_cap() -> String {
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
        let cap = cap
            .trim()
            .trim_start_matches("sm_")
            .trim_start_matches("compute_");
        let digits = cap.trim_end_matches(|c: char| c.is_ascii_lowercase());
        assert!(
            !digits.is_empty()
                && digits.chars().all(|c| c.is_ascii_digit())
                && cap.len() <= digits.len() + 1,
            "CUDA_COMPUTE_CAP={cap:?}: expected a compute capability such as 80, 90 or 90a"
        );
        cap.to_string()
    }

    fn nvcc() -> PathBuf {
        if let Ok(nvcc) = std::env::var("NVCC") {
            return nvcc.into();
        }
        ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(|root| PathBuf::from(root).join("bin/nvcc"))
            .find(|p| p.exists())
            .unwrap_or_else(|| "nvcc".into())
    }
}
