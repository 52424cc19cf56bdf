//! Scores any model directory on XTREME's Tatoeba task without training it.
//!
//! A command line over `mlctl::pretrain::EvalSuite` with its Tatoeba task. See
//! `examples/evaluate/README.md`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::{Parser, ValueEnum};
use mlctl::align::Lexicon;
use mlctl::device::{select_device, DeviceChoice};
use mlctl::eval::tatoeba::{shipped_tatoeba_dir, tatoeba_markdown, TatoebaPooling, TatoebaTask};
use mlctl::model::MlCtlModel;
use mlctl::pretrain::{write_results, EvalSuite, EVALUATION_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Benchmark {
    /// XTREME's 36 Tatoeba languages, XTREME's pooling and direction.
    Xtreme,
}

/// Score a model on XTREME's Tatoeba task (36 languages with English), without training it.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or Hugging Face id.
    #[arg(long)]
    model: String,
    /// The Tatoeba benchmark.
    #[arg(long, value_enum, default_value = "xtreme")]
    tatoeba: Benchmark,
    /// Directory of the LASER Tatoeba files (default: the crate's data/tatoeba).
    #[arg(long)]
    tatoeba_dir: Option<PathBuf>,
    /// Hidden state pooled by XTREME's protocol (default: 8, or the last of smaller encoders).
    #[arg(long, allow_hyphen_values = true)]
    tatoeba_layer: Option<isize>,
    /// Languages (LASER codes) whose first --held-apart-from lines are training data: they
    /// are scored on the lines after those only.
    #[arg(long, value_delimiter = ',', default_value = "ara,cmn,fra,rus,spa")]
    trained: Vec<String>,
    /// Lines of each --trained language that training uses.
    #[arg(long, default_value_t = 800)]
    held_apart_from: usize,
    /// Also score the mean of the last layer (multilingual-e5's pooling).
    #[arg(long)]
    mean_last_pooling: bool,
    /// Text put before each sentence for --mean-last-pooling, e.g. `query: ` for e5.
    #[arg(long, requires = "mean_last_pooling")]
    text_prefix: Option<String>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// The model's name in the report (default: the last component of --model).
    #[arg(long)]
    label: Option<String>,
    /// Directory for evaluation.json and results.md (absent: print only).
    #[arg(long)]
    out: Option<PathBuf>,
    /// auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args = Args::parse();
    let device = select_device(args.device)?;
    let clock = std::time::Instant::now();
    let model = MlCtlModel::load(&args.model, &device, DType::F32, 0)
        .with_context(|| format!("loading {}", args.model))?;
    let tokenizer = model.bert.tokenizer()?.clone();
    let dir = args.tatoeba_dir.clone().unwrap_or_else(shipped_tatoeba_dir);
    let trained: Vec<&str> = args.trained.iter().map(String::as_str).collect();
    let Benchmark::Xtreme = args.tatoeba;
    let mut poolings = vec![
        TatoebaPooling::xtreme(args.tatoeba_layer),
        TatoebaPooling::model(),
    ];
    if args.mean_last_pooling {
        poolings.push(TatoebaPooling::mean_last(args.text_prefix.as_deref()));
    }
    let task = TatoebaTask::xtreme(&dir, &trained, args.held_apart_from)
        .with_context(|| format!("reading {}", dir.display()))?
        .with_poolings(poolings)
        .with_batch_size(args.batch_size)
        .with_progress(true);
    // Only the Tatoeba task: no other sentence sets, poolings, alignment or XNLI.
    let suite = EvalSuite::new(Vec::new(), Arc::new(Lexicon::embedded()))
        .with_poolings(Vec::new())
        .with_tatoeba(Some(task));
    let loaded = clock.elapsed().as_secs_f64();
    let evaluation = suite.evaluate(&model, &tokenizer)?;
    let seconds = clock.elapsed().as_secs_f64() - loaded;
    let report = evaluation.tatoeba.as_ref().context("no Tatoeba report")?;
    let label = args.label.clone().unwrap_or_else(|| {
        let path = std::path::Path::new(&args.model);
        path.file_name()
            .map_or_else(|| args.model.clone(), |n| n.to_string_lossy().into())
    });
    let mut markdown = format!(
        "# Tatoeba evaluation\n\n- model: {label}\n- time: {seconds:.0} s evaluating ({loaded:.1} s loading)\n"
    );
    markdown += &tatoeba_markdown(&[(label.as_str(), report)]);
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join(EVALUATION_FILE);
        std::fs::write(&path, serde_json::to_vec(&evaluation)?)
            .with_context(|| format!("writing {}", path.display()))?;
        write_results(out, &markdown)?;
    }
    println!("{markdown}");
    Ok(())
}
