//! Reading and writing parallel text, Pharaoh alignments and gold alignments.
//!
//! Every reader reports a malformed line as [`Error::Data`] with the file and its 1-based line
//! number; files are read whole, so nothing is processed before the input is known to be valid.

use std::path::Path;

use super::methods::Alignment;
use super::methods::ScoredAlignment;
use super::metrics::GoldAlignment;
use super::words::SentencePair;
use crate::{Error, Result};

fn read_lines(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(Error::io(path))
}

fn data_error(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Reads a parallel file, one `source ||| target` pair per line (words separated by ASCII
/// whitespace, see [`SentencePair::from_text`]; a blank line is an empty pair).
pub fn read_parallel(path: impl AsRef<Path>) -> Result<Vec<SentencePair>> {
    let path = path.as_ref();
    read_lines(path)?
        .lines()
        .enumerate()
        .map(|(k, line)| SentencePair::parse(line).map_err(|r| data_error(path, k + 1, r)))
        .collect()
}

/// Reads a Pharaoh file: one line of 0-based `i-j` links per sentence pair.
pub fn read_pharaoh(path: impl AsRef<Path>) -> Result<Vec<Alignment>> {
    let path = path.as_ref();
    read_lines(path)?
        .lines()
        .enumerate()
        .map(|(k, line)| Alignment::parse_pharaoh(line).map_err(|r| data_error(path, k + 1, r)))
        .collect()
}

/// Pharaoh text for a corpus: one line per alignment, each ending in a newline.
pub fn pharaoh_text(alignments: &[Alignment]) -> String {
    let mut out = String::new();
    for a in alignments {
        out.push_str(&a.to_pharaoh());
        out.push('\n');
    }
    out
}

/// Writes a Pharaoh file atomically (a temporary file in the same directory, then a rename).
pub fn write_pharaoh(path: impl AsRef<Path>, alignments: &[Alignment]) -> Result<()> {
    crate::fs::write_atomic(path.as_ref(), pharaoh_text(alignments).as_bytes())
}

/// The aligned words of one pair, awesome-align's `--output_word_file` line:
/// `source<sep>target` for each link, in the order of [`Alignment::links`], separated by
/// single spaces. A link outside the pair is an [`Error::InvalidArgument`].
pub fn word_pairs_line(pair: &SentencePair, alignment: &Alignment) -> Result<String> {
    let words: Vec<String> = alignment
        .links()
        .iter()
        .map(|&(i, j)| match (pair.src.get(i), pair.tgt.get(j)) {
            (Some(s), Some(t)) => Ok(format!("{s}<sep>{t}")),
            _ => Err(Error::InvalidArgument(format!(
                "link {i}-{j} is outside a pair of {} and {} words",
                pair.src.len(),
                pair.tgt.len()
            ))),
        })
        .collect::<Result<_>>()?;
    Ok(words.join(" "))
}

/// The scores of one pair's links, awesome-align's `--output_prob_file` line: one number per
/// link, in the order of [`Alignment::links`], with 4 decimals, separated by single spaces. A
/// count of scores other than the count of links is an [`Error::ShapeMismatch`].
pub fn scores_line(scored: &ScoredAlignment) -> Result<String> {
    if scored.scores.len() != scored.alignment.len() {
        return Err(Error::ShapeMismatch {
            name: "link scores".into(),
            expected: vec![scored.alignment.len()],
            actual: vec![scored.scores.len()],
        });
    }
    Ok(scored
        .scores
        .iter()
        .map(|s| format!("{s:.4}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Writes the aligned words of a corpus ([`word_pairs_line`], one line per pair) atomically.
/// `pairs` and `alignments` must have the same length ([`Error::ShapeMismatch`]).
pub fn write_word_pairs(
    path: impl AsRef<Path>,
    pairs: &[SentencePair],
    alignments: &[Alignment],
) -> Result<()> {
    if pairs.len() != alignments.len() {
        return Err(Error::ShapeMismatch {
            name: "alignments".into(),
            expected: vec![pairs.len()],
            actual: vec![alignments.len()],
        });
    }
    let mut out = String::new();
    for (pair, alignment) in pairs.iter().zip(alignments) {
        out.push_str(&word_pairs_line(pair, alignment)?);
        out.push('\n');
    }
    crate::fs::write_atomic(path.as_ref(), out.as_bytes())
}

/// Writes the link scores of a corpus ([`scores_line`], one line per pair) atomically.
pub fn write_scores(path: impl AsRef<Path>, scored: &[ScoredAlignment]) -> Result<()> {
    let mut out = String::new();
    for s in scored {
        out.push_str(&scores_line(s)?);
        out.push('\n');
    }
    crate::fs::write_atomic(path.as_ref(), out.as_bytes())
}

/// Reads a gold file: one line per sentence pair of `i-j` (sure) and `ipj` (possible) links,
/// 1-based when `one_based` (the shared ja-en and ro-en sets are), converted to 0-based.
pub fn read_gold(path: impl AsRef<Path>, one_based: bool) -> Result<Vec<GoldAlignment>> {
    let path = path.as_ref();
    read_lines(path)?
        .lines()
        .enumerate()
        .map(|(k, line)| {
            GoldAlignment::parse(line, one_based).map_err(|r| data_error(path, k + 1, r))
        })
        .collect()
}

/// Checks that `links_file` (read into `links`: one entry per line) has one line per sentence
/// pair and that every link `(i, j)` is inside its pair (`i < src.len()`, `j < tgt.len()`).
/// Indices in the error are reported as they appear in the file (`one_based` adds 1).
pub fn check_links<'a>(
    links_file: impl AsRef<Path>,
    links: impl ExactSizeIterator<Item = &'a [(usize, usize)]>,
    pairs: &[SentencePair],
    one_based: bool,
) -> Result<()> {
    let path = links_file.as_ref();
    let n = links.len();
    if n != pairs.len() {
        return Err(data_error(
            path,
            n.min(pairs.len()) + 1,
            format!("{n} lines of links for {} sentence pairs", pairs.len()),
        ));
    }
    let o = usize::from(one_based);
    for (k, (line, pair)) in links.zip(pairs).enumerate() {
        if let Some(&(i, j)) = line
            .iter()
            .find(|&&(i, j)| i >= pair.src.len() || j >= pair.tgt.len())
        {
            return Err(data_error(
                path,
                k + 1,
                format!(
                    "link {}-{} is out of range: the pair has {} source and {} target words",
                    i + o,
                    j + o,
                    pair.src.len(),
                    pair.tgt.len()
                ),
            ));
        }
    }
    Ok(())
}

/// [`check_links`] for gold alignments (their possible links, which include the sure ones).
pub fn check_gold(
    gold_file: impl AsRef<Path>,
    gold: &[GoldAlignment],
    pairs: &[SentencePair],
    one_based: bool,
) -> Result<()> {
    let links: Vec<Vec<(usize, usize)>> = gold
        .iter()
        .map(|g| g.possible().iter().copied().collect())
        .collect();
    check_links(gold_file, links.iter().map(Vec::as_slice), pairs, one_based)
}
