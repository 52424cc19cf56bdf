//! The numbers the kernels compute with: [`Real`], the arithmetic a kernel accumulates in (f32
//! for f32 and half types, f64 for f64), with branch-free `exp` and `erf` that vectorise;
//! [`Elem`], a storage type and its accumulation type; and [`accumulation_dtype`], the same rule
//! for tensors.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

use candle_core::{DType, Tensor, WithDType};

/// The dtype reductions run in: f16 and bf16 are widened to f32.
pub(crate) fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
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
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// The value masked logits are overwritten with: the most negative finite number, so that
    /// `exp(masked · s − m)` is exactly 0 and `0 · masked` is 0, never NaN.
    const MASKED: Self;
    fn lit(x: f64) -> Self;
    fn from_f32(x: f32) -> Self;
    /// `eˣ` for `x ≤ 0` (a softmax row pass only exponentiates max-subtracted logits); exactly
    /// 0 for `x` below the smallest normal result, including `-inf`.
    fn exp_nonpos(self) -> Self;
    fn ln(self) -> Self;
    /// Wraps a row-major `rows × cols` buffer as a CPU tensor of this type.
    fn into_tensor(v: Vec<Self>, rows: usize, cols: usize) -> candle_core::Result<Tensor> {
        Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu)
    }
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn max(self, other: Self) -> Self;
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const MASKED: Self = f64::MIN;
    fn lit(x: f64) -> Self {
        x
    }
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
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
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const MASKED: Self = f32::MIN;
    fn lit(x: f64) -> Self {
        x as f32
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        exp_nonpos_f32(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
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
    // n = round(x / ln 2) (see `SHIFTER`).
    let shifted = x * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = pow2_shifted(shifted);
    if underflow {
        0.0
    } else {
        p * scale
    }
}

/// `1.5·2²³`: adding it to an `|x| < 2²²` rounds `x` to an integer (`f32::round` is a libm call
/// that blocks vectorisation on baseline x86-64), which then sits in the sum's low mantissa bits.
const SHIFTER: f32 = 12_582_912.0;

/// `2^n` from `shifted = n + SHIFTER`, for an integer `n` in `[-126, 128]`
/// (128 gives +inf): `shifted` holds `n` in its low mantissa bits, so integer arithmetic on its
/// bits gives the exponent field `n + 127` directly. The same bits as
/// `f32::from_bits(((n as i32 + 127) as u32) << 23)` (both exponentials were checked against
/// that form over their whole domain), but Rust's saturating `as i32` does not vectorise: one
/// scalar conversion and its range checks per lane made `exp` 4-5x slower.
#[inline(always)]
fn pow2_shifted(shifted: f32) -> f32 {
    f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(SHIFTER.to_bits())
            .wrapping_add(127)
            << 23,
    )
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
    /// The value in f32 (AdamW computes in f32 whatever the storage).
    fn get(self) -> f32;
    /// `x` rounded to this type.
    fn put(x: f32) -> Self;
    fn elem_zero() -> Self {
        Self::store(Self::A::ZERO)
    }
    /// The slice itself when the storage type is its accumulation type (f32, f64), so that a
    /// kernel can borrow it instead of widening a copy; `None` for half precision.
    fn as_acc(s: &[Self]) -> Option<&[Self::A]>;
    /// [`Elem::as_acc`] for a destination.
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [Self::A]>;
}

impl Elem for f32 {
    fn as_acc(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        a
    }
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        x
    }
}

impl Elem for f64 {
    fn as_acc(s: &[Self]) -> Option<&[f64]> {
        Some(s)
    }
    fn as_acc_mut(s: &mut [Self]) -> Option<&mut [f64]> {
        Some(s)
    }
    type A = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(a: f64) -> Self {
        a
    }
    #[inline(always)]
    fn get(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        x as f64
    }
}

impl Elem for half::bf16 {
    fn as_acc(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_acc_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Elem for half::f16 {
    fn as_acc(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_acc_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        half::f16::from_f32(a)
    }
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// Branch-free `eˣ` for `x ≤ 0` in f32 (Cephes' `expf` polynomial; relative error below
/// 2.5e-7, see the test). Unlike libm's `expf` it inlines, so the row pass vectorizes.
#[inline(always)]
pub(crate) fn exp_nonpos_f32(x: f32) -> f32 {
    // Below ln(f32::MIN_POSITIVE) the result would be subnormal: flush to 0 (and -inf to 0).
    const LO: f32 = -87.336_55;
    let xc = if x < LO { LO } else { x };
    // n = round(x / ln 2) (see `SHIFTER`).
    let shifted = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    // r = x − n ln 2, with ln 2 split in two for precision.
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let two_n = pow2_shifted(shifted);
    if x < LO {
        0.0
    } else {
        p * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exponent built from the shifted value's bits is exactly `2^n` over the whole range.
    #[test]
    fn pow2_from_the_shifted_bits_is_exact() {
        for n in -126..=127 {
            let got = pow2_shifted(n as f32 + SHIFTER);
            assert_eq!(got, 2f32.powi(n), "2^{n}");
        }
        assert_eq!(pow2_shifted(128.0 + SHIFTER), f32::INFINITY);
    }

    /// `exp_f32` within 2 ulp of the exact value (f64) on a fine grid of its finite range, and
    /// `erf_f32` within its approximation's 1.5e-7 of f64's erf, plus four roundings of
    /// values at most 1 (the quotient, the polynomial, `exp` and the final `1 - p·e`).
    #[test]
    fn exp_and_erf_follow_their_f64_values() {
        let mut x = -87.3f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.013;
        }
        assert_eq!(exp_f32(-90.0), 0.0);
        let tol = f64::from(f32::EPSILON);
        let mut x = -6f32;
        while x < 6.0 {
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            let got = f64::from(erf_f32(x));
            assert!(
                (got - want).abs() <= 1.5e-7 + 4.0 * tol,
                "erf({x}) = {got}, want {want}"
            );
            x += 0.0007;
        }
    }
}
