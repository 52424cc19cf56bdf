//! [`NcclCollective`]: one process per CUDA device, collectives through NCCL, each bounded in
//! time by a [`Watchdog`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda::cudarc::driver::{
    CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda::cudarc::nccl::{result as nccl, sys, NcclType};
use candle_core::cuda::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::watchdog::{collective_timeout, within, Communicator, PendingWork, Watchdog};
use super::{rendezvous, Collective, DistEnv};
use crate::{Error, Result};

/// A [`Collective`] over NCCL, for one process per CUDA device.
///
/// The communicator is created on the candle device's CUDA stream, so collectives are queued
/// behind the kernels that produce their inputs, with no host synchronisation before them.
/// Tensors must be on that device; f32, f64, f16 and bf16 are supported.
///
/// # Failures
///
/// NCCL itself never gives up on a peer that died or hangs. Each collective therefore waits
/// for its own completion (a CUDA event recorded behind it) under a [`Watchdog`], as PyTorch's
/// `ProcessGroupNCCL` does in its blocking-wait mode: it polls the communicator's
/// asynchronous error (`ncclCommGetAsyncError`) and aborts the communicator
/// (`ncclCommAbort`) on an error or after the timeout ([`NcclCollective::with_timeout`];
/// default `MLCTL_COLLECTIVE_TIMEOUT_SECS`, or 10 minutes as PyTorch's), returning
/// [`Error::Distributed`] naming this rank, the collective and the cause. Every rank watches its
/// own communicator, so when one rank dies or hangs every other rank's pending collective fails
/// within the timeout (sooner when NCCL reports the broken connection). The price is one host
/// wait per collective: compute queued after a collective does not overlap it.
///
/// Communicator creation and the first collective's connection setup block inside NCCL and are
/// not covered; the rendezvous' timeout and the launcher's bound the first.
///
/// Dropping it aborts the communicator.
///
/// NCCL does not check that ranks call the same collectives with the same shapes: unlike
/// [`super::LocalCollective`], a mismatch hangs (until the timeout) or corrupts. The CPU tests,
/// which run the same code over [`super::LocalCollective`], catch such bugs.
pub struct NcclCollective {
    comm: RawComm,
    stream: Arc<CudaStream>,
    device: Device,
    rank: usize,
    world: usize,
    watchdog: Watchdog,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time; it is only `!Send`
// because it is a raw pointer. `NcclCollective` is not `Sync`, so it is never used from two
// threads at once.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .field("device", &self.device)
            .field("timeout", &self.watchdog.timeout())
            .finish()
    }
}

fn nccl_error(what: &str, e: nccl::NcclError) -> Error {
    Error::Distributed(format!("NCCL {what}: {:?}", e.0))
}

/// An NCCL communicator, aborted once (on failure or drop).
struct RawComm {
    comm: sys::ncclComm_t,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; it is created
// on a helper thread (see `NcclCollective::new`) and then only used by its owner.
unsafe impl Send for RawComm {}

impl RawComm {
    fn init(rank: usize, world: usize, id: sys::ncclUniqueId) -> Result<Self> {
        let int = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("NCCL {what} {v}")))
        };
        let (rank, world) = (int("rank", rank)?, int("world size", world)?);
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success, and read only then.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world, id, rank)
                .map_err(|e| nccl_error("communicator init", e))?;
            comm.assume_init()
        };
        Ok(Self {
            comm,
            aborted: AtomicBool::new(false),
        })
    }
}

impl Communicator for RawComm {
    fn async_error(&self) -> std::result::Result<(), String> {
        if self.aborted.load(Ordering::Acquire) {
            return Err("the communicator was aborted".into());
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is alive (not aborted), `state` is a valid out-pointer.
        let queried = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if let Err(e) = queried.result() {
            return Err(format!("ncclCommGetAsyncError failed: {:?}", e.0));
        }
        // `InProgress` is a non-blocking communicator's normal state.
        match state.result() {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{:?}: {}", e.0, self.last_error())),
        }
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: aborted once; the pointer is not used again. Its own failure is moot:
            // the communicator is given up either way.
            let _ = unsafe { sys::ncclCommAbort(self.comm) };
        }
    }
}

impl RawComm {
    /// NCCL's description of its last error on this communicator (often naming the peer).
    fn last_error(&self) -> String {
        // SAFETY: NCCL returns a NUL-terminated string it owns, or null.
        unsafe {
            let s = sys::ncclGetLastError(self.comm);
            if s.is_null() {
                return String::new();
            }
            std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// A collective's completion: an event recorded on the stream behind it.
struct Event(CudaEvent);

impl PendingWork for Event {
    fn is_done(&self) -> std::result::Result<bool, String> {
        self.0.try_is_complete().map_err(|e| format!("{e:?}"))
    }
}

impl NcclCollective {
    /// Joins the job described by `env`: rank 0 creates the NCCL unique id and sends it to the
    /// other ranks ([`rendezvous`], within `timeout`), then every rank creates its
    /// communicator on `device`'s stream (`device` is usually `Device::new_cuda(env.local_rank)`).
    /// Collectives time out after `MLCTL_COLLECTIVE_TIMEOUT_SECS` seconds, or 10 minutes
    /// ([`NcclCollective::with_timeout`] sets another).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `device` is not a CUDA device or the timeout variable is
    /// not a number of seconds; the rendezvous' errors; [`Error::Distributed`] when NCCL fails
    /// to create the communicator, or has not created it within the collective timeout (a rank
    /// that died after the rendezvous).
    pub fn new(device: &Device, env: &DistEnv, timeout: Duration) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::InvalidArgument(format!(
                "NcclCollective needs a CUDA device, got {:?}",
                device.location()
            )));
        };
        let collective_timeout = collective_timeout()?;
        let blob = rendezvous(env, timeout, || {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("unique id", e))?;
            Ok(id.internal.iter().map(|&c| c as u8).collect())
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
        let stream = cuda.cuda_stream();
        let context = stream.context().clone();
        let (rank, world) = (env.rank, env.world_size);
        // Creating the communicator blocks until every rank has joined, with no timeout of
        // its own: a rank that died after the rendezvous would hold the others forever.
        let comm = within(
            rank,
            collective_timeout,
            "creating the NCCL communicator",
            move || {
                // NCCL creates the communicator on the thread's current device.
                context
                    .bind_to_thread()
                    .map_err(|e| Error::Distributed(format!("binding the CUDA device: {e:?}")))?;
                RawComm::init(rank, world, sys::ncclUniqueId { internal })
            },
        )?;
        Ok(Self {
            comm,
            stream,
            device: device.clone(),
            rank: env.rank,
            world: env.world_size,
            watchdog: Watchdog::new(env.rank, collective_timeout),
        })
    }

    /// The same communicator, whose collectives give up after `timeout` (see the
    /// [type's docs](NcclCollective#failures)).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.watchdog = Watchdog::new(self.rank, timeout);
        self
    }

    fn apply(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        if !x.device().same_device(&self.device) {
            return Err(Error::InvalidArgument(format!(
                "NCCL rank {}: tensor on {:?}, the communicator is on {:?}",
                self.rank,
                x.device().location(),
                self.device.location()
            )));
        }
        let x = x.detach().contiguous()?;
        let what = format!("{kind:?} of {:?} {:?}", x.dtype(), x.dims());
        self.watchdog.run(&self.comm, &what, || {
            let op = NcclOp {
                comm: &self.comm,
                stream: &self.stream,
                world: self.world,
                kind,
            };
            let out = x.apply_op1_no_bwd(&op)?;
            let event = self
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| Error::Distributed(format!("recording a CUDA event: {e:?}")))?;
            Ok((out, Event(event)))
        })
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
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
        if root >= self.world {
            return Err(Error::InvalidArgument(format!(
                "broadcast from rank {root} in a group of {}",
                self.world
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
/// stream. Forward only: the results are constants to autograd. It only queues the
/// collective; [`NcclCollective::apply`] waits for it.
struct NcclOp<'a> {
    comm: &'a RawComm,
    stream: &'a Arc<CudaStream>,
    world: usize,
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
        let (out_len, shape) = match self.kind {
            Kind::AllGather => {
                let mut dims = layout.shape().dims().to_vec();
                dims[0] *= self.world;
                (n * self.world, Shape::from(dims))
            }
            _ => (n, layout.shape().clone()),
        };
        let mut dst = device.alloc_zeros::<T>(out_len)?;
        {
            // The guards order later work on other streams behind this use of the buffers.
            let (src_ptr, _src_guard) = src.device_ptr(self.stream);
            let (dst_ptr, _dst_guard) = dst.device_ptr_mut(self.stream);
            // SAFETY: both buffers are live device allocations of the lengths `run` gives, on
            // the communicator's device.
            unsafe { self.queue(src_ptr, dst_ptr, n, T::as_nccl_type()) }
                .map_err(|e| candle_core::Error::Msg(format!("NCCL {:?}: {:?}", self.kind, e.0)))?;
        }
        Ok((CudaStorage::wrap_cuda_slice(dst, device), shape))
    }

    /// Queues the collective on the stream: NCCL reads `n` elements at `src` (`n` on every
    /// rank, the root's only for a broadcast) and writes `dst` in stream order.
    ///
    /// # Safety
    ///
    /// `src` holds `n` elements and `dst` the output's (`n`, or `n · world` for a gather) of
    /// `dtype`, on the communicator's device, alive until the work completes.
    unsafe fn queue(
        &self,
        src: u64,
        dst: u64,
        n: usize,
        dtype: sys::ncclDataType_t,
    ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError> {
        let (comm, stream) = (self.comm.comm, self.stream.cu_stream() as sys::cudaStream_t);
        let (src, dst) = (src as *const std::ffi::c_void, dst as *mut std::ffi::c_void);
        match self.kind {
            Kind::AllReduceSum => {
                let sum = sys::ncclRedOp_t::ncclSum;
                nccl::all_reduce(src, dst, n, dtype, sum, comm, stream)
            }
            Kind::AllGather => nccl::all_gather(src, dst, n, dtype, comm, stream),
            Kind::Broadcast(root) => nccl::broadcast(src, dst, n, dtype, root as i32, comm, stream),
        }
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
