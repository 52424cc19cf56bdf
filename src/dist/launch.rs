//! Starting the ranks of one node ([`launch_local_ranks`], [`LocalLaunch`]) and joining them
//! ([`join_ranks`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use candle_core::Device;

use super::watchdog::parse_seconds;
use super::{Collective, DistEnv};
use crate::{Error, Result};

/// How often the launcher looks at its ranks (and at the signals it received).
const POLL: Duration = Duration::from_millis(50);

/// How long ranks that are stopped get to exit after the signal before they are killed:
/// torchrun's default.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);

/// The environment variable that bounds a [`launch_local_ranks`] run, in seconds.
pub const LAUNCH_TIMEOUT_VAR: &str = "MLCTL_LAUNCH_TIMEOUT_SECS";

/// Starts `n` ranks of the current program on this machine, one CUDA device each, and waits
/// for them: what `torchrun --nproc-per-node n` does for a Python script.
///
/// Every rank is the current executable with the current command-line arguments and
/// torchrun's variables ([`DistEnv`]): `RANK = LOCAL_RANK = r`, `WORLD_SIZE = n`,
/// `MASTER_ADDR = 127.0.0.1` and a free `MASTER_PORT`. A program calls this when
/// [`DistEnv::from_env`] finds no launch, and otherwise trains as its rank (see
/// [`join_ranks`]). The run has no time limit unless `MLCTL_LAUNCH_TIMEOUT_SECS` sets one;
/// otherwise it behaves as [`LocalLaunch::run`] (failures, signals).
///
/// Several nodes are launched by starting one process per device on each node with the
/// variables set by hand, or by torchrun.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when `n` is 0 or the timeout variable is not a number of
/// seconds; [`Error::Distributed`] in a build without the `nccl` feature (the ranks could not
/// exchange gradients), and [`LocalLaunch::run`]'s errors.
pub fn launch_local_ranks(n: usize) -> Result<()> {
    let launch = LocalLaunch::new(n)?;
    if !cfg!(feature = "nccl") {
        return Err(Error::Distributed(format!(
            "{n} ranks need a build with the `nccl` feature: the ranks exchange gradients \
             over NCCL, one CUDA device each"
        )));
    }
    let timeout = match std::env::var(LAUNCH_TIMEOUT_VAR) {
        Ok(v) => Some(parse_seconds(LAUNCH_TIMEOUT_VAR, &v)?),
        Err(_) => None,
    };
    launch.with_timeout(timeout).run()
}

/// A launch of `n` ranks of one program on this machine, as [`launch_local_ranks`] makes it,
/// with its command, environment and time limits open to change.
///
/// # Failures
///
/// The launcher watches its ranks and stops them all (SIGTERM, then SIGKILL after a grace
/// period, [`LocalLaunch::with_grace`]) when one exits with a failure, when the launch's time
/// limit passes ([`LocalLaunch::with_timeout`]), or when the launcher receives SIGINT or
/// SIGTERM, which it forwards to every rank first. It returns only once every rank has exited
/// and been reaped: no rank outlives it. On Linux the ranks also die with a launcher killed by
/// SIGKILL (their parent-death signal).
#[derive(Debug, Clone)]
pub struct LocalLaunch {
    world: usize,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    timeout: Option<Duration>,
    grace: Duration,
}

impl LocalLaunch {
    /// `n` ranks of the current program with its arguments, no time limit, and
    /// [`DEFAULT_STOP_GRACE`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `n` is 0; [`Error::Distributed`] when the current
    /// program cannot be located.
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "launch_local_ranks needs at least one rank".into(),
            ));
        }
        let program = std::env::current_exe()
            .map_err(|e| Error::Distributed(format!("locating the current program: {e}")))?;
        Ok(Self {
            world: n,
            program,
            args: std::env::args_os().skip(1).collect(),
            envs: Vec::new(),
            timeout: None,
            grace: DEFAULT_STOP_GRACE,
        })
    }

    /// Runs `program` with `args` as every rank, instead of the current program.
    pub fn with_command<I, S>(mut self, program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.program = program.into();
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `key = value` in every rank's environment (besides the launch variables).
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Stops every rank and fails once the launch has run for `timeout` (`None`: no limit).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long stopped ranks get to exit after SIGTERM (or the forwarded signal) before
    /// they are killed.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Starts the ranks and waits for all of them (see the [type's docs](LocalLaunch#failures)).
    ///
    /// # Errors
    ///
    /// [`Error::Distributed`] when a rank cannot be started, when one exits with a failure
    /// (naming the first, and its status), when the time limit passes, or when the launcher
    /// was sent SIGINT or SIGTERM (naming it); every rank has exited by then.
    pub fn run(&self) -> Result<()> {
        let io = |what: &str, e: std::io::Error| Error::Distributed(format!("{what}: {e}"));
        // Bound and released at once: the port is free unless another program takes it before
        // rank 0 listens, which the rendezvous then reports.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| io("finding a free port", e))?
            .port();
        // Drawn from the OS's entropy per launch: only these children can join the rendezvous.
        let job_id = format!("{:032x}", rand::random::<u128>());
        // Installed before the first rank starts, so that no signal finds a rank unwatched.
        let signals = signals::Forwarding::install()?;
        let n = self.world;
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
            let mut command = Command::new(&self.program);
            command.args(&self.args).envs(env.to_vars());
            command.envs(self.envs.iter().map(|(k, v)| (k, v)));
            signals::die_with_launcher(&mut command);
            match command.spawn() {
                Ok(child) => children.push(child),
                Err(e) => {
                    stop(&mut children, signals::TERM, self.grace);
                    return Err(io(&format!("starting rank {rank} of {n}"), e));
                }
            }
        }
        self.watch(&mut children, &signals)
    }

    /// Waits for every rank to succeed; on the first failure, time limit or signal, stops
    /// them all and says why.
    fn watch(&self, children: &mut [Child], signals: &signals::Forwarding) -> Result<()> {
        let n = children.len();
        let start = Instant::now();
        let mut done = vec![false; n];
        while done.iter().any(|d| !d) {
            if let Some(sig) = signals.received() {
                stop(children, sig, self.grace);
                return Err(Error::Distributed(format!(
                    "the launcher received signal {sig}: forwarded to its {n} ranks, which \
                     have exited"
                )));
            }
            for rank in 0..n {
                if done[rank] {
                    continue;
                }
                let failure = match children[rank].try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) if status.success() => {
                        done[rank] = true;
                        continue;
                    }
                    Ok(Some(status)) => format!("rank {rank} of {n} failed ({status})"),
                    Err(e) => format!("waiting for rank {rank} of {n}: {e}"),
                };
                stop(children, signals::TERM, self.grace);
                return Err(Error::Distributed(format!(
                    "{failure}; the other ranks were stopped"
                )));
            }
            if let Some(limit) = self.timeout.filter(|&t| start.elapsed() >= t) {
                let running: Vec<String> = (0..n)
                    .filter(|&r| !done[r])
                    .map(|r| r.to_string())
                    .collect();
                stop(children, signals::TERM, self.grace);
                return Err(Error::Distributed(format!(
                    "the launch timed out after {limit:?} with rank(s) {} still running; \
                     every rank was stopped",
                    running.join(", ")
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

/// Sends `sig` to the ranks still running, gives them `grace` to exit, kills the rest, and
/// reaps them all.
fn stop(children: &mut [Child], sig: i32, grace: Duration) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            signals::send(c, sig);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(POLL.min(grace));
    }
    for c in children.iter_mut() {
        // Fails harmlessly for a rank that has exited.
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// SIGINT and SIGTERM, received by the launcher and forwarded to its ranks.
#[cfg(unix)]
mod signals {
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    use std::sync::Mutex;

    use crate::{Error, Result};

    pub(super) const TERM: i32 = libc::SIGTERM;
    const FORWARDED: [i32; 2] = [libc::SIGINT, libc::SIGTERM];

    /// Signals received since the process started, and the last one: a handler may only
    /// touch lock-free atomics.
    static RECEIVED: AtomicU64 = AtomicU64::new(0);
    static LAST: AtomicI32 = AtomicI32::new(0);

    /// How many launches are running, and the handlers they replaced (restored by the last
    /// one to finish, so that concurrent launches share one installation).
    static INSTALLED: Mutex<(usize, Vec<libc::sigaction>)> = Mutex::new((0, Vec::new()));

    extern "C" fn on_signal(sig: libc::c_int) {
        LAST.store(sig, Ordering::SeqCst);
        RECEIVED.fetch_add(1, Ordering::SeqCst);
    }

    /// SIGINT and SIGTERM are caught (not fatal to the launcher) while this lives.
    pub(super) struct Forwarding {
        seen: u64,
    }

    impl Forwarding {
        pub(super) fn install() -> Result<Self> {
            let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
            if installed.0 == 0 {
                let mut saved = Vec::with_capacity(FORWARDED.len());
                for sig in FORWARDED {
                    // SAFETY: a zeroed sigaction is valid; the handler only stores atomics.
                    unsafe {
                        let mut action: libc::sigaction = std::mem::zeroed();
                        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                        action.sa_flags = libc::SA_RESTART;
                        libc::sigemptyset(&mut action.sa_mask);
                        let mut old: libc::sigaction = std::mem::zeroed();
                        if libc::sigaction(sig, &action, &mut old) != 0 {
                            let e = std::io::Error::last_os_error();
                            restore(&saved);
                            return Err(Error::Distributed(format!(
                                "installing the launcher's handler of signal {sig}: {e}"
                            )));
                        }
                        saved.push(old);
                    }
                }
                installed.1 = saved;
            }
            installed.0 += 1;
            Ok(Self {
                seen: RECEIVED.load(Ordering::SeqCst),
            })
        }

        /// The signal received since this launch began, if any.
        pub(super) fn received(&self) -> Option<i32> {
            (RECEIVED.load(Ordering::SeqCst) != self.seen).then(|| LAST.load(Ordering::SeqCst))
        }
    }

    impl Drop for Forwarding {
        fn drop(&mut self) {
            let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
            installed.0 = installed.0.saturating_sub(1);
            if installed.0 == 0 {
                restore(&installed.1);
                installed.1.clear();
            }
        }
    }

    /// Puts back the handlers `saved` holds, in `FORWARDED`'s order.
    fn restore(saved: &[libc::sigaction]) {
        for (sig, old) in FORWARDED.iter().zip(saved) {
            // SAFETY: `old` is what sigaction returned for `sig`.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }

    /// Makes the rank `command` starts die with the launcher's thread, even a launcher killed
    /// by SIGKILL, which cannot forward anything (Linux only: `PR_SET_PDEATHSIG`; the launcher
    /// thread stays in [`super::LocalLaunch::run`] until every rank is reaped).
    pub(super) fn die_with_launcher(command: &mut Command) {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: getpid is a plain system call.
            let launcher = unsafe { libc::getpid() };
            // SAFETY: between fork and exec the closure makes only async-signal-safe system
            // calls and allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The launcher died before the request: no signal would come.
                    if libc::getppid() != launcher {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = command;
    }

    /// Sends `sig` to a running child (one that exited in between is not signalled: the
    /// caller checked, and its pid stays reserved until it is reaped).
    pub(super) fn send(child: &mut Child, sig: i32) {
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain system call; the pid is our unreaped child.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }
}

/// Without Unix signals, stopping a rank is killing it.
#[cfg(not(unix))]
mod signals {
    use std::process::Child;

    use crate::Result;

    pub(super) const TERM: i32 = 15;

    pub(super) struct Forwarding;

    impl Forwarding {
        pub(super) fn install() -> Result<Self> {
            Ok(Self)
        }

        pub(super) fn received(&self) -> Option<i32> {
            None
        }
    }

    pub(super) fn die_with_launcher(_: &mut std::process::Command) {}

    pub(super) fn send(child: &mut Child, _sig: i32) {
        let _ = child.kill();
    }
}

/// Joins the job `env` describes as its rank: the CUDA device `LOCAL_RANK` and an NCCL
/// communicator over all ranks (the rendezvous waits at most `timeout` for them), ready for
/// [`Trainer::with_collective`](crate::train::Trainer::with_collective). Its collectives give
/// up after `MLCTL_COLLECTIVE_TIMEOUT_SECS` seconds, 10 minutes by default (see
/// [`Watchdog`](super::Watchdog)).
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
