//! AdamW on CUDA: the moments (and f32 master weights) of a parameter on its device, and one
//! launch of `ops.cu`'s `adamw` kernel per update, with the numbers of
//! [`Coefficients`](crate::ops::adamw::Coefficients).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::{elementwise_cfg, output, view, Kernel, Ptx};
use crate::ops::adamw::Coefficients;

/// The moments (and f32 master weights) of one parameter on its CUDA device, updated in place
/// by the fused kernel.
pub(crate) struct AdamState {
    dev: CudaDevice,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    master: Option<CudaSlice<f32>>,
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        other => candle_core::bail!("fused adamw (cuda): a tensor on {:?}", other.location()),
    }
}

/// A copy of `t`'s elements as an f32 buffer on `dev`.
fn f32_buffer(t: &Tensor, dev: &CudaDevice) -> Result<CudaSlice<f32>> {
    let t = t
        .to_device(&candle_core::Device::Cuda(dev.clone()))?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("fused adamw (cuda): expected a CUDA tensor");
    };
    let src = view::<f32>(s, layout)?;
    let mut dst = output::<f32>(dev, t.elem_count())?;
    dev.memcpy_dtod(&src, &mut dst)?;
    Ok(dst)
}

impl AdamState {
    /// Zero moments, and a master copy of `param` when `master`.
    pub(crate) fn new(param: &Tensor, master: bool) -> Result<Self> {
        let dev = cuda_device(param)?;
        let n = param.elem_count();
        Ok(Self {
            m: dev.alloc_zeros::<f32>(n)?,
            v: dev.alloc_zeros::<f32>(n)?,
            master: master.then(|| f32_buffer(param, &dev)).transpose()?,
            dev,
        })
    }

    /// The state from tensors of the parameter's size (any float dtype, any device).
    pub(crate) fn from_tensors(
        param: &Tensor,
        m: &Tensor,
        v: &Tensor,
        master: Option<&Tensor>,
    ) -> Result<Self> {
        let dev = cuda_device(param)?;
        Ok(Self {
            m: f32_buffer(m, &dev)?,
            v: f32_buffer(v, &dev)?,
            master: master.map(|w| f32_buffer(w, &dev)).transpose()?,
            dev,
        })
    }

    /// Copies of `(m, v, master)` as f32 tensors of `shape` on the parameter's device.
    pub(crate) fn tensors(&self, shape: &Shape) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let tensor = |s: &CudaSlice<f32>| -> Result<Tensor> {
            let mut copy = output::<f32>(&self.dev, s.len())?;
            self.dev.memcpy_dtod(s, &mut copy)?;
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(copy, self.dev.clone()));
            Ok(Tensor::from_storage(
                storage,
                shape.clone(),
                BackpropOp::none(),
                false,
            ))
        };
        Ok((
            tensor(&self.m)?,
            tensor(&self.v)?,
            self.master.as_ref().map(tensor).transpose()?,
        ))
    }

    /// One update of `param` (contiguous, on this state's device) from `grad` (any layout and
    /// float dtype: it is brought to the parameter's dtype and made contiguous on the device).
    pub(crate) fn update(&mut self, param: &Tensor, grad: &Tensor, k: &Coefficients) -> Result<()> {
        let grad = grad
            .to_device(param.device())?
            .to_dtype(param.dtype())?
            .contiguous()?;
        let op = AdamWOp {
            state: std::cell::RefCell::new(self),
            k,
        };
        param.inplace_op2(&grad, &op)
    }
}

/// The fused update as an in-place op on the parameter, reading the gradient.
struct AdamWOp<'a> {
    state: std::cell::RefCell<&'a mut AdamState>,
    k: &'a Coefficients,
}

impl candle_core::InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("fused adamw (cuda): a CPU parameter")
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let Some((start, end)) = pl.contiguous_offsets() else {
            candle_core::bail!("fused adamw (cuda): a non-contiguous parameter")
        };
        let n = end - start;
        let mut guard = self.state.borrow_mut();
        let state: &mut AdamState = &mut guard;
        // The launch below reads and writes n elements of every buffer: check each one.
        let master_len = state.master.as_ref().map_or(n, |w| w.len());
        let lens = [
            gl.shape().elem_count(),
            state.m.len(),
            state.v.len(),
            master_len,
        ];
        if lens.iter().any(|&len| len != n) {
            candle_core::bail!(
                "fused adamw (cuda): parameter of {n} elements, but gradient, m, v and master \
                 hold {lens:?}"
            );
        }
        let dtype = p.dtype();
        let dev = state.dev.clone();
        let Coefficients {
            beta1: b1,
            one_minus_beta1: omb1,
            beta2: b2,
            one_minus_beta2: omb2,
            eps,
            inv_correction1: ic1,
            inv_correction2: ic2,
            lr,
            decay: _,
        } = *self.k;
        let (decay, has_decay) = (self.k.decay.unwrap_or(1.0), self.k.decay.is_some() as i32);
        let (len, has_master) = (n as i64, state.master.is_some() as i32);
        dispatch_cuda!(dtype, "fused-adamw", |T| {
            let gv = view::<T>(g, gl)?;
            let mut pv = p.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            let f = func!(dev, "adamw", T)?;
            let mut args = f.builder();
            args.arg(&mut pv)
                .arg(&gv)
                .arg(&mut state.m)
                .arg(&mut state.v);
            // Without master weights the kernel never touches that pointer; it still needs a
            // valid one (the gradient's, which is not aliased by a mutable argument).
            match state.master.as_mut() {
                Some(w) => args.arg(w),
                None => args.arg(&gv),
            };
            args.arg(&has_master).arg(&len);
            for c in [&b1, &omb1, &b2, &omb2, &eps, &ic1, &ic2, &lr, &decay] {
                args.arg(c);
            }
            args.arg(&has_decay);
            // SAFETY: parameter, gradient, moments (and master weights) all hold n elements
            // (checked above); element i is read and written by one thread only.
            unsafe { args.launch(elementwise_cfg(n)) }.w()?;
            Ok(())
        })
    }
}
