//! Word alignment with any BERT checkpoint: `src ||| tgt` lines in, Pharaoh links out, and
//! precision / recall / F1 / AER against a gold file.
//!
//! See `examples/align/README.md`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{ArgAction, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use mlctl::align::io::{check_gold, pharaoh_text, read_gold, read_parallel, write_pharaoh};
use mlctl::align::{
    AlignMethod, AlignmentCounts, ArgMax, IterMax, MaxWeightMatch, SoftmaxAlign, SparsemaxAlign,
    WordAligner, DEFAULT_ALIGN_LAYER,
};
use mlctl::device::{select_device, DeviceChoice};
use mlctl::encoder::PretrainedBert;
use mlctl::pooling::Pooling;

/// Align the words of tokenized sentence pairs (`source ||| target`, one pair per line).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or Hugging Face id.
    #[arg(long)]
    model: String,
    /// Parallel file: `source words ||| target words` per line, words separated by spaces.
    #[arg(long)]
    input: PathBuf,
    /// Extraction method: argmax, itermax, match, softmax or sparsemax.
    #[arg(long, default_value = "argmax", value_parser = ["argmax", "itermax", "match", "softmax", "sparsemax"])]
    method: String,
    /// Hidden layer of the word vectors (0 = embeddings, negative from the end); default
    /// min(8, number of layers), 8 being SimAlign's choice for mBERT.
    #[arg(long, allow_hyphen_values = true)]
    layer: Option<isize>,
    /// Use ML-CTL's pooling instead of one layer: the mean of layer 1 and the last layer.
    #[arg(long, conflicts_with = "layer")]
    mlctl_pooling: bool,
    /// Pharaoh output (0-based `i-j`), written atomically; absent writes to stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Gold alignments (`i-j` sure, `ipj` possible) to score against: prints P/R/F1/AER.
    #[arg(long)]
    gold: Option<PathBuf>,
    /// Whether the gold file counts from 1 (the shared ja-en / ro-en sets do).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    gold_one_based: bool,
    /// Softmax threshold (method softmax), awesome-align's default.
    #[arg(long, default_value_t = 1e-3)]
    softmax_threshold: f64,
    /// SimAlign's distortion prior ratio (0 = off; SimAlign uses 0.5 when on).
    #[arg(long, default_value_t = 0.0)]
    distortion: f32,
    /// Drop links whose similarity is below this value.
    #[arg(long)]
    null_threshold: Option<f32>,
    /// Sentence pairs per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Maximum tokens per sentence, special tokens included; words past it get no link.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Run on the CPU whatever `--device` says.
    #[arg(long)]
    cpu: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // Validate every input before loading the model or writing anything.
    let pairs = read_parallel(&args.input)?;
    let gold = match &args.gold {
        Some(path) => {
            let gold = read_gold(path, args.gold_one_based)?;
            check_gold(path, &gold, &pairs, args.gold_one_based)?;
            Some(gold)
        }
        None => None,
    };
    let method: Box<dyn AlignMethod> = match args.method.as_str() {
        "argmax" => Box::new(ArgMax),
        "itermax" => Box::new(IterMax::default()),
        "match" => Box::new(MaxWeightMatch),
        "sparsemax" => Box::new(SparsemaxAlign::default()),
        _ => Box::new(SoftmaxAlign {
            threshold: args.softmax_threshold,
        }),
    };

    let device = select_device(if args.cpu {
        DeviceChoice::Cpu
    } else {
        args.device
    })?;
    let bert = PretrainedBert::load(&args.model, &device, DType::F32)
        .with_context(|| format!("loading {}", args.model))?;
    let tokenizer = bert.tokenizer()?.clone().with_max_len(args.max_len)?;
    let num_layers = bert.model.encoder.config().num_hidden_layers as isize;
    let pooling = if args.mlctl_pooling {
        Pooling::mlctl()
    } else {
        Pooling::layer(args.layer.unwrap_or(DEFAULT_ALIGN_LAYER.min(num_layers)))
    };
    let aligner = WordAligner::new(&bert.model.encoder, tokenizer)
        .with_pooling(&pooling)
        .with_distortion(args.distortion)
        .with_null_threshold(args.null_threshold);

    let progress = ProgressBar::new(pairs.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} pairs, {per_sec}, eta {eta}")
            .expect("valid template"),
    );
    let mut alignments = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(args.batch_size) {
        alignments.extend(aligner.align_pairs(chunk, method.as_ref())?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();

    match &args.output {
        Some(path) => write_pharaoh(path, &alignments)?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(pharaoh_text(&alignments).as_bytes())?;
            out.flush()?;
        }
    }
    let links: usize = alignments.iter().map(|a| a.len()).sum();
    eprintln!(
        "aligned {} pairs ({links} links) with {} on layers {:?} of {}",
        pairs.len(),
        method.name(),
        pooling.layers(),
        args.model
    );
    if let Some(gold) = gold {
        let c = AlignmentCounts::corpus(&alignments, &gold)?;
        let report = format!(
            "precision {:.4}  recall {:.4}  F1 {:.4}  AER {:.4}  (|A| {}, |S| {}, |A∩S| {}, |A∩P| {})",
            c.precision(),
            c.recall(),
            c.f1(),
            c.aer(),
            c.predicted,
            c.sure,
            c.predicted_sure,
            c.predicted_possible
        );
        // Keep stdout pure Pharaoh when the links go there.
        if args.output.is_some() {
            println!("{report}");
        } else {
            eprintln!("{report}");
        }
    }
    Ok(())
}
