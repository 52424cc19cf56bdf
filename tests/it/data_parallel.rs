//! Data-parallel training and its building blocks: collectives, gathered negatives, gradient
//! buckets, the rendezvous, the trainer's ranks. `cargo test data_parallel` runs them all.
//!
//! The CPU tests run `W` ranks as threads over `LocalCollective` and compare with quantities
//! computed independently: sums and concatenations in plain Rust, gradients of one process over
//! the whole batch. Every test that waits on other ranks is bounded in time.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, nan_max};
use mlctl::data::{
    AnchorFinder, CorpusFormat, LoaderConfig, LoaderCursor, LoaderStats, PairBatch, PairLoader,
    ParallelCorpus,
};
use mlctl::dist::{
    any_rank_non_finite, broadcast_vars, gather_with_local_grad, rendezvous, Collective, DistEnv,
    GradLayout, LocalCollective,
};
use mlctl::loss::{CzNce, MultiLevelLoss};
use mlctl::pooling::TokenSpan;
use mlctl::train::{Decay, LossScaler, LrSchedule, StepRecord, TrainConfig, Trainer};
use mlctl::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How long a test waits for its ranks before declaring a hang.
const HANG: Duration = Duration::from_secs(60);

/// Runs `f(rank's collective)` on `world` threads; returns the results in rank order. Panics
/// (fails the test) if they have not all returned within [`HANG`].
fn run_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(LocalCollective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    run_threads(LocalCollective::group(world).unwrap(), HANG, f)
}

/// Runs `f(input)` on one thread per input; returns the results in input order. Panics (fails
/// the test) if a thread panics or they have not all returned within `limit`.
fn run_threads<I: Send + 'static, T: Send + 'static>(
    inputs: Vec<I>,
    limit: Duration,
    f: impl Fn(I) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let n = inputs.len();
    let f = std::sync::Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for (i, input) in inputs.into_iter().enumerate() {
        let (f, tx) = (f.clone(), tx.clone());
        thread::spawn(move || {
            let out = f(input);
            let _ = tx.send((i, out));
        });
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, v)) => out[i] = Some(v),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("ranks still running after {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a rank panicked"),
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Rank `r`'s test values: `[3, 4]` with entry `(i, j)` = `r·100 + i·4 + j + 0.25`.
fn rank_values(r: usize) -> Vec<f32> {
    (0..12).map(|e| (r * 100 + e) as f32 + 0.25).collect()
}

#[test]
fn data_parallel_collectives_match_independent_sums() {
    let world = 3;
    let results = run_ranks(world, |c| {
        let x = Tensor::from_vec(rank_values(c.rank()), (3, 4), &Device::Cpu).unwrap();
        let sum = c.all_reduce_sum(&x).unwrap();
        let gathered = c.all_gather(&x).unwrap();
        let from_1 = c.broadcast(&x, 1).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (
            sum.dims().to_vec(),
            flat(&sum),
            gathered.dims().to_vec(),
            flat(&gathered),
            flat(&from_1),
        )
    });
    let expected_sum: Vec<f32> = (0..12)
        .map(|e| (0..world).map(|r| rank_values(r)[e]).sum())
        .collect();
    let expected_gather: Vec<f32> = (0..world).flat_map(rank_values).collect();
    for (rank, (sum_dims, sum, gather_dims, gathered, from_1)) in results.iter().enumerate() {
        assert_eq!(sum_dims, &[3, 4], "rank {rank}");
        assert_eq!(sum, &expected_sum, "rank {rank}: all_reduce_sum");
        assert_eq!(gather_dims, &[9, 4], "rank {rank}");
        assert_eq!(gathered, &expected_gather, "rank {rank}: all_gather");
        assert_eq!(from_1, &rank_values(1), "rank {rank}: broadcast from 1");
    }
}

/// A linear embedding `x Wᵀ + b` trained with CZ-NCE over the global batch plus a local term
/// (λ·Σq² / B, standing in for the MLM term weighted by its local share).
struct Model {
    vars: BTreeMap<String, Var>,
}

const D_IN: usize = 8;
const D: usize = 6;
const LAMBDA: f64 = 0.3;

impl Model {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut var = |dims: &[usize]| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap()
        };
        let vars = BTreeMap::from([
            ("proj.weight".to_string(), var(&[D, D_IN])),
            ("proj.bias".to_string(), var(&[D])),
            // In no graph: no gradient on any rank, as in one process.
            ("unused".to_string(), var(&[3])),
        ]);
        Self { vars }
    }

    fn embed(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.vars["proj.weight"].t().unwrap())
            .unwrap()
            .broadcast_add(&self.vars["proj.bias"])
            .unwrap()
    }

    /// The loss on this rank: global CZ-NCE over gathered embeddings, plus the local term
    /// normalised by the global batch size.
    fn loss(&self, c: &dyn Collective, src: &Tensor, tgt: &Tensor, global_b: usize) -> Tensor {
        let (q, k) = (self.embed(src), self.embed(tgt));
        let q_all = gather_with_local_grad(c, &q).unwrap();
        let k_all = gather_with_local_grad(c, &k).unwrap();
        let contrastive = CzNce::new().forward(&q_all, &k_all).unwrap();
        let local = (q.sqr().unwrap().sum_all().unwrap() * (LAMBDA / global_b as f64)).unwrap();
        (contrastive + local).unwrap()
    }

    fn grads(&self, loss: &Tensor) -> BTreeMap<String, Tensor> {
        let store = loss.backward().unwrap();
        self.vars
            .iter()
            .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
            .collect()
    }

    fn sgd(&self, grads: &BTreeMap<String, Tensor>, lr: f64) {
        for (name, g) in grads {
            let v = &self.vars[name];
            v.set(&(v.as_tensor() - (g * lr).unwrap()).unwrap())
                .unwrap();
        }
    }
}

/// The global batch of step `step`: `[B, D_IN]` sources and targets (targets are noisy
/// copies, so that positives are closer than negatives).
fn batch(step: usize, b: usize) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + step as u64);
    let src: Vec<f32> = (0..b * D_IN)
        .map(|_| rng.random_range(-1f32..1.0))
        .collect();
    let tgt: Vec<f32> = src
        .iter()
        .map(|x| x + rng.random_range(-0.3f32..0.3))
        .collect();
    (
        Tensor::from_vec(src, (b, D_IN), &Device::Cpu).unwrap(),
        Tensor::from_vec(tgt, (b, D_IN), &Device::Cpu).unwrap(),
    )
}

#[test]
fn data_parallel_gradients_equal_single_process() {
    const WORLD: usize = 3;
    const B: usize = 12;
    const STEPS: usize = 3;
    const LR: f64 = 0.5;
    let init_seed = 7;

    // One process, whole batch.
    let single = Model::new(init_seed);
    let mut single_grads = Vec::new();
    for step in 0..STEPS {
        let (src, tgt) = batch(step, B);
        let one = LocalCollective::group(1).unwrap().remove(0);
        let grads = single.grads(&single.loss(&one, &src, &tgt, B));
        assert!(!grads.contains_key("unused"));
        single.sgd(&grads, LR);
        single_grads.push(grads);
    }

    // W ranks, each with its shard; ranks other than 0 start from other weights, which the
    // broadcast must overwrite.
    let per_rank = run_ranks(WORLD, move |c| {
        let rank = c.rank();
        let model = Model::new(if rank == 0 {
            init_seed
        } else {
            99 + rank as u64
        });
        broadcast_vars(&c, &model.vars, 0).unwrap();
        // Several buckets, to cover the split.
        let layout = GradLayout::new(&model.vars)
            .unwrap()
            .with_max_bucket_len(20);
        assert!(layout.bucket_lens().len() > 1);
        let shard = B / WORLD;
        let mut reduced_per_step = Vec::new();
        for step in 0..STEPS {
            let (src, tgt) = batch(step, B);
            let src = src.narrow(0, rank * shard, shard).unwrap();
            let tgt = tgt.narrow(0, rank * shard, shard).unwrap();
            let loss = model.loss(&c, &src, &tgt, B);
            let finite = loss.to_scalar::<f32>().unwrap().is_finite();
            let local = model.grads(&loss);
            let reduced = layout.all_reduce(&c, &local, finite).unwrap();
            assert!(!reduced.skip);
            model.sgd(&reduced.grads, LR);
            reduced_per_step.push(reduced.grads);
        }
        let params: BTreeMap<String, Tensor> = model
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        (reduced_per_step, params)
    });

    let mut worst = 0f64;
    for (rank, (reduced_per_step, params)) in per_rank.iter().enumerate() {
        for (step, (reduced, expected)) in reduced_per_step.iter().zip(&single_grads).enumerate() {
            let names: Vec<_> = reduced.keys().collect();
            let expected_names: Vec<_> = expected.keys().collect();
            assert_eq!(
                names, expected_names,
                "rank {rank} step {step}: parameter set"
            );
            for (name, g) in expected {
                // A linear model of 8 inputs over 12 pairs: every gradient element is a sum of
                // at most 12·8 products of terms below 1, so orders differ by < 100·u ≈ 6e-6.
                let diff = max_abs_diff(&reduced[name], g);
                worst = worst.max(diff);
                assert!(
                    diff < 1e-5,
                    "rank {rank} step {step} {name}: |Δgrad| = {diff:e}"
                );
            }
        }
        for (name, v) in &single.vars {
            let diff = max_abs_diff(&params[name], v.as_tensor());
            assert!(diff < 1e-5, "rank {rank} {name}: |Δparam| = {diff:e}");
        }
    }
    eprintln!("largest |Δgrad| over ranks, steps and parameters: {worst:e}");
}

fn grads_of(pairs: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
    pairs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect()
}

fn layout_abc() -> GradLayout {
    let dev = Device::Cpu;
    let vars = BTreeMap::from([
        (
            "a".to_string(),
            Var::zeros((2, 2), DType::F32, &dev).unwrap(),
        ),
        ("b".to_string(), Var::zeros(3, DType::F32, &dev).unwrap()),
        ("c".to_string(), Var::zeros(1, DType::F32, &dev).unwrap()),
    ]);
    GradLayout::new(&vars).unwrap()
}

#[test]
fn data_parallel_buckets_missing_gradients_and_non_finite_agreement() {
    let dev = Device::Cpu;
    // One rank: the buffer is [a (4) | b (3) | c (1) | presence a, b, c | non-finite flag].
    let layout = layout_abc();
    let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let c = Tensor::new(&[5f32], &dev).unwrap();
    let buf = layout
        .flatten(&grads_of(&[("a", a.clone()), ("c", c.clone())]), false)
        .unwrap();
    assert_eq!(buf.len(), 1);
    assert_eq!(
        buf[0].to_vec1::<f32>().unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 5.0, 1.0, 0.0, 1.0, 1.0]
    );
    let back = layout.unflatten(&buf).unwrap();
    assert_eq!(back.grads.keys().collect::<Vec<_>>(), ["a", "c"]);
    assert_eq!(max_abs_diff(&back.grads["a"], &a), 0.0);
    assert!(back.skip);

    // Unknown parameter, wrong shape: typed errors, not silent loss.
    let err = layout
        .flatten(&grads_of(&[("z", c.clone())]), true)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = layout
        .flatten(&grads_of(&[("a", c.clone())]), true)
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");

    // Two ranks: `b` only on rank 1 (rank 0 sends zeros for it and does not wait forever),
    // `c` on neither (absent from the result), a non-finite loss on rank 1 only.
    let results = run_ranks(2, |coll| {
        let dev = Device::Cpu;
        let layout = layout_abc();
        let r = coll.rank() as f32;
        let mut grads = grads_of(&[("a", Tensor::full(r + 1.0, (2, 2), &dev).unwrap())]);
        if coll.rank() == 1 {
            grads.insert("b".into(), Tensor::new(&[7f32, 8.0, 9.0], &dev).unwrap());
        }
        let finite = coll.rank() == 0;
        let reduced = layout.all_reduce(&coll, &grads, finite).unwrap();
        let skip_before_backward = any_rank_non_finite(&coll, finite, &dev).unwrap();
        (reduced, skip_before_backward)
    });
    for (rank, (reduced, skip_before_backward)) in results.iter().enumerate() {
        assert_eq!(
            reduced.grads.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "rank {rank}"
        );
        assert_eq!(
            reduced.grads["a"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![3.0; 4]
        );
        assert_eq!(
            reduced.grads["b"].to_vec1::<f32>().unwrap(),
            vec![7.0, 8.0, 9.0]
        );
        assert!(reduced.skip, "rank {rank} must skip with the others");
        assert_eq!(reduced.non_finite_ranks, 1);
        assert!(skip_before_backward);
    }
}

/// Half-precision gradients are summed in f32 and stay f32: two ranks' scaled f16 gradients of
/// 40000 each sum to 80000, beyond f16's range (65504), which a cast back to f16 before the
/// unscale turned into infinity (a skipped step).
#[test]
fn data_parallel_half_precision_gradients_are_summed_and_kept_in_f32() {
    for dtype in [DType::F16, DType::BF16] {
        let results = run_ranks(2, move |coll| {
            let dev = Device::Cpu;
            let vars = BTreeMap::from([("w".to_string(), Var::zeros(3, dtype, &dev).unwrap())]);
            let layout = GradLayout::new(&vars).unwrap();
            let g = Tensor::full(40000f32, 3, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            layout
                .all_reduce(&coll, &grads_of(&[("w", g)]), true)
                .unwrap()
        });
        for reduced in &results {
            let w = &reduced.grads["w"];
            assert_eq!(w.dtype(), DType::F32, "{dtype:?}");
            let one = Tensor::new(&[40000f32], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let expected = 2.0 * one.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
            assert_eq!(w.to_vec1::<f32>().unwrap(), vec![expected; 3], "{dtype:?}");
        }
    }
}

/// Buckets are capped in bytes of their f32 buffers, at PyTorch DDP's 25 MiB by default, and
/// split at parameter boundaries.
#[test]
fn data_parallel_buckets_are_capped_at_ddps_default() {
    assert_eq!(mlctl::dist::DEFAULT_BUCKET_BYTES, 25 * 1024 * 1024);
    let dev = Device::Cpu;
    let m = 1 << 20;
    let vars = BTreeMap::from([
        (
            "a".to_string(),
            Var::zeros(3 * m, DType::F16, &dev).unwrap(),
        ),
        (
            "b".to_string(),
            Var::zeros(4 * m, DType::F16, &dev).unwrap(),
        ),
        ("c".to_string(), Var::zeros(m, DType::F16, &dev).unwrap()),
        (
            "d".to_string(),
            Var::zeros(7 * m, DType::F16, &dev).unwrap(),
        ),
    ]);
    let layout = GradLayout::new(&vars)
        .unwrap()
        .with_max_bucket_bytes(mlctl::dist::DEFAULT_BUCKET_BYTES);
    // 25 MiB of f32 is 6.25 Mi elements: a alone (b would overflow it), b + c, d alone (larger
    // than the cap), then the trailer (4 presence flags and the non-finite flag).
    assert_eq!(layout.bucket_lens(), vec![3 * m, 5 * m, 7 * m + 5]);
}

#[test]
fn data_parallel_failed_rank_stops_the_others() {
    // Rank 2 fails before its first collective; 0 and 1 must get an error, not hang.
    let results = run_ranks(3, |c| {
        if c.rank() == 2 {
            return Err(Error::InvalidArgument(
                "rank 2 failed to load its shard".into(),
            ));
        }
        let x = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        c.all_reduce_sum(&x)?;
        Ok(())
    });
    for (rank, r) in results.iter().enumerate().take(2) {
        let err = r.as_ref().unwrap_err();
        assert!(matches!(err, Error::Distributed(_)), "rank {rank}: {err}");
        assert!(err.to_string().contains("rank 2"), "rank {rank}: {err}");
    }

    // A rank that panics in the middle of a run (after one collective succeeded).
    let results = run_ranks(3, |c| {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        c.all_reduce_sum(&x).unwrap();
        if c.rank() == 1 {
            let _keep_alive = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _c = c;
                panic!("rank 1 crashed");
            }));
            return None;
        }
        Some(c.all_gather(&x).map(|_| ()))
    });
    for rank in [0, 2] {
        let err = results[rank].as_ref().unwrap().as_ref().unwrap_err();
        assert!(err.to_string().contains("rank 1"), "rank {rank}: {err}");
    }

    // Ranks that disagree on the collective or the shard shape all get the same error.
    let results = run_ranks(2, |c| {
        let x = Tensor::ones(2 + c.rank(), DType::F32, &Device::Cpu).unwrap();
        c.all_reduce_sum(&x).map(|_| ()).map_err(|e| e.to_string())
    });
    assert!(results[0]
        .as_ref()
        .unwrap_err()
        .contains("shards must be equal"));
    assert_eq!(results[0], results[1]);
    let results = run_ranks(2, |c| {
        let x = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
        let r = if c.rank() == 0 {
            c.all_reduce_sum(&x)
        } else {
            c.all_gather(&x)
        };
        r.map(|_| ()).map_err(|e| e.to_string())
    });
    assert!(results[0].as_ref().unwrap_err().contains("disagree"));
    assert_eq!(results[0], results[1]);
}

#[test]
fn data_parallel_env_parsing() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(DistEnv::from_lookup(vars(&[])).unwrap(), None);
    let leftover = vars(&[("MASTER_ADDR", "login-node"), ("MASTER_PORT", "1234")]);
    assert_eq!(DistEnv::from_lookup(leftover).unwrap(), None);
    let env = DistEnv::from_lookup(vars(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "3"),
        ("MASTER_ADDR", "node-a.cluster"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        env,
        DistEnv {
            rank: 3,
            world_size: 16,
            local_rank: 3,
            master_addr: "node-a.cluster".into(),
            master_port: 29500,
            job_id: String::new(),
        }
    );
    let back = DistEnv::from_lookup(|name| {
        env.to_vars()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    })
    .unwrap();
    assert_eq!(back.as_ref(), Some(&env));
    // Reachable from other machines without a job id of its own: refused before connecting.
    for id in ["", "none"] {
        let open = DistEnv {
            job_id: id.into(),
            ..env.clone()
        };
        let err = rendezvous(&open, Duration::from_secs(1), || Ok(vec![1])).unwrap_err();
        assert!(err.to_string().contains("MLCTL_JOB_ID"), "{err}");
    }
    // On the loopback address only this machine's processes can join: no id needed (rank 0
    // then waits for rank 1 until the timeout).
    let local = DistEnv {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        job_id: String::new(),
    };
    let err = rendezvous(&local, Duration::from_millis(300), || Ok(vec![1])).unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");

    let bad: [(&[(&str, &str)], &str); 4] = [
        (
            &[("RANK", "0")],
            "missing: WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT",
        ),
        (
            &[
                ("RANK", "2"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        (
            &[
                ("RANK", "x"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "RANK=\"x\"",
        ),
        (
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "70000"),
            ],
            "MASTER_PORT=\"70000\"",
        ),
    ];
    for (pairs, needle) in bad {
        let err = DistEnv::from_lookup(|name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
        .unwrap_err();
        assert!(matches!(err, Error::Distributed(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local_env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world_size: world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        job_id: format!("test-job-{port}"),
    }
}

/// The blob rank 0 hands out in the process test: 128 bytes, as an NCCL unique id.
fn test_blob(seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..128).map(|_| rng.random()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Not a test on its own: the body of each rank process of
/// `data_parallel_rendezvous_processes`, which runs this test binary with
/// `MLCTL_TEST_DIST_WORKER` and the torchrun variables set.
#[test]
#[ignore = "a rank process of data_parallel_rendezvous_processes, which starts it"]
fn data_parallel_rendezvous_worker() {
    let seed = std::env::var("MLCTL_TEST_DIST_WORKER")
        .expect("run by data_parallel_rendezvous_processes, which sets MLCTL_TEST_DIST_WORKER");
    let env = DistEnv::from_env().unwrap().expect("launch variables set");
    let blob = rendezvous(&env, Duration::from_secs(30), || {
        Ok(test_blob(seed.parse().unwrap()))
    })
    .unwrap();
    println!("RANK {} BLOB {}", env.rank, hex(&blob));
}

/// The full name of the test `name` of this module, as the harness's `--exact` wants it.
fn test_path(name: &str) -> String {
    // module_path!() is `it::data_parallel`; test names start after the crate's name.
    let module = module_path!();
    let module = module.split_once("::").map_or(module, |(_, m)| m);
    format!("{module}::{name}")
}

/// Runs `world` processes of this test binary, each running only the test `worker` with the
/// torchrun variables of its rank and `MLCTL_TEST_DIST_WORKER=worker_arg`; returns each rank's
/// standard output once all have succeeded. Fails the test if one fails or they take longer
/// than `limit` (then kills them all).
fn run_rank_processes(
    worker: &str,
    world: usize,
    worker_arg: &str,
    limit: Duration,
) -> Vec<String> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    // Started in reverse order, so that other ranks wait for rank 0 to listen.
    let mut children: Vec<(usize, std::process::Child)> = (0..world)
        .rev()
        .map(|rank| {
            let child = std::process::Command::new(&exe)
                .args([
                    test_path(worker).as_str(),
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                    "--include-ignored",
                ])
                .envs(local_env(rank, world, port).to_vars())
                .env("MLCTL_TEST_DIST_WORKER", worker_arg)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (rank, child)
        })
        .collect();
    let deadline = Instant::now() + limit;
    while children
        .iter_mut()
        .any(|(_, c)| c.try_wait().unwrap().is_none())
    {
        if Instant::now() > deadline {
            for (_, c) in &mut children {
                let _ = c.kill();
            }
            panic!("rank processes still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    children.sort_by_key(|(rank, _)| *rank);
    children
        .into_iter()
        .map(|(rank, child)| {
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "rank {rank} failed: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        })
        .collect()
}

#[test]
fn data_parallel_rendezvous_processes() {
    let seed = 4242u64;
    let outputs = run_rank_processes(
        "data_parallel_rendezvous_worker",
        3,
        &seed.to_string(),
        HANG,
    );
    let expected = hex(&test_blob(seed));
    for (rank, stdout) in outputs.iter().enumerate() {
        let line = format!("RANK {rank} BLOB {expected}");
        assert!(stdout.contains(&line), "rank {rank} printed: {stdout}");
    }
}

#[test]
fn data_parallel_rendezvous_failures_are_reported_in_time() {
    // Rank 2 never comes: rank 0 names it; rank 1 is told instead of waiting forever.
    let port = free_port();
    let start = Instant::now();
    let ranks: Vec<_> = [0, 1]
        .into_iter()
        .map(|rank| {
            thread::spawn(move || {
                // Rank 1 waits longer than rank 0, to hear why rank 0 gave up.
                let timeout = Duration::from_secs(if rank == 0 { 2 } else { 15 });
                rendezvous(&local_env(rank, 3, port), timeout, || Ok(vec![1, 2, 3]))
            })
        })
        .collect();
    let results: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        start.elapsed() < Duration::from_secs(14),
        "rank 1 was not told"
    );
    let err0 = results[0].as_ref().unwrap_err().to_string();
    assert!(err0.contains("rank(s) 2"), "{err0}");
    let err1 = results[1].as_ref().unwrap_err().to_string();
    assert!(err1.contains("rank(s) 2"), "rank 1 is told why: {err1}");

    // Ranks disagree on WORLD_SIZE: both fail.
    let port = free_port();
    let r0 = thread::spawn(move || {
        rendezvous(&local_env(0, 2, port), Duration::from_secs(10), || {
            Ok(vec![9])
        })
    });
    let r1 = rendezvous(&local_env(1, 3, port), Duration::from_secs(10), || {
        unreachable!("only rank 0 makes the blob")
    });
    let r0 = r0.join().unwrap();
    assert!(r0.unwrap_err().to_string().contains("WORLD_SIZE=3"));
    assert!(r1.unwrap_err().to_string().contains("WORLD_SIZE=3"));

    // One rank alone needs no network.
    let blob = rendezvous(&local_env(0, 1, 1), Duration::from_secs(1), || Ok(vec![5])).unwrap();
    assert_eq!(blob, vec![5]);
}

#[test]
fn data_parallel_rendezvous_admits_only_the_job_and_waits_on_no_silent_peer() {
    let port = free_port();
    let start = Instant::now();
    let r0 = thread::spawn(move || {
        rendezvous(&local_env(0, 2, port), Duration::from_secs(20), || {
            Ok(vec![7, 7])
        })
    });
    // A peer that connects and never speaks: rank 0 reads hellos on their own threads, so the
    // real rank is let in long before this one's 5 s are up.
    let silent = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    // A process of another job (same protocol, same rank) is turned away and changes nothing.
    let stranger = DistEnv {
        job_id: "another job".into(),
        ..local_env(1, 2, port)
    };
    let err = rendezvous(&stranger, Duration::from_secs(10), || unreachable!()).unwrap_err();
    assert!(err.to_string().contains("job id differs"), "{err}");
    let r1 = rendezvous(
        &local_env(1, 2, port),
        Duration::from_secs(10),
        || unreachable!(),
    );
    assert_eq!(r1.unwrap(), vec![7, 7]);
    assert_eq!(r0.join().unwrap().unwrap(), vec![7, 7]);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "a silent peer held the rendezvous for {:?}",
        start.elapsed()
    );
    drop(silent);
}

/// Rank 0 listens on the address it is given, not on every interface: on Linux every
/// 127.x.y.z is a local address, and 127.0.0.2 must not reach a rank 0 told 127.0.0.1.
#[cfg(target_os = "linux")]
#[test]
fn data_parallel_rendezvous_listens_on_master_addr_only() {
    let port = free_port();
    let r0 = thread::spawn(move || {
        rendezvous(&local_env(0, 2, port), Duration::from_secs(3), || {
            Ok(vec![1])
        })
    });
    thread::sleep(Duration::from_millis(300));
    let other = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 2], port)),
        Duration::from_millis(500),
    );
    assert!(other.is_err(), "rank 0 accepted a connection on 127.0.0.2");
    assert!(r0.join().unwrap().is_err(), "no rank 1 came");
}

/// One NCCL rank on GPU 0: every collective is the identity, and the data-parallel helpers
/// give what they give over `LocalCollective` of one rank.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn data_parallel_nccl_one_rank_round_trip() {
    use mlctl::dist::NcclCollective;
    let dev = Device::new_cuda(0).unwrap();
    let env = local_env(0, 1, free_port());
    let c = NcclCollective::new(&dev, &env, Duration::from_secs(30)).unwrap();
    assert_eq!((c.rank(), c.world_size()), (0, 1));
    let x = Tensor::from_vec(rank_values(0), (3, 4), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let xd = x.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        for (what, y) in [
            ("all_reduce_sum", c.all_reduce_sum(&xd).unwrap()),
            ("all_gather", c.all_gather(&xd).unwrap()),
            ("broadcast", c.broadcast(&xd, 0).unwrap()),
        ] {
            assert_eq!(y.dims(), &[3, 4], "{what} {dtype:?}");
            let y = y.to_device(&Device::Cpu).unwrap();
            assert_eq!(
                max_abs_diff(&y, &x.to_dtype(dtype).unwrap()),
                0.0,
                "{what} {dtype:?}"
            );
        }
    }
    // A strided input (a transpose) is made contiguous first.
    let xt = x.to_device(&dev).unwrap().t().unwrap();
    let y = c
        .all_reduce_sum(&xt)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    assert_eq!(max_abs_diff(&y, &x.t().unwrap()), 0.0);

    // Gradients through the NCCL path equal those of one process on the CPU.
    let (src, tgt) = batch(0, 6);
    let on = |device: &Device, c: &dyn Collective| {
        let model = Model::new(3);
        let vars: BTreeMap<String, Var> = model
            .vars
            .iter()
            .map(|(n, v)| {
                let t = v.as_tensor().to_device(device).unwrap();
                (n.clone(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let model = Model { vars };
        let loss = model.loss(
            c,
            &src.to_device(device).unwrap(),
            &tgt.to_device(device).unwrap(),
            6,
        );
        let grads = model.grads(&loss);
        let layout = GradLayout::new(&model.vars).unwrap();
        layout.all_reduce(c, &grads, true).unwrap().grads
    };
    let gpu = on(&dev, &c);
    let cpu = on(&Device::Cpu, &LocalCollective::group(1).unwrap()[0]);
    assert_eq!(
        gpu.keys().collect::<Vec<_>>(),
        cpu.keys().collect::<Vec<_>>()
    );
    for (name, g) in &cpu {
        let diff = max_abs_diff(&gpu[name].to_device(&Device::Cpu).unwrap(), g);
        assert!(diff < 1e-5, "{name}: {diff:e}");
    }
}

/// Not a test on its own: the body of each rank process of
/// `data_parallel_nccl_all_gpus`.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "a rank process of data_parallel_nccl_all_gpus"]
fn data_parallel_nccl_worker() {
    use mlctl::dist::NcclCollective;
    assert!(
        std::env::var("MLCTL_TEST_DIST_WORKER").is_ok(),
        "run by data_parallel_nccl_all_gpus, which sets MLCTL_TEST_DIST_WORKER"
    );
    let env = DistEnv::from_env().unwrap().expect("launch variables set");
    let (rank, world) = (env.rank, env.world_size);
    let dev = Device::new_cuda(env.local_rank).unwrap();
    let c = NcclCollective::new(&dev, &env, Duration::from_secs(60)).unwrap();

    let x = Tensor::from_vec(rank_values(rank), (3, 4), &dev).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected_sum: Vec<f32> = (0..12)
        .map(|e| (0..world).map(|r| rank_values(r)[e]).sum())
        .collect();
    assert_eq!(flat(c.all_reduce_sum(&x).unwrap()), expected_sum);
    let expected_gather: Vec<f32> = (0..world).flat_map(rank_values).collect();
    assert_eq!(flat(c.all_gather(&x).unwrap()), expected_gather);
    assert_eq!(
        flat(c.broadcast(&x, world - 1).unwrap()),
        rank_values(world - 1)
    );

    // One update of the gathered-negatives model: the summed gradients equal those of one
    // process on the CPU over the whole batch.
    let b = 4 * world;
    let (src, tgt) = batch(0, b);
    let single = Model::new(11);
    let one = LocalCollective::group(1).unwrap().remove(0);
    let expected = single.grads(&single.loss(&one, &src, &tgt, b));
    let vars: BTreeMap<String, Var> = Model::new(11 + rank as u64)
        .vars
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().to_device(&dev).unwrap();
            (n.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let model = Model { vars };
    broadcast_vars(&c, &model.vars, 0).unwrap();
    let shard = |t: &Tensor| t.narrow(0, rank * 4, 4).unwrap().to_device(&dev).unwrap();
    let loss = model.loss(&c, &shard(&src), &shard(&tgt), b);
    let local = model.grads(&loss);
    let layout = GradLayout::new(&model.vars).unwrap();
    let reduced = layout.all_reduce(&c, &local, true).unwrap();
    assert_eq!(
        reduced.grads.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, g) in &expected {
        let diff = max_abs_diff(&reduced.grads[name].to_device(&Device::Cpu).unwrap(), g);
        assert!(diff < 1e-5, "rank {rank} {name}: {diff:e}");
    }
    println!("RANK {rank} OK");
}

/// One process per visible GPU (at least two), as torchrun would launch them.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs two or more CUDA GPUs and NCCL (fails below two)"]
fn data_parallel_nccl_all_gpus() {
    use candle_core::cuda::cudarc::driver::CudaContext;
    let gpus = CudaContext::device_count().unwrap() as usize;
    if gpus < 2 {
        panic!("data_parallel_nccl_all_gpus needs at least two GPUs, found {gpus}");
    }
    let outputs = run_rank_processes(
        "data_parallel_nccl_worker",
        gpus,
        "nccl",
        Duration::from_secs(300),
    );
    for (rank, stdout) in outputs.iter().enumerate() {
        assert!(
            stdout.contains(&format!("RANK {rank} OK")),
            "rank {rank}: {stdout}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The trainer's ranks: W trainers over LocalCollective threads against one process.

/// Pairs in the training file of the trainer tests.
const PAIRS: usize = 24;

fn train_corpus(dir: &Path) -> PathBuf {
    let path = dir.join("train.tsv");
    std::fs::write(&path, common::synthetic_tsv(PAIRS, 21)).unwrap();
    path
}

/// Adam at a learning rate large enough that a wrong gradient shows within a few steps, with
/// clipping (applied after the all-reduce) that binds on the tiny model's gradients.
/// [`dp_config`] with an update that is linear in the gradient, for comparing `W` ranks with
/// one process (which sum the same gradients in another order, so round differently).
///
/// Adam's step `lr·m̂/(√v̂ + eps)` divides by the gradient's own size: an element whose gradient
/// is rounding noise (the attention key bias's, which softmax ignores, or any element near a
/// cancellation) moves by about `lr` whichever way it rounds, so parameters after Adam steps of
/// two correct computations can differ by `lr` whatever the tolerance, and a tolerance that
/// passes on one CPU's GEMM kernels fails on another's. With `eps` far above every `√v̂` (the
/// global norm is clipped to 1, so `√v̂ ≤ 1`) the step is `(lr/eps)·m̂` up to a relative `1/eps`:
/// SGD with momentum at rate `lr/eps`, which carries a gradient's rounding error into the
/// parameters at the gradient's own relative size. No weight decay (it would scale with `lr`).
fn dp_sgd_config(steps: u64, grad_accum: usize, mini_batch: Option<usize>) -> TrainConfig {
    const EPS: f64 = 1e6;
    let mut config = dp_config(steps, grad_accum, mini_batch);
    config.schedule.peak_lr = 5e-2 * EPS;
    config.adamw.eps = EPS;
    config.adamw.weight_decay = 0.0;
    config
}

fn dp_config(steps: u64, grad_accum: usize, mini_batch: Option<usize>) -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule {
            peak_lr: 1e-3,
            warmup_steps: 0,
            total_steps: steps,
            decay: Decay::Linear,
        },
        max_grad_norm: Some(1.0),
        grad_accum,
        mini_batch,
        progress: false,
        ..TrainConfig::adam_linear_clipped(steps)
    }
}

/// A trainer of the tiny model (dropout 0.1 on) with ML-CTL's objective (sentence CZ-NCE and
/// MLM) over a global batch of `batch` pairs: from the TSV file `data`, or from the corpus with
/// dropped pairs [`dropping_corpus`] wrote when `data` is its directory.
fn dp_trainer(run: &Path, data: &Path, batch: usize, config: TrainConfig, init: u64) -> Trainer {
    let loader = if data.is_dir() {
        let config = dropping_config(batch, true);
        dropping_loader(data, config, Arc::new(RecordingFinder::default()))
    } else {
        common::tsv_loader(data, batch, 16, 3)
    };
    Trainer::new(
        common::tiny_model(init),
        MultiLevelLoss::mlctl(),
        loader,
        config,
        run,
    )
    .unwrap()
}

/// Lines of [`dropping_corpus`].
const DROPPING_LINES: usize = 30;

/// Whether line `i` of [`dropping_corpus`] is a usable pair.
fn usable_line(i: usize) -> bool {
    !(i % 7 == 3 || i % 11 == 5 || i % 13 == 8)
}

/// A line-aligned corpus (`src.txt`, `tgt.txt` in a directory of its own) of
/// [`DROPPING_LINES`] pairs, some of which the loader drops: line `i` has no anchor when
/// `i % 7 == 3` (its source holds "zzz", see [`RecordingFinder`]), a source truncated at 16
/// tokens when `i % 11 == 5`, an empty target (a bad line, skipped) when `i % 13 == 8`; the
/// others are usable ([`usable_line`]). Returns the sources of the lines.
fn dropping_corpus(dir: &Path) -> (PathBuf, Vec<String>) {
    let data = dir.join("line-aligned");
    std::fs::create_dir_all(&data).unwrap();
    let words = |i: usize, n: usize| -> String {
        let words = common::WORDS.iter().cycle().skip((7 * i) % 40);
        words.take(n).cloned().collect::<Vec<_>>().join(" ")
    };
    let (mut src, mut tgt) = (Vec::new(), Vec::new());
    for i in 0..DROPPING_LINES {
        let mut s = words(i, 3 + i % 6);
        if i % 7 == 3 {
            s.push_str(" zzz");
        }
        if i % 11 == 5 {
            s = words(i, 25);
        }
        src.push(s);
        tgt.push(if i % 13 == 8 {
            String::new()
        } else {
            words(i + 3, 2 + i % 5)
        });
    }
    std::fs::write(data.join("src.txt"), src.join("\n") + "\n").unwrap();
    std::fs::write(data.join("tgt.txt"), tgt.join("\n") + "\n").unwrap();
    (data, src)
}

/// An anchor finder that records the source of every pair it is asked about (the loader asks
/// once per pair it has read and tokenized) and answers: no anchor for a source holding "zzz",
/// the closing token for a truncated source (so the loader drops it as truncated), token 1 of
/// each side otherwise.
#[derive(Default)]
struct RecordingFinder {
    seen: Mutex<Vec<String>>,
}

impl AnchorFinder for RecordingFinder {
    fn find(
        &self,
        src: &str,
        src_tokens: &tokenizers::Encoding,
        _tgt: &str,
        _tgt_tokens: &tokenizers::Encoding,
    ) -> Option<(TokenSpan, TokenSpan)> {
        self.seen.lock().unwrap().push(src.to_string());
        let first = TokenSpan { start: 1, end: 1 };
        if src.contains("zzz") {
            return None;
        }
        if !src_tokens.get_overflowing().is_empty() {
            let last = src_tokens.len() - 1;
            return Some((
                TokenSpan {
                    start: last,
                    end: last,
                },
                first,
            ));
        }
        Some((first, first))
    }
}

/// Global batches of `batch`, bad lines skipped, anchors required.
fn dropping_config(batch: usize, shuffle: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch,
        seed: 3,
        shuffle,
        skip_bad_lines: true,
        require_anchors: true,
    }
}

/// A loader over [`dropping_corpus`]'s directory `data` (max_len 16), asking `finder` for
/// anchors.
fn dropping_loader(data: &Path, config: LoaderConfig, finder: Arc<RecordingFinder>) -> PairLoader {
    let tok = mlctl::tokenize::Tokenizer::from_file(common::fixture("tiny_bert/tokenizer.json"))
        .unwrap()
        .with_max_len(16)
        .unwrap();
    let corpus = ParallelCorpus::open(CorpusFormat::LineAligned {
        src: data.join("src.txt"),
        tgt: data.join("tgt.txt"),
    })
    .unwrap();
    PairLoader::new(corpus, tok, config)
        .unwrap()
        .with_anchor_finder(finder)
}

fn params(trainer: &Trainer) -> BTreeMap<String, Tensor> {
    trainer
        .model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect()
}

fn metrics(run: &Path) -> Vec<StepRecord> {
    std::fs::read_to_string(run.join(mlctl::train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Trains `steps` updates on `world` ranks sharing the run directory `run` (rank `r > 0`
/// starts from other weights, which the broadcast replaces); returns each rank's parameters,
/// step records and loader state.
fn train_ranks(
    world: usize,
    run: &Path,
    data: &Path,
    batch: usize,
    config: TrainConfig,
    steps: u64,
) -> Vec<(BTreeMap<String, Tensor>, Vec<StepRecord>, LoaderState)> {
    let (run, data) = (run.to_path_buf(), data.to_path_buf());
    run_ranks(world, move |c| {
        let init = 5 + 10 * c.rank() as u64;
        let mut trainer = dp_trainer(&run, &data, batch, config.clone(), init)
            .with_collective(Box::new(c))
            .unwrap();
        let records = (0..steps)
            .map(|_| trainer.train_step().unwrap())
            .collect::<Vec<_>>();
        (params(&trainer), records, loader_state(&trainer.loader))
    })
}

/// How far apart two correct f32 computations of the same few SGD steps may end, relative to
/// the largest distance any parameter moved.
///
/// They differ only in summation order (per-rank partial sums and an all-reduce against one
/// batch's sums; GEMM blocking that depends on the row count; chunked against whole). A sum of
/// `n` f32 terms is off by at most `n·u·Σ|terms|` (`u = 2⁻²⁴`); each gradient element here is a
/// chain of at most about ten such sums of at most 128 terms (8 pairs × 16 tokens; every width
/// is smaller), so two orders differ by at most `10·128·u ≈ 8e-5` of the gradient's scale, and
/// a linear step carries that into the parameters at the same relative size of the step. Later
/// steps see slightly different weights, which the loss's curvature turns into gradient
/// differences of the same relative order. `1e-3` leaves a factor ten for that; a real bug is
/// far above it (one rank's gradient counted twice moves the sum by `1/W` of it, at least 25 %).
const REL_TO_MOVEMENT: f64 = 1e-3;

/// A loader's cursor and counts.
type LoaderState = (LoaderCursor, LoaderStats);

fn loader_state(loader: &PairLoader) -> LoaderState {
    (loader.cursor(), loader.stats())
}

/// `W` ranks end where one process with the same global batch ends: parameters within
/// [`REL_TO_MOVEMENT`] of the largest movement after SGD steps ([`dp_sgd_config`]), and rank 0
/// logs the loss terms and gradient norm one process logs.
fn check_against_one_process(
    world: usize,
    batch: usize,
    grad_accum: usize,
    mini_batch: Option<usize>,
) {
    check_against_one_process_on(world, batch, grad_accum, mini_batch, train_corpus);
}

/// [`check_against_one_process`] on the corpus `corpus` writes into a directory; every rank's
/// loader also ends in the cursor and counts of the one process's.
fn check_against_one_process_on(
    world: usize,
    batch: usize,
    grad_accum: usize,
    mini_batch: Option<usize>,
    corpus: fn(&Path) -> PathBuf,
) {
    const STEPS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let config = dp_sgd_config(STEPS, grad_accum, mini_batch);
    let single_run = dir.path().join("single");
    let mut single = dp_trainer(&single_run, &data, batch, config.clone(), 5);
    let initial = params(&single);
    for _ in 0..STEPS {
        single.train_step().unwrap();
    }
    let expected = params(&single);
    let expected_log = metrics(&single_run);
    let expected_loader = loader_state(&single.loader);
    let moved = largest_diff(&initial, &expected);
    // The clipping binds, and the steps are far above rounding.
    assert!(expected_log[0].grad_norm > 1.0, "{expected_log:?}");
    assert!(moved > 1e-3, "parameters moved by at most {moved:e}");

    let run = dir.path().join("ranks");
    let ranks = train_ranks(world, &run, &data, batch, config, STEPS);
    let mut worst = 0f64;
    for (rank, (got, records, loader)) in ranks.iter().enumerate() {
        assert_eq!(
            loader, &expected_loader,
            "W={world} rank {rank}: loader state"
        );
        assert_eq!(got.len(), expected.len());
        for (name, want) in &expected {
            // The ranks apply the same summed gradients: they stay bit-identical.
            assert_eq!(
                max_abs_diff(&got[name], &ranks[0].0[name]),
                0.0,
                "rank {rank} {name}"
            );
            let diff = max_abs_diff(&got[name], want);
            worst = worst.max(diff);
            assert!(
                diff <= REL_TO_MOVEMENT * moved,
                "W={world} rank {rank} {name}: |Δparam| = {diff:e}, largest movement {moved:e}"
            );
        }
        for (got, want) in records.iter().zip(&expected_log) {
            assert!(!got.skipped && !want.skipped);
            // Scalars summed over the whole batch: relative differences of order n·u.
            let close = |a: f64, b: f64, what: &str| {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "W={world} rank {rank} step {}: {what} {a} vs one process {b}",
                    want.step
                );
            };
            close(got.loss.into(), want.loss.into(), "loss");
            close(
                got.sentence.unwrap().into(),
                want.sentence.unwrap().into(),
                "sentence",
            );
            close(got.mlm.unwrap().into(), want.mlm.unwrap().into(), "mlm");
            close(got.grad_norm, want.grad_norm, "grad norm");
        }
    }
    assert_eq!(metrics(&run).len(), STEPS as usize, "rank 0 alone logs");
    eprintln!(
        "W={world}: largest |Δparam| against one process {worst:e} = {:.2e} of the largest \
         movement {moved:e}",
        worst / moved
    );
}

/// The largest element-wise difference between two parameter sets of the same names.
fn largest_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(name, t)| max_abs_diff(t, &b[name]))
        .fold(0.0, nan_max)
}

#[test]
fn data_parallel_trainer_two_ranks_with_accumulation_match_one_process() {
    check_against_one_process(2, 8, 2, None);
}

#[test]
fn data_parallel_trainer_four_ranks_match_one_process() {
    check_against_one_process(4, 8, 1, None);
}

#[test]
fn data_parallel_trainer_with_cached_loss_matches_one_process() {
    // Shards of 4 in chunks of 2.
    check_against_one_process(2, 8, 1, Some(2));
}

/// Two ranks with a loss scale move as one process without one, on the plain and the cached
/// path: the scaled gradients are summed over the ranks and divided by the scale exactly once.
/// No clipping (it would rescale a gradient 2^10 times too large or too small back to norm 1
/// and hide a missing or doubled unscale) and an update linear in the gradient
/// ([`dp_sgd_config`]). The scale is a power of two, exact in f32, so the ranks differ from the
/// one process only in summation order: [`REL_TO_MOVEMENT`].
#[test]
fn data_parallel_with_a_loss_scale_moves_as_one_unscaled_process() {
    const STEPS: u64 = 3;
    for mini_batch in [None, Some(2)] {
        let dir = tempfile::tempdir().unwrap();
        let data = train_corpus(dir.path());
        let mut config = dp_sgd_config(STEPS, 1, mini_batch);
        config.max_grad_norm = None;
        let mut single = dp_trainer(&dir.path().join("single"), &data, 8, config.clone(), 5)
            .with_loss_scaler(None);
        let initial = params(&single);
        for _ in 0..STEPS {
            single.train_step().unwrap();
        }
        let expected = params(&single);
        let moved = largest_diff(&initial, &expected);
        assert!(moved > 1e-3, "parameters moved by at most {moved:e}");
        let run = dir.path().join("ranks");
        let ranks = run_ranks(2, move |c| {
            let init = 5 + 10 * c.rank() as u64;
            let scaler = LossScaler::new(1024.0).unwrap();
            let mut trainer = dp_trainer(&run, &data, 8, config.clone(), init)
                .with_loss_scaler(Some(scaler))
                .with_collective(Box::new(c))
                .unwrap();
            for _ in 0..STEPS {
                assert!(!trainer.train_step().unwrap().skipped);
            }
            params(&trainer)
        });
        for (rank, got) in ranks.iter().enumerate() {
            for (name, want) in &expected {
                let diff = max_abs_diff(&got[name], want);
                assert!(
                    diff <= REL_TO_MOVEMENT * moved,
                    "{mini_batch:?} rank {rank} {name}: |Δparam| = {diff:e}, moved {moved:e}"
                );
            }
        }
    }
}

/// Every rank reads, tokenizes and masks only its shard of each global batch, from a corpus
/// where the loader drops pairs (no anchor, truncated anchor, bad line) and wraps to a shuffled
/// new epoch: the ranks still train on the one process's batches and masks.
#[test]
fn data_parallel_ranks_loading_their_shards_with_dropped_pairs_match_one_process() {
    let corpus: fn(&Path) -> PathBuf = |dir| dropping_corpus(dir).0;
    check_against_one_process_on(3, 6, 2, None, corpus);
    check_against_one_process_on(2, 6, 1, Some(2), corpus);
}

/// A rank's loader reads and tokenizes only its rows of each global batch ([`RecordingFinder`]
/// records every pair a loader tokenized), and gets them as the same tensors and anchors as
/// those rows of the one process's batch, with the same cursor and counts. The one process's
/// batches are the usable lines in file order. With dropped pairs a rank also reads the few
/// rows that move into its share from another rank's block.
///
/// The loader splits a batch of 7 over 2 or 3 ranks, unevenly (the trainer itself needs a
/// batch divisible by the world size).
#[test]
fn data_parallel_each_rank_reads_and_tokenizes_only_its_rows() {
    const B: usize = 7;
    const BATCHES: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let (data, sources) = dropping_corpus(dir.path());
    // The same lines with nothing dropped.
    let clean = dir.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    let kept: Vec<usize> = (0..DROPPING_LINES).filter(|&i| usable_line(i)).collect();
    for file in ["src.txt", "tgt.txt"] {
        let text = std::fs::read_to_string(data.join(file)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let picked: Vec<&str> = kept.iter().map(|&i| lines[i]).collect();
        std::fs::write(clean.join(file), picked.join("\n") + "\n").unwrap();
    }
    let usable: Vec<String> = kept.iter().map(|&i| sources[i].clone()).collect();
    for (corpus, dropping) in [(&clean, false), (&data, true)] {
        let finder = Arc::new(RecordingFinder::default());
        let mut one = dropping_loader(corpus, dropping_config(B, false), finder.clone());
        let mut expected = Vec::new();
        for b in 0..BATCHES {
            let batch = one.next_batch(&Device::Cpu).unwrap();
            // Independently: the usable lines in file order, wrapping.
            let want: Vec<&str> = (0..B)
                .map(|k| usable[(b * B + k) % usable.len()].as_str())
                .collect();
            let tok = one.tokenizer();
            let encoded = tok.encode_batch(&want, &Device::Cpu).unwrap();
            assert_eq!(
                batch.src.input_ids.to_vec2::<u32>().unwrap(),
                encoded.input_ids.to_vec2::<u32>().unwrap(),
                "batch {b}"
            );
            expected.push((batch, loader_state(&one)));
        }
        let one_seen = finder.seen.lock().unwrap().len();
        if dropping {
            let stats = one.stats();
            assert!(stats.no_anchor > 0 && stats.anchor_truncated > 0 && stats.bad_lines > 0);
        }
        let expected = Arc::new(expected);
        for world in [2, 3] {
            let (corpus, expected) = (corpus.clone(), expected.clone());
            let seen = run_ranks(world, move |c| {
                let finder = Arc::new(RecordingFinder::default());
                let config = dropping_config(B, false);
                let mut loader = dropping_loader(&corpus, config, finder.clone());
                let rows = loader.shard_rows(c.rank(), world).unwrap();
                for (b, (batch, state)) in expected.iter().enumerate() {
                    let shard = loader.next_shard(&c, &Device::Cpu).unwrap();
                    assert_shard_rows(&shard, batch, rows.clone(), (b, c.rank()));
                    assert_eq!(&loader_state(&loader), state, "batch {b} rank {}", c.rank());
                }
                let seen = finder.seen.lock().unwrap().clone();
                (rows, seen)
            });
            let total: usize = seen.iter().map(|(_, s)| s.len()).sum();
            eprintln!(
                "W={world}, dropped pairs {dropping}: pairs tokenized per rank {:?}, one process {one_seen}",
                seen.iter().map(|(_, s)| s.len()).collect::<Vec<_>>()
            );
            for (rank, (rows, seen)) in seen.iter().enumerate() {
                if !dropping {
                    // Exactly its rows, batch after batch.
                    let want: Vec<&str> = (0..BATCHES)
                        .flat_map(|b| rows.clone().map(move |k| b * B + k))
                        .map(|g| usable[g % usable.len()].as_str())
                        .collect();
                    assert_eq!(seen, &want, "W={world} rank {rank}");
                } else {
                    // Its block of every window, and rows that moved in from another block.
                    assert!(
                        seen.len() < one_seen,
                        "W={world} rank {rank}: {}",
                        seen.len()
                    );
                }
            }
            if !dropping {
                assert_eq!(total, one_seen, "W={world}: pairs tokenized twice");
            }
        }
    }
}

/// A bad line (not skipped) fails every rank with the error one process gets, naming the file
/// and line, whichever rank read it.
#[test]
fn data_parallel_a_bad_line_fails_every_rank_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = dropping_corpus(dir.path());
    let config = LoaderConfig {
        skip_bad_lines: false,
        ..dropping_config(6, false)
    };
    let finder = Arc::new(RecordingFinder::default());
    let mut one = dropping_loader(&data, config.clone(), finder);
    // Line 9 (index 8) has an empty target; the first batch ends before it.
    one.next_batch(&Device::Cpu).unwrap();
    let expected = one.next_batch(&Device::Cpu).unwrap_err().to_string();
    assert!(expected.contains("src.txt:9: empty sentence"), "{expected}");
    for world in [2, 3] {
        let (data, config) = (data.clone(), config.clone());
        let errors = run_ranks(world, move |c| {
            let finder = Arc::new(RecordingFinder::default());
            let mut loader = dropping_loader(&data, config.clone(), finder);
            loader.next_shard(&c, &Device::Cpu).unwrap();
            let err = loader.next_shard(&c, &Device::Cpu).unwrap_err();
            assert!(
                matches!(err, Error::Data { .. }),
                "rank {}: {err}",
                c.rank()
            );
            err.to_string()
        });
        for (rank, err) in errors.iter().enumerate() {
            assert_eq!(err, &expected, "W={world} rank {rank}");
        }
    }
}

/// `shard` is rows `rows` of the one process's `batch`: ids, type ids, attention (padded to the
/// whole batch's longest), lengths and anchors.
fn assert_shard_rows(
    shard: &PairBatch,
    batch: &PairBatch,
    rows: std::ops::Range<usize>,
    at: (usize, usize),
) {
    let slice = |t: &Tensor| {
        t.narrow(0, rows.start, rows.len())
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    };
    for (mine, whole) in [(&shard.src, &batch.src), (&shard.tgt, &batch.tgt)] {
        assert_eq!(
            mine.input_ids.to_vec2::<u32>().unwrap(),
            slice(&whole.input_ids),
            "{at:?}"
        );
        assert_eq!(
            mine.token_type_ids.to_vec2::<u32>().unwrap(),
            slice(&whole.token_type_ids),
            "{at:?}"
        );
        assert_eq!(
            mine.attention_mask.to_vec2::<u32>().unwrap(),
            slice(&whole.attention_mask),
            "{at:?}"
        );
        assert_eq!(mine.lengths, whole.lengths[rows.clone()], "{at:?}");
    }
    let anchors = batch.anchors.as_ref().map(|a| a[rows].to_vec());
    assert_eq!(shard.anchors, anchors, "{at:?}");
}

#[test]
fn data_parallel_batch_not_divisible_by_world_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let c = LocalCollective::group(4).unwrap().remove(0);
    let err = dp_trainer(&dir.path().join("run"), &data, 6, dp_config(1, 1, None), 5)
        .with_collective(Box::new(c))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("6 pairs"), "{err}");
    assert!(err.to_string().contains("4 ranks"), "{err}");
}

/// A rank that hangs or dies in the middle of training makes every other rank return a typed
/// error naming it, within the collective's timeout: no rank waits forever.
#[test]
fn data_parallel_a_hung_or_dead_rank_fails_every_rank_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    for hang in [true, false] {
        let start = Instant::now();
        let (run, data) = (dir.path().join(format!("run-{hang}")), data.clone());
        let group = LocalCollective::group_with_timeout(3, Duration::from_secs(2)).unwrap();
        let results = run_threads(group, HANG, move |c| {
            let rank = c.rank();
            let mut trainer = dp_trainer(&run, &data, 6, dp_config(3, 1, None), 5)
                .with_collective(Box::new(c))
                .unwrap();
            trainer.train_step().unwrap();
            if rank == 2 {
                if !hang {
                    return "dropped".to_string(); // dies: its handle goes with it
                }
                thread::sleep(Duration::from_secs(4)); // hangs past the timeout
            }
            trainer.train_step().unwrap_err().to_string()
        });
        let waited = start.elapsed();
        for (rank, err) in results.iter().enumerate().take(2) {
            assert!(
                err.contains("distributed") && err.contains("rank"),
                "rank {rank}: {err}"
            );
            assert!(err.contains("2"), "rank {rank} is told which rank: {err}");
        }
        if hang {
            assert!(results[0].contains("timed out"), "{}", results[0]);
            assert!(
                results[2].contains("timed out"),
                "the hung rank is told too: {}",
                results[2]
            );
        }
        assert!(waited < Duration::from_secs(20), "took {waited:?}");
    }
}

/// Ranks started with different seeds, training different parameters or with another training
/// configuration are refused on every rank before anything else crosses, naming the field.
#[test]
fn data_parallel_ranks_that_differ_in_seed_parameters_or_configuration_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let root = dir.path().to_path_buf();
    for (field, differ) in [
        (
            "seed",
            TrainConfig {
                seed: 1,
                ..dp_config(2, 1, None)
            },
        ),
        (
            "trained parameters",
            TrainConfig {
                freeze_embeddings: true,
                ..dp_config(2, 1, None)
            },
        ),
        (
            "training configuration",
            TrainConfig {
                max_grad_norm: Some(2.0),
                ..dp_config(2, 1, None)
            },
        ),
    ] {
        let (root, data) = (root.clone(), data.clone());
        let errors = run_ranks(2, move |c| {
            // The common `seed + rank` habit, or a rank started with other options.
            let config = match c.rank() {
                0 => dp_config(2, 1, None),
                _ => differ.clone(),
            };
            dp_trainer(&root.join("run"), &data, 4, config, 5)
                .with_collective(Box::new(c))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        });
        for (rank, err) in errors.iter().enumerate() {
            assert!(
                err.contains(field) && err.contains("rank 1"),
                "rank {rank}: {err}"
            );
        }
    }
}

/// Ranks whose loaders would draw other batches (here: rank 1's loader seeded differently)
/// are refused on every rank: their shards would not make up one global batch.
#[test]
fn data_parallel_ranks_that_differ_in_data_order_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let root = dir.path().to_path_buf();
    let errors = run_ranks(2, move |c| {
        let loader = common::tsv_loader(&data, 4, 16, 3 + c.rank() as u64);
        let model = common::tiny_model(5);
        let config = dp_config(2, 1, None);
        Trainer::new(
            model,
            MultiLevelLoss::mlctl(),
            loader,
            config,
            &root.join("run"),
        )
        .unwrap()
        .with_collective(Box::new(c))
        .map(|_| ())
        .unwrap_err()
        .to_string()
    });
    for (rank, err) in errors.iter().enumerate() {
        assert!(
            err.contains("data order") && err.contains("rank 1"),
            "rank {rank}: {err}"
        );
    }
}

/// A one-step checkpoint (trainer seeded `init`) in `run`; returns its directory.
fn one_step_checkpoint(run: &Path, data: &Path, init: u64) -> PathBuf {
    let mut single = dp_trainer(run, data, 4, dp_config(2, 1, None), init);
    single.train_step().unwrap();
    single.save_checkpoint().unwrap()
}

/// Two ranks resuming, each from its node-local `root/run-{rank}` (which may hold no
/// checkpoint): each rank's error.
fn resume_errors_from_node_local_runs(root: &Path, data: &Path) -> Vec<String> {
    let (root, data) = (root.to_path_buf(), data.to_path_buf());
    run_ranks(2, move |c| {
        let run = root.join(format!("run-{}", c.rank()));
        let mut trainer = dp_trainer(&run, &data, 4, dp_config(2, 1, None), 5)
            .with_collective(Box::new(c))
            .unwrap();
        trainer.resume().unwrap_err().to_string()
    })
}

/// The agreed checkpoint fails to load on rank 1 only (copies without checksums, as written
/// before checksums existed, rank 1's optimizer file truncated): every rank stops, rank 1 with
/// its own error, rank 0 instead of training on alone.
#[test]
fn data_parallel_resume_that_fails_to_load_on_one_rank_is_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    for rank in 0..2 {
        // The same seed and data: the same checkpoint on both "nodes".
        let run = dir.path().join(format!("run-{rank}"));
        let checkpoint = one_step_checkpoint(&run, &data, 5);
        std::fs::remove_file(checkpoint.join("checksums.json")).unwrap();
        if rank == 1 {
            let optimizer = checkpoint.join("optimizer.safetensors");
            let bytes = std::fs::read(&optimizer).unwrap();
            std::fs::write(&optimizer, &bytes[..bytes.len() / 2]).unwrap();
        }
    }
    let errors = resume_errors_from_node_local_runs(dir.path(), &data);
    assert!(errors[1].contains("optimizer.safetensors"), "{}", errors[1]);
    assert!(
        errors[0].contains("checkpoint loaded") && errors[0].contains("rank 1 has 0"),
        "{}",
        errors[0]
    );
}

/// A shared run directory whose newest checkpoint is damaged: every rank skips it alike and
/// resumes from the older, whole one.
#[test]
fn data_parallel_ranks_skip_a_damaged_newest_checkpoint_alike() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let run = dir.path().join("run");
    let mut single = dp_trainer(&run, &data, 4, dp_config(3, 1, None), 5);
    single.train_step().unwrap();
    single.save_checkpoint().unwrap();
    single.train_step().unwrap();
    let newest = single.save_checkpoint().unwrap();
    let model = newest.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() - 100]).unwrap();
    let steps = run_ranks(2, move |c| {
        let mut trainer = dp_trainer(&run, &data, 4, dp_config(3, 1, None), 5)
            .with_collective(Box::new(c))
            .unwrap();
        trainer.resume().unwrap()
    });
    assert_eq!(steps, vec![Some(1), Some(1)]);
}

/// A resume where rank 1 sees no checkpoint (a node-local run directory) is refused on every
/// rank: it would train other weights with the same collectives.
#[test]
fn data_parallel_resume_that_only_rank_zero_can_see_is_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    one_step_checkpoint(&dir.path().join("run-0"), &data, 5);
    let errors = resume_errors_from_node_local_runs(dir.path(), &data);
    for (rank, err) in errors.iter().enumerate() {
        assert!(
            err.contains("checkpoint to resume from") && err.contains("rank 0 has 1"),
            "rank {rank}: {err}"
        );
    }
}

/// Two node-local run directories that both hold a checkpoint of step 1, from runs that drew
/// different data: the same step, other weights. Resuming is refused on every rank.
#[test]
fn data_parallel_resume_from_checkpoints_that_differ_is_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    for (rank, seed) in [(0usize, 5u64), (1, 6)] {
        one_step_checkpoint(&dir.path().join(format!("run-{rank}")), &data, seed);
    }
    let errors = resume_errors_from_node_local_runs(dir.path(), &data);
    for (rank, err) in errors.iter().enumerate() {
        assert!(err.contains("checkpoint contents"), "rank {rank}: {err}");
    }
}

#[test]
fn data_parallel_only_rank_zero_writes_the_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let root = dir.path().to_path_buf();
    let summaries = run_ranks(2, move |c| {
        // Each rank gets its own directory here, to see which ones are written.
        let run = root.join(format!("run-{}", c.rank()));
        let config = TrainConfig {
            checkpoint_every: 1,
            ..dp_config(2, 1, None)
        };
        let mut trainer = dp_trainer(&run, &data, 4, config, 5)
            .with_collective(Box::new(c))
            .unwrap();
        trainer.run().unwrap()
    });
    assert!(
        !dir.path().join("run-1").exists(),
        "rank 1 wrote its run directory"
    );
    let run0 = dir.path().join("run-0");
    assert_eq!(metrics(&run0).len(), 2);
    let checkpoints = mlctl::train::list_checkpoints(&run0.join("checkpoints")).unwrap();
    assert_eq!(checkpoints.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(summaries[0].checkpoint.as_ref(), Some(&checkpoints[1].1));
    assert_eq!(summaries[0].steps, 2);
    assert_eq!(summaries[1].steps, 2);
}

#[test]
fn data_parallel_resume_is_bit_exact() {
    const WORLD: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let config = TrainConfig {
        checkpoint_every: 2,
        ..dp_config(4, 2, None)
    };
    let straight = train_ranks(
        WORLD,
        &dir.path().join("straight"),
        &data,
        4,
        config.clone(),
        4,
    );

    // Two updates and the checkpoint at step 2, a third lost with the processes; then every
    // rank resumes from the one run directory, from other initial weights.
    let run = dir.path().join("interrupted");
    let (r, d, cfg) = (run.clone(), data.clone(), config.clone());
    run_ranks(WORLD, move |c| {
        let mut trainer = dp_trainer(&r, &d, 4, cfg.clone(), 5)
            .with_collective(Box::new(c))
            .unwrap();
        for _ in 0..2 {
            trainer.train_step().unwrap();
        }
        trainer.save_checkpoint().unwrap();
        trainer.train_step().unwrap();
    });
    let (r, d) = (run.clone(), data.clone());
    let resumed = run_ranks(WORLD, move |c| {
        let init = 77 + c.rank() as u64;
        let mut trainer = dp_trainer(&r, &d, 4, config.clone(), init)
            .with_collective(Box::new(c))
            .unwrap();
        assert_eq!(trainer.resume().unwrap(), Some(2));
        trainer.run().unwrap();
        params(&trainer)
    });
    for (rank, got) in resumed.iter().enumerate() {
        for (name, want) in &straight[rank].0 {
            assert_eq!(max_abs_diff(&got[name], want), 0.0, "rank {rank} {name}");
        }
    }
    let steps: Vec<u64> = metrics(&run).iter().map(|r| r.step).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

#[test]
fn data_parallel_non_finite_loss_on_one_rank_skips_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let results = run_ranks(2, move |c| {
        let rank = c.rank();
        let mut trainer = dp_trainer(&dir.path().join("run"), &data, 4, dp_config(3, 1, None), 5)
            .with_collective(Box::new(c))
            .unwrap();
        let first = trainer.train_step().unwrap();
        let before = params(&trainer);
        // Rank 1's MLM head turns NaN for one step: only its local MLM term is non-finite
        // (the contrastive terms, computed from the encoder, stay finite on rank 0).
        let vars = trainer.model.named_vars();
        let (name, bias) = vars
            .iter()
            .find(|(n, _)| n.starts_with("cls.predictions") && n.ends_with("bias"))
            .expect("an MLM head bias");
        let saved = bias.as_tensor().copy().unwrap();
        if rank == 1 {
            bias.set(&(&saved * f64::NAN).unwrap()).unwrap();
        }
        let second = trainer.train_step().unwrap();
        bias.set(&saved).unwrap();
        let after = params(&trainer);
        let third = trainer.train_step().unwrap();
        (name.clone(), first, second, third, before, after)
    });
    for (rank, (name, first, second, third, before, after)) in results.iter().enumerate() {
        assert!(!first.skipped && !third.skipped, "rank {rank}");
        assert!(
            second.skipped,
            "rank {rank} did not skip step 2 ({name} NaN on rank 1)"
        );
        assert!(!second.loss.is_finite(), "rank {rank} logs {}", second.loss);
        for (n, t) in before {
            assert_eq!(max_abs_diff(t, &after[n]), 0.0, "rank {rank}: {n} moved");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The loss-level rule, with a learnable temperature and the word level.

/// Rows `start..start + len` of a token batch (written here, independently of the crate's).
fn token_rows(
    t: &mlctl::tokenize::TokenBatch,
    start: usize,
    len: usize,
) -> mlctl::tokenize::TokenBatch {
    let rows = start..start + len;
    mlctl::tokenize::TokenBatch {
        input_ids: t.input_ids.narrow(0, start, len).unwrap(),
        token_type_ids: t.token_type_ids.narrow(0, start, len).unwrap(),
        attention_mask: t.attention_mask.narrow(0, start, len).unwrap(),
        offsets: t.offsets[rows.clone()].to_vec(),
        word_ids: t.word_ids[rows.clone()].to_vec(),
        special_tokens_mask: t.special_tokens_mask[rows.clone()].to_vec(),
        lengths: t.lengths[rows].to_vec(),
    }
}

/// The masked tokens of rows `start..start + len`, positions relative to those rows.
fn masked_token_rows(
    m: &mlctl::data::MaskedTokens,
    seq_len: usize,
    start: usize,
    len: usize,
) -> mlctl::data::MaskedTokens {
    let (lo, hi) = ((start * seq_len) as u32, ((start + len) * seq_len) as u32);
    let positions: Vec<u32> = m.positions.to_vec1().unwrap();
    let targets: Vec<u32> = m.targets.to_vec1().unwrap();
    let (p, t): (Vec<u32>, Vec<u32>) = positions
        .into_iter()
        .zip(targets)
        .filter(|(p, _)| (lo..hi).contains(p))
        .map(|(p, t)| (p - lo, t))
        .unzip();
    let n = p.len();
    mlctl::data::MaskedTokens {
        input_ids: m.input_ids.narrow(0, start, len).unwrap(),
        positions: Tensor::from_vec(p, n, &Device::Cpu).unwrap(),
        targets: Tensor::from_vec(t, n, &Device::Cpu).unwrap(),
    }
}

#[test]
fn data_parallel_rank_gradients_sum_to_one_process_with_learnable_temperatures() {
    use mlctl::data::{MaskKey, MlmMasking};
    use mlctl::loss::{MaskedPair, RankShard};
    const WORLD: usize = 2;
    const B: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let mut loader = common::tsv_loader(&data, B, 16, 3);
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    let masking = MlmMasking::for_tokenizer(loader.tokenizer()).unwrap();
    let masked = MaskedPair::draw(&masking, &batch, MaskKey::new(8, 0)).unwrap();
    assert!(!masked.src.is_empty() && !masked.tgt.is_empty());

    // Both contrastive levels, each with its own learnable temperature, and MLM.
    let setup = || {
        let model = common::tiny_model(5);
        model.encoder().dropout_rng().reseed(17);
        let theta = Var::new(&[(1.0f32 / 0.07).ln()], &Device::Cpu).unwrap();
        let phi = Var::new(&[(1.0f32 / 0.1).ln()], &Device::Cpu).unwrap();
        let objective = MultiLevelLoss::mlctl()
            .with_sentence(Some(
                CzNce::new().with_learnable_log_scale(theta.as_tensor().clone()),
            ))
            .with_word(Some(
                CzNce::new().with_learnable_log_scale(phi.as_tensor().clone()),
            ));
        let mut vars = model.named_vars();
        vars.insert("theta".into(), theta);
        vars.insert("phi".into(), phi);
        (model, objective, vars)
    };
    let grads_of = |loss: &Tensor, vars: &BTreeMap<String, Var>| {
        let store = loss.backward().unwrap();
        vars.iter()
            .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
            .collect::<BTreeMap<_, _>>()
    };

    let (model, objective, vars) = setup();
    let single = objective
        .forward(&model, &batch, Some(&masked), true)
        .unwrap();
    let expected = grads_of(&single.total, &vars);
    // Without dropout, the reference of the cached evaluation.
    let single_eval = objective
        .forward(&model, &batch, Some(&masked), false)
        .unwrap();
    let expected_eval = grads_of(&single_eval.total, &vars);
    assert!(expected.contains_key("theta") && expected.contains_key("phi"));
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    let expected_mlm = scalar(single.mlm.as_ref().unwrap());

    let ranks = run_ranks(WORLD, move |c| {
        let (model, objective, vars) = setup();
        let rows = B / WORLD;
        let start = c.rank() * rows;
        let local = mlctl::data::PairBatch {
            src: token_rows(&batch.src, start, rows),
            tgt: token_rows(&batch.tgt, start, rows),
            anchors: batch
                .anchors
                .as_ref()
                .map(|a| a[start..start + rows].to_vec()),
        };
        let seq = |t: &mlctl::tokenize::TokenBatch| t.input_ids.dims2().unwrap().1;
        let local_masked = MaskedPair {
            src: masked_token_rows(&masked.src, seq(&batch.src), start, rows),
            tgt: masked_token_rows(&masked.tgt, seq(&batch.tgt), start, rows),
        };
        let shard = RankShard {
            collective: &c,
            sample_offset: start as u64,
            global_masked: (masked.src.len(), masked.tgt.len()),
        };
        let terms = objective
            .forward_rank(&model, &local, Some(&local_masked), &shard, true)
            .unwrap();
        let grads = grads_of(&terms.total, &vars);
        let layout = GradLayout::new(&vars).unwrap();
        let reduced = layout.all_reduce(&c, &grads, true).unwrap();
        // The cached evaluation in chunks of 3 (a smaller last chunk), without dropout.
        let named: Vec<(String, Var)> = vars.clone().into_iter().collect();
        let cached = mlctl::loss::CachedLoss::new(objective.clone(), 3)
            .unwrap()
            .forward_backward_rank(&model, &local, Some(&local_masked), &named, None, &shard)
            .unwrap();
        let cached = layout.all_reduce(&c, &cached.grads, true).unwrap();
        let mlm_part = scalar(terms.mlm.as_ref().unwrap());
        let mlm = c
            .all_reduce_sum(&Tensor::new(&[mlm_part], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        (
            reduced.grads,
            scalar(terms.sentence.as_ref().unwrap()),
            mlm,
            cached.grads,
        )
    });
    let expected_sentence = scalar(single.sentence.as_ref().unwrap());
    let check = |what: &str,
                 rank: usize,
                 got: &BTreeMap<String, Tensor>,
                 expected: &BTreeMap<String, Tensor>| {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        for (name, want) in expected {
            // Gradients before any optimizer, relative to each tensor's largest element (at
            // least 1): one process and the ranks sum at most 12 pairs × 16 tokens of f32
            // contributions in another order, about √n·u ≈ 1e-6 of the terms' scale.
            let diff = max_abs_diff(&got[name], want);
            let scale = max_abs_diff(want, &want.zeros_like().unwrap()).max(1.0);
            assert!(
                diff <= 1e-5 * scale,
                "{what} rank {rank} {name}: |Δgrad| = {diff:e}"
            );
        }
    };
    for (rank, (grads, sentence, mlm, cached)) in ranks.iter().enumerate() {
        assert!(
            (sentence - expected_sentence).abs() < 1e-5,
            "rank {rank}: {sentence}"
        );
        assert!(
            (mlm - expected_mlm).abs() < 1e-5,
            "rank {rank}: {mlm} vs {expected_mlm}"
        );
        check("forward_rank", rank, grads, &expected);
        check("cached", rank, cached, &expected_eval);
    }
}

#[test]
fn data_parallel_one_rank_is_bit_identical_to_no_collective() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    for mini_batch in [None, Some(3)] {
        let config = dp_config(2, 2, mini_batch);
        let mut single = dp_trainer(&dir.path().join("single"), &data, 4, config.clone(), 5);
        let c = LocalCollective::group(1).unwrap().remove(0);
        let mut one_rank = dp_trainer(&dir.path().join("rank"), &data, 4, config, 5)
            .with_collective(Box::new(c))
            .unwrap();
        for _ in 0..2 {
            single.train_step().unwrap();
            one_rank.train_step().unwrap();
        }
        let (a, b) = (params(&single), params(&one_rank));
        for (name, t) in &a {
            assert_eq!(max_abs_diff(t, &b[name]), 0.0, "{mini_batch:?} {name}");
        }
    }
}

/// A trainer can be built on one thread and moved to the thread of its rank.
#[test]
fn data_parallel_trainer_is_send() {
    fn send<T: Send>() {}
    send::<Trainer>();
}

/// Without the `nccl` feature, asking for several ranks is an error that says what is missing,
/// before any process starts; zero ranks is an invalid argument in every build.
#[test]
fn data_parallel_launcher_errors() {
    let err = mlctl::dist::launch_local_ranks(0).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    #[cfg(not(feature = "nccl"))]
    {
        let err = mlctl::dist::launch_local_ranks(2).unwrap_err();
        assert!(matches!(err, Error::Distributed(_)), "{err}");
        assert!(err.to_string().contains("`nccl` feature"), "{err}");
        let Err(err) = mlctl::dist::join_ranks(&local_env(1, 2, 1), HANG) else {
            panic!("joined without NCCL");
        };
        assert!(matches!(err, Error::Distributed(_)), "{err}");
        assert!(err.to_string().contains("rank 1 of 2"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The trainer's ranks over NCCL, on CUDA devices (run by hand on a GPU machine:
// `cargo test --features nccl --test it data_parallel::data_parallel_nccl_ -- --ignored`).

/// [`dp_trainer`] on `dev`: the tiny model built there, then given the CPU tiny model's
/// weights of seed `init` (so every device starts from the same numbers whatever its RNG).
#[cfg(feature = "nccl")]
fn dp_trainer_on(
    dev: &Device,
    run: &Path,
    data: &Path,
    batch: usize,
    config: TrainConfig,
    init: u64,
) -> Trainer {
    use mlctl::encoder::BertConfig;
    use mlctl::pretrained::PretrainedBert;
    let cfg = BertConfig::from_file(common::fixture("tiny_bert/config.json")).unwrap();
    let tok =
        mlctl::tokenize::Tokenizer::from_file(common::fixture("tiny_bert/tokenizer.json")).unwrap();
    let bert = PretrainedBert::from_config(cfg, Some(tok), dev, DType::F32, init).unwrap();
    let model = mlctl::model::MlCtlModel::new(bert, Default::default(), init).unwrap();
    let cpu = common::tiny_model(init).named_vars();
    let vars = model.named_vars();
    assert_eq!(
        vars.keys().collect::<Vec<_>>(),
        cpu.keys().collect::<Vec<_>>()
    );
    for (name, var) in &vars {
        var.set(&cpu[name].as_tensor().to_device(dev).unwrap())
            .unwrap();
    }
    Trainer::new(
        model,
        MultiLevelLoss::mlctl(),
        common::tsv_loader(data, batch, 16, 3),
        config,
        run,
    )
    .unwrap()
}

/// [`params`] copied to the CPU.
#[cfg(feature = "nccl")]
fn cpu_params(trainer: &Trainer) -> BTreeMap<String, Tensor> {
    params(trainer)
        .into_iter()
        .map(|(n, t)| (n, t.to_device(&Device::Cpu).unwrap()))
        .collect()
}

/// Parameters of `b` within `tol` of `a`'s; returns the largest difference.
#[cfg(feature = "nccl")]
fn assert_params_close(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    tol: f64,
    what: &str,
) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (name, want) in a {
        let diff = max_abs_diff(&b[name], want);
        worst = worst.max(diff);
        assert!(diff <= tol, "{what} {name}: |Δparam| = {diff:e}");
    }
    worst
}

/// One NCCL rank on cuda:0 trains as a trainer without a collective on cuda:0 does, with
/// and without the cached loss.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn data_parallel_nccl_one_rank_trainer_matches_no_collective() {
    use mlctl::dist::NcclCollective;
    let dev = Device::new_cuda(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    for (i, mini_batch) in [None, Some(3)].into_iter().enumerate() {
        const STEPS: u64 = 2;
        let config = dp_sgd_config(STEPS, 2, mini_batch);
        let run = |name: &str| dir.path().join(format!("{name}-{i}"));
        let mut single = dp_trainer_on(&dev, &run("single"), &data, 6, config.clone(), 5);
        let initial = cpu_params(&single);
        let c = NcclCollective::new(&dev, &local_env(0, 1, free_port()), HANG).unwrap();
        let mut one_rank = dp_trainer_on(&dev, &run("rank"), &data, 6, config, 5)
            .with_collective(Box::new(c))
            .unwrap();
        assert_eq!(one_rank.rank_and_world(), (0, 1));
        for _ in 0..STEPS {
            let (a, b) = (single.train_step().unwrap(), one_rank.train_step().unwrap());
            assert!(!a.skipped && !b.skipped);
            assert!(
                (a.loss - b.loss).abs() <= 1e-5,
                "{mini_batch:?}: {a:?} vs {b:?}"
            );
        }
        let expected = cpu_params(&single);
        let moved = largest_diff(&initial, &expected);
        assert!(moved > 1e-3, "parameters moved by at most {moved:e}");
        let worst = assert_params_close(
            &expected,
            &cpu_params(&one_rank),
            REL_TO_MOVEMENT * moved,
            &format!("{mini_batch:?}"),
        );
        eprintln!("mini_batch {mini_batch:?}: largest |Δparam| {worst:e}");
    }
}

/// Every visible GPU (at least two, at most eight) as a rank on its own thread, each with its
/// own device and NCCL communicator, ends where one process on cuda:0 with the same global
/// batch ends; the ranks stay bit-identical.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs two or more CUDA GPUs and NCCL (fails below two)"]
fn data_parallel_nccl_trainer_threads_match_one_process() {
    use candle_core::cuda::cudarc::driver::CudaContext;
    use mlctl::dist::NcclCollective;
    let gpus = CudaContext::device_count().unwrap() as usize;
    if gpus < 2 {
        panic!(
            "data_parallel_nccl_trainer_threads_match_one_process needs at least two GPUs, \
             found {gpus}"
        );
    }
    let world = gpus.min(8);
    const STEPS: u64 = 3;
    let batch = 2 * world;
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let config = dp_sgd_config(STEPS, 1, None);
    let dev0 = Device::new_cuda(0).unwrap();
    let mut single = dp_trainer_on(
        &dev0,
        &dir.path().join("single"),
        &data,
        batch,
        config.clone(),
        5,
    );
    let initial = cpu_params(&single);
    for _ in 0..STEPS {
        single.train_step().unwrap();
    }
    let expected = cpu_params(&single);
    let moved = largest_diff(&initial, &expected);
    assert!(moved > 1e-3, "parameters moved by at most {moved:e}");
    drop(single);

    let port = free_port();
    let (run, data) = (dir.path().join("ranks"), data.clone());
    let ranks = run_threads(
        (0..world).collect(),
        Duration::from_secs(300),
        move |rank| {
            let dev = Device::new_cuda(rank).unwrap();
            let c = NcclCollective::new(&dev, &local_env(rank, world, port), HANG).unwrap();
            // Ranks above 0 start elsewhere: the broadcast of rank 0's weights must replace them.
            let init = 5 + 10 * rank as u64;
            let mut trainer = dp_trainer_on(&dev, &run, &data, batch, config.clone(), init)
                .with_collective(Box::new(c))
                .unwrap();
            for _ in 0..STEPS {
                assert!(!trainer.train_step().unwrap().skipped);
            }
            cpu_params(&trainer)
        },
    );
    for (rank, got) in ranks.iter().enumerate() {
        for (name, t) in got {
            // The ranks apply the same summed gradients: they stay bit-identical.
            assert_eq!(max_abs_diff(t, &ranks[0][name]), 0.0, "rank {rank} {name}");
        }
        let worst = assert_params_close(
            &expected,
            got,
            REL_TO_MOVEMENT * moved,
            &format!("W={world} rank {rank}"),
        );
        eprintln!("W={world} rank {rank}: largest |Δparam| against one process {worst:e}");
    }
}

/// With a weighted word term, the loss rank 0 logs is the one process's: the ranks rebuild the
/// total from the reduced terms, and must weigh the word term as the objective does.
#[test]
fn data_parallel_logs_the_weighted_word_term_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = train_corpus(dir.path());
    let objective = MultiLevelLoss::mlctl()
        .with_word(Some(CzNce::new().with_temperature(0.1)))
        .with_word_weight(0.25);
    let config = dp_sgd_config(1, 1, None);
    let trainer = move |run: &Path, init: u64| {
        let loader = common::tsv_loader(&data, 8, 16, 3);
        let model = common::tiny_model(init);
        Trainer::new(model, objective.clone(), loader, config.clone(), run).unwrap()
    };
    let want = trainer(&dir.path().join("single"), 5).train_step().unwrap();
    let run = dir.path().join("ranks");
    let got = run_ranks(2, move |c| {
        let init = 5 + 10 * c.rank() as u64;
        let mut t = trainer(&run, init).with_collective(Box::new(c)).unwrap();
        t.train_step().unwrap()
    });
    let (sentence, word, mlm) = (
        want.sentence.unwrap(),
        want.word.unwrap(),
        want.mlm.unwrap(),
    );
    // The reference is built from the logged terms, not from the trainer's total.
    let total = sentence + 0.25 * word + 0.1 * mlm;
    assert!((want.loss - total).abs() <= 1e-5 * total.abs(), "{want:?}");
    for (rank, got) in got.iter().enumerate() {
        // Scalars summed over the whole batch: relative differences of order n·u.
        assert!(
            (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
            "rank {rank}: loss {} vs one process {}",
            got.loss,
            want.loss
        );
    }
}
