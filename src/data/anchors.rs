//! Anchors found on the fly with the ML-CTL dictionary, for parallel text without them.

use std::sync::Arc;

use tokenizers::Encoding;

use super::loader::AnchorFinder;
use crate::align::Lexicon;
use crate::pooling::TokenSpan;

/// Finds the anchor of a sentence pair with a [`Lexicon`]: the first dictionary entry (by
/// source position) that occurs exactly once on each side and whose tokens survived truncation.
#[derive(Debug, Clone)]
pub struct LexiconAnchors {
    lexicon: Arc<Lexicon>,
    src_lang: String,
    tgt_lang: String,
}

impl LexiconAnchors {
    /// Anchors between `src_lang` and `tgt_lang` (codes of the lexicon, e.g. `fr`, `en`).
    pub fn new(lexicon: Arc<Lexicon>, src_lang: &str, tgt_lang: &str) -> crate::Result<Self> {
        for lang in [src_lang, tgt_lang] {
            if !lexicon.langs().iter().any(|l| l == lang) {
                return Err(crate::Error::InvalidArgument(format!(
                    "the lexicon has no language `{lang}` (it has {:?})",
                    lexicon.langs()
                )));
            }
        }
        Ok(Self {
            lexicon,
            src_lang: src_lang.into(),
            tgt_lang: tgt_lang.into(),
        })
    }
}

impl AnchorFinder for LexiconAnchors {
    fn find(
        &self,
        src: &str,
        src_tokens: &Encoding,
        tgt: &str,
        tgt_tokens: &Encoding,
    ) -> Option<(TokenSpan, TokenSpan)> {
        let span = |enc: &Encoding, bytes| {
            crate::align::anchors::span_of(enc.get_offsets(), enc.get_word_ids(), bytes)
        };
        self.lexicon
            .find_anchors(&self.src_lang, src, &self.tgt_lang, tgt)
            .ok()?
            .into_iter()
            .find_map(|m| {
                Some((
                    span(src_tokens, m.src_bytes)?,
                    span(tgt_tokens, m.tgt_bytes)?,
                ))
            })
    }
}
