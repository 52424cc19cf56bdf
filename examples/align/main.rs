//! Word alignment with any BERT checkpoint: `src ||| tgt` lines in, Pharaoh links out, and
//! precision / recall / F1 / AER against a gold file.
//!
//! See `examples/align/README.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{ArgAction, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use mlctl::align::io::{
    check_gold, pharaoh_text, read_gold, read_parallel, write_pharaoh, write_scores,
    write_word_pairs,
};
use mlctl::align::{
    method_by_name, AlignMethod, Alignment, AlignmentCounts, ScoredAlignment, SoftmaxAlign,
    TokenType, WordAligner, DEFAULT_ALIGN_LAYER, METHOD_NAMES,
};
use mlctl::device::{select_device, DeviceChoice};
use mlctl::encoder::{BertConfig, BertEncoder};
use mlctl::pooling::Pooling;
use mlctl::pretrained::PretrainedBert;

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
    /// Extraction methods, comma-separated (argmax, itermax, match, softmax, sparsemax): one
    /// encoder pass serves them all, one output file each.
    #[arg(long, default_value = "argmax", value_delimiter = ',', value_parser = METHOD_NAMES)]
    method: Vec<String>,
    /// What the methods link: `bpe` (subwords, then a word pair is linked when any of its
    /// subwords are; SimAlign's default) or `word` (words as the mean of their subwords).
    #[arg(long, default_value = "bpe", value_parser = ["bpe", "word"])]
    token_type: String,
    /// Hidden layer of the word vectors (0 = embeddings, negative from the end); default
    /// min(8, number of layers), 8 being SimAlign's choice for mBERT.
    #[arg(long, allow_hyphen_values = true)]
    layer: Option<isize>,
    /// Use ML-CTL's pooling instead of one layer: the mean of layer 1 and the last layer.
    #[arg(long, conflicts_with = "layer")]
    mlctl_pooling: bool,
    /// Pharaoh output (0-based `i-j`), written atomically; absent writes to stdout. With several
    /// methods, one file each: `out.align` becomes `out.argmax.align`, `out.itermax.align`, ...
    #[arg(long)]
    output: Option<PathBuf>,
    /// The aligned words, awesome-align's `--output_word_file`: `src<sep>tgt` per link, one
    /// line per pair, written atomically; with several methods one file each, named as for
    /// `--output`.
    #[arg(long)]
    output_word_file: Option<PathBuf>,
    /// A score per link, awesome-align's `--output_prob_file`: one number per link in the order
    /// of the Pharaoh line (the similarity for argmax, itermax and match; awesome-align's link
    /// probability for softmax and sparsemax); with several methods one file each.
    #[arg(long)]
    output_prob_file: Option<PathBuf>,
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
    /// Sentence pairs per forward pass. Memory grows with it times the longest sentence's
    /// tokens squared: 8 pairs of ~300-token sentences peak near 4 GB with a 12-layer model.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Maximum tokens per sentence, special tokens included; words past it get no link.
    /// Default: the model's position limit (`max_position_embeddings`), as SimAlign truncates.
    #[arg(long)]
    max_len: Option<usize>,
    /// auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

/// Where method `name`'s links go: `path` itself for a single method, else `path` with the
/// method's name before its extension.
fn output_path(path: &Path, name: &str, several: bool) -> PathBuf {
    if !several {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let file = match path.extension() {
        Some(ext) => format!("{stem}.{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{name}"),
    };
    path.with_file_name(file)
}

/// The encoder up to the deepest layer the vectors need: layers above it cannot change them.
/// The layers share their weights with `bert`'s encoder.
fn encoder_up_to(bert: &PretrainedBert, device: &Device, layers: &[isize]) -> Result<BertEncoder> {
    let full = bert.encoder().config().num_hidden_layers;
    let deepest = layers
        .iter()
        .map(|&l| usize::try_from(l).ok())
        .collect::<Option<Vec<_>>>();
    match deepest.and_then(|d| d.into_iter().max()) {
        Some(deepest) if (1..full).contains(&deepest) => {
            let config = BertConfig {
                num_hidden_layers: deepest,
                ..bert.encoder().config().clone()
            };
            Ok(BertEncoder::load(
                bert.params.var_builder(DType::F32, device).pp("bert"),
                &config,
            )?)
        }
        _ => Ok(bert.encoder().clone()),
    }
}

fn main() -> Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args = Args::parse();
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut names: Vec<&str> = Vec::new();
    for name in &args.method {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let several = names.len() > 1;
    if several && args.output.is_none() {
        bail!("--output is needed with several methods (one file each)");
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
    // The library's parser, but softmax with the threshold asked for.
    let methods = names
        .iter()
        .map(|&name| match name {
            "softmax" => Ok(Box::new(SoftmaxAlign {
                threshold: args.softmax_threshold,
            }) as Box<dyn AlignMethod>),
            other => method_by_name(other),
        })
        .collect::<mlctl::Result<Vec<_>>>()?;
    let methods: Vec<&dyn AlignMethod> = methods.iter().map(AsRef::as_ref).collect();
    let token_type: TokenType = args.token_type.parse()?;

    let device = select_device(args.device)?;
    let bert = PretrainedBert::load(&args.model, &device, DType::F32)
        .with_context(|| format!("loading {}", args.model))?;
    let tokenizer = bert.tokenizer()?.clone().with_max_len(
        args.max_len
            .unwrap_or(bert.encoder().config().max_sequence_length()),
    )?;
    let num_layers = bert.encoder().config().num_hidden_layers as isize;
    let pooling = if args.mlctl_pooling {
        Pooling::mlctl()
    } else {
        Pooling::layer(args.layer.unwrap_or(DEFAULT_ALIGN_LAYER.min(num_layers)))
    };
    let encoder = encoder_up_to(&bert, &device, pooling.layers())?;
    let aligner = WordAligner::new(&encoder, tokenizer)
        .with_pooling(&pooling)
        .with_token_type(token_type)
        .with_batch_size(2 * args.batch_size)
        .with_distortion(args.distortion)
        .with_null_threshold(args.null_threshold);

    let start = Instant::now();
    let progress = ProgressBar::new(pairs.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} pairs, {per_sec}, eta {eta}")
            .expect("valid template"),
    );
    // Batches are sorted by length within each window of pairs; windows bound the memory the
    // vectors take and pace the progress bar.
    let window = (16 * args.batch_size).max(256);
    let scored = args.output_prob_file.is_some();
    let mut alignments: Vec<Vec<ScoredAlignment>> =
        vec![Vec::with_capacity(pairs.len()); names.len()];
    for chunk in pairs.chunks(window) {
        let per_method = if scored {
            aligner.align_pairs_scored(chunk, &methods)?
        } else {
            aligner
                .align_pairs_multi(chunk, &methods)?
                .into_iter()
                .map(|method| {
                    method
                        .into_iter()
                        .map(|alignment| ScoredAlignment {
                            alignment,
                            scores: Vec::new(),
                        })
                        .collect()
                })
                .collect()
        };
        for (all, more) in alignments.iter_mut().zip(per_method) {
            all.extend(more);
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    for (name, scored_links) in names.iter().zip(&alignments) {
        let aligned: Vec<Alignment> = scored_links.iter().map(|s| s.alignment.clone()).collect();
        let aligned = &aligned;
        if let Some(path) = &args.output_word_file {
            write_word_pairs(output_path(path, name, several), &pairs, aligned)?;
        }
        if let Some(path) = &args.output_prob_file {
            write_scores(output_path(path, name, several), scored_links)?;
        }
        match &args.output {
            Some(path) => write_pharaoh(output_path(path, name, several), aligned)?,
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(pharaoh_text(aligned).as_bytes())?;
                out.flush()?;
            }
        }
    }
    eprintln!(
        "aligned {} pairs with {} ({} units) on layers {:?} of {} in {seconds:.1} s",
        pairs.len(),
        names.join(", "),
        args.token_type,
        pooling.layers(),
        args.model
    );
    if let Some(gold) = gold {
        for (name, scored_links) in names.iter().zip(&alignments) {
            let aligned: Vec<Alignment> =
                scored_links.iter().map(|s| s.alignment.clone()).collect();
            let c = AlignmentCounts::corpus(&aligned, &gold)?;
            let report = format!(
                "{name}: precision {:.4}  recall {:.4}  F1 {:.4}  AER {:.4}  (|A| {}, |S| {}, |A∩S| {}, |A∩P| {})",
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
    }
    Ok(())
}
