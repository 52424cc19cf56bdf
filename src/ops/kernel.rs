//! What the fused kernels share besides their numbers ([`super::num`]): row partitioning, a
//! vectorising sum, contiguous views of CPU storage and argument checks.

use candle_core::{CpuStorage, DType, Layout, Tensor};

use super::num::{Elem, Real};

use crate::{Error, Result};

/// Rows per task when a kernel spreads rows over rayon: large enough to amortise scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// `sum_{i < len} f(i)` over eight interleaved partial sums, so that the loop vectorises (a
/// single running sum is a dependency chain the compiler may not reorder).
#[inline(always)]
pub(crate) fn lane_sum<A: Real>(len: usize, f: impl Fn(usize) -> A) -> A {
    let mut acc = [A::ZERO; 8];
    let full = len / 8 * 8;
    for base in (0..full).step_by(8) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(base + k);
        }
    }
    let mut rest = A::ZERO;
    for i in full..len {
        rest += f(i);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

/// The contiguous elements of a CPU storage under `layout` (the wrappers make inputs
/// contiguous, so anything else is a bug surfaced as an error).
pub(crate) fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// Runs `$body` with `$T` bound to the element type of `$storage` (f32, f64, bf16, f16).
macro_rules! dispatch {
    ($storage:expr, $op:expr, |$T:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            candle_core::CpuStorage::BF16(_) => {
                type $T = half::bf16;
                $body
            }
            candle_core::CpuStorage::F16(_) => {
                type $T = half::f16;
                $body
            }
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                candle_core::backend::BackendStorage::dtype(other),
                $op,
            )),
        }
    };
}
pub(crate) use dispatch;

/// Checks that `x` is a float tensor the fused kernels handle.
pub(crate) fn check_float(x: &Tensor, op: &'static str) -> Result<()> {
    match x.dtype() {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        dtype => Err(candle_core::Error::UnsupportedDTypeForOp(dtype, op).into()),
    }
}

/// Checks that `other` has `x`'s dtype and device.
pub(crate) fn check_same(x: &Tensor, other: &Tensor, op: &'static str) -> Result<()> {
    if x.dtype() != other.dtype() {
        return Err(candle_core::Error::DTypeMismatchBinaryOp {
            lhs: x.dtype(),
            rhs: other.dtype(),
            op,
        }
        .into());
    }
    if !x.device().same_device(other.device()) {
        return Err(candle_core::Error::DeviceMismatchBinaryOp {
            lhs: x.device().location(),
            rhs: other.device().location(),
            op,
        }
        .into());
    }
    Ok(())
}

/// Whether the CUDA kernels (`cuda` feature) handle `dtype`: they store f32, f16 and bf16.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the fused kernels run `x` where it is: on the CPU always, on CUDA (with the `cuda`
/// feature) for f32, f16 and bf16.
pub(crate) fn fused_supported(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda_supports(x.dtype()),
        _ => false,
    }
}

/// Checks that a fused op runs on `x`'s device and dtype ([`fused_supported`]).
pub(crate) fn check_device(x: &Tensor, op: &'static str) -> Result<()> {
    if fused_supported(x) {
        return Ok(());
    }
    if x.device().is_cuda() {
        // Only f64 gets here (other dtypes fail `check_float` first).
        return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), op).into());
    }
    Err(Error::InvalidArgument(format!(
        "{op}: the fused kernel runs on the CPU{}; use the composite form on {:?}",
        if cfg!(feature = "cuda") {
            " and CUDA"
        } else {
            ""
        },
        x.device().location()
    )))
}

/// A loop body that [`vectorized`] compiles for the CPU's widest vector instructions. Its `run`
/// must be `#[inline(always)]`: it is then inlined into a function compiled for AVX-512 or
/// AVX2 + FMA, and its loops (and the `#[inline(always)]` helpers they call, such as
/// [`lane_sum`], `Real::exp` and `Real::erf`) vectorise to the wider registers. (A closure would
/// not do: it stays a call into code compiled for the baseline.)
pub(crate) trait Vectorized {
    /// What the loop returns.
    type Output;
    /// The loop.
    fn run(self) -> Self::Output;
}

/// Runs `k` compiled for AVX-512 or AVX2 + FMA when the CPU has them (checked at run time, so
/// the crate needs no `target-cpu` flag). Rust never contracts `a * b + c` into an FMA and the
/// kernels fix their summation order, so every instruction set computes the same bits.
#[inline(always)]
pub(crate) fn vectorized<K: Vectorized>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { avx512(k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { avx2(k) };
        }
    }
    k.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512<K: Vectorized>(k: K) -> K::Output {
    k.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<K: Vectorized>(k: K) -> K::Output {
    k.run()
}
