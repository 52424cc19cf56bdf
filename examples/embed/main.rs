//! Embeds sentences with any BERT checkpoint: one line in, one vector out.
//!
//! See `examples/embed/README.md`.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Parser;
use mlctl::device::{select_device, DeviceChoice};
use mlctl::encode::{encode, EncodeOptions};
use mlctl::encoder::PretrainedBert;
use mlctl::pooling::Pooling;

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
    /// Hidden layers to pool and sum (0 = embeddings, -1 = last); ML-CTL uses 1 and -1.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "1,-1"
    )]
    layers: Vec<isize>,
    /// Text prepended to every line before tokenization, e.g. `"query: "` for e5 models (use
    /// `--layers -1` for their own pooling, the mean of the last layer).
    #[arg(long)]
    prefix: Option<String>,
    /// Scale every embedding to unit length.
    #[arg(long)]
    normalize: bool,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Maximum tokens per sentence, special tokens included; longer ones are truncated.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = select_device(args.device)?;
    let bert = PretrainedBert::load(&args.model, &device, DType::F32)
        .with_context(|| format!("loading {}", args.model))?;
    let tokenizer = bert.tokenizer()?.clone().with_max_len(args.max_len)?;
    let mut options = EncodeOptions::default()
        .with_pooling(Pooling::mlctl().with_layers(args.layers.clone()))
        .with_batch_size(args.batch_size)
        .with_normalize(args.normalize)
        .with_progress(true);
    if let Some(prefix) = &args.prefix {
        options = options.with_prefix(prefix.clone());
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

    let embeddings = encode(&bert.model.encoder, &tokenizer, &lines, &options)?;

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
    eprintln!(
        "embedded {n} sentences into {dim} dimensions (layers {:?})",
        args.layers
    );
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
