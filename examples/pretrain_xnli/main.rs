//! ML-CTL end to end: pre-train with the multi-level contrastive objective, evaluate retrieval
//! (and alignment, XNLI when given the data) before and after, write a run directory.
//!
//! A command line over the steps of `mlctl::pretrain`. See `examples/pretrain_xnli/README.md`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use mlctl::align::Lexicon;
use mlctl::data::{CorpusFormat, LexiconAnchors, LoaderConfig, PairLoader, ParallelCorpus};
use mlctl::device::{select_device, DeviceChoice};
use mlctl::dist::{join_ranks, launch_local_ranks, Collective, DistEnv};
use mlctl::encoder::BertConfig;
use mlctl::eval::plots::{plot_before_after, plot_training, BeforeAfter};
use mlctl::eval::tatoeba::{shipped_tatoeba_dir, TatoebaPooling, TatoebaTask};
use mlctl::loss::{CzNce, MultiLevelLoss};
use mlctl::model::{HeadConfig, MlCtlModel};
use mlctl::nli::NliFinetuneConfig;
use mlctl::pretrain::{
    comparison_markdown, prepare_run_dir, read_evaluations, read_metrics, write_anchored_tsv,
    write_evaluations, write_results, AlignmentTask, EvalSuite, Evaluation, ParallelSet,
    RunEvaluations, SentencePooling, XnliTask,
};
use mlctl::pretrained::PretrainedBert;
use mlctl::tokenize::{train_wordpiece, Tokenizer};
use mlctl::train::{LrSchedule, TrainConfig, TrainSummary, Trainer, METRICS_FILE};

/// The Tatoeba sets shipped in `data/tatoeba/`: (LASER code, lexicon code, text, English text).
const TATOEBA: [(&str, &str, &str, &str); 5] = [
    (
        "ara",
        "ar",
        include_str!("../../data/tatoeba/tatoeba.ara-eng.ara"),
        include_str!("../../data/tatoeba/tatoeba.ara-eng.eng"),
    ),
    (
        "cmn",
        "zh",
        include_str!("../../data/tatoeba/tatoeba.cmn-eng.cmn"),
        include_str!("../../data/tatoeba/tatoeba.cmn-eng.eng"),
    ),
    (
        "fra",
        "fr",
        include_str!("../../data/tatoeba/tatoeba.fra-eng.fra"),
        include_str!("../../data/tatoeba/tatoeba.fra-eng.eng"),
    ),
    (
        "rus",
        "ru",
        include_str!("../../data/tatoeba/tatoeba.rus-eng.rus"),
        include_str!("../../data/tatoeba/tatoeba.rus-eng.eng"),
    ),
    (
        "spa",
        "es",
        include_str!("../../data/tatoeba/tatoeba.spa-eng.spa"),
        include_str!("../../data/tatoeba/tatoeba.spa-eng.eng"),
    ),
];
/// The embedded default's WordPiece vocabulary (8000 entries), trained once with
/// `train_wordpiece` on the embedded training pairs and shipped, because the `tokenizers`
/// trainer is not deterministic across runs (`--train-tokenizer` trains a fresh one).
const EMBEDDED_TOKENIZER: &str = include_str!("../../data/tokenizer/wordpiece-8000.json");
/// Pairs of each embedded language used for training; the rest are held apart for evaluation.
const EMBEDDED_TRAIN_PAIRS: usize = 800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Recipe {
    /// Adam, linear decay after the warm-up, global gradient norm clipped at 1.
    AdamLinearClipped,
    /// The ML-CTL release's: Adam, MultiStepLR x0.1 at 2/6, 4/6 and 5/6 of training, no clipping.
    Reference,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TatoebaBenchmark {
    /// XTREME's 36 Tatoeba languages, XTREME's pooling and direction.
    Xtreme,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Objective {
    /// Sentence + word levels (CZ-NCE on concat(sentence, word) projections) and MLM.
    MlCtl,
    /// CZ-NCE on sentence projections only, and MLM.
    SentenceCzNce,
    /// Two CZ-NCE terms, added: one on sentence projections, one on the anchor words' pooled
    /// embeddings (the word level as a term of its own instead of concatenated into the
    /// projection's input), and MLM.
    SentenceAndWordTerms,
    /// Standard InfoNCE (positive in the denominator) on sentence projections, and MLM.
    SentenceInfonce,
    /// MLM alone (no contrastive term).
    Mlm,
}

/// Pre-train a BERT with ML-CTL and report retrieval, alignment and XNLI before and after.
///
/// Without --model and --train it runs the embedded default: a small BERT from scratch on the
/// Tatoeba pairs shipped in data/, in minutes on a CPU.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Starting encoder: model directory or Hugging Face id (e.g. bert-base-multilingual-cased,
    /// the paper's setting). Absent: a small BERT initialised from scratch.
    #[arg(long)]
    model: Option<String>,
    /// Training pairs: ML-CTL TSV (.tsv), `src ||| tgt` lines, or with --train-tgt a source file
    /// line-aligned with it. Absent: the embedded Tatoeba training pairs.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Target-language file line-aligned with --train.
    #[arg(long, requires = "train")]
    train_tgt: Option<PathBuf>,
    /// Lexicon languages of --train's sides, for anchors found with the dictionary.
    #[arg(long, num_args = 2, value_names = ["SRC", "TGT"], default_values = ["fr", "en"])]
    langs: Vec<String>,
    /// Objective (the paper's comparison).
    #[arg(long, value_enum, default_value = "ml-ctl")]
    objective: Objective,
    /// Optimizer updates (default: 600 embedded, 10000 with --model).
    #[arg(long)]
    steps: Option<u64>,
    /// Pairs per batch (default: 32 embedded, 64 with --model).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Maximum tokens per sentence (default: 32 embedded, 128 with --model).
    #[arg(long)]
    max_len: Option<usize>,
    /// Peak learning rate (default: 1e-3 embedded, 2e-6 with --model).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up updates (default: 50 embedded, 0 with --model).
    #[arg(long)]
    warmup: Option<u64>,
    /// Optimisation recipe: `adam-linear-clipped` (linear decay, gradient norm clipped at 1) or
    /// `reference` (the ML-CTL release's: learning rate x0.1 at 2/6, 4/6 and 5/6 of the run, no
    /// clipping). Both use Adam without weight decay.
    #[arg(long, value_enum, default_value = "adam-linear-clipped")]
    recipe: Recipe,
    /// Peak learning rate of the randomly initialised projection head (default: --lr). A head
    /// trained at 2e-6 barely moves from its initialisation.
    #[arg(long)]
    head_lr: Option<f64>,
    /// Keep the embedding layer (word, position and token-type tables and their LayerNorm)
    /// fixed. With a large vocabulary this skips the optimizer's update of its biggest table;
    /// a tied MLM decoder stays fixed with it.
    #[arg(long)]
    freeze_embeddings: bool,
    /// Update the word-embedding table row by row: rows of tokens absent from a batch keep
    /// their weights and moments (PyTorch's SparseAdam rule). Needs `--mlm-weight 0` (the tied
    /// MLM decoder gives every row a gradient) and trained embeddings.
    #[arg(long)]
    sparse_embeddings: bool,
    /// CZ-NCE temperature.
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Weight of the MLM term.
    #[arg(long, default_value_t = 0.1)]
    mlm_weight: f64,
    /// Weight of the word-level term of `sentence-and-word-terms` (the other objectives have no
    /// such term: ML-CTL's word level is inside its projection's input).
    #[arg(long, default_value_t = 1.0)]
    word_weight: f64,
    /// Hidden layers pooled over the anchor word, when not the sentence's (layer 1 and the last;
    /// e.g. `--word-layers 8` for the alignment layer, `--word-layers -1` for the last alone).
    /// Applies to a newly initialised head; a head on disk keeps its own.
    #[arg(long, num_args = 1.., allow_negative_numbers = true)]
    word_layers: Option<Vec<isize>>,
    /// Micro-batches per update.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Pairs per encoder pass with the cached loss (GradCache): a --batch-size of any size in the
    /// memory of this many pairs, with the same gradients. Default: the whole batch at once.
    #[arg(long)]
    mini_batch: Option<usize>,
    /// Seed of initialisation, data order, masking and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run directory (checkpoints, metrics.jsonl, results.md, plots).
    #[arg(long, default_value = "runs/pretrain_xnli")]
    out: PathBuf,
    /// Take the starting model's evaluation from this earlier run directory instead of
    /// evaluating it again (seeds and objectives of one starting model share it). The run must
    /// have had the same starting model and evaluation flags (its `evaluation_setup.txt`).
    #[arg(long, conflicts_with = "resume")]
    before_from: Option<PathBuf>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Checkpoint every N updates (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Skip and count malformed training lines instead of stopping.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Gold word alignments (1-based `i-j`/`ipj`) to score AER on, with --gold-input; repeat
    /// both for several sets (paired in order). Scored with argmax and itermax, on subwords
    /// and on words.
    #[arg(long, requires = "gold_input")]
    gold: Vec<PathBuf>,
    /// The `src ||| tgt` sentences of each --gold.
    #[arg(long, requires = "gold")]
    gold_input: Vec<PathBuf>,
    /// Also score sentence retrieval with the mean of the last layer (the pooling of
    /// sentence-embedding models such as multilingual-e5), besides ML-CTL's layers 1 and L.
    #[arg(long)]
    mean_last_pooling: bool,
    /// Text put before each sentence for --mean-last-pooling, e.g. `query: ` for
    /// multilingual-e5.
    #[arg(long, requires = "mean_last_pooling")]
    text_prefix: Option<String>,
    /// XNLI data (XNLI-1.0 dev/test and an English MNLI / XNLI-MT train file): fine-tune on
    /// English, evaluate every language, before and after ML-CTL.
    #[arg(long)]
    xnli_dir: Option<PathBuf>,
    /// Fine-tune on at most this many English NLI examples (a seeded sample).
    #[arg(long)]
    xnli_train_examples: Option<usize>,
    /// Epochs of NLI fine-tuning.
    #[arg(long, default_value_t = 2)]
    xnli_epochs: usize,
    /// Also score XTREME's Tatoeba task (36 languages) before and after; the five training
    /// languages on their held-apart lines only.
    #[arg(long, value_enum)]
    tatoeba: Option<TatoebaBenchmark>,
    /// Directory of the LASER Tatoeba files for --tatoeba (default: the crate's data/tatoeba).
    #[arg(long, requires = "tatoeba")]
    tatoeba_dir: Option<PathBuf>,
    /// Hidden state pooled by XTREME's protocol (default: 8, or the last of smaller encoders).
    #[arg(long, requires = "tatoeba", allow_hyphen_values = true)]
    tatoeba_layer: Option<isize>,
    /// Layer used for word alignment (default: 8, or the last layer of smaller encoders).
    #[arg(long)]
    align_layer: Option<isize>,
    /// Embedded default only: training pairs taken from each language (at most 800).
    #[arg(long, default_value_t = EMBEDDED_TRAIN_PAIRS)]
    train_pairs: usize,
    /// Held-apart Tatoeba pairs evaluated per language (at most 200).
    #[arg(long, default_value_t = 1000 - EMBEDDED_TRAIN_PAIRS)]
    eval_pairs: usize,
    /// Embedded default only: train a fresh WordPiece vocabulary on the training pairs instead of
    /// using the shipped one (the trainer is not deterministic across runs).
    #[arg(long)]
    train_tokenizer: bool,
    /// auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Data-parallel training on N CUDA devices of this machine, one process each (a build with
    /// the `nccl` feature): starts N ranks of this program with torchrun's variables and waits
    /// for them. --batch-size is the global batch (divisible by N); rank 0 evaluates and writes
    /// the run directory. A process started by torchrun (RANK, WORLD_SIZE, ... set) trains as
    /// its rank on cuda:LOCAL_RANK without this flag.
    #[arg(long)]
    nproc_per_node: Option<usize>,
}

impl Objective {
    /// The loss of this objective.
    fn loss(self, temperature: f64, mlm_weight: f64, word_weight: f64) -> MultiLevelLoss {
        let sentence = match self {
            Objective::MlCtl | Objective::SentenceCzNce | Objective::SentenceAndWordTerms => {
                Some(CzNce::new().with_temperature(temperature))
            }
            Objective::SentenceInfonce => Some(CzNce::info_nce().with_temperature(temperature)),
            Objective::Mlm => None,
        };
        let word = (self == Objective::SentenceAndWordTerms)
            .then(|| CzNce::new().with_temperature(temperature));
        MultiLevelLoss::mlctl()
            .with_sentence(sentence)
            .with_word(word)
            .with_word_weight(word_weight)
            // A zero weight turns the term off (no masked passes at all).
            .with_mlm_weight((mlm_weight != 0.0).then_some(mlm_weight))
    }

    /// Whether every training pair needs a dictionary anchor (the objectives with a word level).
    fn needs_anchors(self) -> bool {
        matches!(self, Objective::MlCtl | Objective::SentenceAndWordTerms)
    }

    /// The head a model without one starts with: words concatenated only for ML-CTL, pooled
    /// over `word_layers` when given.
    fn head(self, word_layers: Option<Vec<isize>>) -> HeadConfig {
        HeadConfig {
            concat_word: self == Objective::MlCtl,
            word_layers,
            ..HeadConfig::default()
        }
    }

    /// Flags that only some objectives use are refused by the others.
    fn check_flags(self, args: &Args) -> Result<()> {
        if args.word_weight != 1.0 && self != Objective::SentenceAndWordTerms {
            bail!("--word-weight weighs the word-level term of sentence-and-word-terms; {self:?} has none");
        }
        if args.word_layers.is_some() && !self.needs_anchors() {
            bail!("--word-layers pools anchor words, which {self:?} does not use");
        }
        Ok(())
    }
}

/// Settings that differ between the embedded default and a real checkpoint.
struct Mode {
    steps: u64,
    warmup: u64,
    batch_size: usize,
    max_len: usize,
    lr: f64,
}

impl Mode {
    fn new(args: &Args) -> Self {
        let embedded = args.model.is_none();
        Self {
            steps: args.steps.unwrap_or(if embedded { 600 } else { 10_000 }),
            batch_size: args.batch_size.unwrap_or(if embedded { 32 } else { 64 }),
            max_len: args.max_len.unwrap_or(if embedded { 32 } else { 128 }),
            lr: args.lr.unwrap_or(if embedded { 1e-3 } else { 2e-6 }),
            warmup: args.warmup.unwrap_or(if embedded { 50 } else { 0 }),
        }
    }
}

fn main() -> Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args = Args::parse();
    let dist = DistEnv::from_env()?;
    match (&dist, args.nproc_per_node) {
        (_, Some(0)) => bail!("--nproc-per-node needs at least 1"),
        (None, Some(n)) if n > 1 => {
            return launch_local_ranks(n).with_context(|| format!("--nproc-per-node {n}"))
        }
        _ => {}
    }
    // A rank joins its group first: the others wait for it while rank 0 evaluates.
    let (device, collective) = match &dist {
        Some(env) if env.world_size > 1 => {
            if args.train_tokenizer && env.world_size > 1 {
                bail!("--train-tokenizer trains a different vocabulary in every rank: use the shipped one");
            }
            let (device, collective) = join_ranks(env, Duration::from_secs(300))?;
            (device, Some(collective))
        }
        _ => (select_device(args.device)?, None),
    };
    // Rank 0 (or the only process) evaluates and writes the run directory.
    let lead = dist.as_ref().is_none_or(|env| env.rank == 0);
    let clock = std::time::Instant::now();
    let stage = |name: &str| {
        if lead {
            eprintln!("[{:>6.1}s] {name}", clock.elapsed().as_secs_f64())
        }
    };
    if args.train_pairs == 0
        || args.train_pairs > EMBEDDED_TRAIN_PAIRS
        || args.eval_pairs < 2
        || args.eval_pairs > 1000 - EMBEDDED_TRAIN_PAIRS
    {
        bail!(
            "--train-pairs must be in 1..={EMBEDDED_TRAIN_PAIRS} and --eval-pairs in 2..={}",
            1000 - EMBEDDED_TRAIN_PAIRS
        );
    }
    let mode = Mode::new(&args);
    args.objective.check_flags(&args)?;
    if lead {
        prepare_run_dir(&args.out, args.resume).context(
            "pass --resume to continue it, --out DIR for a new run, or delete the directory",
        )?;
    }
    let lexicon = Arc::new(Lexicon::embedded());

    stage("1/5 model and data");
    let (model, tokenizer) = load_model(&args, &mode, &device)?;
    if !lead {
        // The other ranks only train, on a private copy of the training file.
        let tsv = std::env::temp_dir().join(format!("pretrain_xnli-{}.tsv", std::process::id()));
        let loader = training_loader(&args, &mode, &tokenizer, &lexicon, &tsv)?;
        let trained = train(&args, &mode, model, loader, collective, false);
        let _ = std::fs::remove_file(&tsv);
        return trained.map(|_| ());
    }
    let loader = training_loader(
        &args,
        &mode,
        &tokenizer,
        &lexicon,
        &args.out.join("train.tsv"),
    )?;
    let suite = eval_suite(&args, &mode, lexicon)?;
    let setup = evaluation_setup(&args, &mode);
    let reused = match &args.before_from {
        Some(dir) => Some(reused_before(dir, &setup)?),
        None => None,
    };
    std::fs::write(args.out.join(EVALUATION_SETUP_FILE), &setup)
        .with_context(|| format!("writing {}", args.out.display()))?;

    let before = match reused {
        Some(before) => {
            stage("2/5 the starting model's evaluation, from --before-from");
            before
        }
        None => {
            stage("2/5 evaluating the starting model");
            suite.evaluate(&model, &tokenizer)?
        }
    };

    stage(&format!(
        "3/5 training ({} steps, batch {}, lr {:e}, {:?})",
        mode.steps, mode.batch_size, mode.lr, args.objective
    ));
    let (model, summary) = train(&args, &mode, model, loader, collective, true)?;

    stage("4/5 evaluating the trained model");
    let after = suite.evaluate(&model, &tokenizer)?;

    stage(&format!("5/5 writing {}", args.out.display()));
    let mut report = run_description(&args, &mode, summary.checkpoint.as_deref());
    report += &comparison_markdown(&before, &after)?;
    write_results(&args.out, &report)?;
    plot(&args.out, &before, &after)?;
    write_evaluations(&args.out, &RunEvaluations { before, after })?;
    println!("{report}");
    Ok(())
}

/// The file in which a run records what its starting model's evaluation depends on.
const EVALUATION_SETUP_FILE: &str = "evaluation_setup.txt";

/// Everything the starting model's evaluation depends on, one setting per line: two runs with
/// the same text evaluate the same starting model in the same way. The seed counts only where
/// it changes that evaluation (a model initialised here, or XNLI fine-tuning).
fn evaluation_setup(args: &Args, mode: &Mode) -> String {
    let seeded = args.model.is_none() || args.xnli_dir.is_some();
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let paths = |ps: &[PathBuf]| {
        ps.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    };
    [
        format!("model: {:?}", args.model),
        format!("seed: {:?}", seeded.then_some(args.seed)),
        format!("train tokenizer: {}", args.train_tokenizer),
        format!("max len: {}", mode.max_len),
        format!("eval pairs: {}", args.eval_pairs),
        format!(
            "gold: {:?} {:?}",
            paths(&args.gold),
            paths(&args.gold_input)
        ),
        format!(
            "mean-last pooling: {} {:?}",
            args.mean_last_pooling, args.text_prefix
        ),
        format!("align layer: {:?}", args.align_layer),
        format!(
            "xnli: {:?} {:?} {}",
            path(&args.xnli_dir),
            args.xnli_train_examples,
            args.xnli_epochs
        ),
        format!(
            "tatoeba: {:?} {:?} {:?}",
            args.tatoeba,
            path(&args.tatoeba_dir),
            args.tatoeba_layer
        ),
        format!("version: {}", env!("CARGO_PKG_VERSION")),
    ]
    .join("\n")
        + "\n"
}

/// The starting model's evaluation from an earlier run `dir` whose evaluation setup equals
/// `setup`; an error names the first setting that differs.
fn reused_before(dir: &Path, setup: &str) -> Result<Evaluation> {
    let path = dir.join(EVALUATION_SETUP_FILE);
    let theirs = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--before-from: reading {} (written by runs of this version)",
            path.display()
        )
    })?;
    if let Some((mine, theirs)) = setup.lines().zip(theirs.lines()).find(|(a, b)| a != b) {
        bail!(
            "--before-from {}: its starting model was evaluated differently ({theirs:?} there, {mine:?} here)",
            dir.display()
        );
    }
    if setup.lines().count() != theirs.lines().count() {
        bail!(
            "--before-from {}: {} is not from this version",
            dir.display(),
            path.display()
        );
    }
    Ok(read_evaluations(dir)?.before)
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(|l| l.trim().to_string()).collect()
}

/// Lines `range` (0-based) of every embedded Tatoeba language with English.
fn tatoeba(range: Range<usize>) -> Result<Vec<ParallelSet>> {
    let set = |(lang, lexicon_lang, text, eng): &(&str, &str, &str, &str)| {
        let (src, eng) = (lines(text), lines(eng));
        ParallelSet::new(
            format!("{lang}-eng"),
            *lexicon_lang,
            "en",
            src[range.clone()].to_vec(),
            eng[range.clone()].to_vec(),
        )
    };
    Ok(TATOEBA.iter().map(set).collect::<mlctl::Result<_>>()?)
}

/// The starting model, loaded once, and its tokenizer truncating at the run's `max_len`.
fn load_model(args: &Args, mode: &Mode, device: &Device) -> Result<(MlCtlModel, Tokenizer)> {
    let head = args.objective.head(args.word_layers.clone());
    let model = match &args.model {
        Some(model) => MlCtlModel::load_or_new(model, device, DType::F32, head.clone(), args.seed)
            .with_context(|| format!("loading {model}"))?,
        None => MlCtlModel::new(embedded_bert(args, device)?, head, args.seed)?,
    };
    let tokenizer = model.bert.tokenizer()?.clone().with_max_len(mode.max_len)?;
    Ok((model, tokenizer))
}

/// The embedded default's encoder: a small BERT from scratch with the shipped WordPiece
/// vocabulary, or one trained on the training pairs with `--train-tokenizer`.
fn embedded_bert(args: &Args, device: &Device) -> Result<PretrainedBert> {
    let tokenizer = if args.train_tokenizer {
        let sets = tatoeba(0..args.train_pairs)?;
        let texts = sets.iter().flat_map(|s| s.src.iter().chain(&s.tgt));
        train_wordpiece(texts, 8_000)?
    } else {
        let parsed = EMBEDDED_TOKENIZER
            .parse()
            .map_err(|e| anyhow::anyhow!("embedded tokenizer: {e}"))?;
        Tokenizer::new(parsed)?
    };
    let config = BertConfig {
        vocab_size: tokenizer.vocab_size(),
        hidden_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 512,
        max_position_embeddings: 128,
        ..BertConfig::default()
    };
    Ok(PretrainedBert::from_config(
        config,
        Some(tokenizer),
        device,
        DType::F32,
        args.seed,
    )?)
}

/// `--train` with dictionary anchors for text without them or, by default, the embedded
/// training pairs with a dictionary anchor, written to `tsv` (the run directory's `train.tsv`).
fn training_loader(
    args: &Args,
    mode: &Mode,
    tokenizer: &Tokenizer,
    lexicon: &Arc<Lexicon>,
    tsv: &Path,
) -> Result<PairLoader> {
    let config = LoaderConfig {
        batch_size: mode.batch_size,
        seed: args.seed,
        shuffle: true,
        skip_bad_lines: args.skip_bad_lines,
        require_anchors: args.objective.needs_anchors(),
    };
    let Some(train) = &args.train else {
        let written = write_anchored_tsv(tsv, &tatoeba(0..args.train_pairs)?, lexicon, tokenizer)?;
        eprintln!(
            "      {written} of {} embedded training pairs have a dictionary anchor",
            5 * args.train_pairs
        );
        let corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(tsv.to_path_buf()))?;
        return Ok(PairLoader::new(corpus, tokenizer.clone(), config)?);
    };
    let corpus = ParallelCorpus::open(CorpusFormat::from_paths(train, args.train_tgt.as_deref()))?;
    let anchors = LexiconAnchors::new(lexicon.clone(), &args.langs[0], &args.langs[1])?;
    Ok(PairLoader::new(corpus, tokenizer.clone(), config)?.with_anchor_finder(Arc::new(anchors)))
}

/// The held-apart Tatoeba pairs, and alignment and XNLI when their data is given.
fn eval_suite(args: &Args, mode: &Mode, lexicon: Arc<Lexicon>) -> Result<EvalSuite> {
    let held_apart = tatoeba(EMBEDDED_TRAIN_PAIRS..EMBEDDED_TRAIN_PAIRS + args.eval_pairs)?;
    if args.gold.len() != args.gold_input.len() {
        bail!(
            "{} --gold files but {} --gold-input files: give one of each per set",
            args.gold.len(),
            args.gold_input.len()
        );
    }
    let alignment = args
        .gold
        .iter()
        .zip(&args.gold_input)
        .map(|(gold, input)| Ok(AlignmentTask::read(input, gold)?.with_layer(args.align_layer)))
        .collect::<Result<Vec<_>>>()?;
    let mut poolings = vec![SentencePooling::mlctl()];
    if args.mean_last_pooling {
        poolings.push(SentencePooling::mean_last(args.text_prefix.as_deref()));
    }
    let finetune = NliFinetuneConfig {
        epochs: args.xnli_epochs,
        max_len: mode.max_len,
        seed: args.seed,
        max_examples: args.xnli_train_examples,
        progress: true,
        ..NliFinetuneConfig::default()
    };
    let xnli = match &args.xnli_dir {
        Some(dir) => {
            let xnli = XnliTask::read(dir, finetune)?;
            eprintln!(
                "      XNLI: {} English training examples, {} evaluation examples: {}",
                xnli.train.len(),
                xnli.eval.len(),
                xnli.split
            );
            Some(xnli)
        }
        None => None,
    };
    Ok(EvalSuite::new(held_apart, lexicon)
        .with_poolings(poolings)
        .with_alignment(alignment)
        .with_xnli(xnli)
        .with_tatoeba(tatoeba_task(args)?))
}

/// XTREME's Tatoeba task with `--tatoeba`: the embedded training languages scored on their
/// held-apart lines, with XTREME's pooling, the model's and, with --mean-last-pooling, e5's.
fn tatoeba_task(args: &Args) -> Result<Option<TatoebaTask>> {
    let Some(TatoebaBenchmark::Xtreme) = args.tatoeba else {
        return Ok(None);
    };
    let dir = args.tatoeba_dir.clone().unwrap_or_else(shipped_tatoeba_dir);
    let trained: Vec<&str> = TATOEBA.iter().map(|(laser, ..)| *laser).collect();
    let mut poolings = vec![
        TatoebaPooling::xtreme(args.tatoeba_layer),
        TatoebaPooling::model(),
    ];
    if args.mean_last_pooling {
        poolings.push(TatoebaPooling::mean_last(args.text_prefix.as_deref()));
    }
    let task = TatoebaTask::xtreme(&dir, &trained, EMBEDDED_TRAIN_PAIRS)
        .with_context(|| format!("reading {}", dir.display()))?;
    Ok(Some(task.with_poolings(poolings).with_progress(true)))
}

/// Trains (or resumes) in the run directory, as a rank of `collective` when given; returns the
/// trained model. `lead`: this process writes the run directory and reports.
fn train(
    args: &Args,
    mode: &Mode,
    model: MlCtlModel,
    loader: PairLoader,
    collective: Option<Box<dyn Collective + Send>>,
    lead: bool,
) -> Result<(MlCtlModel, TrainSummary)> {
    let recipe = match args.recipe {
        Recipe::AdamLinearClipped => TrainConfig::adam_linear_clipped(mode.steps),
        Recipe::Reference => TrainConfig::reference(mode.steps),
    };
    let config = TrainConfig {
        schedule: LrSchedule {
            peak_lr: mode.lr,
            warmup_steps: mode.warmup,
            ..recipe.schedule
        },
        head_lr: args.head_lr,
        grad_accum: args.grad_accum,
        mini_batch: args.mini_batch,
        freeze_embeddings: args.freeze_embeddings,
        sparse_embeddings: args.sparse_embeddings,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        ..recipe
    };
    let objective = args
        .objective
        .loss(args.temperature, args.mlm_weight, args.word_weight);
    let mut trainer = Trainer::new(model, objective, loader, config, &args.out)?;
    if let Some(collective) = collective {
        trainer = trainer.with_collective(collective)?;
    }
    if args.resume {
        let resumed = trainer.resume()?;
        match resumed {
            Some(step) if lead => eprintln!("      resumed at step {step}"),
            None if lead => eprintln!("      nothing to resume: starting afresh"),
            _ => {}
        }
    } else if lead {
        let _ = std::fs::remove_file(args.out.join(METRICS_FILE));
    }
    let summary = trainer.run()?;
    if !lead {
        return Ok((trainer.model, summary));
    }
    if summary.first_loss.is_none() {
        eprintln!("      nothing left to train: the run had already reached its last step");
        return Ok((trainer.model, summary));
    }
    eprintln!(
        "      loss {:.4} -> {:.4} in {:.0} s; {} pairs used, {} without anchor, {} anchors truncated, {} bad lines, {} steps skipped",
        summary.first_loss.unwrap_or(f32::NAN),
        summary.last_loss.unwrap_or(f32::NAN),
        summary.seconds,
        summary.loader.used,
        summary.loader.no_anchor,
        summary.loader.anchor_truncated,
        summary.loader.bad_lines,
        summary.skipped_steps
    );
    Ok((trainer.model, summary))
}

/// The head of `results.md`: the starting model, the objective and every hyper-parameter.
fn run_description(args: &Args, mode: &Mode, checkpoint: Option<&Path>) -> String {
    let mut s = String::from("# ML-CTL run\n\n");
    let start = match &args.model {
        Some(m) => m.clone(),
        None => format!(
            "embedded default: BERT 4 layers, H=128, 4 heads, FFN 512, from scratch; WordPiece ({}) trained on the training pairs",
            if args.train_tokenizer { "trained in this run" } else { "data/tokenizer/wordpiece-8000.json" }
        ),
    };
    s += &format!("- starting model: {start}\n");
    s += &format!(
        "- objective: `{:?}`; steps {}, batch {}, max_len {}, lr {:e} ({:?}, {} warm-up), head lr {}, temperature {}, MLM weight {}, embeddings {}, seed {}\n",
        args.objective, mode.steps, mode.batch_size, mode.max_len, mode.lr, args.recipe, mode.warmup,
        args.head_lr.map_or_else(|| "= lr".into(), |h| format!("{h:e}")),
        args.temperature, args.mlm_weight,
        if args.freeze_embeddings { "frozen" } else { "trained" }, args.seed
    );
    if let Some(layers) = &args.word_layers {
        s += &format!("- anchor words pooled over hidden states {layers:?} (a new head's)\n");
    }
    if args.word_weight != 1.0 {
        s += &format!("- word-level term weight {}\n", args.word_weight);
    }
    let data = match &args.train {
        Some(p) => p.display().to_string(),
        None => format!(
            "embedded Tatoeba, first {} pairs of each language (those with a dictionary anchor)",
            args.train_pairs
        ),
    };
    s += &format!("- training data: {data}\n");
    s += &format!(
        "- evaluation: {} Tatoeba pairs of each language from lines {}-{}, never trained on; chance acc@1 = {:.1}%\n",
        args.eval_pairs,
        EMBEDDED_TRAIN_PAIRS + 1,
        EMBEDDED_TRAIN_PAIRS + args.eval_pairs,
        100.0 / args.eval_pairs as f32
    );
    if let Some(c) = checkpoint {
        s += &format!("- checkpoint: `{}`\n", c.display());
    }
    s
}

/// `loss.svg` (the loss terms over steps) and `retrieval.svg` (acc@1 before and after).
fn plot(out: &Path, before: &Evaluation, after: &Evaluation) -> Result<()> {
    plot_training(&read_metrics(out)?, &out.join("loss.svg"))?;
    let (Some(before), Some(after)) = (before.sentence_first(), after.sentence_first()) else {
        return Ok(());
    };
    let rows: Vec<BeforeAfter> = before
        .iter()
        .map(|(name, b)| BeforeAfter {
            label: name.clone(),
            before: b.mean(),
            after: after.get(name).map_or(f32::NAN, |a| a.mean()),
        })
        .collect();
    plot_before_after(
        "Tatoeba retrieval acc@1 (held-apart pairs, both directions)",
        &rows,
        &out.join("retrieval.svg"),
    )?;
    Ok(())
}
