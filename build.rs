//! With the `cuda` feature, compiles the CUDA kernels to PTX with nvcc (for `CUDA_COMPUTE_CAP`,
//! or the local GPU's): the CZ-NCE kernels (`src/loss/cz_nce/cz_nce.cu`) into `ptx.rs` and the
//! fused encoder ops and AdamW (`src/ops/ops.cu`) into `ops_ptx.rs`, both in `OUT_DIR`.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // Both kernel files include it; cudaforge watches only the files it compiles.
    println!("cargo::rerun-if-changed=src/cuda_common.cuh");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        for (source, module) in [
            ("src/loss/cz_nce/cz_nce.cu", "ptx.rs"),
            ("src/ops/ops.cu", "ops_ptx.rs"),
        ] {
            let ptx = cudaforge::KernelBuilder::new()
                .source_files([source])
                .arg("-std=c++17")
                .arg("-O3")
                .build_ptx()
                .unwrap_or_else(|e| {
                    panic!("nvcc failed on {source} (see README: CUDA build): {e}")
                });
            ptx.write(out.join(module))
                .expect("cannot write the PTX module to OUT_DIR");
        }
    }
}
