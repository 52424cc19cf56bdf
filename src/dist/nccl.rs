//! [`NcclCollective`]: one process per CUDA device, collectives through NCCL.

use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{rendezvous, Collective, DistEnv};
use crate::{Error, Result};

/// A [`Collective`] over NCCL, for one process per CUDA device.
///
/// The communicator is created on the candle device's CUDA stream, so collectives are queued
/// behind the kernels that produce their inputs and before the ones that read their outputs,
/// with no host synchronisation. Tensors must be on that device; f32, f64, f16 and bf16 are
/// supported.
///
/// Dropping it aborts the communicator (`ncclCommAbort`): ranks blocked in a collective with
/// this one then fail instead of waiting forever (NCCL reports the broken peer).
///
/// NCCL does not check that ranks call the same collectives with the same shapes: unlike
/// [`super::LocalCollective`], a mismatch hangs or corrupts. The CPU tests, which run the same
/// code over [`super::LocalCollective`], catch such bugs.
pub struct NcclCollective {
    comm: Comm,
    device: Device,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time; `Comm` is only
// `!Send` because it holds a raw pointer. `NcclCollective` is not `Sync`, so it is never used
// from two threads at once.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("device", &self.device)
            .finish()
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Distributed(format!("NCCL {what}: {e:?}"))
}

impl NcclCollective {
    /// Joins the job described by `env`: rank 0 creates the NCCL unique id and sends it to the
    /// other ranks ([`rendezvous`], within `timeout`), then every rank creates its
    /// communicator on `device`'s stream (`device` is usually `Device::new_cuda(env.local_rank)`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `device` is not a CUDA device; the rendezvous' errors;
    /// [`Error::Distributed`] when NCCL fails to create the communicator.
    pub fn new(device: &Device, env: &DistEnv, timeout: Duration) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::InvalidArgument(format!(
                "NcclCollective needs a CUDA device, got {:?}",
                device.location()
            )));
        };
        let blob = rendezvous(env, timeout, || {
            let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        })?;
        let internal: [std::ffi::c_char; 128] = blob
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                Error::Distributed(format!(
                    "the NCCL unique id has {} bytes, expected 128",
                    blob.len()
                ))
            })?;
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            env.rank,
            env.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| nccl_error("communicator init", e))?;
        Ok(Self {
            comm,
            device: device.clone(),
        })
    }

    fn apply(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        if !x.device().same_device(&self.device) {
            return Err(Error::InvalidArgument(format!(
                "NCCL rank {}: tensor on {:?}, the communicator is on {:?}",
                self.comm.rank(),
                x.device().location(),
                self.device.location()
            )));
        }
        let x = x.detach().contiguous()?;
        let op = NcclOp {
            comm: &self.comm,
            kind,
        };
        Ok(x.apply_op1_no_bwd(&op)?)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Kind::AllReduceSum)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 0 {
            return Err(Error::InvalidArgument(
                "all_gather: the tensor needs a dimension to concatenate".into(),
            ));
        }
        self.apply(x, Kind::AllGather)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.comm.world_size() {
            return Err(Error::InvalidArgument(format!(
                "broadcast from rank {root} in a group of {}",
                self.comm.world_size()
            )));
        }
        self.apply(x, Kind::Broadcast(root))
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    AllReduceSum,
    AllGather,
    Broadcast(usize),
}

/// One collective as a candle op, so that it runs on the tensor's storage on the device's
/// stream. Forward only: the results are constants to autograd.
struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl NcclOp<'_> {
    fn run<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("NCCL collective on a non-contiguous tensor".into())
        })?;
        let device = storage.device().clone();
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let n = end - start;
        let world = self.comm.world_size();
        let err = |e: candle_core::cuda::cudarc::nccl::result::NcclError| {
            candle_core::Error::Msg(format!("NCCL {:?}: {e:?}", self.kind))
        };
        let (dst, shape) = match self.kind {
            Kind::AllReduceSum => {
                let mut dst = device.alloc_zeros::<T>(n)?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(err)?;
                (dst, layout.shape().clone())
            }
            Kind::AllGather => {
                let mut dst = device.alloc_zeros::<T>(n * world)?;
                self.comm.all_gather(&src, &mut dst).map_err(err)?;
                let mut dims = layout.shape().dims().to_vec();
                dims[0] *= world;
                (dst, Shape::from(dims))
            }
            Kind::Broadcast(root) => {
                let mut dst = device.alloc_zeros::<T>(n)?;
                // The send buffer is read on the root only; the others pass theirs for its
                // length.
                self.comm
                    .broadcast(Some(&src), &mut dst, root as i32)
                    .map_err(err)?;
                (dst, layout.shape().clone())
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(dst, device), shape))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("an NCCL collective needs a CUDA tensor")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, layout),
            DType::F64 => self.run::<f64>(storage, layout),
            DType::F16 => self.run::<half::f16>(storage, layout),
            DType::BF16 => self.run::<half::bf16>(storage, layout),
            other => candle_core::bail!("NCCL collective: unsupported dtype {other:?}"),
        }
    }
}
