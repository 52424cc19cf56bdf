//! [`Watchdog`]: the failure handling of a collective backend (NCCL's), kept apart from the
//! backend so that it runs, and is tested, without one.
//!
//! NCCL never returns on its own when a peer dies or hangs: the collective's kernel spins on
//! the GPU, and the next host synchronisation waits forever. PyTorch's `ProcessGroupNCCL`
//! bounds that with a watchdog that polls each queued collective's completion event and the
//! communicator's asynchronous error, and aborts the communicator on an error or after the
//! process group's timeout (10 minutes by default). [`Watchdog`] does the same for one
//! collective at a time, in the calling thread (PyTorch's "blocking wait" mode): a collective
//! returns only once its work is done, or with [`Error::Distributed`] once it is known never to
//! be.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The default time a collective may take before its rank gives up: PyTorch's default for
/// NCCL process groups. Long, because a healthy collective can wait that long for a slow peer
/// (one that evaluates or writes a checkpoint while the others wait).
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// The environment variable that sets the collective timeout, in seconds (a decimal number).
pub const COLLECTIVE_TIMEOUT_VAR: &str = "MLCTL_COLLECTIVE_TIMEOUT_SECS";

/// The longest pause between two looks at a pending collective. Polls start far shorter
/// (a collective usually completes within microseconds to milliseconds) and back off to this.
const MAX_POLL: Duration = Duration::from_millis(10);
const FIRST_POLL: Duration = Duration::from_micros(20);

/// The operations of a communicator the watchdog needs (NCCL's `ncclCommGetAsyncError` and
/// `ncclCommAbort`).
pub trait Communicator {
    /// The communicator's asynchronous error, if it has one: a failure NCCL detected while
    /// running queued work (a peer that closed its connection, a network error).
    ///
    /// # Errors
    ///
    /// A description of the error (the caller adds the rank and the collective).
    fn async_error(&self) -> std::result::Result<(), String>;

    /// Aborts the communicator: queued and running work stops, and nothing can use it again.
    /// Called at most once per failure; it must not block on the peers.
    fn abort(&self);
}

/// Work queued on a communicator (a CUDA event recorded behind the collective).
pub trait PendingWork {
    /// Whether the work has completed.
    ///
    /// # Errors
    ///
    /// A description of the failure when the query itself fails (a CUDA error).
    fn is_done(&self) -> std::result::Result<bool, String>;
}

/// Bounds every collective of one rank's communicator in time and turns its failures into
/// [`Error::Distributed`], aborting the communicator.
///
/// Once a collective failed, the communicator is aborted and every later one returns the same
/// error without touching it (NCCL cannot recover a communicator).
#[derive(Debug)]
pub struct Watchdog {
    rank: usize,
    timeout: Duration,
    max_poll: Duration,
    /// Why the communicator was aborted.
    failed: Mutex<Option<String>>,
    /// Collectives started, for the error messages (PyTorch's sequence number).
    started: Mutex<u64>,
}

impl Watchdog {
    /// A watchdog for rank `rank` whose collectives may take at most `timeout`.
    pub fn new(rank: usize, timeout: Duration) -> Self {
        Self {
            rank,
            timeout,
            max_poll: MAX_POLL,
            failed: Mutex::new(None),
            started: Mutex::new(0),
        }
    }

    /// The time a collective may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Why the communicator was aborted, once it was.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Runs one collective: `enqueue` queues it on `comm` and returns its output and its
    /// pending work; this waits until the work is done, polling `comm`'s asynchronous error.
    ///
    /// # Errors
    ///
    /// [`Error::Distributed`], after aborting `comm`, when `enqueue` fails, when `comm` reports
    /// an asynchronous error, when the work's query fails, or when the work is not done within
    /// the timeout; the message names this rank, the collective (`what` and its sequence
    /// number) and the cause. Every later call returns the first failure's error.
    pub fn run<T, W: PendingWork>(
        &self,
        comm: &dyn Communicator,
        what: &str,
        enqueue: impl FnOnce() -> Result<(T, W)>,
    ) -> Result<T> {
        if let Some(why) = self.failure() {
            return Err(Error::Distributed(why));
        }
        let seq = self.next_seq();
        let start = Instant::now();
        let (out, work) = match enqueue() {
            Ok(queued) => queued,
            Err(e) => {
                // NCCL refuses to queue on a communicator that already failed: its asynchronous
                // error says why better than the refusal does.
                let cause = comm.async_error().err().unwrap_or_else(|| e.to_string());
                return Err(self.fail(comm, what, seq, &format!("could not be queued: {cause}")));
            }
        };
        self.wait(comm, &work, what, seq, start)?;
        Ok(out)
    }

    fn next_seq(&self) -> u64 {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        *started += 1;
        *started
    }

    /// Polls `work` and `comm` until the work is done, an error shows or the timeout passes.
    fn wait(
        &self,
        comm: &dyn Communicator,
        work: &dyn PendingWork,
        what: &str,
        seq: u64,
        start: Instant,
    ) -> Result<()> {
        let mut pause = FIRST_POLL.min(self.max_poll);
        loop {
            // The error first: work that "completed" on a failed communicator holds garbage.
            if let Err(e) = comm.async_error() {
                let cause = format!("failed: NCCL reported an asynchronous error: {e}");
                return Err(self.fail(comm, what, seq, &cause));
            }
            match work.is_done() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let cause = format!("failed: its completion could not be queried: {e}");
                    return Err(self.fail(comm, what, seq, &cause));
                }
            }
            let elapsed = start.elapsed();
            if elapsed >= self.timeout {
                let cause = format!(
                    "timed out after {:?} (the timeout is {:?}; {COLLECTIVE_TIMEOUT_VAR} sets \
                     it): another rank hung, died or never called it",
                    elapsed, self.timeout
                );
                return Err(self.fail(comm, what, seq, &cause));
            }
            std::thread::sleep(pause.min(self.timeout - elapsed));
            pause = (pause * 2).min(self.max_poll);
        }
    }

    /// Aborts `comm` and records why, once; returns the error every later call returns.
    fn fail(&self, comm: &dyn Communicator, what: &str, seq: u64, cause: &str) -> Error {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_none() {
            comm.abort();
            *failed = Some(format!(
                "rank {}: collective #{seq} ({what}) {cause}; the communicator was aborted",
                self.rank
            ));
        }
        Error::Distributed(failed.clone().unwrap_or_default())
    }
}

/// The collective timeout `lookup` gives ([`COLLECTIVE_TIMEOUT_VAR`], in seconds), or
/// [`DEFAULT_COLLECTIVE_TIMEOUT`] when it gives none. [`collective_timeout`] reads it from the
/// process's environment.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a value that is not a positive, finite number of seconds.
pub fn collective_timeout_from(lookup: impl Fn(&str) -> Option<String>) -> Result<Duration> {
    let Some(value) = lookup(COLLECTIVE_TIMEOUT_VAR) else {
        return Ok(DEFAULT_COLLECTIVE_TIMEOUT);
    };
    parse_seconds(COLLECTIVE_TIMEOUT_VAR, &value)
}

/// Runs `f` on a thread of its own and waits for it at most `timeout`: a blocking call with no
/// timeout of its own (NCCL's communicator creation, which waits for every rank) is bounded
/// this way. On timeout the thread is left behind, still blocked (nothing can cancel it), and
/// the caller gets the error; the process is expected to exit with it.
///
/// # Errors
///
/// `f`'s error; [`Error::Distributed`] naming the rank, `what` and the timeout when `f` has
/// not returned in time, or when it panicked.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))] // NCCL's communicator is its one user
pub(crate) fn within<T: Send + 'static>(
    rank: usize,
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    match result.recv_timeout(timeout) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Distributed(format!(
            "rank {rank}: {what} did not finish within {timeout:?} ({COLLECTIVE_TIMEOUT_VAR} \
             sets the limit): another rank hung, died or never started"
        ))),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(Error::Distributed(format!("rank {rank}: {what} panicked")))
        }
    }
}

/// [`collective_timeout_from`] the process's environment.
///
/// # Errors
///
/// As [`collective_timeout_from`].
pub fn collective_timeout() -> Result<Duration> {
    collective_timeout_from(|name| std::env::var(name).ok())
}

/// A positive, finite number of seconds.
pub(crate) fn parse_seconds(name: &str, value: &str) -> Result<Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{name}={value:?}: expected a positive number of seconds"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that returns in time gives its result; one that blocks past the timeout gives a
    /// typed error in about the timeout, not when it returns.
    #[test]
    fn within_bounds_a_blocking_call() {
        let quick = within(1, Duration::from_secs(5), "a quick call", || Ok(7));
        assert_eq!(quick.unwrap(), 7);
        let failing = within(
            1,
            Duration::from_secs(5),
            "a failing call",
            || -> Result<()> { Err(Error::InvalidArgument("no".into())) },
        );
        assert!(matches!(failing, Err(Error::InvalidArgument(_))));
        let start = Instant::now();
        let blocked = within(
            2,
            Duration::from_millis(200),
            "creating the communicator",
            || {
                std::thread::sleep(Duration::from_secs(30));
                Ok(())
            },
        );
        let took = start.elapsed();
        let err = blocked.unwrap_err().to_string();
        assert!(
            err.contains("rank 2") && err.contains("creating the communicator"),
            "{err}"
        );
        assert!(took < Duration::from_secs(10), "took {took:?}");
        let panicked = within(3, Duration::from_secs(5), "a call", || -> Result<()> {
            panic!("inside")
        });
        assert!(panicked.unwrap_err().to_string().contains("panicked"));
    }
}
