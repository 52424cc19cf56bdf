//! The results tables: one run before and after, and several runs side by side.

use super::metrics::{Evaluation, Metric};
use crate::eval::bootstrap::Interval;
use crate::eval::seeds::{seed_group, MeanSd};
use crate::eval::tatoeba::tatoeba_markdown;
use crate::eval::RetrievalScores;
use crate::{Error, Result};

/// A share in `[0, 1]` as a percentage with one decimal.
fn pct(x: f32) -> String {
    format!("{:.1}", 100.0 * x)
}

/// Both directions of retrieval, `xx→en / en→xx`, or `-` when absent.
fn directions(scores: Option<&RetrievalScores>) -> String {
    match scores {
        Some(s) => format!("{} / {}", pct(s.src_to_tgt), pct(s.tgt_to_src)),
        None => "-".into(),
    }
}

/// `12.3 [10.1, 14.2]` for accuracies in percent, `0.312 [0.301, 0.325]` for AER.
fn with_interval(ci: &Interval, aer: bool) -> String {
    if aer {
        format!("{:.3} [{:.3}, {:.3}]", ci.estimate, ci.low, ci.high)
    } else {
        format!("{:.1} [{:.1}, {:.1}]", ci.estimate, ci.low, ci.high)
    }
}

/// A signed difference with its interval, in bold when the interval excludes zero.
fn signed_with_interval(ci: &Interval, aer: bool) -> String {
    let text = if aer {
        format!("{:+.3} [{:+.3}, {:+.3}]", ci.estimate, ci.low, ci.high)
    } else {
        format!("{:+.1} [{:+.1}, {:+.1}]", ci.estimate, ci.low, ci.high)
    };
    if ci.above_zero() || ci.below_zero() {
        format!("**{text}**")
    } else {
        text
    }
}

/// The Markdown tables comparing two evaluations of the same suite: sentence retrieval (per
/// pooling), anchor-word retrieval, a summary with 95% bootstrap intervals and the paired
/// change, and XNLI when measured.
pub fn comparison_markdown(before: &Evaluation, after: &Evaluation) -> Result<String> {
    let mut s = String::new();
    for (pooling, sets) in &before.sentence {
        s += &format!(
            "\n## Sentence retrieval acc@1 (%), {pooling}, xx→en / en→xx\n\n\
             | language | before | after |\n|---|---|---|\n"
        );
        for (name, b) in sets {
            let a = after.sentence.get(pooling).and_then(|a| a.get(name));
            s += &format!("| {name} | {} | {} |\n", directions(Some(b)), directions(a));
        }
    }
    s += "\n## Anchor-word retrieval acc@1 (%), xx→en / en→xx\n\n\
          | language | pairs | before | after |\n|---|---|---|---|\n";
    for (name, b) in &before.anchor {
        let a = after.anchor.get(name);
        s += &format!(
            "| {name} | {} | {} | {} |\n",
            b.n,
            directions(Some(b)),
            directions(a)
        );
    }
    s += "\n## Summary with 95% bootstrap intervals\n\n\
          Accuracies in %, averaged over every language and both directions; AER as a fraction \
          (lower is better). The change is paired: both models resampled on the same items; in \
          bold when its interval excludes zero.\n\n\
          | metric | before | after | change |\n|---|---|---|---|\n";
    for (b, a) in before.metrics().iter().zip(after.metrics()) {
        let aer = b.lower_is_better();
        s += &format!(
            "| {} | {} | {} | {} |\n",
            b.label,
            with_interval(&b.interval()?, aer),
            with_interval(&a.interval()?, aer),
            signed_with_interval(&b.difference(&a)?, aer)
        );
    }
    if let (Some(b), Some(a)) = (&before.xnli, &after.xnli) {
        s += "\n## XNLI zero-shot accuracy (%), fine-tuned on English\n\n";
        if let Some(split) = &after.xnli_split {
            s += &format!("Evaluated on the {split}.\n\n");
        }
        s += "| language | before | after |\n|---|---|---|\n";
        for (lang, acc) in &b.accuracy_by_language {
            let after = a.accuracy_by_language.get(lang).copied();
            let after = after.map_or_else(|| "-".into(), pct);
            s += &format!("| {lang} | {} | {after} |\n", pct(*acc));
        }
        s += &format!("| average | {} | {} |\n", pct(b.average), pct(a.average));
    }
    if let (Some(b), Some(a)) = (&before.tatoeba, &after.tatoeba) {
        s += &tatoeba_markdown(&[("before", b), ("after", a)]);
    }
    Ok(s)
}

/// Runs compared side by side: the starting model's evaluation and each trained run's, by
/// label, all on the same suite. Two Markdown tables: every metric with its 95% bootstrap
/// interval per model, then the paired change of each run against the starting model and of
/// the first run against each other run (in bold where the interval excludes zero).
pub fn objectives_markdown(start: &Evaluation, runs: &[(String, Evaluation)]) -> Result<String> {
    let base = start.metrics();
    let metrics: Vec<Vec<Metric>> = runs.iter().map(|(_, e)| e.metrics()).collect();
    for ((label, _), m) in runs.iter().zip(&metrics) {
        if !Metric::same_suite(m, &base) {
            return Err(Error::InvalidArgument(format!(
                "run `{label}` was not evaluated on the same suite as the starting model"
            )));
        }
    }
    let labels: Vec<String> = runs.iter().map(|(l, _)| format!("`{l}`")).collect();
    let mut s = String::from(
        "\n### Scores with 95% bootstrap intervals\n\n\
         Accuracies in % (every language, both directions); AER as a fraction, lower is better.\n\n",
    );
    let mut cols = vec!["starting model".to_string()];
    cols.extend(labels.iter().cloned());
    s += &table_header(&cols);
    for (i, b) in base.iter().enumerate() {
        let aer = b.lower_is_better();
        s += &format!("| {} | {} |", b.label, with_interval(&b.interval()?, aer));
        for m in &metrics {
            s += &format!(" {} |", with_interval(&m[i].interval()?, aer));
        }
        s.push('\n');
    }
    let mut cols: Vec<String> = labels.iter().map(|l| format!("{l} − start")).collect();
    if let Some(first) = labels.first() {
        cols.extend(labels[1..].iter().map(|l| format!("{first} − {l}")));
    }
    s += "\n### Paired differences with 95% bootstrap intervals\n\n\
          Positive is better for accuracy, negative is better for AER; in bold where the \
          interval excludes zero.\n\n";
    s += &table_header(&cols);
    for (i, b) in base.iter().enumerate() {
        let aer = b.lower_is_better();
        s += &format!("| {} |", b.label);
        for m in &metrics {
            s += &format!(" {} |", signed_with_interval(&b.difference(&m[i])?, aer));
        }
        if let Some(first) = metrics.first() {
            for m in &metrics[1..] {
                s += &format!(
                    " {} |",
                    signed_with_interval(&m[i].difference(&first[i])?, aer)
                );
            }
        }
        s.push('\n');
    }
    Ok(s)
}

/// `| metric | a | b |` and its separator row.
fn table_header(cols: &[String]) -> String {
    let names: String = cols.iter().map(|c| format!(" {c} |")).collect();
    format!("| metric |{names}\n|---|{}\n", "---|".repeat(cols.len()))
}

/// The configurations of `runs` ([`seed_group`] of their labels, in first-seen order), each
/// with its runs' seed tags and metrics.
type SeedGroups<'a> = Vec<(&'a str, Vec<(&'a str, Vec<Metric>)>)>;

fn seed_groups<'a>(base: &[Metric], runs: &'a [(String, Evaluation)]) -> Result<SeedGroups<'a>> {
    let mut groups: SeedGroups<'a> = Vec::new();
    for (label, evaluation) in runs {
        let metrics = evaluation.metrics();
        if !Metric::same_suite(&metrics, base) {
            return Err(Error::InvalidArgument(format!(
                "run `{label}` was not evaluated on the same suite as the starting model"
            )));
        }
        let group = seed_group(label);
        let seed = &label[group.len()..];
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push((seed, metrics)),
            None => groups.push((group, vec![(seed, metrics)])),
        }
    }
    Ok(groups)
}

/// One cell: metric `i` of `after` minus `before`, over the seeds both have (`before` may be
/// one run for every seed: the starting model): the seed-averaged difference with its paired
/// bootstrap interval, and ± the standard deviation of the per-seed differences.
fn over_seeds_cell(
    i: usize,
    before: &[(&str, Vec<Metric>)],
    after: &[(&str, Vec<Metric>)],
) -> Result<String> {
    let paired: Vec<(&Metric, &Metric)> = after
        .iter()
        .filter_map(|(seed, a)| {
            let b = match before {
                // The starting model (no seed tag) stands beside every seed.
                [("", only)] => Some(only),
                _ => before.iter().find(|(s, _)| s == seed).map(|(_, b)| b),
            };
            b.map(|b| (&b[i], &a[i]))
        })
        .collect();
    if paired.is_empty() {
        return Ok("—".into());
    }
    let (b, a): (Vec<&Metric>, Vec<&Metric>) = paired.iter().copied().unzip();
    let aer = a[0].lower_is_better();
    let ci = Metric::difference_over_seeds(&b, &a)?;
    let per_seed: Vec<f64> = paired.iter().map(|(b, a)| a.value() - b.value()).collect();
    let spread = MeanSd::of(&per_seed).expect("at least one seed");
    let sd = match (spread.sd, aer) {
        (Some(sd), true) => format!(" ±{sd:.3}"),
        (Some(sd), false) => format!(" ±{sd:.1}"),
        (None, _) => String::new(),
    };
    Ok(format!(
        "{}{sd} (n={})",
        signed_with_interval(&ci, aer),
        spread.n
    ))
}

/// Paired differences averaged over training seeds: every configuration (runs grouped by
/// [`seed_group`] of their labels, such as `ml-ctl-seed0`, `ml-ctl-seed1`) against the
/// starting model, and the first configuration against each other one, paired by seed tag.
/// Each cell is the mean over seeds of the per-seed differences, with a 95% bootstrap interval
/// that resamples the test items once for every run (the test set's noise on that mean), then
/// ± the sample standard deviation of the per-seed differences (the training seeds' noise)
/// and the number of seeds paired.
pub fn seed_differences_markdown(
    start: &Evaluation,
    runs: &[(String, Evaluation)],
) -> Result<String> {
    let base = start.metrics();
    let groups = seed_groups(&base, runs)?;
    let starting = vec![("", base.clone())];
    let mut cols: Vec<String> = groups
        .iter()
        .map(|(g, _)| format!("`{g}` − start"))
        .collect();
    if let Some((first, _)) = groups.first() {
        cols.extend(
            groups[1..]
                .iter()
                .map(|(g, _)| format!("`{first}` − `{g}`")),
        );
    }
    let mut s = String::from(
        "\n### Paired differences averaged over seeds\n\n\
         Mean over seeds of the per-seed difference (runs paired by seed tag), its 95% bootstrap \
         interval over the test items (in bold where it excludes zero), ± the standard deviation \
         of the per-seed differences, and the seeds paired. Positive is better for accuracy, \
         negative for AER.\n\n",
    );
    s += &table_header(&cols);
    for (i, metric) in base.iter().enumerate() {
        s += &format!("| {} |", metric.label);
        for (_, members) in &groups {
            s += &format!(" {} |", over_seeds_cell(i, &starting, members)?);
        }
        if let Some((_, first)) = groups.first() {
            for (_, members) in &groups[1..] {
                s += &format!(" {} |", over_seeds_cell(i, members, first)?);
            }
        }
        s.push('\n');
    }
    Ok(s)
}
