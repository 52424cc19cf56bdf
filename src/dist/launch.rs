//! Starting the ranks of one node ([`launch_local_ranks`]) and joining them ([`join_ranks`]).

use std::process::{Child, Command};
use std::time::Duration;

use candle_core::Device;

use super::{Collective, DistEnv};
use crate::{Error, Result};

/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(200);

/// Starts `n` ranks of the current program on this machine, one CUDA device each, and waits
/// for them: what `torchrun --nproc-per-node n` does for a Python script.
///
/// Every rank is the current executable with the current command-line arguments and
/// torchrun's variables ([`DistEnv`]): `RANK = LOCAL_RANK = r`, `WORLD_SIZE = n`,
/// `MASTER_ADDR = 127.0.0.1` and a free `MASTER_PORT`. A program calls this when
/// [`DistEnv::from_env`] finds no launch, and otherwise trains as its rank (see
/// [`join_ranks`]). When one rank fails, the launcher stops the others and reports it. The
/// ranks inherit standard output and error.
///
/// Several nodes are launched by starting one process per device on each node with the
/// variables set by hand, or by torchrun.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when `n` is 0; [`Error::Distributed`] in a build without the
/// `nccl` feature (the ranks could not exchange gradients), when a rank cannot be started,
/// or when one exits with a failure.
pub fn launch_local_ranks(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidArgument(
            "launch_local_ranks needs at least one rank".into(),
        ));
    }
    if !cfg!(feature = "nccl") {
        return Err(Error::Distributed(format!(
            "{n} ranks need a build with the `nccl` feature: the ranks exchange gradients \
             over NCCL, one CUDA device each"
        )));
    }
    let io = |what: &str, e: std::io::Error| Error::Distributed(format!("{what}: {e}"));
    // Bound and released at once: the port is free unless another program takes it before
    // rank 0 listens, which the rendezvous then reports.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| io("finding a free port", e))?
        .port();
    let exe = std::env::current_exe().map_err(|e| io("locating the current program", e))?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    // Drawn from the OS's entropy per launch: only these children can join the rendezvous.
    let job_id = format!("{:032x}", rand::random::<u128>());
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let env = DistEnv {
            rank,
            world_size: n,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            job_id: job_id.clone(),
        };
        match Command::new(&exe).args(&args).envs(env.to_vars()).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                stop(&mut children);
                return Err(io(&format!("starting rank {rank} of {n}"), e));
            }
        }
    }
    let mut done = vec![false; n];
    while done.iter().any(|d| !d) {
        for rank in 0..n {
            if done[rank] {
                continue;
            }
            let status = children[rank].try_wait();
            match status {
                Ok(None) => {}
                Ok(Some(status)) if status.success() => done[rank] = true,
                Ok(Some(status)) => {
                    stop(&mut children);
                    return Err(Error::Distributed(format!(
                        "rank {rank} of {n} failed ({status})"
                    )));
                }
                Err(e) => {
                    stop(&mut children);
                    return Err(io(&format!("waiting for rank {rank} of {n}"), e));
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Kills and reaps the ranks that are still running (the others' kill fails harmlessly).
fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Joins the job `env` describes as its rank: the CUDA device `LOCAL_RANK` and an NCCL
/// communicator over all ranks (the rendezvous waits at most `timeout` for them), ready for
/// [`Trainer::with_collective`](crate::train::Trainer::with_collective).
///
/// # Errors
///
/// [`Error::Distributed`] in a build without the `nccl` feature; with it, the errors of
/// [`Device::new_cuda`] (no such device) and of `NcclCollective::new`.
pub fn join_ranks(
    env: &DistEnv,
    timeout: Duration,
) -> Result<(Device, Box<dyn Collective + Send>)> {
    #[cfg(feature = "nccl")]
    {
        let device = Device::new_cuda(env.local_rank)?;
        let collective = super::NcclCollective::new(&device, env, timeout)?;
        Ok((device, Box::new(collective)))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = timeout;
        Err(Error::Distributed(format!(
            "started as rank {} of {} (RANK and WORLD_SIZE are set), but this build has no \
             `nccl` feature: data-parallel ranks need NCCL and one CUDA device each",
            env.rank, env.world_size
        )))
    }
}
