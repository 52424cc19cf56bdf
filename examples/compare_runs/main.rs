//! Compares `pretrain_xnli` runs side by side: every metric with its 95% bootstrap interval,
//! and paired differences between the runs and against the starting model.
//!
//! A command line over `mlctl::pretrain::objectives_markdown`. See
//! `examples/compare_runs/README.md`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mlctl::pretrain::{objectives_markdown, read_evaluations};

/// Tables comparing `pretrain_xnli` runs evaluated on the same suite.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Run directories (each with the `evaluation.json` that `pretrain_xnli` writes), the
    /// first one being the run the others are compared with. A directory's label is its name.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut start = None;
    let mut runs = Vec::new();
    for dir in &args.runs {
        let evaluations =
            read_evaluations(dir).with_context(|| format!("reading {}", dir.display()))?;
        let label = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        match &start {
            None => start = Some(evaluations.before),
            Some(first) if *first != evaluations.before => bail!(
                "{} started from another model or was evaluated on another suite than {}",
                dir.display(),
                args.runs[0].display()
            ),
            Some(_) => {}
        }
        runs.push((label, evaluations.after));
    }
    let start = start.context("no run given")?;
    print!("{}", objectives_markdown(&start, &runs)?);
    Ok(())
}
