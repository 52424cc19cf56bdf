//! Compares `pretrain_xnli` runs side by side: every metric with its 95% bootstrap interval,
//! paired differences between the runs and against the starting model, the mean ± standard
//! deviation over the seeds of each configuration and, when a configuration has several
//! seeds, the paired differences between configurations averaged over seeds.
//!
//! A command line over `mlctl::pretrain::objectives_markdown`. See
//! `examples/compare_runs/README.md`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mlctl::eval::seeds::{seed_group, seeds_markdown, RunMetrics};
use mlctl::pretrain::{
    objectives_markdown, read_evaluations, seed_differences_markdown, Evaluation,
};

/// Tables comparing `pretrain_xnli` runs evaluated on the same suite.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Run directories (each with the `evaluation.json` that `pretrain_xnli` writes), the
    /// first one being the run the others are compared with. A directory's label is its name;
    /// names that differ only by a trailing seed tag (`ml-ctl-seed0`, `ml-ctl-seed1`) are
    /// runs of one configuration, summarised as mean ± standard deviation.
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
    println!(
        "\n### Mean ± standard deviation over seeds\n\n\
         Runs grouped by directory name less its seed tag; the sample standard deviation \
         (n − 1) of each metric's value over the runs of a group.\n"
    );
    let values = runs
        .iter()
        .map(|(label, e)| Ok((label.clone(), metric_values(e)?)))
        .collect::<Result<Vec<RunMetrics>>>()?;
    let aer: Vec<String> = start
        .metrics()
        .into_iter()
        .filter(|m| m.lower_is_better())
        .map(|m| m.label)
        .collect();
    let lower_is_better = |label: &str| aer.iter().any(|a| a == label);
    print!("{}", seeds_markdown(&values, lower_is_better)?);
    tatoeba_averages(&start, &runs)?;
    let groups: std::collections::BTreeSet<&str> =
        runs.iter().map(|(label, _)| seed_group(label)).collect();
    if groups.len() < runs.len() {
        // Some configuration has several seeds: compare configurations seed by seed.
        print!("{}", seed_differences_markdown(&start, &runs)?);
    }
    Ok(())
}

/// With XTREME Tatoeba in the runs: its per-language averages (XTREME's summary: each
/// language counts once), mean ± standard deviation over seeds, beside the starting model.
fn tatoeba_averages(start: &Evaluation, runs: &[(String, Evaluation)]) -> Result<()> {
    let Some(report) = &start.tatoeba else {
        return Ok(());
    };
    let mut values: Vec<RunMetrics> = vec![("starting model".into(), report.averages())];
    for (label, evaluation) in runs {
        let report = evaluation
            .tatoeba
            .as_ref()
            .context("a run without Tatoeba")?;
        values.push((label.clone(), report.averages()));
    }
    println!(
        "\n### XTREME Tatoeba, averaged over languages, mean ± standard deviation over seeds\n\n\
         Accuracy in %, each language counted once (XTREME's average); en→xx is XTREME's \
         direction.\n"
    );
    print!("{}", seeds_markdown(&values, |_| false)?);
    Ok(())
}

/// Every metric's value (accuracy in %, AER as a fraction), labelled.
fn metric_values(evaluation: &Evaluation) -> Result<Vec<(String, f64)>> {
    evaluation
        .metrics()
        .into_iter()
        .map(|m| Ok((m.label.clone(), m.interval()?.estimate)))
        .collect()
}
