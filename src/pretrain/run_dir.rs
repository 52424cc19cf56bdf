//! The run directory: evaluations, results and metrics, written atomically and read back.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::Evaluation;
use crate::fs::write_atomic;
use crate::train::{latest_checkpoint, StepRecord, METRICS_FILE};
use crate::{Error, Result};

/// Name of the file [`write_evaluations`] writes in a run directory.
pub const EVALUATION_FILE: &str = "evaluation.json";

/// The evaluations of a run's starting and trained models, as saved in its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvaluations {
    /// The starting model.
    pub before: Evaluation,
    /// The trained model.
    pub after: Evaluation,
}

/// Writes `dir/evaluation.json` atomically; [`read_evaluations`] reads it back.
pub fn write_evaluations(dir: &Path, evaluations: &RunEvaluations) -> Result<std::path::PathBuf> {
    let path = dir.join(EVALUATION_FILE);
    let json = serde_json::to_vec(evaluations).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    write_atomic(&path, &json)?;
    Ok(path)
}

/// Reads a run directory's `evaluation.json`.
pub fn read_evaluations(dir: &Path) -> Result<RunEvaluations> {
    let path = dir.join(EVALUATION_FILE);
    let text = std::fs::read(&path).map_err(Error::io(&path))?;
    serde_json::from_slice(&text).map_err(|source| Error::Json { path, source })
}

/// Name of the results file a run directory gets from [`write_results`].
pub const RESULTS_FILE: &str = "results.md";

/// Writes `markdown` to `dir/results.md` atomically (a temporary file renamed into place, so an
/// interrupted run never leaves a half-written report) and returns the file's path.
pub fn write_results(dir: &Path, markdown: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(RESULTS_FILE);
    crate::fs::write_atomic(&path, markdown.as_bytes())?;
    Ok(path)
}

/// Makes `dir` a run directory. Unless `resume`, one that already holds checkpoints is refused:
/// a new run never overwrites or mixes with an earlier one.
pub fn prepare_run_dir(dir: &Path, resume: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    if !resume {
        if let Some((step, _)) = latest_checkpoint(&dir.join("checkpoints"))? {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a run (checkpoint at step {step}): pass --resume to continue \
                 it, or --out DIR to start the new run in another directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The per-step records the trainer wrote to a run directory's `metrics.jsonl`.
pub fn read_metrics(dir: &Path) -> Result<Vec<StepRecord>> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
    text.lines()
        .map(|line| {
            serde_json::from_str(line).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })
        })
        .collect()
}
