//! Gold alignments and alignment error rate (AER), precision, recall and F1.

use std::collections::BTreeSet;

use super::methods::Alignment;
use crate::{Error, Result};

/// A gold alignment: sure links and possible links, 0-based. `possible` always contains
/// `sure` (S ⊆ P).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GoldAlignment {
    sure: BTreeSet<(usize, usize)>,
    possible: BTreeSet<(usize, usize)>,
}

impl GoldAlignment {
    /// A gold alignment from sure and possible-only links; the sure links are added to the
    /// possible ones.
    pub fn new(
        sure: impl IntoIterator<Item = (usize, usize)>,
        possible: impl IntoIterator<Item = (usize, usize)>,
    ) -> Self {
        let sure: BTreeSet<_> = sure.into_iter().collect();
        let mut possible: BTreeSet<_> = possible.into_iter().collect();
        possible.extend(sure.iter().copied());
        Self { sure, possible }
    }

    /// The sure links S.
    pub fn sure(&self) -> &BTreeSet<(usize, usize)> {
        &self.sure
    }

    /// The possible links P (sure links included).
    pub fn possible(&self) -> &BTreeSet<(usize, usize)> {
        &self.possible
    }

    /// Parses one gold line: whitespace-separated `i-j` (sure) and `ipj` (possible) links,
    /// 1-based when `one_based` (then index 0 is an error). The error is the reason, for the
    /// caller to attach a file and line.
    pub fn parse(line: &str, one_based: bool) -> std::result::Result<Self, String> {
        let mut sure = Vec::new();
        let mut possible = Vec::new();
        for link in line.split_whitespace() {
            let (sep, target) = if let Some(p) = link.find('-') {
                (p, &mut sure)
            } else if let Some(p) = link.find('p') {
                (p, &mut possible)
            } else {
                return Err(format!(
                    "`{link}` is neither an `i-j` (sure) nor an `ipj` (possible) link"
                ));
            };
            let index = |s: &str| -> std::result::Result<usize, String> {
                let v = s
                    .parse::<usize>()
                    .map_err(|_| format!("`{link}`: `{s}` is not a non-negative integer"))?;
                if one_based {
                    v.checked_sub(1)
                        .ok_or_else(|| format!("`{link}`: index 0 in a 1-based gold file"))
                } else {
                    Ok(v)
                }
            };
            target.push((index(&link[..sep])?, index(&link[sep + 1..])?));
        }
        Ok(Self::new(sure, possible))
    }

    /// The gold alignment as a line in its own format (`i-j` sure, `ipj` possible-only).
    pub fn to_line(&self, one_based: bool) -> String {
        let o = usize::from(one_based);
        self.possible
            .iter()
            .map(|&(i, j)| {
                let sep = if self.sure.contains(&(i, j)) {
                    '-'
                } else {
                    'p'
                };
                format!("{}{sep}{}", i + o, j + o)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The largest source and target indices, if any link exists.
    pub fn max_indices(&self) -> Option<(usize, usize)> {
        let i = self.possible.iter().map(|l| l.0).max()?;
        let j = self.possible.iter().map(|l| l.1).max()?;
        Some((i, j))
    }
}

/// Link counts accumulated over a corpus, from which the scores are computed (corpus-level:
/// counts are summed over sentences, then divided).
///
/// With A the predicted links, S the sure and P the possible gold links:
/// - precision = |A∩P| / |A| (0 when A is empty)
/// - recall = |A∩S| / |S| (0 when S is empty)
/// - F1 = 2PR / (P + R) (0 when both are 0)
/// - AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|) (0 when A and S are both empty)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AlignmentCounts {
    /// |A|.
    pub predicted: usize,
    /// |S|.
    pub sure: usize,
    /// |A ∩ S|.
    pub predicted_sure: usize,
    /// |A ∩ P|.
    pub predicted_possible: usize,
}

impl AlignmentCounts {
    /// Adds one sentence pair.
    pub fn add(&mut self, predicted: &Alignment, gold: &GoldAlignment) {
        self.predicted += predicted.len();
        self.sure += gold.sure.len();
        self.predicted_sure += predicted
            .links()
            .iter()
            .filter(|l| gold.sure.contains(l))
            .count();
        self.predicted_possible += predicted
            .links()
            .iter()
            .filter(|l| gold.possible.contains(l))
            .count();
    }

    /// Counts of one sentence pair.
    pub fn pair(predicted: &Alignment, gold: &GoldAlignment) -> Self {
        let mut counts = Self::default();
        counts.add(predicted, gold);
        counts
    }

    /// Counts over a corpus; the two slices must have one entry per sentence pair.
    pub fn corpus(predicted: &[Alignment], gold: &[GoldAlignment]) -> Result<Self> {
        if predicted.len() != gold.len() {
            return Err(Error::ShapeMismatch {
                name: "alignments vs gold".into(),
                expected: vec![gold.len()],
                actual: vec![predicted.len()],
            });
        }
        Ok(predicted
            .iter()
            .zip(gold)
            .map(|(a, g)| Self::pair(a, g))
            .sum())
    }

    /// |A∩P| / |A|.
    pub fn precision(&self) -> f64 {
        ratio(self.predicted_possible, self.predicted)
    }

    /// |A∩S| / |S|.
    pub fn recall(&self) -> f64 {
        ratio(self.predicted_sure, self.sure)
    }

    /// Harmonic mean of precision and recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        }
    }

    /// Alignment error rate, 1 − (|A∩S| + |A∩P|) / (|A| + |S|).
    pub fn aer(&self) -> f64 {
        let denom = self.predicted + self.sure;
        if denom == 0 {
            0.0
        } else {
            1.0 - (self.predicted_sure + self.predicted_possible) as f64 / denom as f64
        }
    }
}

fn ratio(num: usize, denom: usize) -> f64 {
    if denom == 0 {
        0.0
    } else {
        num as f64 / denom as f64
    }
}

impl std::iter::Sum for AlignmentCounts {
    /// Corpus counts from per-pair counts.
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |t, c| Self {
            predicted: t.predicted + c.predicted,
            sure: t.sure + c.sure,
            predicted_sure: t.predicted_sure + c.predicted_sure,
            predicted_possible: t.predicted_possible + c.predicted_possible,
        })
    }
}
