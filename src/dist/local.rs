//! [`LocalCollective`]: ranks as threads of one process.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::Collective;
use crate::{Error, Result};

/// A [`Collective`] whose ranks are threads of one process, exchanging tensors through shared
/// memory. It runs the same data-parallel code as NCCL on the CPU: tests use it to check that
/// `W` ranks compute what one process computes.
///
/// Each rank's handle is moved into its thread. When a handle is dropped (its thread returned,
/// failed or panicked) while others still wait, or later call a collective, they get
/// [`Error::Distributed`] instead of waiting forever. Ranks that call different collectives,
/// or pass tensors of different shapes or dtypes, all get the same error. A rank that hangs
/// (never reaches a collective the others wait in) fails them all after the group's timeout
/// ([`LocalCollective::group_with_timeout`]), with an error naming the ranks that did not come,
/// as NCCL's watchdog would.
///
/// Sums are taken in rank order, so every rank gets bit-identical results.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor};
/// use mlctl::dist::{Collective, LocalCollective};
///
/// # fn main() -> mlctl::Result<()> {
/// let handles: Vec<_> = LocalCollective::group(2)?
///     .into_iter()
///     .map(|c| {
///         std::thread::spawn(move || -> mlctl::Result<Vec<f32>> {
///             let x = Tensor::new(&[c.rank() as f32 + 1.0], &Device::Cpu)?;
///             Ok(c.all_reduce_sum(&x)?.to_vec1()?)
///         })
///     })
///     .collect();
/// for h in handles {
///     assert_eq!(h.join().unwrap()?, vec![3.0]);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    /// How long a rank waits in a collective for the others.
    timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    /// Incremented each time a collective completes.
    generation: u64,
    deposits: Vec<Option<Deposit>>,
    arrived: usize,
    /// The result of the last completed collective; it stays until every rank has read it,
    /// because the next one cannot complete before every rank has deposited again.
    outcome: Option<std::result::Result<Tensor, String>>,
    /// Set when a rank left the group: every later or pending collective fails with it.
    failed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    AllGather,
    Broadcast(usize),
}

#[derive(Debug)]
struct Deposit {
    op: Op,
    tensor: Tensor,
}

impl LocalCollective {
    /// The handles of a new group of `world` ranks, in rank order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `world` is 0.
    pub fn group(world: usize) -> Result<Vec<LocalCollective>> {
        Self::build(world, None)
    }

    /// [`LocalCollective::group`] whose collectives give up after `timeout`: a rank that
    /// waits longer for the others fails the group with [`Error::Distributed`] naming the
    /// ranks that did not arrive, and every rank gets that error (a hung rank, too, when it
    /// reaches its next collective).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `world` is 0.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Result<Vec<LocalCollective>> {
        Self::build(world, Some(timeout))
    }

    fn build(world: usize, timeout: Option<Duration>) -> Result<Vec<LocalCollective>> {
        if world == 0 {
            return Err(Error::InvalidArgument(
                "LocalCollective::group: world size must be at least 1".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                deposits: (0..world).map(|_| None).collect(),
                arrived: 0,
                outcome: None,
                failed: None,
            }),
            changed: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalCollective {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held can only come from a tensor op in `complete`; the
        // state itself stays consistent, and the panicking rank's drop marks the group failed.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deposits this rank's tensor, waits for every rank, returns the collective's result.
    fn exchange(&self, op: Op, x: &Tensor) -> Result<Tensor> {
        let device = x.device().clone();
        // A private copy: the caller may overwrite `x` (a `Var`) once this call returns, while
        // slower ranks still read it.
        let tensor = x.detach().to_device(&Device::Cpu)?.copy()?;
        let mut state = self.lock();
        if let Some(why) = &state.failed {
            return Err(Error::Distributed(why.clone()));
        }
        let generation = state.generation;
        state.deposits[self.rank] = Some(Deposit { op, tensor });
        state.arrived += 1;
        if state.arrived == self.shared.world {
            let deposits: Vec<Deposit> = state.deposits.iter_mut().flat_map(Option::take).collect();
            state.outcome = Some(complete(&deposits));
            state.arrived = 0;
            state.generation += 1;
            self.shared.changed.notify_all();
        } else {
            // Completion is checked before failure: a rank that returned from the last
            // collective and then left must not fail the ranks still reading its result.
            let deadline = self.shared.timeout.map(|t| (Instant::now() + t, t));
            while state.generation == generation {
                if let Some(why) = &state.failed {
                    return Err(Error::Distributed(why.clone()));
                }
                let Some((deadline, timeout)) = deadline else {
                    state = self
                        .shared
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    continue;
                };
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let why = timed_out(&state.deposits, timeout, op);
                    state.failed = Some(why.clone());
                    self.shared.changed.notify_all();
                    return Err(Error::Distributed(why));
                }
                state = self
                    .shared
                    .changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
        }
        match state.outcome.as_ref() {
            Some(Ok(t)) => Ok(t.copy()?.to_device(&device)?),
            Some(Err(why)) => Err(Error::Distributed(why.clone())),
            None => Err(Error::Distributed(
                "collective completed without a result".into(),
            )),
        }
    }
}

/// Why a collective timed out: the ranks that had not deposited.
fn timed_out(deposits: &[Option<Deposit>], timeout: Duration, op: Op) -> String {
    let missing: Vec<String> = (0..deposits.len())
        .filter(|&r| deposits[r].is_none())
        .map(|r| r.to_string())
        .collect();
    format!(
        "{op:?} timed out after {timeout:?}: rank(s) {} never reached it (hung or dead)",
        missing.join(", ")
    )
}

/// Computes a collective's result from every rank's deposit (in rank order), or the error
/// every rank reports.
fn complete(deposits: &[Deposit]) -> std::result::Result<Tensor, String> {
    let first = &deposits[0];
    for (rank, d) in deposits.iter().enumerate() {
        if d.op != first.op {
            return Err(format!(
                "ranks disagree on the collective: rank 0 called {:?}, rank {rank} called {:?}",
                first.op, d.op
            ));
        }
        if d.tensor.dims() != first.tensor.dims() || d.tensor.dtype() != first.tensor.dtype() {
            return Err(format!(
                "{:?}: rank 0 passed {:?} {:?}, rank {rank} passed {:?} {:?} (shards must be equal)",
                first.op,
                first.tensor.dtype(),
                first.tensor.dims(),
                d.tensor.dtype(),
                d.tensor.dims()
            ));
        }
    }
    let tensors: Vec<&Tensor> = deposits.iter().map(|d| &d.tensor).collect();
    let result = match first.op {
        Op::AllReduceSum => tensors[1..]
            .iter()
            .try_fold(tensors[0].clone(), |acc, t| acc.add(t)),
        Op::AllGather => {
            if first.tensor.rank() == 0 {
                return Err("all_gather: the tensor needs a dimension to concatenate".into());
            }
            Tensor::cat(&tensors, 0)
        }
        Op::Broadcast(root) => match tensors.get(root) {
            Some(t) => Ok((*t).clone()),
            None => {
                return Err(format!(
                    "broadcast from rank {root} in a group of {}",
                    tensors.len()
                ))
            }
        },
    };
    result.map_err(|e| format!("{:?}: {e}", first.op))
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.exchange(Op::AllReduceSum, x)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.exchange(Op::AllGather, x)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.exchange(Op::Broadcast(root), x)
    }
}

impl Drop for LocalCollective {
    fn drop(&mut self) {
        let mut state = self.lock();
        if state.failed.is_none() {
            let how = if std::thread::panicking() {
                "panicked"
            } else {
                "returned or failed"
            };
            state.failed = Some(format!(
                "rank {} left the group ({how}) while other ranks needed it",
                self.rank
            ));
        }
        self.shared.changed.notify_all();
    }
}
