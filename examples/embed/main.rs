//! Embeds sentences with any BERT checkpoint: one line in, one vector out.
//!
//! See `examples/embed/README.md`.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Parser;
use mlctl::device::{select_device, DeviceChoice};
use mlctl::encode::EncodeOptions;
use mlctl::pooling::Pooling;
use mlctl::pretrained::PretrainedBert;

/// Embed sentences (one per line) with a BERT checkpoint and write .npy or JSONL.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or Hugging Face id.
    #[arg(long)]
    model: String,
    /// Input text, one sentence per line; `-` or absent reads stdin.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Output file: `.npy` writes a [lines, hidden] f32 matrix, anything else JSONL; absent
    /// writes JSONL to stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Hidden layers to pool and sum (0 = embeddings, -1 = last), with the token mean. Default:
    /// a sentence-transformers directory's own pooling (`modules.json`), else ML-CTL's 1,-1.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    layers: Option<Vec<isize>>,
    /// Text prepended to every line before tokenization, e.g. `"query: "` for e5 models (use
    /// `--layers -1` for their own pooling, the mean of the last layer). Wins over
    /// `--prompt-name`; `--prefix ""` switches a model's default prompt off.
    #[arg(long)]
    prefix: Option<String>,
    /// One of a sentence-transformers model's named prompts (`query`, `passage`, ...).
    #[arg(long)]
    prompt_name: Option<String>,
    /// Scale every embedding to unit length (a sentence-transformers model with a `Normalize`
    /// module does so already).
    #[arg(long)]
    normalize: bool,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Maximum tokens per sentence, special tokens included; longer ones are truncated.
    /// Default: a sentence-transformers model's `max_seq_length`, else 128.
    #[arg(long)]
    max_len: Option<usize>,
    /// auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args = Args::parse();
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = select_device(args.device)?;
    let bert = PretrainedBert::load(&args.model, &device, DType::F32)
        .with_context(|| format!("loading {}", args.model))?;
    let mut options = EncodeOptions::default()
        .with_batch_size(args.batch_size)
        .with_progress(true);
    if let Some(layers) = &args.layers {
        options = options.with_pooling(Pooling::mlctl().with_layers(layers.clone()));
    }
    if args.normalize {
        options = options.with_normalize(true);
    }
    if let Some(max_len) = args.max_len {
        options = options.with_max_len(max_len);
    }
    if let Some(prefix) = &args.prefix {
        options = options.with_prefix(prefix.clone());
    }
    if let Some(name) = &args.prompt_name {
        options = options.with_prompt_name(name.clone());
    }

    let lines: Vec<String> = match &args.input {
        Some(path) if path.as_os_str() != "-" => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::to_owned)
            .collect(),
        _ => std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()?,
    };
    if lines.is_empty() {
        bail!("no input lines");
    }

    // Follows a sentence-transformers directory's modules where the flags leave them open.
    let embeddings = bert.encode(&lines, &options)?;

    match &args.output {
        Some(path) if path.extension().is_some_and(|e| e == "npy") => {
            // Write beside and rename, so an interrupted run leaves no half-written file.
            let tmp = path.with_extension("npy.partial");
            embeddings.write_npy(&tmp)?;
            std::fs::rename(&tmp, path)?;
        }
        Some(path) => {
            let tmp = path.with_extension("partial");
            write_jsonl(
                BufWriter::new(std::fs::File::create(&tmp)?),
                &lines,
                &embeddings,
            )?;
            std::fs::rename(&tmp, path)?;
        }
        None => write_jsonl(
            BufWriter::new(std::io::stdout().lock()),
            &lines,
            &embeddings,
        )?,
    }
    let (n, dim) = embeddings.dims2()?;
    let pooling = match (&args.layers, &bert.sentence_transformer) {
        (Some(layers), _) => format!("layers {layers:?}"),
        (None, Some(st)) => format!("the model's modules.json: {:?}", st.pooling.modes()),
        (None, None) => format!("layers {:?}", Pooling::mlctl().layers()),
    };
    eprintln!("embedded {n} sentences into {dim} dimensions ({pooling})");
    Ok(())
}

#[derive(serde::Serialize)]
struct Record<'a> {
    line: usize,
    text: &'a str,
    embedding: Vec<f32>,
}

fn write_jsonl(mut out: impl Write, lines: &[String], embeddings: &Tensor) -> Result<()> {
    for (i, (text, embedding)) in lines.iter().zip(embeddings.to_vec2::<f32>()?).enumerate() {
        serde_json::to_writer(
            &mut out,
            &Record {
                line: i + 1,
                text,
                embedding,
            },
        )?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
