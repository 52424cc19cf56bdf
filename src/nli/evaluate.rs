//! Accuracy of an NLI predictor per language, as XNLI results are reported.

use std::collections::BTreeMap;
use std::fmt;

use super::data::{NliExample, NliLabel};
use crate::{Error, Result};

/// Anything that predicts NLI labels: what [`evaluate_nli`] evaluates.
pub trait NliPredictor {
    /// One label per example, in order.
    fn predict(&self, examples: &[NliExample]) -> Result<Vec<NliLabel>>;
}

/// Correct predictions and examples of one language.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LanguageCounts {
    /// Examples predicted right.
    pub correct: usize,
    /// Examples.
    pub total: usize,
}

/// Accuracy per language, as XNLI results are reported.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NliReport {
    /// Accuracy (`correct / total`, in `[0, 1]`) of each language.
    pub accuracy_by_language: BTreeMap<String, f32>,
    /// The counts behind each accuracy.
    pub counts: BTreeMap<String, LanguageCounts>,
    /// Accuracy over all examples, whatever their language.
    pub overall: f32,
    /// Mean of the per-language accuracies: the "avg" column of XNLI tables. On the official
    /// sets, where every language has the same examples, it equals `overall`.
    pub average: f32,
    /// Confusion matrix over all examples: `confusion[gold][predicted]`, classes in
    /// [`NliLabel::index`] order.
    pub confusion: [[usize; 3]; 3],
}

impl NliReport {
    /// The report for `predictions` of `examples` (one per example, in order).
    pub fn from_predictions(examples: &[NliExample], predictions: &[NliLabel]) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::InvalidArgument("no NLI examples to evaluate".into()));
        }
        if predictions.len() != examples.len() {
            return Err(Error::ShapeMismatch {
                name: "NLI predictions".into(),
                expected: vec![examples.len()],
                actual: vec![predictions.len()],
            });
        }
        let mut counts: BTreeMap<String, LanguageCounts> = BTreeMap::new();
        let mut confusion = [[0usize; 3]; 3];
        let mut correct = 0usize;
        for (example, &predicted) in examples.iter().zip(predictions) {
            let entry = counts.entry(example.language.clone()).or_default();
            entry.total += 1;
            if predicted == example.label {
                entry.correct += 1;
                correct += 1;
            }
            confusion[example.label.index()][predicted.index()] += 1;
        }
        let accuracy_by_language: BTreeMap<String, f32> = counts
            .iter()
            .map(|(l, c)| (l.clone(), (c.correct as f64 / c.total as f64) as f32))
            .collect();
        let average = (accuracy_by_language
            .values()
            .map(|&a| a as f64)
            .sum::<f64>()
            / accuracy_by_language.len() as f64) as f32;
        Ok(Self {
            accuracy_by_language,
            counts,
            overall: (correct as f64 / examples.len() as f64) as f32,
            average,
            confusion,
        })
    }
}

impl fmt::Display for NliReport {
    /// One line per language (`fr  74.20%  (3717/5010)`), then the average and overall
    /// accuracy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (language, accuracy) in &self.accuracy_by_language {
            let c = self.counts[language];
            writeln!(
                f,
                "{language:<8} {:6.2}%  ({}/{})",
                accuracy * 100.0,
                c.correct,
                c.total
            )?;
        }
        writeln!(f, "{:<8} {:6.2}%", "average", self.average * 100.0)?;
        write!(f, "{:<8} {:6.2}%", "overall", self.overall * 100.0)
    }
}

/// Predicts every example with `predictor` and reports the accuracy per language.
///
/// Errors: [`Error::InvalidArgument`] for no examples, [`Error::ShapeMismatch`] when the
/// predictor returns another number of labels, and the predictor's own errors.
pub fn evaluate_nli<P: NliPredictor + ?Sized>(
    predictor: &P,
    examples: &[NliExample],
) -> Result<NliReport> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument("no NLI examples to evaluate".into()));
    }
    let predictions = predictor.predict(examples)?;
    NliReport::from_predictions(examples, &predictions)
}
