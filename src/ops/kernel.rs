//! What the fused kernels share: element types with their accumulation type, branch-free math
//! that the compiler can vectorise, contiguous views of CPU storage and argument checks.

use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};

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

/// The arithmetic a kernel accumulates in: f32 for f32 and half types, f64 for f64.
pub(crate) trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn lit(x: f64) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn max(self, other: Self) -> Self;
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn lit(x: f64) -> Self {
        x
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn lit(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        // tanh(y) = 1 - 2 / (exp(2y) + 1); the clamp keeps exp finite, tanh(±9) is ±1 in f32.
        let y = self.clamp(-9.0, 9.0);
        1.0 - 2.0 / (exp_f32(2.0 * y) + 1.0)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }
}

/// `e^x` in f32 without a libm call, so that loops over it vectorise: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, `e^r` by its degree-7 Taylor polynomial (truncation below 1e-8 relative),
/// `2^n` built in the exponent bits. Within 2 ulp of `f32::exp`; 0 below `-87.3`.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by the 1.5 * 2^23 trick: `f32::round` is a libm call that blocks
    // vectorisation on baseline x86-64.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        p * scale
    }
}

/// `erf(x)` in f32 by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, f32's own
/// resolution near 1), branch-free so that it vectorises.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

/// A storage element type and the type it is computed in.
pub(crate) trait Elem: WithDType + Send + Sync {
    type A: Real;
    fn load(self) -> Self::A;
    fn store(a: Self::A) -> Self;
    fn elem_zero() -> Self {
        Self::store(Self::A::ZERO)
    }
}

impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(a: f64) -> Self {
        a
    }
}

impl Elem for half::bf16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
}

impl Elem for half::f16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        half::f16::from_f32(a)
    }
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

/// Whether the fused kernels run `x` where it is: on the CPU always, on CUDA (with the `cuda`
/// feature) for f32, f16 and bf16.
pub(crate) fn fused_supported(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => super::cuda::supports(x.dtype()),
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
