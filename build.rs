//! With the `cuda` feature, compiles the CZ-NCE kernels (`src/loss/cz_nce/cz_nce.cu`) to PTX
//! with nvcc (for `CUDA_COMPUTE_CAP`, or the local GPU's) and writes `ptx.rs` into `OUT_DIR`.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_files(["src/loss/cz_nce/cz_nce.cu"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("nvcc failed on src/loss/cz_nce/cz_nce.cu (see README: CUDA build)");
        ptx.write(out.join("ptx.rs"))
            .expect("cannot write ptx.rs to OUT_DIR");
    }
}
