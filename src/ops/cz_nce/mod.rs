//! The fused CZ-NCE op: one candle custom op with its forward and exact backward on the CPU and
//! (with the `cuda` feature) on CUDA, over the whole batch or (CPU only) a band of its rows.
//! `loss::CzNce` is its user-facing builder, and holds the composite twin the op is tested
//! against.

mod blas_layout;
pub(crate) mod cpu;
mod op;
mod rows;
mod spec;

#[cfg(feature = "cuda")]
pub(crate) use blas_layout::row_major_gemm;
pub(crate) use op::CzNceOp;
pub use spec::BackwardMode;
pub(crate) use spec::{LogitScale, Spec, NORM_EPS};
