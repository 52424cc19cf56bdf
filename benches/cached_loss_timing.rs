//! Time per update and peak memory of the cached loss (`TrainConfig::mini_batch`, GradCache)
//! against the whole batch in one graph, on the embedded default of `pretrain_xnli`.
//!
//! ```text
//! cargo bench --bench cached_loss_timing -- [--reps 3]
//! ```
//!
//! The model is `pretrain_xnli`'s embedded default: BERT with 4 layers, H 128, 4 heads, FFN
//! 512, the shipped 8000-entry WordPiece vocabulary, max_len 32, random weights, trained with
//! ML-CTL's objective (`MultiLevelLoss::mlctl()`: sentence CZ-NCE at t = 0.07 on the
//! head with concatenated words, MLM with weight 0.1) by Adam at
//! lr 1e-3 with clipping at 1.0. The pairs are the embedded Tatoeba sets (all 1000 lines of
//! each language) that have a dictionary anchor.
//!
//! Configurations: B = 1024 cached in mini-batches of 32, B = 1024 in one graph, B = 32 in one
//! graph. Each runs in its own process (this program, re-run with `MLCTL_CACHED_LOSS_CONFIG`
//! set), so that its peak resident memory (`VmHWM`) is its own: one warm-up update, then
//! `reps` timed updates (wall clock, loading the batch included). The table prints the median
//! time per update, the peak RSS, the peak minus the RSS before the first update (what
//! training adds to the model, the optimizer-free setup and the data), and the ratios of the
//! cached run to the uncached one at the same batch.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device};
use mlctl::align::Lexicon;
use mlctl::data::{CorpusFormat, LoaderConfig, PairLoader, ParallelCorpus};
use mlctl::encoder::BertConfig;
use mlctl::loss::MultiLevelLoss;
use mlctl::model::{HeadConfig, MlCtlModel};
use mlctl::pretrain::{write_anchored_tsv, ParallelSet};
use mlctl::pretrained::PretrainedBert;
use mlctl::tokenize::Tokenizer;
use mlctl::train::{LrSchedule, TrainConfig, Trainer};

const TATOEBA: [(&str, &str, &str, &str); 5] = [
    (
        "ara",
        "ar",
        include_str!("../data/tatoeba/tatoeba.ara-eng.ara"),
        include_str!("../data/tatoeba/tatoeba.ara-eng.eng"),
    ),
    (
        "cmn",
        "zh",
        include_str!("../data/tatoeba/tatoeba.cmn-eng.cmn"),
        include_str!("../data/tatoeba/tatoeba.cmn-eng.eng"),
    ),
    (
        "fra",
        "fr",
        include_str!("../data/tatoeba/tatoeba.fra-eng.fra"),
        include_str!("../data/tatoeba/tatoeba.fra-eng.eng"),
    ),
    (
        "rus",
        "ru",
        include_str!("../data/tatoeba/tatoeba.rus-eng.rus"),
        include_str!("../data/tatoeba/tatoeba.rus-eng.eng"),
    ),
    (
        "spa",
        "es",
        include_str!("../data/tatoeba/tatoeba.spa-eng.spa"),
        include_str!("../data/tatoeba/tatoeba.spa-eng.eng"),
    ),
];
const TOKENIZER: &str = include_str!("../data/tokenizer/wordpiece-8000.json");
const MAX_LEN: usize = 32;
const SEED: u64 = 0;
/// Selects one configuration in a child process: `<batch>` or `<batch>/<mini_batch>`.
const CONFIG_VAR: &str = "MLCTL_CACHED_LOSS_CONFIG";

/// `(global batch, mini_batch)` of each configuration, in table order.
const CONFIGS: [(usize, Option<usize>); 3] = [(1024, Some(32)), (1024, None), (32, None)];

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A field of `/proc/self/status` in KiB (`VmHWM`: peak RSS, `VmRSS`: current); 0 where
/// unavailable.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn trainer(
    batch: usize,
    mini_batch: Option<usize>,
    steps: u64,
    dir: &std::path::Path,
) -> Result<Trainer> {
    let device = Device::Cpu;
    let parsed = TOKENIZER
        .parse()
        .map_err(|e| format!("embedded tokenizer: {e}"))?;
    let tokenizer = Tokenizer::new(parsed)?;
    let config = BertConfig {
        vocab_size: tokenizer.vocab_size(),
        hidden_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 512,
        max_position_embeddings: 128,
        ..BertConfig::default()
    };
    let bert = PretrainedBert::from_config(config, Some(tokenizer), &device, DType::F32, SEED)?;
    let head = HeadConfig {
        concat_word: true,
        ..HeadConfig::default()
    };
    let model = MlCtlModel::new(bert, head, SEED)?;
    let tokenizer = model.bert.tokenizer()?.clone().with_max_len(MAX_LEN)?;

    let lines = |t: &str| t.lines().map(|l| l.trim().to_string()).collect::<Vec<_>>();
    let sets = TATOEBA
        .iter()
        .map(|(lang, lex, text, eng)| {
            ParallelSet::new(format!("{lang}-eng"), *lex, "en", lines(text), lines(eng))
        })
        .collect::<mlctl::Result<Vec<_>>>()?;
    let tsv = dir.join("train.tsv");
    let written = write_anchored_tsv(&tsv, &sets, &Lexicon::embedded(), &tokenizer)?;
    if written < batch {
        return Err(format!("{written} anchored pairs, fewer than a batch of {batch}").into());
    }
    let loader = PairLoader::new(
        ParallelCorpus::open(CorpusFormat::ReferenceTsv(tsv))?,
        tokenizer,
        LoaderConfig {
            batch_size: batch,
            seed: SEED,
            shuffle: true,
            skip_bad_lines: false,
            require_anchors: true,
        },
    )?;
    let recipe = TrainConfig::adam_linear_clipped(steps);
    let config = TrainConfig {
        schedule: LrSchedule {
            peak_lr: 1e-3,
            ..recipe.schedule
        },
        mini_batch,
        progress: false,
        ..recipe
    };
    Ok(Trainer::new(
        model,
        MultiLevelLoss::mlctl(),
        loader,
        config,
        &dir.join("run"),
    )?)
}

/// The child: one configuration; prints `RESULT <median ms> <min ms> <peak KiB> <base KiB>`.
fn child(spec: &str, reps: usize) -> Result<()> {
    let (batch, mini_batch) = match spec.split_once('/') {
        Some((b, m)) => (b.parse()?, Some(m.parse()?)),
        None => (spec.parse()?, None),
    };
    let dir = tempfile::tempdir()?;
    let mut trainer = trainer(batch, mini_batch, reps as u64 + 1, dir.path())?;
    let base = status_kib("VmRSS");
    let warm = trainer.train_step()?;
    if warm.skipped || !warm.loss.is_finite() {
        return Err(format!("the warm-up update was skipped (loss {})", warm.loss).into());
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        trainer.train_step()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN timings"));
    println!(
        "RESULT {} {} {} {}",
        ms[ms.len() / 2],
        ms[0],
        status_kib("VmHWM"),
        base
    );
    Ok(())
}

struct Row {
    batch: usize,
    mini_batch: Option<usize>,
    median_ms: f64,
    min_ms: f64,
    peak_kib: f64,
    base_kib: f64,
}

fn run_config(batch: usize, mini_batch: Option<usize>, reps: usize) -> Result<Row> {
    let spec = match mini_batch {
        Some(m) => format!("{batch}/{m}"),
        None => batch.to_string(),
    };
    let out = Command::new(std::env::current_exe()?)
        .args(["--reps", &reps.to_string()])
        .env(CONFIG_VAR, &spec)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "configuration {spec} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("configuration {spec} printed no result: {stdout}"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    Ok(Row {
        batch,
        mini_batch,
        median_ms: v[0],
        min_ms: v[1],
        peak_kib: v[2],
        base_kib: v[3],
    })
}

fn main() -> Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(3), |v| v.parse())?;
    if reps == 0 {
        return Err("--reps needs at least 1".into());
    }
    if let Ok(spec) = std::env::var(CONFIG_VAR) {
        return child(&spec, reps);
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "embedded default (BERT 4x128, 4 heads, FFN 512, vocab 8000, max_len 32), ML-CTL with \
         MLM, CPU, {threads} threads; 1 warm-up + {reps} updates per configuration, one process each\n"
    );
    let mut rows = Vec::new();
    for (batch, mini_batch) in CONFIGS {
        let row = run_config(batch, mini_batch, reps)?;
        eprintln!(
            "B={batch} mini_batch={mini_batch:?}: {:.0} ms, peak {:.0} MiB",
            row.median_ms,
            row.peak_kib / 1024.0
        );
        rows.push(row);
    }
    let mib = |kib: f64| kib / 1024.0;
    println!(
        "| B | mini_batch | ms / update (median) | min | peak RSS | peak − RSS before training |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} MiB | {:.0} MiB |",
            r.batch,
            r.mini_batch
                .map_or("— (one graph)".to_string(), |m| m.to_string()),
            r.median_ms,
            r.min_ms,
            mib(r.peak_kib),
            mib(r.peak_kib - r.base_kib)
        );
    }
    let (cached, uncached) = (&rows[0], &rows[1]);
    println!();
    println!(
        "B = 1024, cached / uncached: time {:.2}x, peak RSS {:.2}x, peak − RSS before training {:.2}x",
        cached.median_ms / uncached.median_ms,
        cached.peak_kib / uncached.peak_kib,
        (cached.peak_kib - cached.base_kib) / (uncached.peak_kib - uncached.base_kib)
    );
    let small = &rows[2];
    println!(
        "B = 1024 cached / B = 32 uncached: time {:.1}x (for 32x the pairs), peak RSS {:.2}x",
        cached.median_ms / small.median_ms,
        cached.peak_kib / small.peak_kib
    );
    Ok(())
}
