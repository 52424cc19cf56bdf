//! Failures of a multi-process run: the collective watchdog (NCCL's failure handling, driven
//! here by fake communicators) and the local launcher (real processes on this machine).
//!
//! Rank workers are `#[ignore]`d entry points that this file's tests start as processes; run
//! alone, they fail (their variables are missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mlctl::dist::{
    collective_timeout_from, Communicator, DistEnv, LocalLaunch, PendingWork, Watchdog,
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

/// Rank `rank` of a [`Group`]: four collectives; rank 2 dies or hangs at the third.
fn group_rank(group: &Arc<Group>, rank: usize, timeout: Duration, dies: bool) -> mlctl::Result<()> {
    let dog = Watchdog::new(rank, timeout);
    for seq in 1..=4u64 {
        if rank == 2 && seq == 3 {
            if dies {
                // Dies while the others wait in the third collective (NCCL would report it
                // wherever they are; waiting makes the collective the test expects certain).
                while group.queued.lock().unwrap()[..2].iter().any(|&q| q < 3) {
                    thread::sleep(Duration::from_millis(1));
                }
                for (r, c) in group.comms.iter().enumerate().filter(|&(r, _)| r != 2) {
                    let why = format!("ncclRemoteError: rank {r} lost its connection to rank 2");
                    *c.error.lock().unwrap() = Some(why);
                }
                return Ok(());
            }
            thread::sleep(timeout * 4);
        }
        dog.run(&group.comms[rank], "AllReduceSum", || {
            group.queued.lock().unwrap()[rank] = seq;
            let group = group.clone();
            Ok(((), GroupWork { group, seq }))
        })?;
    }
    Ok(())
}

#[test]
fn watchdog_every_rank_fails_in_bounded_time_when_one_dies_or_hangs() {
    for dies in [true, false] {
        let world = 3;
        let group = Arc::new(Group {
            queued: Mutex::new(vec![0; world]),
            comms: (0..world).map(|_| FakeComm::default()).collect(),
        });
        let timeout = Duration::from_secs(1);
        let start = Instant::now();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let group = group.clone();
                thread::spawn(move || group_rank(&group, rank, timeout, dies))
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let waited = start.elapsed();
        assert!(waited < Duration::from_secs(10), "took {waited:?}");
        for (rank, result) in results.iter().enumerate().take(2) {
            let err = result.as_ref().unwrap_err();
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

// ---------------------------------------------------------------------------------------------
// Real processes.

const MODE: &str = "MLCTL_TEST_FAILURE_MODE";
const DIR: &str = "MLCTL_TEST_FAILURE_DIR";

/// The arguments that make this test binary run only `worker` (a test of this module).
fn worker_args(worker: &str) -> Vec<String> {
    // module_path!() is `it::dist_failures`; test names start after the crate's name.
    let module = module_path!();
    let module = module.split_once("::").map_or(module, |(_, m)| m);
    let worker = format!("{module}::{worker}");
    [
        worker.as_str(),
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "--include-ignored",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A communicator across processes for the watchdog: collective `k` of rank `r` is the file
/// `c{k}.r{r}` in a shared directory, and completes once every rank's file exists. An abort
/// leaves `aborted.r{r}`.
struct FileComm {
    dir: PathBuf,
    rank: usize,
    world: usize,
}

impl Communicator for FileComm {
    fn async_error(&self) -> Result<(), String> {
        Ok(())
    }

    fn abort(&self) {
        std::fs::write(self.dir.join(format!("aborted.r{}", self.rank)), "").unwrap();
    }
}

struct FileWork<'a> {
    comm: &'a FileComm,
    seq: u64,
}

impl PendingWork for FileWork<'_> {
    fn is_done(&self) -> Result<bool, String> {
        let c = self.comm;
        Ok((0..c.world).all(|r| c.dir.join(format!("c{}.r{r}", self.seq)).exists()))
    }
}

/// Waits until every rank has started, before the first collective's clock starts: a slow
/// start on a busy machine is not what these tests are about.
fn wait_for_ranks(dir: &Path, world: usize) {
    let start = Instant::now();
    while (0..world).any(|r| !dir.join(format!("pid.r{r}")).exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the other ranks never started"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Not a test on its own: one rank process of the launcher tests. Writes its pid, then runs
/// five collectives under a watchdog (2 s timeout); `MLCTL_TEST_FAILURE_MODE` says which rank
/// dies or hangs at the third (`die:R`, `hang:R`, `hang:all`; `:ignore-term` makes the ranks
/// ignore SIGTERM). Writes its outcome to `result.r{rank}` and fails if a collective failed.
#[test]
#[ignore = "a rank process of the dist_failures launcher tests, which start it"]
fn dist_failures_rank_worker() {
    let mode = std::env::var(MODE).expect("started by a launcher test, which sets the mode");
    let dir = PathBuf::from(std::env::var(DIR).expect("and the directory"));
    let env = DistEnv::from_env().unwrap().expect("launch variables set");
    // Renamed into place, so that a reader never sees it half written.
    let (pid, tmp) = (format!("pid.r{}", env.rank), format!("tmp.r{}", env.rank));
    std::fs::write(dir.join(&tmp), std::process::id().to_string()).unwrap();
    std::fs::rename(dir.join(tmp), dir.join(pid)).unwrap();
    if mode.ends_with(":ignore-term") {
        // SAFETY: plain system call.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let mut parts = mode.split(':');
    let (what, who) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let me = who == "all" || who == env.rank.to_string();
    let comm = FileComm {
        dir: dir.clone(),
        rank: env.rank,
        world: env.world_size,
    };
    wait_for_ranks(&dir, env.world_size);
    let dog = Watchdog::new(env.rank, Duration::from_secs(2));
    let result = (1..=5u64).try_for_each(|k| {
        if k == 3 && me {
            match what {
                "die" => std::process::exit(3),
                "hang" => thread::sleep(Duration::from_secs(3600)),
                _ => {}
            }
        }
        dog.run(&comm, "file all-reduce", || {
            std::fs::write(dir.join(format!("c{k}.r{}", env.rank)), "")
                .map_err(|e| Error::Distributed(e.to_string()))?;
            Ok((
                (),
                FileWork {
                    comm: &comm,
                    seq: k,
                },
            ))
        })
    });
    std::fs::write(
        dir.join(format!("result.r{}", env.rank)),
        format!("{result:?}"),
    )
    .unwrap();
    if result.is_err() {
        std::process::exit(1);
    }
}

/// Not a test on its own: a launcher process (for the signal test) of three ranks that hang.
#[test]
#[ignore = "the launcher process of dist_failures_launcher_forwards_sigterm, which starts it"]
fn dist_failures_launcher_worker() {
    let dir = PathBuf::from(std::env::var(DIR).expect("started by the signal test"));
    let result = LocalLaunch::new(3)
        .unwrap()
        .with_command(
            std::env::current_exe().unwrap(),
            worker_args("dist_failures_rank_worker"),
        )
        .with_env(MODE, "hang:all")
        .with_env(DIR, &dir)
        .with_grace(Duration::from_secs(5))
        .run();
    std::fs::write(dir.join("launcher.result"), format!("{result:?}")).unwrap();
    std::process::exit(if result.is_ok() { 0 } else { 2 });
}

fn launch(dir: &Path, world: usize, mode: &str, timeout: Option<Duration>) -> mlctl::Result<()> {
    LocalLaunch::new(world)
        .unwrap()
        .with_command(
            std::env::current_exe().unwrap(),
            worker_args("dist_failures_rank_worker"),
        )
        .with_env(MODE, mode)
        .with_env(DIR, dir)
        .with_timeout(timeout)
        .with_grace(Duration::from_secs(2))
        .run()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
}

/// The pids the ranks wrote.
fn rank_pids(dir: &Path, world: usize) -> Vec<i32> {
    (0..world)
        .map(|r| {
            read(&dir.join(format!("pid.r{r}")))
                .parse()
                .expect("every rank wrote its pid")
        })
        .collect()
}

/// Fails the test if a process remains; kills it first, so that no test leaves one behind.
fn assert_all_gone(pids: &[i32]) {
    // SAFETY: plain system calls; signal 0 only checks that the process exists.
    let alive: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| unsafe { libc::kill(p, 0) } == 0)
        .collect();
    for &p in &alive {
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert!(alive.is_empty(), "processes left behind: {alive:?}");
}

/// A rank that hangs mid-step: the others' collectives fail with a typed timeout and abort
/// their communicators; the launcher reports the first failure, stops the hung rank (which
/// ignores SIGTERM, so it is killed after the grace period) and leaves no process behind.
#[test]
fn dist_failures_a_hung_rank_fails_its_peers_and_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = launch(dir.path(), 3, "hang:2:ignore-term", None).unwrap_err();
    let waited = start.elapsed();
    let why = distributed(&err);
    assert!(
        why.contains("rank 0 of 3 failed") || why.contains("rank 1 of 3 failed"),
        "{why}"
    );
    for rank in 0..2 {
        let result = read(&dir.path().join(format!("result.r{rank}")));
        assert!(
            result.contains("Distributed") && result.contains("timed out"),
            "rank {rank}: {result}"
        );
        assert!(
            result.contains("#3"),
            "rank {rank} fails at the collective rank 2 missed: {result}"
        );
        assert!(
            dir.path().join(format!("aborted.r{rank}")).exists(),
            "rank {rank} did not abort"
        );
    }
    assert!(
        !dir.path().join("result.r2").exists(),
        "the hung rank was stopped"
    );
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    assert_all_gone(&rank_pids(dir.path(), 3));
}

/// A rank that dies mid-step: the launcher notices at once (well before any collective
/// timeout), stops the others and names the dead rank.
#[test]
fn dist_failures_a_dead_rank_stops_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = launch(dir.path(), 3, "die:1", None).unwrap_err();
    let waited = start.elapsed();
    let why = distributed(&err);
    assert!(
        why.contains("rank 1 of 3 failed") && why.contains('3'),
        "{why}"
    );
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
    assert_all_gone(&rank_pids(dir.path(), 3));
}

/// Starts `world` processes of the ignored test `worker` as the ranks of a job on 127.0.0.1
/// (`port`, job id), each told the failure `mode` and the shared `dir`, without a launcher.
fn start_ranks(
    worker: &str,
    world: usize,
    (port, job): (u16, &str),
    mode: &str,
    dir: &Path,
) -> Vec<std::process::Child> {
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|rank| {
            let env = DistEnv {
                rank,
                world_size: world,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                job_id: job.into(),
            };
            Command::new(&exe)
                .args(worker_args(worker))
                .envs(env.to_vars())
                .env(MODE, mode)
                .env(DIR, dir)
                .spawn()
                .unwrap()
        })
        .collect()
}

/// The exit codes of `ranks` once all have exited; kills them and fails the test naming
/// `who` if they have not within `limit`.
fn exit_codes(mut ranks: Vec<std::process::Child>, limit: Duration, who: &str) -> Vec<Option<i32>> {
    let deadline = Instant::now() + limit;
    while ranks.iter_mut().any(|r| r.try_wait().unwrap().is_none()) {
        if Instant::now() > deadline {
            ranks.iter_mut().for_each(|r| drop(r.kill()));
            panic!("{who} did not fail in time");
        }
        thread::sleep(Duration::from_millis(20));
    }
    ranks.iter_mut().map(|r| r.wait().unwrap().code()).collect()
}

/// A rank that dies mid-step, with no launcher to stop the others (as under a scheduler that
/// starts each rank on its own): every other rank's collective fails with a typed timeout
/// within its 2 s limit, and each exits with a failure.
#[test]
fn dist_failures_a_dead_rank_fails_its_peers_in_time_without_a_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let worker = "dist_failures_rank_worker";
    let ranks = start_ranks(worker, 3, (29400, "file-test"), "die:1", dir.path());
    // Generous beside the 2 s collective timeout: the ranks start on a possibly busy machine.
    let codes = exit_codes(
        ranks,
        Duration::from_secs(60),
        "the ranks after rank 1 died",
    );
    assert_eq!(codes, [Some(1), Some(3), Some(1)]);
    for rank in [0, 2] {
        let result = read(&dir.path().join(format!("result.r{rank}")));
        assert!(
            result.contains("Distributed") && result.contains("timed out") && result.contains("#3"),
            "rank {rank}: {result}"
        );
    }
    assert_all_gone(&rank_pids(dir.path(), 3));
}

/// Ranks that all hang (no collective to time out) are stopped by the launch's own limit.
#[test]
fn dist_failures_the_launch_timeout_stops_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = launch(dir.path(), 2, "hang:all", Some(Duration::from_secs(2))).unwrap_err();
    let waited = start.elapsed();
    let why = distributed(&err);
    assert!(
        why.contains("timed out after 2s") && why.contains("0, 1"),
        "{why}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    assert_all_gone(&rank_pids(dir.path(), 2));
}

#[test]
fn dist_failures_a_successful_launch_returns_ok() {
    let dir = tempfile::tempdir().unwrap();
    launch(dir.path(), 2, "ok", Some(Duration::from_secs(60))).unwrap();
    for rank in 0..2 {
        assert_eq!(read(&dir.path().join(format!("result.r{rank}"))), "Ok(())");
    }
}

/// SIGTERM sent to the launcher reaches its ranks: the launcher exits with an error once they
/// have, and none is left behind (a launcher that died of the signal would orphan them).
#[test]
fn dist_failures_launcher_forwards_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut launcher = Command::new(std::env::current_exe().unwrap())
        .args(worker_args("dist_failures_launcher_worker"))
        .env(DIR, dir.path())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..3).any(|r| !dir.path().join(format!("pid.r{r}")).exists()) {
        assert!(Instant::now() < deadline, "the ranks did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let pids = rank_pids(dir.path(), 3);
    // SAFETY: plain system call to our child.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = launcher.kill();
            assert_all_gone(&pids);
            panic!("the launcher did not exit after SIGTERM");
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_all_gone(&pids);
    assert_eq!(
        status.code(),
        Some(2),
        "the launcher must exit with its error: {status}"
    );
    let result = read(&dir.path().join("launcher.result"));
    assert!(result.contains("signal 15"), "{result}");
}

/// Whether `pid` is gone or a zombie (an orphan whose reaper is slow is no longer running).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A launcher killed by SIGKILL can forward nothing: its ranks die with it all the same
/// (their parent-death signal), instead of training on as orphans.
#[cfg(target_os = "linux")]
#[test]
fn dist_failures_ranks_die_with_a_killed_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let mut launcher = Command::new(std::env::current_exe().unwrap())
        .args(worker_args("dist_failures_launcher_worker"))
        .env(DIR, dir.path())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..3).any(|r| !dir.path().join(format!("pid.r{r}")).exists()) {
        assert!(Instant::now() < deadline, "the ranks did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let pids = rank_pids(dir.path(), 3);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&p| dead(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let alive: Vec<i32> = pids.iter().copied().filter(|&p| !dead(p)).collect();
    for &p in &alive {
        // SAFETY: plain system call; cleans up after a failure.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert!(alive.is_empty(), "ranks outlived their launcher: {alive:?}");
}

// ---------------------------------------------------------------------------------------------
// NCCL (GPUs only).

/// Not a test on its own: one rank process of `dist_failures_nccl_a_hung_or_dead_peer`. Three
/// all-reduces over NCCL with a 5 s collective timeout; the rank `MLCTL_TEST_FAILURE_MODE`
/// names (`hang:R` or `die:R`, optionally `:ignore-term`) hangs or dies at the third.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "a rank process of dist_failures_nccl_a_hung_or_dead_peer, which starts it"]
fn dist_failures_nccl_worker() {
    use candle_core::{DType, Device, Tensor};
    use mlctl::dist::{Collective, NcclCollective};
    let mode = std::env::var(MODE).expect("started by the NCCL test, which sets the mode");
    let dir = PathBuf::from(std::env::var(DIR).expect("and the directory"));
    let env = DistEnv::from_env().unwrap().expect("launch variables set");
    let (pid, tmp) = (format!("pid.r{}", env.rank), format!("tmp.r{}", env.rank));
    std::fs::write(dir.join(&tmp), std::process::id().to_string()).unwrap();
    std::fs::rename(dir.join(tmp), dir.join(pid)).unwrap();
    if mode.ends_with(":ignore-term") {
        // SAFETY: plain system call.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let mut parts = mode.split(':');
    let (what, who) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let me = who == env.rank.to_string();
    let dev = Device::new_cuda(env.local_rank).unwrap();
    let c = NcclCollective::new(&dev, &env, Duration::from_secs(120))
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let x = Tensor::ones(1 << 20, DType::F32, &dev).unwrap();
    let result = (1..=3).try_for_each(|k| -> mlctl::Result<()> {
        if k == 3 && me {
            match what {
                "die" => std::process::exit(3),
                "hang" => thread::sleep(Duration::from_secs(3600)),
                _ => {}
            }
        }
        let sum = c.all_reduce_sum(&x)?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(sum, env.world_size as f32);
        Ok(())
    });
    std::fs::write(
        dir.join(format!("result.r{}", env.rank)),
        format!("{result:?}"),
    )
    .unwrap();
    if result.is_err() {
        std::process::exit(1);
    }
}

/// The watchdog over real NCCL communicators: a peer that hangs mid-step (through the
/// launcher, which then stops it) or dies (started directly, so that nothing stops the survivor
/// before it reports) makes rank 0's all-reduce return `Error::Distributed` within its 5 s
/// timeout, and the process exits (the aborted communicator holds nothing up).
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs two CUDA GPUs and NCCL (fails below two)"]
fn dist_failures_nccl_a_hung_or_dead_peer() {
    use candle_core::cuda::cudarc::driver::CudaContext;
    let gpus = CudaContext::device_count().unwrap();
    assert!(gpus >= 2, "needs two GPUs, found {gpus}");
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = LocalLaunch::new(2)
        .unwrap()
        .with_command(&exe, worker_args("dist_failures_nccl_worker"))
        .with_env(MODE, "hang:1:ignore-term")
        .with_env(DIR, dir.path())
        .with_grace(Duration::from_secs(2))
        .run()
        .unwrap_err();
    assert!(distributed(&err).contains("rank 0 of 2 failed"), "{err}");
    let result = read(&dir.path().join("result.r0"));
    assert!(
        result.contains("Distributed") && result.contains("timed out"),
        "{result}"
    );
    assert_all_gone(&rank_pids(dir.path(), 2));

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = format!("nccl-test-{port}");
    let ranks = start_ranks(
        "dist_failures_nccl_worker",
        2,
        (port, &job),
        "die:1",
        dir.path(),
    );
    let codes = exit_codes(ranks, Duration::from_secs(180), "rank 0 after rank 1 died");
    assert_eq!(codes, [Some(1), Some(3)]);
    let result = read(&dir.path().join("result.r0"));
    assert!(result.contains("Distributed"), "{result}");
}
