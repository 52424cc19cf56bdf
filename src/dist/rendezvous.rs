//! The torchrun launch protocol: ranks from the environment, a byte blob from rank 0 over TCP.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Where this process sits in a data-parallel job, as torchrun (and `torch.distributed`'s
/// `env://`) describe it with environment variables.
///
/// | variable | field |
/// |---|---|
/// | `RANK` | [`DistEnv::rank`]: this process's rank, `0..WORLD_SIZE` |
/// | `WORLD_SIZE` | [`DistEnv::world_size`]: processes in the job, over all nodes |
/// | `LOCAL_RANK` | [`DistEnv::local_rank`]: rank on this node, i.e. the CUDA device ordinal |
/// | `MASTER_ADDR` | [`DistEnv::master_addr`]: host name or address of rank 0's node |
/// | `MASTER_PORT` | [`DistEnv::master_port`]: a free TCP port there |
/// | `MLCTL_JOB_ID`, else `TORCHELASTIC_RUN_ID` (optional) | [`DistEnv::job_id`] |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's global rank.
    pub rank: usize,
    /// The number of processes over all nodes.
    pub world_size: usize,
    /// The rank on this node: the CUDA device ordinal to use.
    pub local_rank: usize,
    /// Host name or address of the node of rank 0, reachable from every node.
    pub master_addr: String,
    /// The TCP port rank 0 listens on for the rendezvous.
    pub master_port: u16,
    /// A name that every rank of this launch shares and no one else knows: rank 0 hands the
    /// rendezvous blob (the NCCL id) only to peers that present it. [`super::launch_local_ranks`]
    /// draws a random one per launch; under torchrun, `--rdzv-id` (`TORCHELASTIC_RUN_ID`) or
    /// `MLCTL_JOB_ID` set to a secret on every node. Empty, or torchrun's default `none`:
    /// [`rendezvous`] refuses to start unless `master_addr` is a loopback address (where only
    /// this machine's processes can connect).
    pub job_id: String,
}

/// The variables [`DistEnv::from_env`] reads.
const VARS: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl DistEnv {
    /// Reads the launch variables from the process environment: `None` when neither `RANK` nor
    /// `WORLD_SIZE` is set (not a distributed launch; a `MASTER_ADDR` left in a cluster's
    /// environment does not make one), the configuration when all are set and consistent.
    ///
    /// # Errors
    ///
    /// [`Error::Distributed`] naming the variable that is missing (when some but not all are
    /// set), not a number, or out of range (`RANK >= WORLD_SIZE`, `WORLD_SIZE = 0`, port 0).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] with another source of variables (a map in tests, a config file).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let values: Vec<Option<String>> = VARS.iter().map(|v| get(v)).collect();
        if values[0].is_none() && values[1].is_none() {
            return Ok(None);
        }
        let missing: Vec<&str> = VARS
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Distributed(format!(
                "a distributed launch sets all of {}; missing: {}",
                VARS.join(", "),
                missing.join(", ")
            )));
        }
        let value = |i: usize| values[i].as_deref().unwrap_or_default().trim();
        let number = |i: usize| -> Result<usize> {
            value(i).parse().map_err(|_| {
                Error::Distributed(format!(
                    "{}={:?} is not a non-negative integer",
                    VARS[i],
                    value(i)
                ))
            })
        };
        let (rank, world_size, local_rank) = (number(0)?, number(1)?, number(2)?);
        let master_addr = value(3).to_string();
        let master_port: u16 = value(4).parse().map_err(|_| {
            Error::Distributed(format!(
                "MASTER_PORT={:?} is not a TCP port (1..65535)",
                value(4)
            ))
        })?;
        let job_id = get("MLCTL_JOB_ID")
            .or_else(|| get("TORCHELASTIC_RUN_ID"))
            .unwrap_or_default();
        let env = Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            job_id,
        };
        env.validate()?;
        Ok(Some(env))
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(Error::Distributed("WORLD_SIZE must be at least 1".into()));
        }
        if self.rank >= self.world_size {
            return Err(Error::Distributed(format!(
                "RANK={} is not below WORLD_SIZE={}",
                self.rank, self.world_size
            )));
        }
        if self.master_addr.is_empty() {
            return Err(Error::Distributed("MASTER_ADDR is empty".into()));
        }
        if self.master_port == 0 {
            return Err(Error::Distributed(
                "MASTER_PORT=0 is not a TCP port (1..65535)".into(),
            ));
        }
        Ok(())
    }

    /// The variables that describe this process, to launch it (`Command::envs`).
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (VARS[0], self.rank.to_string()),
            (VARS[1], self.world_size.to_string()),
            (VARS[2], self.local_rank.to_string()),
            (VARS[3], self.master_addr.clone()),
            (VARS[4], self.master_port.to_string()),
        ];
        if !self.job_id.is_empty() {
            vars.push(("MLCTL_JOB_ID", self.job_id.clone()));
        }
        vars
    }

    /// What a rank presents for [`DistEnv::job_id`]: its SHA-256 (the name itself never
    /// crosses the network).
    fn job_token(&self) -> [u8; 32] {
        Sha256::digest(self.job_id.as_bytes()).into()
    }

    fn master_socket_addrs(&self) -> Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::Distributed(format!(
                    "cannot resolve MASTER_ADDR={}: {e}",
                    self.master_addr
                ))
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Distributed(format!(
                "MASTER_ADDR={} resolves to no address",
                self.master_addr
            )));
        }
        Ok(addrs)
    }
}

/// Marks the hello of an mlctl rank (and the protocol version).
const MAGIC: &[u8; 8] = b"MLCTLRV2";
/// A hello: `MAGIC`, rank and world size (u64 little-endian each), the job token.
const HELLO_LEN: usize = 8 + 8 + 8 + 32;
/// How long a peer has to say who it is.
const HELLO_TIME: Duration = Duration::from_secs(5);
/// Bounds what a reply may announce, so a stray peer cannot make a rank allocate gigabytes.
const MAX_BLOB: usize = 1 << 20;
const POLL: Duration = Duration::from_millis(20);

/// Rendezvous of all ranks: rank 0 calls `make_blob` (for NCCL: a fresh unique id) and hands
/// its result to every other rank; every rank returns the same bytes. A barrier too: nobody
/// returns before all `world_size` ranks have arrived.
///
/// Rank 0 listens on `MASTER_ADDR:MASTER_PORT` (the address it is given, which must be one of
/// its node's; not every interface); the others connect there, retrying until rank 0 is up,
/// and say who they are: rank, world size and the job's token ([`DistEnv::job_id`]). Rank 0
/// reads each hello on its own thread, so a peer that connects and says nothing stalls no one;
/// a peer that does not present the job's token is turned away and the rendezvous goes on.
/// When all have arrived, rank 0 sends each of them the blob. Ranks may be on any node that
/// reaches `MASTER_ADDR`.
///
/// # Errors
///
/// [`Error::Distributed`] on every rank that can still be told when the rendezvous fails:
/// `timeout` passes before all ranks have arrived (rank 0 names the missing ranks), two
/// processes claim the same rank, ranks disagree on `WORLD_SIZE`, the port is taken, or the
/// connection breaks. `make_blob`'s error on rank 0 (the others then time out or are told).
pub fn rendezvous(
    env: &DistEnv,
    timeout: Duration,
    make_blob: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    env.validate()?;
    check_job_id(env)?;
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        serve(env, deadline, make_blob)
    } else {
        join(env, deadline)
    }
}

/// Refuses a rendezvous that other machines can reach without a job id that is not public:
/// rank 0 would hand the NCCL id to any peer that speaks the protocol.
fn check_job_id(env: &DistEnv) -> Result<()> {
    let id = env.job_id.trim();
    let loopback = env.master_addr == "localhost"
        || env
            .master_addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if env.world_size == 1 || loopback || !(id.is_empty() || id == "none") {
        return Ok(());
    }
    Err(Error::Distributed(format!(
        "MASTER_ADDR={} can be reached from other machines, and the job's id is {id:?} \
         (MLCTL_JOB_ID, else TORCHELASTIC_RUN_ID, whose torchrun default is \"none\"), which \
         anyone can present: set MLCTL_JOB_ID to the same secret on every node",
        env.master_addr
    )))
}

fn serve(
    env: &DistEnv,
    deadline: Instant,
    make_blob: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let blob = make_blob()?;
    if blob.len() > MAX_BLOB {
        return Err(Error::InvalidArgument(format!(
            "rendezvous: blob of {} bytes (at most {MAX_BLOB})",
            blob.len()
        )));
    }
    if env.world_size == 1 {
        return Ok(blob);
    }
    let (mut peers, failure) = gather_peers(env, deadline)?;
    let (ok, payload) = match &failure {
        None => (true, blob.as_slice()),
        Some(why) => (false, why.as_bytes()),
    };
    let mut send_error = None;
    for (rank, stream) in peers.iter_mut().enumerate() {
        if let Some(stream) = stream {
            if let Err(e) = write_reply(stream, ok, payload) {
                send_error.get_or_insert(format!("rank 0 could not send to rank {rank}: {e}"));
            }
        }
    }
    match (failure, send_error) {
        (Some(why), _) | (None, Some(why)) => Err(Error::Distributed(why)),
        (None, None) => Ok(blob),
    }
}

/// Rank 0's side: accepts hellos (each read on its own thread, so a silent peer holds only
/// its own) until every rank has joined, the deadline passes or a peer is refused. Returns the
/// joined peers' streams by rank and, on failure, why (to be sent to every joined peer).
fn gather_peers(
    env: &DistEnv,
    deadline: Instant,
) -> Result<(Vec<Option<TcpStream>>, Option<String>)> {
    let listener = listen(env)?;
    let (hellos, arrivals) = mpsc::channel();
    let mut peers: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
    let mut arrived = 1;
    while arrived < env.world_size {
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..env.world_size)
                .filter(|&r| peers[r].is_none())
                .map(|r| r.to_string())
                .collect();
            let why = format!(
                "rank 0 timed out waiting for rank(s) {} to join on port {}",
                missing.join(", "),
                env.master_port
            );
            return Ok((peers, Some(why)));
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let hellos = hellos.clone();
                std::thread::spawn(move || {
                    let _ = hellos.send(read_hello(stream, deadline));
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Distributed(format!("rendezvous accept: {e}"))),
        }
        // Something that does not speak the protocol (a port scanner, a health check) is
        // dropped; the rendezvous goes on.
        let Ok(Ok((mut stream, rank, world, token))) = arrivals.recv_timeout(POLL) else {
            continue;
        };
        if token != env.job_token() {
            let _ = write_reply(
                &mut stream,
                false,
                b"not a rank of this job (job id differs)",
            );
            continue;
        }
        if let Some(why) = refusal(env, &peers, rank, world) {
            let _ = write_reply(&mut stream, false, why.as_bytes());
            return Ok((peers, Some(why)));
        }
        peers[rank] = Some(stream);
        arrived += 1;
    }
    Ok((peers, None))
}

/// Why rank 0 refuses a hello from `rank` with `WORLD_SIZE` `world`, if it does.
fn refusal(
    env: &DistEnv,
    peers: &[Option<TcpStream>],
    rank: usize,
    world: usize,
) -> Option<String> {
    if world != env.world_size {
        Some(format!(
            "rank {rank} has WORLD_SIZE={world}, rank 0 has WORLD_SIZE={}",
            env.world_size
        ))
    } else if rank == 0 || rank >= env.world_size {
        Some(format!(
            "a process joined as rank {rank}, not in 1..{}",
            env.world_size
        ))
    } else if peers[rank].is_some() {
        Some(format!("two processes joined as rank {rank}"))
    } else {
        None
    }
}

/// A non-blocking listener on `MASTER_ADDR:MASTER_PORT` (the first of its addresses that
/// binds).
fn listen(env: &DistEnv) -> Result<TcpListener> {
    let mut last_error = None;
    for addr in env.master_socket_addrs()? {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(|e| Error::Distributed(format!("rendezvous listener: {e}")))?;
                return Ok(listener);
            }
            Err(e) => last_error = Some(format!("{addr}: {e}")),
        }
    }
    Err(Error::Distributed(format!(
        "rank 0 cannot listen on MASTER_ADDR={} port {} ({}); MASTER_ADDR must be an address \
         of rank 0's node",
        env.master_addr,
        env.master_port,
        last_error.unwrap_or_default()
    )))
}

fn join(env: &DistEnv, deadline: Instant) -> Result<Vec<u8>> {
    let addrs = env.master_socket_addrs()?;
    let who = format!(
        "rank {} joining {}:{}",
        env.rank, env.master_addr, env.master_port
    );
    // Rank 0 may start later than this rank: retry until the deadline.
    let mut stream = 'connect: loop {
        let mut last_error = String::new();
        for addr in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(addr, left.clamp(POLL, Duration::from_secs(2))) {
                Ok(s) => break 'connect s,
                Err(e) => last_error = e.to_string(),
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Distributed(format!(
                "{who}: timed out connecting to rank 0 ({last_error})"
            )));
        }
        std::thread::sleep(POLL.max(Duration::from_millis(100)));
    };
    let io = |e: std::io::Error| Error::Distributed(format!("{who}: {e}"));
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
    hello.extend_from_slice(&(env.world_size as u64).to_le_bytes());
    hello.extend_from_slice(&env.job_token());
    stream.write_all(&hello).map_err(io)?;
    // The reply comes when every rank has arrived, so this waits as long as the deadline.
    set_read_deadline(&stream, deadline).map_err(io)?;
    let mut head = [0u8; 9];
    read_exact_by(&mut stream, &mut head, deadline).map_err(|e| {
        Error::Distributed(format!(
            "{who}: no answer from rank 0 ({e}); did every rank start, with the same WORLD_SIZE?"
        ))
    })?;
    let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0; 8])) as usize;
    if len > MAX_BLOB {
        return Err(Error::Distributed(format!(
            "{who}: rank 0 announced {len} bytes, more than {MAX_BLOB}"
        )));
    }
    let mut payload = vec![0u8; len];
    read_exact_by(&mut stream, &mut payload, deadline).map_err(io)?;
    if head[0] == 0 {
        Ok(payload)
    } else {
        Err(Error::Distributed(format!(
            "{who}: rank 0 refused: {}",
            String::from_utf8_lossy(&payload)
        )))
    }
}

/// A rank's hello: its stream, rank, world size and job token.
type Hello = (TcpStream, usize, usize, [u8; 32]);

/// Reads a rank's hello ([`HELLO_LEN`] bytes), giving the peer [`HELLO_TIME`] at most.
fn read_hello(stream: TcpStream, deadline: Instant) -> std::io::Result<Hello> {
    let mut stream = stream;
    stream.set_nonblocking(false)?;
    let hello_deadline = deadline.min(Instant::now() + HELLO_TIME);
    set_read_deadline(&stream, hello_deadline)?;
    let mut hello = [0u8; HELLO_LEN];
    read_exact_by(&mut stream, &mut hello, hello_deadline)?;
    if &hello[..8] != MAGIC {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "not an mlctl rank",
        ));
    }
    let num = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize;
    let token = hello[24..].try_into().unwrap_or([0; 32]);
    Ok((stream, num(&hello[8..16]), num(&hello[16..24]), token))
}

/// The reply: a status byte (0 ok, 1 refused), a u64 little-endian length, the payload (the
/// blob, or why the rendezvous failed).
fn write_reply(stream: &mut TcpStream, ok: bool, payload: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(9 + payload.len());
    msg.push(if ok { 0 } else { 1 });
    msg.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    msg.extend_from_slice(payload);
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&msg)?;
    stream.flush()
}

fn set_read_deadline(stream: &TcpStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    // A zero timeout means "block forever" to the OS: use a tiny one instead.
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))
}

/// `read_exact` that gives up at `deadline` (a read timeout alone restarts with every byte).
fn read_exact_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        if Instant::now() >= deadline {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "timed out"));
        }
        set_read_deadline(stream, deadline)?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed",
                ))
            }
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
