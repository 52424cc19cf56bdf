//! What an evaluation holds: [`Evaluation`] and its [`Metric`]s, each with a bootstrap interval.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::tasks::AlignmentScores;
use crate::align::AlignmentCounts;
use crate::eval::bootstrap::{self, Interval};
use crate::eval::tatoeba::TatoebaReport;
use crate::eval::RetrievalScores;
use crate::nli::NliReport;
use crate::{Error, Result};

/// Scores of one model on an [`EvalSuite`](super::EvalSuite); saved beside a run's results
/// ([`write_evaluations`](super::write_evaluations)) so that runs can be compared later ([`objectives_markdown`](super::objectives_markdown)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Sentence retrieval of each set, by pooling label ([`SentencePooling::label`](super::SentencePooling::label)) then set
    /// name.
    pub sentence: BTreeMap<String, BTreeMap<String, RetrievalScores>>,
    /// Anchor-word retrieval (the model's sentence pooling over the word's span, whatever
    /// layers its head pools words over) of each set with at least
    /// two anchored pairs, by name.
    pub anchor: BTreeMap<String, RetrievalScores>,
    /// Word alignment of every task, method and token type.
    pub alignment: Vec<AlignmentScores>,
    /// XNLI accuracy, with an [`XnliTask`](super::XnliTask).
    pub xnli: Option<NliReport>,
    /// Which XNLI split was evaluated, and why ([`XnliTask::split`](super::XnliTask::split)).
    pub xnli_split: Option<String>,
    /// XTREME's Tatoeba task, with a [`TatoebaTask`](crate::eval::tatoeba::TatoebaTask).
    #[serde(default)]
    pub tatoeba: Option<TatoebaReport>,
}

impl Evaluation {
    /// Sentence retrieval with the first pooling of the suite (the model's own by default).
    pub fn sentence_first(&self) -> Option<&BTreeMap<String, RetrievalScores>> {
        self.sentence.values().next()
    }

    /// Every metric of this evaluation as bootstrap items, in a fixed order: averages of
    /// sentence retrieval per pooling and of anchor retrieval (hits, both directions, every
    /// set), then AER per task, method and token type.
    pub fn metrics(&self) -> Vec<Metric> {
        let mut out = Vec::new();
        let hits = |sets: &BTreeMap<String, RetrievalScores>| -> Vec<f64> {
            sets.values().flat_map(RetrievalScores::hits).collect()
        };
        for (pooling, sets) in &self.sentence {
            out.push(Metric {
                label: format!("sentence acc@1, {pooling}"),
                items: MetricItems::Hits(hits(sets)),
            });
        }
        if !self.anchor.is_empty() {
            out.push(Metric {
                label: "anchor-word acc@1".into(),
                items: MetricItems::Hits(hits(&self.anchor)),
            });
        }
        for (label, hits) in self.tatoeba.iter().flat_map(TatoebaReport::metric_hits) {
            out.push(Metric {
                label,
                items: MetricItems::Hits(hits),
            });
        }
        for a in &self.alignment {
            out.push(Metric {
                label: format!("AER {}", a.label()),
                items: MetricItems::Alignment(a.pairs.clone()),
            });
        }
        out
    }
}

/// One summary metric of an [`Evaluation`] with the items its bootstrap resamples.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Row label.
    pub label: String,
    /// What is resampled.
    pub items: MetricItems,
}

/// The items of a [`Metric`].
#[derive(Debug, Clone, PartialEq)]
pub enum MetricItems {
    /// Retrieval hits (0 or 1) of every query: the metric is their mean, in percent.
    Hits(Vec<f64>),
    /// Alignment counts of every sentence pair: the metric is the corpus AER.
    Alignment(Vec<AlignmentCounts>),
}

impl Metric {
    /// The value with its 95% interval (accuracy in percent, AER as a fraction).
    pub fn interval(&self) -> Result<Interval> {
        match &self.items {
            MetricItems::Hits(h) => Ok(bootstrap::mean_interval(h)?.scaled(100.0)),
            MetricItems::Alignment(c) => bootstrap::aer_interval(c),
        }
    }

    /// The value as measured, without an interval (accuracy in percent, AER as a fraction):
    /// [`Metric::interval`]'s estimate.
    pub fn value(&self) -> f64 {
        match &self.items {
            MetricItems::Hits(h) => 100.0 * h.iter().sum::<f64>() / h.len().max(1) as f64,
            MetricItems::Alignment(c) => c.iter().copied().sum::<AlignmentCounts>().aer(),
        }
    }

    /// Whether two evaluations' metric lists come from the same suite: the same labels in the
    /// same order.
    pub fn same_suite(a: &[Metric], b: &[Metric]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.label == b.label)
    }

    /// `other - self` on the same items, with its paired 95% interval.
    pub fn difference(&self, other: &Metric) -> Result<Interval> {
        match (&self.items, &other.items) {
            (MetricItems::Hits(a), MetricItems::Hits(b)) => {
                Ok(bootstrap::paired_mean_difference(a, b)?.scaled(100.0))
            }
            (MetricItems::Alignment(a), MetricItems::Alignment(b)) => {
                bootstrap::paired_aer_difference(a, b)
            }
            _ => Err(Error::InvalidArgument(format!(
                "cannot compare `{}` with `{}`",
                self.label, other.label
            ))),
        }
    }

    /// The mean over seeds of `after[s] - before[s]` (runs of two configurations paired by
    /// seed, every run scored on the same items), with the 95% interval of one resampling of
    /// those items shared by every run ([`bootstrap::paired_mean_difference_over_seeds`]).
    pub fn difference_over_seeds(before: &[&Metric], after: &[&Metric]) -> Result<Interval> {
        fn hits<'a>(runs: &[&'a Metric]) -> Option<Vec<&'a [f64]>> {
            runs.iter()
                .map(|m| match &m.items {
                    MetricItems::Hits(h) => Some(h.as_slice()),
                    MetricItems::Alignment(_) => None,
                })
                .collect()
        }
        fn pairs<'a>(runs: &[&'a Metric]) -> Option<Vec<&'a [AlignmentCounts]>> {
            runs.iter()
                .map(|m| match &m.items {
                    MetricItems::Alignment(c) => Some(c.as_slice()),
                    MetricItems::Hits(_) => None,
                })
                .collect()
        }
        if let (Some(b), Some(a)) = (hits(before), hits(after)) {
            return Ok(bootstrap::paired_mean_difference_over_seeds(&b, &a)?.scaled(100.0));
        }
        if let (Some(b), Some(a)) = (pairs(before), pairs(after)) {
            return bootstrap::paired_aer_difference_over_seeds(&b, &a);
        }
        Err(Error::InvalidArgument(
            "a difference over seeds needs one kind of metric in every run".into(),
        ))
    }

    /// Whether lower is better (AER).
    pub fn lower_is_better(&self) -> bool {
        matches!(self.items, MetricItems::Alignment(_))
    }
}
