//! Choosing the compute device from cargo features and a user's choice.

use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Which device to run on; parse it from a command-line flag with [`FromStr`]
/// (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`, `metal:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU this build supports (CUDA, then Metal) if one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal device with this ordinal (needs the `metal` feature).
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => {
                let n = n
                    .parse()
                    .map_err(|_| Error::InvalidArgument(format!("bad device ordinal in `{s}`")))?;
                (kind, Some(n))
            }
            None => (s, None),
        };
        match (kind.to_ascii_lowercase().as_str(), ordinal) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda" | "gpu", n) => Ok(Self::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Self::Metal(n.unwrap_or(0))),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{s}`: expected auto, cpu, cuda[:N] or metal[:N]"
            ))),
        }
    }
}

impl DeviceChoice {
    /// Opens the chosen device.
    ///
    /// Asking for CUDA or Metal in a build without that feature is an error that says which
    /// feature to enable; `Auto` quietly falls back to the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    Ok(Device::new_cuda(0)?)
                } else if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    Ok(Device::new_metal(0)?)
                } else {
                    Ok(Device::Cpu)
                }
            }
            Self::Cuda(n) if cfg!(feature = "cuda") => Ok(Device::new_cuda(n)?),
            Self::Metal(n) if cfg!(feature = "metal") => Ok(Device::new_metal(n)?),
            Self::Cuda(_) => Err(Error::InvalidArgument(
                "this build has no CUDA support: rebuild with `--features cuda`".into(),
            )),
            Self::Metal(_) => Err(Error::InvalidArgument(
                "this build has no Metal support: rebuild with `--features metal`".into(),
            )),
        }
    }
}

/// Opens the device for a `--device` flag value: [`DeviceChoice::open`].
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    choice.open()
}

/// Runs candle's elementwise CPU ops on the calling thread instead of on a second thread pool,
/// so that rayon's pool (candle's matrix products and mlctl's kernels) is the only one;
/// [`BertEncoder::load`](crate::encoder::BertEncoder::load) calls it on the CPU and the examples
/// at the start of `main`. Returns whether it is in effect: whether candle's elementwise pool
/// has no worker threads.
///
/// Why: candle 0.11 runs every contiguous elementwise op of 65 536 elements or more on a pool
/// of its own (`CANDLE_NUM_THREADS` threads, by default one per core), whose workers spin for
/// thousands of iterations after each op before they sleep. With rayon's workers that makes
/// two busy threads per core, and each pool's threads wait for the other's to be scheduled: on
/// a 2-core machine kept busy by another process, CZ-NCE's forward and backward at a batch of
/// 64 by 1536 took 2–6 times as long with candle's pool as without it, and an ML-CTL training
/// run of the `pretrain_xnli` example a fifth longer; with the machine to itself the two made
/// no measurable difference (see `benches/README.md`). Elementwise ops give the same bits
/// either way: each element is computed alone.
///
/// How: it sets `CANDLE_NUM_THREADS=1` when that variable is unset, which candle reads when
/// its pool first starts. It changes the environment only while the process has a single
/// thread (on Linux, where it can count them), since changing it while another thread may
/// read it is undefined behaviour; otherwise, or if the variable holds another value, or if
/// candle's pool has already started with workers, it changes nothing. Setting
/// `CANDLE_NUM_THREADS=1` yourself has the same effect anywhere. The first call starts candle's
/// pool, which fixes the answer, so later calls return it without looking again.
pub fn single_cpu_thread_pool() -> bool {
    static IN_EFFECT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN_EFFECT.get_or_init(elementwise_on_caller)
}

fn elementwise_on_caller() -> bool {
    const VAR: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(VAR).is_none() && process_threads() == Some(1) {
        // Sound: this process has one thread (this one), so nothing else reads the
        // environment while it changes.
        std::env::set_var(VAR, "1");
    }
    candle_core::utils::barrier_pool().n_workers() == 0
}

/// The number of threads of this process, where the platform tells (Linux's `/proc`).
fn process_threads() -> Option<usize> {
    if cfg!(target_os = "linux") {
        std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
    } else {
        None
    }
}

/// Makes the C allocator keep freed memory for reuse instead of handing it back to the
/// operating system at every free; [`BertEncoder::load`](crate::encoder::BertEncoder::load)
/// and the first [`CzNce`](crate::loss::CzNce) call on CPU tensors call it. Returns whether the
/// allocator was tuned (only on Linux with glibc; elsewhere it does nothing).
///
/// Why: a training step allocates and frees hundreds of buffers of a few MiB. glibc's malloc
/// returns the top of its heap to the kernel whenever more than a (dynamic) threshold is free
/// there, and serves larger requests with fresh `mmap`s, so the next step faults every page of
/// those buffers back in and the kernel zeroes them: at multilingual-e5-small's shape a third
/// of a forward pass went to page faults. This sets `M_TRIM_THRESHOLD` to 2 GiB (the heap is
/// not trimmed) and `M_MMAP_THRESHOLD` to 32 MiB (glibc's largest; bigger blocks, such as a
/// whole embedding table's gradient, still get their own mapping). It also sets `M_ARENA_MAX`
/// to 1: glibc gives threads that allocate at the same time arenas of their own, and an arena
/// that is never trimmed keeps its own high-water mark, so memory one thread freed (an
/// inference group's buffers on a worker thread) could not serve another (the training step on
/// the main one); the buffers here are few and large, so sharing one arena's lock cost nothing
/// measurable (on two cores; not measured on many). The cost is that the process keeps its
/// peak heap size after a step, as PyTorch's caching allocators do on GPUs. It changes the
/// whole process's allocator; it is safe to call more than once.
pub fn retain_freed_cpu_memory() -> bool {
    static TUNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TUNED.get_or_init(tune_malloc)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() -> bool {
    use std::os::raw::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // From glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    const M_ARENA_MAX: c_int = -8;
    // SAFETY: mallopt only changes the allocator's parameters (it takes the allocator's own
    // lock); the three values are within the ranges glibc documents and accepts (it returns 0
    // and changes nothing otherwise).
    unsafe {
        mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1
            && mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
            && mallopt(M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test runs beside the harness's main thread, so the environment must stay as it was:
    /// changing it while other threads may read it is undefined behaviour.
    #[test]
    fn single_cpu_thread_pool_leaves_the_environment_of_a_threaded_process_alone() {
        let before = std::env::var_os("CANDLE_NUM_THREADS");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        if cfg!(target_os = "linux") {
            assert!(process_threads().is_some_and(|n| n >= 2));
        }
        let in_effect = single_cpu_thread_pool();
        assert_eq!(std::env::var_os("CANDLE_NUM_THREADS"), before);
        assert_eq!(
            in_effect,
            candle_core::utils::barrier_pool().n_workers() == 0
        );
        tx.send(()).unwrap();
        other.join().unwrap().unwrap();
    }
}
