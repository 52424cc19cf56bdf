//! GELU, exact (erf) and tanh-approximated.

use std::sync::Arc;

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{check_device, check_float, dispatch, fused_supported, slice};
use super::num::{Elem, Real};
use crate::Result;

/// Which GELU: transformers' `gelu` (erf) or `gelu_new` / `gelu_pytorch_tanh` (tanh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeluForm {
    /// `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
    Erf,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    Tanh,
}

impl GeluForm {
    /// The form's number in `cuda/ops.cu`'s GELU kernels.
    #[cfg(feature = "cuda")]
    fn kernel_arg(self) -> i32 {
        match self {
            GeluForm::Erf => 0,
            GeluForm::Tanh => 1,
        }
    }
}

/// GELU: the fused kernel where it runs (the CPU; CUDA for f32, f16 and bf16), the composite
/// elsewhere.
///
/// # Shapes
/// - `x`: any; output: the shape of `x`
pub fn gelu(x: &Tensor, form: GeluForm) -> Result<Tensor> {
    if fused_supported(x) {
        gelu_fused(x, form)
    } else {
        gelu_composite(x, form)
    }
}

/// candle's own GELU ops (`gelu_erf`, `gelu`), differentiable on every device.
pub fn gelu_composite(x: &Tensor, form: GeluForm) -> Result<Tensor> {
    check_float(x, "gelu")?;
    Ok(match form {
        GeluForm::Erf => x.gelu_erf()?,
        GeluForm::Tanh => x.gelu()?,
    })
}

/// GELU as one pass (CPU, or CUDA for f32, f16 and bf16; f32 arithmetic for half precision)
/// with a fused backward that evaluates the exact derivative.
pub fn gelu_fused(x: &Tensor, form: GeluForm) -> Result<Tensor> {
    check_float(x, "gelu")?;
    check_device(x, "gelu")?;
    Ok(x.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(GeluOp { form })))?)
}

const CHUNK: usize = 8192;
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const TANH_C: f64 = 0.044_715;

/// `(gelu(x), gelu'(x))`.
#[inline(always)]
pub(crate) fn value_and_slope<A: Real>(x: A, form: GeluForm) -> (A, A) {
    let half = A::lit(0.5);
    match form {
        GeluForm::Erf => {
            let cdf = half * (A::ONE + (x * A::lit(FRAC_1_SQRT_2)).erf());
            let pdf = A::lit(FRAC_1_SQRT_2PI) * (-half * x * x).exp();
            (x * cdf, cdf + x * pdf)
        }
        GeluForm::Tanh => {
            let c = A::lit(TANH_C);
            let k = A::lit(SQRT_2_OVER_PI);
            let t = (k * (x + c * x * x * x)).tanh();
            let du = k * (A::ONE + A::lit(3.0) * c * x * x);
            (
                half * x * (A::ONE + t),
                half * (A::ONE + t) + half * x * (A::ONE - t * t) * du,
            )
        }
    }
}

struct GeluOp {
    form: GeluForm,
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let form = self.form;
        dispatch!(s, "fused-gelu", |T| {
            let x = slice::<T>(s, l)?;
            let mut out = vec![T::elem_zero(); x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| match form {
                    // One loop per form, so each inner loop is branch-free.
                    GeluForm::Erf => y.iter_mut().zip(x).for_each(|(y, x)| {
                        *y = T::store(value_and_slope(Elem::load(*x), GeluForm::Erf).0)
                    }),
                    GeluForm::Tanh => y.iter_mut().zip(x).for_each(|(y, x)| {
                        *y = T::store(value_and_slope(Elem::load(*x), GeluForm::Tanh).0)
                    }),
                });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::gelu_fwd((s, l), self.form.kernel_arg())?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GeluBwd { form: self.form },
        )?))
    }
}

/// `grad * gelu'(x)`.
struct GeluBwd {
    form: GeluForm,
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let form = self.form;
        dispatch!(s1, "fused-gelu-bwd", |T| {
            let x = slice::<T>(s1, l1)?;
            let g = slice::<T>(s2, l2)?;
            let mut out = vec![T::elem_zero(); x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|((dx, x), g)| match form {
                    GeluForm::Erf => dx.iter_mut().zip(x).zip(g).for_each(|((d, x), g)| {
                        *d = T::store(
                            Elem::load(*g) * value_and_slope(Elem::load(*x), GeluForm::Erf).1,
                        )
                    }),
                    GeluForm::Tanh => dx.iter_mut().zip(x).zip(g).for_each(|((d, x), g)| {
                        *d = T::store(
                            Elem::load(*g) * value_and_slope(Elem::load(*x), GeluForm::Tanh).1,
                        )
                    }),
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dx = super::cuda::gelu_bwd((s1, l1), (s2, l2), self.form.kernel_arg())?;
        Ok((dx, l1.shape().clone()))
    }
}
