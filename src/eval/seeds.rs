//! Spread over training seeds: runs of one configuration, told apart only by their seed, are
//! grouped by name and summarised as mean ± standard deviation per metric.
//!
//! A bootstrap interval ([`crate::eval::bootstrap`]) measures how much a score would move on
//! other test sentences; the spread over seeds measures how much it moves when the same
//! configuration is trained again. Both are needed before calling a difference real.

use crate::{Error, Result};

/// Mean and sample standard deviation of a metric over runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanSd {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation (n − 1 in the denominator); `None` for a single run.
    pub sd: Option<f64>,
    /// The number of runs.
    pub n: usize,
}

impl MeanSd {
    /// `mean ± sd` over `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = (n > 1).then(|| {
            let squares: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
            (squares / (n - 1) as f64).sqrt()
        });
        Some(Self { mean, sd, n })
    }

    /// `61.2 ± 0.4 (n=3)` with `decimals` decimals, or `61.2 (n=1)`.
    pub fn format(&self, decimals: usize) -> String {
        match self.sd {
            Some(sd) => format!(
                "{:.*} ± {:.*} (n={})",
                decimals, self.mean, decimals, sd, self.n
            ),
            None => format!("{:.*} (n=1)", decimals, self.mean),
        }
    }
}

/// The configuration a run belongs to: its name less a trailing seed tag (`-seed3`, `_seed3`,
/// `.seed3`, `-s3`), so that `ml-ctl-seed0` and `ml-ctl-seed1` group as `ml-ctl`. A name
/// without a tag is its own group.
pub fn seed_group(name: &str) -> &str {
    for separator in ['-', '_', '.'] {
        if let Some((stem, tag)) = name.rsplit_once(separator) {
            let digits = tag.strip_prefix("seed").or_else(|| tag.strip_prefix('s'));
            if digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
                return stem;
            }
        }
    }
    name
}

/// One run's metrics: its name, then each metric's label and value.
pub type RunMetrics = (String, Vec<(String, f64)>);

/// A configuration's name with the metric lists of its runs.
type Group<'a> = (&'a str, Vec<&'a [(String, f64)]>);

/// A Markdown table of every metric's mean ± standard deviation over the runs of each
/// configuration ([`seed_group`] of the run names), configurations in first-seen order.
/// `lower_is_better(label)` picks the metrics printed with three decimals (AER) rather than
/// one (accuracies in %). Runs must report the same metrics in the same order.
pub fn seeds_markdown(
    runs: &[RunMetrics],
    lower_is_better: impl Fn(&str) -> bool,
) -> Result<String> {
    let Some((_, first)) = runs.first() else {
        return Err(Error::InvalidArgument("no run to summarise".into()));
    };
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (name, metrics) in runs {
        let same = metrics.len() == first.len()
            && metrics.iter().zip(first).all(|((a, _), (b, _))| a == b);
        if !same {
            return Err(Error::InvalidArgument(format!(
                "run `{name}` reports other metrics than `{}`",
                runs[0].0
            )));
        }
        let group = seed_group(name);
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(metrics.as_slice()),
            None => groups.push((group, vec![metrics.as_slice()])),
        }
    }
    let names: String = groups.iter().map(|(g, _)| format!(" `{g}` |")).collect();
    let mut s = format!("| metric |{names}\n|---|{}\n", "---|".repeat(groups.len()));
    for (i, (label, _)) in first.iter().enumerate() {
        let decimals = if lower_is_better(label) { 3 } else { 1 };
        s += &format!("| {label} |");
        for (_, members) in &groups {
            let values: Vec<f64> = members.iter().map(|m| m[i].1).collect();
            let summary = MeanSd::of(&values).expect("a group has at least one run");
            s += &format!(" {} |", summary.format(decimals));
        }
        s.push('\n');
    }
    Ok(s)
}
