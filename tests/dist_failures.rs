//! Failures of a multi-process run: the collective watchdog (NCCL's failure handling, driven
//! here by fake communicators).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mlctl::dist::{
    collective_timeout_from, Communicator, PendingWork, Watchdog,
    DEFAULT_COLLECTIVE_TIMEOUT,
};
use mlctl::Error;

/// A communicator whose asynchronous error the test sets, and which counts its aborts.
#[derive(Default)]
struct FakeComm {
    error: Mutex<Option<String>>,
    aborts: AtomicUsize,
}

impl Communicator for FakeComm {
    fn async_error(&self) -> Result<(), String> {
        match self.error.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn abort(&self) {
        self.aborts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Work that never completes (a peer never joined the collective).
struct Never;

impl PendingWork for Never {
    fn is_done(&self) -> Result<bool, String> {
        Ok(false)
    }
}

/// Work that completes at an instant.
struct DoneAt(Instant);

impl PendingWork for DoneAt {
    fn is_done(&self) -> Result<bool, String> {
        Ok(Instant::now() >= self.0)
    }
}

fn distributed(err: &Error) -> &str {
    match err {
        Error::Distributed(why) => why,
        other => panic!("expected Error::Distributed, got {other:?}"),
    }
}

#[test]
fn watchdog_returns_collectives_that_complete() {
    let comm = FakeComm::default();
    let dog = Watchdog::new(0, Duration::from_secs(30));
    for i in 0..3 {
        let done = DoneAt(Instant::now() + Duration::from_millis(30));
        assert_eq!(dog.run(&comm, "test", || Ok((i, done))).unwrap(), i);
    }
    assert_eq!(comm.aborts.load(Ordering::SeqCst), 0);
    assert!(dog.failure().is_none());
}

/// The asynchronous error fails the pending collective long before the timeout, aborts the
/// communicator once, and fails every later collective without queueing it.
#[test]
fn watchdog_asynchronous_error_aborts_and_fails_every_later_collective() {
    let comm = Arc::new(FakeComm::default());
    let dog = Watchdog::new(1, Duration::from_secs(60));
    let setter = {
        let comm = comm.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            *comm.error.lock().unwrap() = Some("ncclRemoteError: peer rank 2 is gone".into());
        })
    };
    let start = Instant::now();
    let err = dog
        .run(&*comm, "AllReduceSum", || Ok(((), Never)))
        .unwrap_err();
    setter.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let why = distributed(&err);
    for needle in [
        "rank 1",
        "AllReduceSum",
        "asynchronous error",
        "peer rank 2",
        "aborted",
    ] {
        assert!(why.contains(needle), "{why} lacks {needle}");
    }
    assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
    let queued = AtomicBool::new(false);
    let again = dog
        .run(&*comm, "AllGather", || {
            queued.store(true, Ordering::SeqCst);
            Ok(((), DoneAt(Instant::now())))
        })
        .unwrap_err();
    assert_eq!(distributed(&again), why);
    assert!(
        !queued.load(Ordering::SeqCst),
        "queued on an aborted communicator"
    );
    assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
}

#[test]
fn watchdog_times_out_a_collective_that_never_completes() {
    let comm = FakeComm::default();
    let timeout = Duration::from_millis(300);
    let dog = Watchdog::new(3, timeout);
    let start = Instant::now();
    let err = dog
        .run(&comm, "Broadcast(0)", || Ok(((), Never)))
        .unwrap_err();
    let waited = start.elapsed();
    assert!(waited >= timeout, "gave up after {waited:?}");
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    let why = distributed(&err);
    for needle in ["rank 3", "Broadcast(0)", "timed out", "300ms", "aborted"] {
        assert!(why.contains(needle), "{why} lacks {needle}");
    }
    assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
}

#[test]
fn watchdog_a_collective_that_cannot_be_queued_aborts() {
    let comm = FakeComm::default();
    let dog = Watchdog::new(0, Duration::from_secs(30));
    let err = dog
        .run(&comm, "AllReduceSum", || -> mlctl::Result<((), Never)> {
            Err(Error::Distributed("ncclInvalidUsage".into()))
        })
        .unwrap_err();
    let why = distributed(&err);
    assert!(
        why.contains("could not be queued") && why.contains("ncclInvalidUsage"),
        "{why}"
    );
    assert_eq!(comm.aborts.load(Ordering::SeqCst), 1);
}

#[test]
fn watchdog_timeout_comes_from_the_environment() {
    let var = |v: &'static str| {
        move |name: &str| (name == "MLCTL_COLLECTIVE_TIMEOUT_SECS").then(|| v.to_string())
    };
    assert_eq!(
        collective_timeout_from(|_| None).unwrap(),
        DEFAULT_COLLECTIVE_TIMEOUT
    );
    assert_eq!(DEFAULT_COLLECTIVE_TIMEOUT, Duration::from_secs(600));
    assert_eq!(
        collective_timeout_from(var("2.5")).unwrap(),
        Duration::from_millis(2500)
    );
    for bad in ["0", "-1", "abc", "inf", "NaN", ""] {
        let err = collective_timeout_from(var(bad)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
    }
}

/// A group of fake communicators over threads: collective `k` completes once every rank has
/// queued it. A rank that dies makes the others' communicators report a remote error naming it
/// (as NCCL does when a peer's connection closes); a rank that hangs is only noticed by the
/// timeout.
struct Group {
    queued: Mutex<Vec<u64>>,
    comms: Vec<FakeComm>,
}

struct GroupWork {
    group: Arc<Group>,
    seq: u64,
}

impl PendingWork for GroupWork {
    fn is_done(&self) -> Result<bool, String> {
        Ok(self
            .group
            .queued
            .lock()
            .unwrap()
            .iter()
            .all(|&q| q >= self.seq))
    }
}

#[test]
fn watchdog_every_rank_fails_in_bounded_time_when_one_dies_or_hangs() {
    for dies in [true, false] {
        let world = 3;
        let group = Arc::new(Group {
            queued: Mutex::new(vec![0; world]),
            comms: (0..world).map(|_| FakeComm::default()).collect(),
        });
        let timeout = Duration::from_millis(500);
        let start = Instant::now();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let group = group.clone();
                thread::spawn(move || -> mlctl::Result<()> {
                    let dog = Watchdog::new(rank, timeout);
                    for seq in 1..=4u64 {
                        if rank == 2 && seq == 3 {
                            if dies {
                                for (r, c) in
                                    group.comms.iter().enumerate().filter(|&(r, _)| r != 2)
                                {
                                    *c.error.lock().unwrap() = Some(format!(
                                        "ncclRemoteError: rank {r} lost its connection to rank 2"
                                    ));
                                }
                                return Ok(());
                            }
                            thread::sleep(timeout * 4);
                        }
                        dog.run(&group.comms[rank], "AllReduceSum", || {
                            group.queued.lock().unwrap()[rank] = seq;
                            Ok((
                                (),
                                GroupWork {
                                    group: group.clone(),
                                    seq,
                                },
                            ))
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let waited = start.elapsed();
        assert!(waited < Duration::from_secs(10), "took {waited:?}");
        for rank in 0..2 {
            let err = results[rank].as_ref().unwrap_err();
            let why = distributed(err);
            assert!(
                why.contains(&format!("rank {rank}:")) && why.contains("#3"),
                "{why}"
            );
            let cause = if dies { "rank 2" } else { "timed out" };
            assert!(why.contains(cause), "rank {rank} ({dies}): {why}");
            assert_eq!(group.comms[rank].aborts.load(Ordering::SeqCst), 1);
        }
        if !dies {
            // The hung rank, when it comes back, finds its collective never completes either.
            let why = distributed(results[2].as_ref().unwrap_err()).to_string();
            assert!(
                why.contains("rank 2:") && why.contains("timed out"),
                "{why}"
            );
        }
    }
}
