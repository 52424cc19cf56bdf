//! Percentile bootstrap intervals for evaluation scores, and for the difference between two
//! models scored on the same items (paired: both are resampled with the same indices).
//!
//! With a few hundred test items a point or three of accuracy is noise; an interval says how
//! much. Items are resampled with replacement ([`DEFAULT_RESAMPLES`] times, seeded, so a report
//! is reproducible) and the statistic is recomputed on each resample; the interval is the
//! 2.5th and 97.5th percentile of those values.
//!
//! ```
//! use mlctl::eval::bootstrap::{mean_interval, paired_mean_difference};
//! let before = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0];
//! let after = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0];
//! let ci = mean_interval(&after)?;
//! assert!(ci.low <= ci.estimate && ci.estimate <= ci.high);
//! let gain = paired_mean_difference(&before, &after)?;
//! assert_eq!(gain.estimate, 0.25);
//! # Ok::<(), mlctl::Error>(())
//! ```

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::align::AlignmentCounts;
use crate::{Error, Result};

/// Resamples drawn by the functions of this module.
pub const DEFAULT_RESAMPLES: usize = 2000;

/// Seed of the resampling (fixed, so that the same scores always give the same interval).
const SEED: u64 = 0x6d6c_6374_6c00;

/// A point estimate with a 95% percentile bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The statistic on the items as measured.
    pub estimate: f64,
    /// 2.5th percentile of the resampled statistic.
    pub low: f64,
    /// 97.5th percentile of the resampled statistic.
    pub high: f64,
}

impl Interval {
    /// Whether the interval lies entirely above zero (for a difference: a clear gain).
    pub fn above_zero(&self) -> bool {
        self.low > 0.0
    }

    /// Whether the interval lies entirely below zero (for a difference: a clear loss).
    pub fn below_zero(&self) -> bool {
        self.high < 0.0
    }

    /// The interval with every value multiplied by `factor` (e.g. 100 for percentages).
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            estimate: self.estimate * factor,
            low: self.low * factor,
            high: self.high * factor,
        }
    }
}

/// The interval of `statistic` over `n` items: `statistic` receives the item indices of one
/// sample (`0..n` in order for the estimate, then each resample's).
pub fn interval(
    n: usize,
    resamples: usize,
    statistic: impl Fn(&[usize]) -> f64,
) -> Result<Interval> {
    if n == 0 || resamples == 0 {
        return Err(Error::InvalidArgument(
            "a bootstrap interval needs at least one item and one resample".into(),
        ));
    }
    let all: Vec<usize> = (0..n).collect();
    let estimate = statistic(&all);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut sample = vec![0; n];
    let mut values: Vec<f64> = (0..resamples)
        .map(|_| {
            for s in &mut sample {
                *s = rng.random_range(0..n);
            }
            statistic(&sample)
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Ok(Interval {
        estimate,
        low: at(0.025),
        high: at(0.975),
    })
}

/// The mean of `items` (e.g. 0/1 hits of retrieval queries) with its interval.
pub fn mean_interval(items: &[f64]) -> Result<Interval> {
    interval(items.len(), DEFAULT_RESAMPLES, |idx| mean_at(items, idx))
}

/// `mean(after) - mean(before)` over paired items (the same queries scored by two models),
/// resampled together.
pub fn paired_mean_difference(before: &[f64], after: &[f64]) -> Result<Interval> {
    same_len(before.len(), after.len())?;
    interval(before.len(), DEFAULT_RESAMPLES, |idx| {
        mean_at(after, idx) - mean_at(before, idx)
    })
}

/// Corpus AER over per-sentence-pair counts, with its interval (sentence pairs resampled).
pub fn aer_interval(pairs: &[AlignmentCounts]) -> Result<Interval> {
    interval(pairs.len(), DEFAULT_RESAMPLES, |idx| aer_at(pairs, idx))
}

/// `AER(after) - AER(before)` over the same sentence pairs, resampled together.
pub fn paired_aer_difference(
    before: &[AlignmentCounts],
    after: &[AlignmentCounts],
) -> Result<Interval> {
    same_len(before.len(), after.len())?;
    interval(before.len(), DEFAULT_RESAMPLES, |idx| {
        aer_at(after, idx) - aer_at(before, idx)
    })
}

/// The mean over seeds of `mean(after[s]) - mean(before[s])`: two configurations trained with
/// the same seeds `s`, every run scored on the same items, all resampled with one set of
/// indices. The interval is the test items' noise on the seed-averaged difference; the
/// training seeds' spread is apart ([`crate::eval::seeds::MeanSd`] of the per-seed
/// differences).
pub fn paired_mean_difference_over_seeds(before: &[&[f64]], after: &[&[f64]]) -> Result<Interval> {
    difference_over_seeds(before, after, mean_at)
}

/// [`paired_mean_difference_over_seeds`] for corpus AER over the same sentence pairs.
pub fn paired_aer_difference_over_seeds(
    before: &[&[AlignmentCounts]],
    after: &[&[AlignmentCounts]],
) -> Result<Interval> {
    difference_over_seeds(before, after, aer_at)
}

/// The interval of the mean over seeds of `statistic(after[s]) - statistic(before[s])`, one
/// set of item indices for every run.
fn difference_over_seeds<T>(
    before: &[&[T]],
    after: &[&[T]],
    statistic: fn(&[T], &[usize]) -> f64,
) -> Result<Interval> {
    let n = same_items(before, after)?;
    interval(n, DEFAULT_RESAMPLES, |idx| {
        let per_seed = before
            .iter()
            .zip(after)
            .map(|(b, a)| statistic(a, idx) - statistic(b, idx));
        per_seed.sum::<f64>() / before.len() as f64
    })
}

/// The item count shared by every run of both configurations, which have as many seeds.
fn same_items<T>(before: &[&[T]], after: &[&[T]]) -> Result<usize> {
    if before.is_empty() {
        return Err(Error::InvalidArgument(
            "a difference over seeds needs at least one seed".into(),
        ));
    }
    same_len(before.len(), after.len())?;
    let n = before[0].len();
    for items in before.iter().chain(after) {
        same_len(n, items.len())?;
    }
    Ok(n)
}

fn same_len(before: usize, after: usize) -> Result<()> {
    if before != after {
        return Err(Error::ShapeMismatch {
            name: "paired bootstrap items".into(),
            expected: vec![before],
            actual: vec![after],
        });
    }
    Ok(())
}

fn mean_at(items: &[f64], idx: &[usize]) -> f64 {
    idx.iter().map(|&i| items[i]).sum::<f64>() / idx.len() as f64
}

fn aer_at(pairs: &[AlignmentCounts], idx: &[usize]) -> f64 {
    idx.iter().map(|&i| pairs[i]).sum::<AlignmentCounts>().aer()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bootstrap interval of a proportion is close to the normal approximation
    /// `p ± 1.96·sqrt(p(1-p)/n)`, an independent reference at this size.
    #[test]
    fn proportion_interval_matches_normal_approximation() {
        let n = 400;
        let items: Vec<f64> = (0..n).map(|i| f64::from(i % 10 < 7)).collect();
        let ci = mean_interval(&items).unwrap();
        let half = 1.96 * (0.7f64 * 0.3 / n as f64).sqrt();
        assert!((ci.estimate - 0.7).abs() < 1e-12);
        assert!((ci.low - (0.7 - half)).abs() < 0.004, "{ci:?}");
        assert!((ci.high - (0.7 + half)).abs() < 0.004, "{ci:?}");
    }

    /// Identical models differ by exactly zero on every resample; a constant shift by the
    /// shift.
    #[test]
    fn paired_difference_of_identical_and_shifted_scores() {
        let a: Vec<f64> = (0..50).map(|i| f64::from(i % 3 == 0)).collect();
        let same = paired_mean_difference(&a, &a).unwrap();
        assert_eq!((same.estimate, same.low, same.high), (0.0, 0.0, 0.0));
        let b: Vec<f64> = a.iter().map(|x| x + 0.5).collect();
        let shift = paired_mean_difference(&a, &b).unwrap();
        assert!((shift.low - 0.5).abs() < 1e-12 && (shift.high - 0.5).abs() < 1e-12);
    }

    /// The AER estimate is the corpus AER (not a mean of per-pair AERs).
    #[test]
    fn aer_estimate_is_the_corpus_aer() {
        let pairs = [
            AlignmentCounts {
                predicted: 4,
                sure: 2,
                predicted_sure: 2,
                predicted_possible: 3,
            },
            AlignmentCounts {
                predicted: 1,
                sure: 5,
                predicted_sure: 1,
                predicted_possible: 1,
            },
        ];
        // 1 - (3 + 4) / (5 + 7)
        let ci = aer_interval(&pairs).unwrap();
        assert!((ci.estimate - (1.0 - 7.0 / 12.0)).abs() < 1e-12);
        assert!(ci.low <= ci.estimate && ci.estimate <= ci.high);
    }

    /// Over seeds, the estimate is the mean of the per-seed differences (counted by hand), and
    /// identical configurations differ by zero on every resample.
    #[test]
    fn difference_over_seeds_averages_the_per_seed_differences() {
        // Seed 0: 2/4 -> 3/4 (+0.25); seed 1: 1/4 -> 4/4 (+0.75); mean +0.5.
        let before: [&[f64]; 2] = [&[1.0, 0.0, 1.0, 0.0], &[0.0, 0.0, 1.0, 0.0]];
        let after: [&[f64]; 2] = [&[1.0, 1.0, 1.0, 0.0], &[1.0, 1.0, 1.0, 1.0]];
        let ci = paired_mean_difference_over_seeds(&before, &after).unwrap();
        assert!((ci.estimate - 0.5).abs() < 1e-12, "{ci:?}");
        assert!(ci.low <= ci.estimate && ci.estimate <= ci.high);
        let same = paired_mean_difference_over_seeds(&before, &before).unwrap();
        assert_eq!((same.estimate, same.low, same.high), (0.0, 0.0, 0.0));
        // Unequal seeds, unequal items and no seed at all are refused.
        assert!(paired_mean_difference_over_seeds(&before, &after[..1]).is_err());
        let short: [&[f64]; 2] = [&[1.0], &[0.0]];
        assert!(paired_mean_difference_over_seeds(&before, &short).is_err());
        assert!(paired_mean_difference_over_seeds(&[], &[]).is_err());
    }

    /// AER over seeds: the mean of the per-seed corpus AER differences.
    #[test]
    fn aer_difference_over_seeds_averages_corpus_aers() {
        let counts = |p: usize, s: usize, ps: usize, pp: usize| AlignmentCounts {
            predicted: p,
            sure: s,
            predicted_sure: ps,
            predicted_possible: pp,
        };
        // AER = 1 - (ps + pp) / (p + s): 1 - 4/8 = 0.5 against 1 - 6/8 = 0.25, and
        // 1 - 2/8 = 0.75 against 1 - 8/8 = 0: differences -0.25 and -0.75, mean -0.5.
        let before = [vec![counts(4, 4, 2, 2)], vec![counts(4, 4, 1, 1)]];
        let after = [vec![counts(4, 4, 3, 3)], vec![counts(4, 4, 4, 4)]];
        let b: Vec<&[AlignmentCounts]> = before.iter().map(Vec::as_slice).collect();
        let a: Vec<&[AlignmentCounts]> = after.iter().map(Vec::as_slice).collect();
        let ci = paired_aer_difference_over_seeds(&b, &a).unwrap();
        assert!((ci.estimate + 0.5).abs() < 1e-12, "{ci:?}");
    }

    #[test]
    fn empty_or_unpaired_items_are_errors() {
        assert!(mean_interval(&[]).is_err());
        assert!(paired_mean_difference(&[1.0], &[1.0, 0.0]).is_err());
    }
}
