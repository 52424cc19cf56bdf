//! ML-CTL end to end: pre-train with the multi-level contrastive objective, evaluate retrieval
//! (and alignment, XNLI when given the data) before and after, write a run directory.
//!
//! See `examples/pretrain_xnli/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Parser, ValueEnum};
use mlctl::align::{io as align_io, AlignmentCounts, IterMax, Lexicon, WordAligner};
use mlctl::data::{CorpusFormat, LexiconAnchors, LoaderConfig, PairLoader, ParallelCorpus};
use mlctl::data::{NliExample, NliReadOptions, XnliDir};
use mlctl::device::{select_device, DeviceChoice};
use mlctl::encoder::{write_atomic, BertConfig, PretrainedBert};
use mlctl::eval::plots::{plot_before_after, plot_training, BeforeAfter};
use mlctl::eval::{
    embed_sentences, embed_spans, evaluate_nli, finetune_nli, retrieval_accuracy,
    NliFinetuneConfig, NliReport, RetrievalScores,
};
use mlctl::loss::{CzNce, MultiLevelLoss};
use mlctl::model::{HeadConfig, MlCtlModel};
use mlctl::pooling::TokenSpan;
use mlctl::tokenize::{train_wordpiece, Tokenizer};
use mlctl::train::{
    latest_checkpoint, Decay, LrSchedule, StepRecord, TrainConfig, Trainer, METRICS_FILE,
};

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
enum Objective {
    /// Sentence + word levels (CZ-NCE on concat(sentence, word) projections) and MLM.
    MlCtl,
    /// CZ-NCE on sentence projections only, and MLM.
    SentenceCzNce,
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
    /// CZ-NCE temperature.
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Weight of the MLM term.
    #[arg(long, default_value_t = 0.1)]
    mlm_weight: f64,
    /// Micro-batches per update.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Seed of initialisation, data order, masking and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run directory (checkpoints, metrics.jsonl, results.md, plots).
    #[arg(long, default_value = "runs/pretrain_xnli")]
    out: PathBuf,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Checkpoint every N updates (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Skip and count malformed training lines instead of stopping.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Gold word alignments (1-based `i-j`/`ipj`) to score AER on, with --gold-input.
    #[arg(long, requires = "gold_input")]
    gold: Option<PathBuf>,
    /// The `src ||| tgt` sentences of --gold.
    #[arg(long, requires = "gold")]
    gold_input: Option<PathBuf>,
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
    /// Run on the CPU whatever --device says.
    #[arg(long)]
    cpu: bool,
}

/// Evaluation pairs of one language with English, never trained on.
struct EvalSet {
    lang: String,
    lexicon_lang: String,
    src: Vec<String>,
    eng: Vec<String>,
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(|l| l.trim().to_string()).collect()
}

/// Settings that differ between the embedded default and a real checkpoint.
struct Mode {
    steps: u64,
    warmup: u64,
    batch_size: usize,
    max_len: usize,
    lr: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let clock = std::time::Instant::now();
    let stage = |name: &str| eprintln!("[{:>6.1}s] {name}", clock.elapsed().as_secs_f64());
    let device = select_device(if args.cpu {
        DeviceChoice::Cpu
    } else {
        args.device
    })?;
    let embedded = args.model.is_none();
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
    let mode = Mode {
        steps: args.steps.unwrap_or(if embedded { 600 } else { 10_000 }),
        batch_size: args.batch_size.unwrap_or(if embedded { 32 } else { 64 }),
        max_len: args.max_len.unwrap_or(if embedded { 32 } else { 128 }),
        lr: args.lr.unwrap_or(if embedded { 1e-3 } else { 2e-6 }),
        warmup: args.warmup.unwrap_or(if embedded { 50 } else { 0 }),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // Never overwrite or mix with an earlier run's checkpoints and log.
    if !args.resume {
        if let Some((step, _)) = latest_checkpoint(&args.out.join("checkpoints"))? {
            bail!(
                "{} already holds a run (checkpoint at step {step}): pass --resume to continue it, \
                 --out DIR for a new run, or delete the directory",
                args.out.display()
            );
        }
    }
    let lexicon = Arc::new(Lexicon::embedded());

    // Evaluation sets: the held-apart embedded Tatoeba pairs.
    let eval_sets: Vec<EvalSet> = TATOEBA
        .iter()
        .map(|(lang, lex, text, eng)| EvalSet {
            lang: lang.to_string(),
            lexicon_lang: lex.to_string(),
            src: lines(text)[EMBEDDED_TRAIN_PAIRS..EMBEDDED_TRAIN_PAIRS + args.eval_pairs].to_vec(),
            eng: lines(eng)[EMBEDDED_TRAIN_PAIRS..EMBEDDED_TRAIN_PAIRS + args.eval_pairs].to_vec(),
        })
        .collect();

    // Training data: a TSV the loader reads. The embedded pairs get their anchors now, from
    // the dictionary, with the tokenizer they will be trained with.
    stage("1/5 model and data");
    let embedded_train: Vec<(&str, Vec<String>, Vec<String>)> = TATOEBA
        .iter()
        .map(|(_, lex, text, eng)| {
            (
                *lex,
                lines(text)[..args.train_pairs].to_vec(),
                lines(eng)[..args.train_pairs].to_vec(),
            )
        })
        .collect();
    let bert = match &args.model {
        Some(model) => PretrainedBert::load(model, &device, DType::F32)
            .with_context(|| format!("loading {model}"))?,
        None => {
            let tokenizer = if args.train_tokenizer {
                let texts = embedded_train
                    .iter()
                    .flat_map(|(_, s, e)| s.iter().chain(e));
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
            PretrainedBert::from_config(config, Some(tokenizer), &device, DType::F32, args.seed)?
        }
    };
    let tokenizer = bert.tokenizer()?.clone().with_max_len(mode.max_len)?;
    let head = HeadConfig {
        concat_word: args.objective == Objective::MlCtl,
        ..HeadConfig::default()
    };
    let model = match &args.model {
        Some(model)
            if Path::new(model)
                .join(mlctl::model::HEAD_WEIGHTS_FILE)
                .is_file() =>
        {
            MlCtlModel::load(model, &device, DType::F32, args.seed)?
        }
        _ => MlCtlModel::new(bert, head, args.seed)?,
    };

    let loader_config = LoaderConfig {
        batch_size: mode.batch_size,
        seed: args.seed,
        shuffle: true,
        skip_bad_lines: args.skip_bad_lines,
        require_anchors: args.objective == Objective::MlCtl,
    };
    let loader = match (&args.train, &args.train_tgt) {
        (None, _) => {
            let tsv = args.out.join("train.tsv");
            let written = write_anchored_tsv(&tsv, &embedded_train, &lexicon, &tokenizer)?;
            eprintln!(
                "      {written} of {} embedded training pairs have a dictionary anchor",
                5 * args.train_pairs
            );
            let corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(tsv))?;
            PairLoader::new(corpus, tokenizer.clone(), loader_config)?
        }
        (Some(src), Some(tgt)) => {
            let corpus = ParallelCorpus::open(CorpusFormat::LineAligned {
                src: src.clone(),
                tgt: tgt.clone(),
            })?;
            PairLoader::new(corpus, tokenizer.clone(), loader_config)?.with_anchor_finder(Arc::new(
                LexiconAnchors::new(lexicon.clone(), &args.langs[0], &args.langs[1])?,
            ))
        }
        (Some(path), None) => {
            let format = if path.extension().is_some_and(|e| e == "tsv") {
                CorpusFormat::ReferenceTsv(path.clone())
            } else {
                CorpusFormat::Bitext(path.clone())
            };
            PairLoader::new(
                ParallelCorpus::open(format)?,
                tokenizer.clone(),
                loader_config,
            )?
            .with_anchor_finder(Arc::new(LexiconAnchors::new(
                lexicon.clone(),
                &args.langs[0],
                &args.langs[1],
            )?))
        }
    };

    let xnli = match &args.xnli_dir {
        Some(dir) => {
            let xnli = XnliDir::discover(dir)?;
            let train = xnli.read_train(&NliReadOptions::default())?.examples;
            let eval = match xnli.read_test(&NliReadOptions::default()) {
                Ok(test) => test.examples,
                Err(_) => xnli.read_dev(&NliReadOptions::default())?.examples,
            };
            eprintln!(
                "      XNLI: {} English training examples, {} evaluation examples",
                train.len(),
                eval.len()
            );
            Some(XnliData { train, eval })
        }
        None => None,
    };
    let nli_config = NliFinetuneConfig {
        epochs: args.xnli_epochs,
        max_len: mode.max_len,
        seed: args.seed,
        max_examples: args.xnli_train_examples,
        progress: true,
        ..NliFinetuneConfig::default()
    };

    stage("2/5 evaluating the starting model");
    let before = evaluate(&model, &tokenizer, &eval_sets, &lexicon, &args)?;
    let xnli_before = xnli
        .as_ref()
        .map(|d| xnli_accuracy(&model, d, &nli_config))
        .transpose()?;

    stage(&format!(
        "3/5 training ({} steps, batch {}, lr {:e}, {:?})",
        mode.steps, mode.batch_size, mode.lr, args.objective
    ));
    let objective = match args.objective {
        Objective::MlCtl | Objective::SentenceCzNce => MultiLevelLoss::mlctl()
            .with_sentence(Some(CzNce::new().with_temperature(args.temperature))),
        Objective::SentenceInfonce => MultiLevelLoss::mlctl()
            .with_sentence(Some(CzNce::info_nce().with_temperature(args.temperature))),
        Objective::Mlm => MultiLevelLoss::mlctl().with_sentence(None),
    }
    .with_mlm_weight(Some(args.mlm_weight));
    let config = TrainConfig {
        schedule: LrSchedule {
            peak_lr: mode.lr,
            warmup_steps: mode.warmup,
            total_steps: mode.steps,
            decay: Decay::Linear,
        },
        grad_accum: args.grad_accum,
        checkpoint_every: args.checkpoint_every,
        seed: args.seed,
        ..TrainConfig::mlctl(mode.steps)
    };
    let mut trainer = Trainer::new(model, objective, loader, config, &args.out)?;
    if args.resume {
        match trainer.resume()? {
            Some(step) => eprintln!("      resumed at step {step}"),
            None => eprintln!("      nothing to resume: starting afresh"),
        }
    } else {
        let _ = std::fs::remove_file(args.out.join(METRICS_FILE));
    }
    let summary = trainer.run()?;
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

    stage("4/5 evaluating the trained model");
    let after = evaluate(&trainer.model, &tokenizer, &eval_sets, &lexicon, &args)?;
    let xnli_after = xnli
        .as_ref()
        .map(|d| xnli_accuracy(&trainer.model, d, &nli_config))
        .transpose()?;

    stage(&format!("5/5 writing {}", args.out.display()));
    let mut report = results_markdown(
        &args,
        &mode,
        embedded,
        &before,
        &after,
        summary.checkpoint.as_deref(),
    );
    if let (Some(b), Some(a)) = (&xnli_before, &xnli_after) {
        report += &xnli_markdown(b, a);
    }
    write_atomic(&args.out.join("results.md"), report.as_bytes())?;
    let records: Vec<StepRecord> = std::fs::read_to_string(args.out.join(METRICS_FILE))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    plot_training(&records, &args.out.join("loss.svg"))?;
    let rows: Vec<BeforeAfter> = before
        .sentence
        .iter()
        .map(|(lang, b)| BeforeAfter {
            label: format!("{lang}-eng"),
            before: b.mean(),
            after: after.sentence[lang].mean(),
        })
        .collect();
    plot_before_after(
        "Tatoeba retrieval acc@1 (held-apart pairs, both directions)",
        &rows,
        &args.out.join("retrieval.svg"),
    )?;
    println!("{report}");
    Ok(())
}

/// English NLI training examples and the multilingual evaluation examples.
struct XnliData {
    train: Vec<NliExample>,
    eval: Vec<NliExample>,
}

/// Zero-shot XNLI: fine-tune a copy of the encoder on English, evaluate every language.
fn xnli_accuracy(
    model: &MlCtlModel,
    data: &XnliData,
    config: &NliFinetuneConfig,
) -> Result<NliReport> {
    let classifier = finetune_nli(&model.bert, &data.train, config)?;
    Ok(evaluate_nli(&classifier, &data.eval)?)
}

fn xnli_markdown(before: &NliReport, after: &NliReport) -> String {
    let mut s = String::from("\n## XNLI zero-shot accuracy (%), fine-tuned on English\n\n| language | before | after |\n|---|---|---|\n");
    for (lang, b) in &before.accuracy_by_language {
        let a = after
            .accuracy_by_language
            .get(lang)
            .copied()
            .unwrap_or(f32::NAN);
        s += &format!("| {lang} | {} | {} |\n", pct(*b), pct(a));
    }
    s += &format!(
        "| average | {} | {} |\n",
        pct(before.average),
        pct(after.average)
    );
    s
}

/// Scores of one model.
struct Evaluation {
    sentence: BTreeMap<String, RetrievalScores>,
    anchor: BTreeMap<String, RetrievalScores>,
    aer: Option<f64>,
}

fn evaluate(
    model: &MlCtlModel,
    tokenizer: &Tokenizer,
    sets: &[EvalSet],
    lexicon: &Lexicon,
    args: &Args,
) -> Result<Evaluation> {
    let encoder = &model.bert.model.encoder;
    let (mut sentence, mut anchor) = (BTreeMap::new(), BTreeMap::new());
    for set in sets {
        let src = embed_sentences(encoder, tokenizer, &model.pooling, &set.src, 64)?;
        let eng = embed_sentences(encoder, tokenizer, &model.pooling, &set.eng, 64)?;
        sentence.insert(set.lang.clone(), retrieval_accuracy(&src, &eng)?);
        // Anchor words of the held-apart pairs: does each word retrieve its translation?
        let (mut texts, mut spans) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for (s, e) in set.src.iter().zip(&set.eng) {
            let found =
                mlctl::align::find_anchor_spans(lexicon, tokenizer, &set.lexicon_lang, s, "en", e)?;
            if let Some(a) = found.first() {
                texts.0.push(s.as_str());
                texts.1.push(e.as_str());
                spans.0.push(a.src_span);
                spans.1.push(a.tgt_span);
            }
        }
        if texts.0.len() >= 2 {
            let words = |t: &[&str], s: &[TokenSpan]| {
                embed_spans(encoder, tokenizer, &model.pooling, t, s, 64)
            };
            anchor.insert(
                set.lang.clone(),
                retrieval_accuracy(&words(&texts.0, &spans.0)?, &words(&texts.1, &spans.1)?)?,
            );
        }
    }
    let aer = match (&args.gold, &args.gold_input) {
        (Some(gold), Some(input)) => {
            let pairs = align_io::read_parallel(input)?;
            let gold = align_io::read_gold(gold, true)?;
            let layers = model.bert.config.num_hidden_layers as isize;
            let layer = args.align_layer.unwrap_or(8.min(layers));
            let aligner = WordAligner::new(encoder, tokenizer.clone()).with_layer(layer);
            let predicted = aligner.align_pairs(&pairs, &IterMax::default())?;
            Some(AlignmentCounts::corpus(&predicted, &gold)?.aer())
        }
        _ => None,
    };
    Ok(Evaluation {
        sentence,
        anchor,
        aer,
    })
}

/// Writes the ML-CTL TSV of the embedded pairs that have a dictionary anchor; returns how many.
fn write_anchored_tsv(
    path: &Path,
    pairs: &[(&str, Vec<String>, Vec<String>)],
    lexicon: &Lexicon,
    tokenizer: &Tokenizer,
) -> Result<usize> {
    let mut out = String::new();
    let mut written = 0;
    for (lang, src, eng) in pairs {
        for (s, e) in src.iter().zip(eng) {
            if let Some(anchor) =
                mlctl::align::find_anchor_spans(lexicon, tokenizer, lang, s, "en", e)?.first()
            {
                out += &anchor.to_tsv(s, e)?;
                out.push('\n');
                written += 1;
            }
        }
    }
    if written == 0 {
        bail!("no embedded training pair has a dictionary anchor");
    }
    write_atomic(path, out.as_bytes())?;
    Ok(written)
}

fn pct(x: f32) -> String {
    format!("{:.1}", 100.0 * x)
}

fn results_markdown(
    args: &Args,
    mode: &Mode,
    embedded: bool,
    before: &Evaluation,
    after: &Evaluation,
    checkpoint: Option<&Path>,
) -> String {
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
        "- objective: `{:?}`; steps {}, batch {}, max_len {}, lr {:e} (linear decay, {} warm-up), temperature {}, MLM weight {}, seed {}\n",
        args.objective, mode.steps, mode.batch_size, mode.max_len, mode.lr, mode.warmup, args.temperature, args.mlm_weight, args.seed
    );
    let data = match (&args.train, embedded) {
        (Some(p), _) => p.display().to_string(),
        (None, _) => format!(
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
    s += "\n## Sentence retrieval acc@1 (%), xx→en / en→xx\n\n| language | before | after |\n|---|---|---|\n";
    for (lang, b) in &before.sentence {
        let a = &after.sentence[lang];
        s += &format!(
            "| {lang}-eng | {} / {} | {} / {} |\n",
            pct(b.src_to_tgt),
            pct(b.tgt_to_src),
            pct(a.src_to_tgt),
            pct(a.tgt_to_src)
        );
    }
    s += "\n## Anchor-word retrieval acc@1 (%), xx→en / en→xx\n\n| language | pairs | before | after |\n|---|---|---|---|\n";
    for (lang, b) in &before.anchor {
        let a = &after.anchor[lang];
        s += &format!(
            "| {lang}-eng | {} | {} / {} | {} / {} |\n",
            b.n,
            pct(b.src_to_tgt),
            pct(b.tgt_to_src),
            pct(a.src_to_tgt),
            pct(a.tgt_to_src)
        );
    }
    if let (Some(b), Some(a)) = (before.aer, after.aer) {
        s += &format!("\n## Word alignment\n\nAER (itermax): before {b:.3}, after {a:.3}\n");
    }
    s
}
