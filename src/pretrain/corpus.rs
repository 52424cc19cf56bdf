//! Training and held-apart text: [`ParallelSet`] and the anchored training file.

use std::path::Path;

use crate::align::{find_anchor_spans, Lexicon};
use crate::fs::write_atomic;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// Sentence pairs of one language pair, line-aligned: training text, or a held-apart
/// evaluation set (one row of each results table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelSet {
    /// Row label in the results, e.g. `fra-eng`.
    pub name: String,
    /// Lexicon language of `src` (e.g. `fr`), for the anchor words.
    pub src_lang: String,
    /// Lexicon language of `tgt` (e.g. `en`).
    pub tgt_lang: String,
    /// Source sentences.
    pub src: Vec<String>,
    /// Their translations, `tgt[i]` of `src[i]`.
    pub tgt: Vec<String>,
}

impl ParallelSet {
    /// A set of `src.len()` pairs; the two sides must have the same length.
    pub fn new(
        name: impl Into<String>,
        src_lang: impl Into<String>,
        tgt_lang: impl Into<String>,
        src: Vec<String>,
        tgt: Vec<String>,
    ) -> Result<Self> {
        let name = name.into();
        if src.len() != tgt.len() {
            return Err(Error::InvalidArgument(format!(
                "{name}: {} source sentences but {} target sentences",
                src.len(),
                tgt.len()
            )));
        }
        Ok(Self {
            name,
            src_lang: src_lang.into(),
            tgt_lang: tgt_lang.into(),
            src,
            tgt,
        })
    }
}

/// Writes ML-CTL's TSV ([`CorpusFormat::ReferenceTsv`](crate::data::CorpusFormat::ReferenceTsv)) of the pairs of `sets` that have a
/// dictionary anchor, their spans counted by `tokenizer` (the one training will use, with its
/// truncation); returns how many pairs were written. No anchored pair at all is an error.
pub fn write_anchored_tsv(
    path: &Path,
    sets: &[ParallelSet],
    lexicon: &Lexicon,
    tokenizer: &Tokenizer,
) -> Result<usize> {
    let mut out = String::new();
    let mut written = 0;
    for set in sets {
        for (s, t) in set.src.iter().zip(&set.tgt) {
            let found = find_anchor_spans(lexicon, tokenizer, &set.src_lang, s, &set.tgt_lang, t)?;
            if let Some(anchor) = found.first() {
                out += &anchor.to_tsv(s, t)?;
                out.push('\n');
                written += 1;
            }
        }
    }
    if written == 0 {
        return Err(Error::InvalidArgument(
            "no training pair has a dictionary anchor".into(),
        ));
    }
    write_atomic(path, out.as_bytes())?;
    Ok(written)
}
