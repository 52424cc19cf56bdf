//! Data-parallel building blocks: one process (or thread) per device, gradients summed across
//! ranks, contrastive negatives gathered from every rank.
//!
//! # The gradient rule
//!
//! Every rank holds an equal shard of the global batch. For a contrastive loss over the global
//! batch (CZ-NCE with cross-rank negatives), every rank
//!
//! 1. embeds its shard and gathers everyone's embeddings with [`gather_with_local_grad`]: the
//!    other ranks' rows are constants, only its own rows are in its autograd graph;
//! 2. computes the **global** loss on the gathered embeddings (plus purely local terms weighted
//!    by their local share, e.g. `λ · MLM` scaled by local / global masked-token count);
//! 3. back-propagates, and sums the gradients of all ranks with one all-reduce
//!    ([`GradLayout::all_reduce`]).
//!
//! Rank `r`'s backward gives the part of the global loss's gradient that flows through its own
//! rows; the sum over ranks is the exact gradient of the global-batch loss, the one a single
//! process would compute for the whole batch. That is why the reduction is a **sum**, not a mean.
//!
//! # Pieces
//!
//! - [`Collective`]: sum all-reduce, all-gather, broadcast. Implementations:
//!   [`LocalCollective`] (ranks are threads of one process; what the CPU tests use) and, with
//!   the `nccl` feature, `NcclCollective` (one process per CUDA device).
//! - [`Watchdog`]: bounds a backend's collectives in time and aborts its communicator on an
//!   asynchronous error or a timeout (what `NcclCollective` runs its collectives under), over
//!   the [`Communicator`] and [`PendingWork`] traits, so that it is tested without a GPU.
//! - [`GradLayout`]: flattens named gradients into one (or a few) dense f32 buffers in a fixed
//!   order, all-reduces them and unflattens them; a parameter without a gradient contributes
//!   zeros, and the ranks agree on skipping a step whose loss is non-finite on any rank.
//! - [`broadcast_vars`]: start every rank from rank 0's parameters.
//! - [`Trainer::with_collective`](crate::train::Trainer::with_collective): a trainer as one
//!   rank, over [`MultiLevelLoss::forward_rank`](crate::loss::MultiLevelLoss::forward_rank) or
//!   [`CachedLoss::forward_backward_rank`](crate::loss::CachedLoss::forward_backward_rank).
//! - [`DistEnv`] and [`rendezvous`]: the torchrun launch protocol (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); rank 0 hands every other rank a byte blob (the
//!   NCCL unique id) over TCP, so several nodes work the same way as one.
//! - [`launch_local_ranks`] (and [`LocalLaunch`]) and [`join_ranks`]: a program that starts
//!   its own ranks on one node (`--nproc-per-node`), stopping them all when one fails, on a
//!   signal or at a time limit, and a rank that joins its job (a CUDA device and an NCCL
//!   communicator).

mod buckets;
mod launch;
mod local;
#[cfg(feature = "nccl")]
mod nccl;
mod rendezvous;
mod watchdog;

pub use buckets::{
    any_rank_non_finite, broadcast_vars, GradLayout, ReducedGrads, DEFAULT_BUCKET_BYTES,
};
pub use launch::{
    join_ranks, launch_local_ranks, LocalLaunch, DEFAULT_STOP_GRACE, LAUNCH_TIMEOUT_VAR,
};
pub use local::LocalCollective;
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;
pub use rendezvous::{rendezvous, DistEnv};
pub use watchdog::{
    collective_timeout, collective_timeout_from, Communicator, PendingWork, Watchdog,
    COLLECTIVE_TIMEOUT_VAR, DEFAULT_COLLECTIVE_TIMEOUT,
};

use crate::{Error, Result};
use candle_core::Tensor;

/// Collective operations over a group of `world_size` ranks.
///
/// Every rank must call the same collectives in the same order with tensors of the same shape
/// and dtype (shards of equal length). Results are new tensors on the input's device, outside
/// any autograd graph; [`gather_with_local_grad`] puts the local rows back into the graph.
///
/// A failure on one rank (an error, a panic, a rank that leaves) must make the other ranks'
/// pending and later collectives return [`Error::Distributed`] rather than wait forever.
pub trait Collective {
    /// This rank's index, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// The elementwise sum of `x` over all ranks.
    ///
    /// # Shapes
    ///
    /// - `x`: any shape, the same on every rank.
    /// - output: the shape of `x`.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// Every rank's `x`, concatenated along dimension 0 in rank order.
    ///
    /// # Shapes
    ///
    /// - `x`: `[n, ...]`, the same on every rank.
    /// - output: `[world_size · n, ...]`; rows `r·n .. (r+1)·n` are rank `r`'s.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s `x`, on every rank (the other ranks' `x` only give the shape and dtype).
    ///
    /// # Shapes
    ///
    /// - `x`: any shape, the same on every rank.
    /// - output: the shape of `x`.
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
}

/// Checks that every rank holds the same value of each named field, with one all-gather;
/// every rank gets the same verdict, so they fail (or go on) together.
///
/// `device` is where the collective's tensors live (the model's device). Values are 64-bit
/// (a step, a seed, a hash of a configuration); each crosses as four 16-bit pieces in f32,
/// which holds them exactly.
///
/// # Errors
///
/// [`Error::Distributed`] naming the first field on which ranks differ, which ranks differ
/// from rank 0 and their values; the collective's errors.
pub fn agree(
    c: &dyn Collective,
    device: &candle_core::Device,
    fields: &[(&str, u64)],
) -> Result<()> {
    let world = c.world_size();
    if world == 1 || fields.is_empty() {
        return Ok(());
    }
    let values: Vec<u64> = fields.iter().map(|&(_, v)| v).collect();
    let mine = to_pieces(&values, 16);
    let n = mine.len();
    let all: Vec<f32> = c
        .all_gather(&Tensor::from_vec(mine, n, device)?)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?;
    if all.len() != world * n {
        return Err(Error::Distributed(format!(
            "all_gather returned {} values for {world} ranks of {n}",
            all.len()
        )));
    }
    let value = |rank: usize, field: usize| -> u64 {
        let at = rank * n + field * 4;
        from_pieces(&all[at..at + 4], 16)
    };
    for (f, (name, _)) in fields.iter().enumerate() {
        let differ: Vec<String> = (1..world)
            .filter(|&r| value(r, f) != value(0, f))
            .map(|r| format!("rank {r} has {}", value(r, f)))
            .collect();
        if !differ.is_empty() {
            return Err(Error::Distributed(format!(
                "the ranks disagree on the {name}: rank 0 has {}, {}",
                value(0, f),
                differ.join(", ")
            )));
        }
    }
    Ok(())
}

/// The sums over the ranks of each of `values`, exactly: a value crosses as eight 8-bit pieces
/// in f32, whose sums over up to 65 793 ranks stay below 2^24. Sums must fit in 64 bits (counts
/// and lengths do). `device` is where the collective's tensors live. One all-reduce; every rank
/// must call it with as many values.
pub(crate) fn sum_counts(
    c: &dyn Collective,
    device: &candle_core::Device,
    values: &[u64],
) -> Result<Vec<u64>> {
    if c.world_size() == 1 || values.is_empty() {
        return Ok(values.to_vec());
    }
    let mine = to_pieces(values, 8);
    let n = mine.len();
    let sums: Vec<f32> = c
        .all_reduce_sum(&Tensor::from_vec(mine, n, device)?)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1()?;
    if sums.len() != n {
        return Err(Error::Distributed(format!(
            "all_reduce_sum returned {} values for {n}",
            sums.len()
        )));
    }
    Ok(sums
        .chunks(8)
        .map(|pieces| from_pieces(pieces, 8))
        .collect())
}

/// Each of `values` as `64 / bits` pieces of `bits` bits (low first), each an f32, which holds
/// it exactly: a collective moves f32 tensors.
fn to_pieces(values: &[u64], bits: u32) -> Vec<f32> {
    let mask = (1u64 << bits) - 1;
    values
        .iter()
        .flat_map(|&v| (0..64 / bits).map(move |i| ((v >> (bits * i)) & mask) as f32))
        .collect()
}

/// The value whose pieces ([`to_pieces`]) are `pieces`, each possibly a sum of several ranks'
/// pieces (exact below 2^24); the carries of such sums add into the higher pieces.
fn from_pieces(pieces: &[f32], bits: u32) -> u64 {
    pieces.iter().enumerate().fold(0u64, |sum, (i, &p)| {
        sum.wrapping_add((p as u64).wrapping_shl(bits * i as u32))
    })
}

/// All-gathers `local` and keeps this rank's rows in the autograd graph (OpenCLIP's
/// `gather_with_grad` restricted to the local slice): the result is
/// `cat(rows of ranks < r (constants), local, rows of ranks > r (constants))`.
///
/// A loss computed on the result and back-propagated gives `local` (and what it was computed
/// from) this rank's share of the gradient; summing the parameter gradients over ranks gives
/// the gradient of the loss over the whole global batch (see the [module docs](self)).
///
/// # Shapes
///
/// - `local`: `[n, ...]`, the same shape on every rank.
/// - output: `[world_size · n, ...]`, in rank order.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a rank-0 tensor; the collective's errors.
pub fn gather_with_local_grad(c: &dyn Collective, local: &Tensor) -> Result<Tensor> {
    if local.rank() == 0 {
        return Err(Error::InvalidArgument(
            "gather_with_local_grad: the tensor needs a batch dimension".into(),
        ));
    }
    let (world, rank) = (c.world_size(), c.rank());
    if world == 1 {
        return Ok(local.clone());
    }
    let n = local.dim(0)?;
    let gathered = c.all_gather(&local.detach())?;
    if gathered.dim(0)? != world * n {
        return Err(Error::Distributed(format!(
            "all_gather returned {} rows for {world} ranks of {n}",
            gathered.dim(0)?
        )));
    }
    let mut parts = Vec::with_capacity(3);
    if rank > 0 {
        parts.push(gathered.narrow(0, 0, rank * n)?);
    }
    parts.push(local.clone());
    if rank + 1 < world {
        parts.push(gathered.narrow(0, (rank + 1) * n, (world - rank - 1) * n)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
