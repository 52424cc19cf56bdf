//! ML-CTL word anchors: dictionary entries that occur exactly once on each side of a sentence
//! pair, with their token spans.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;

use crate::pooling::TokenSpan;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// The languages of the embedded dictionary ([`Lexicon::embedded`]).
pub const LEXICON_LANGS: [&str; 6] = ["ar", "en", "es", "fr", "ru", "zh"];

const EMBEDDED: [(&str, &str); 6] = [
    ("ar", include_str!("../../data/lexicon/ar.txt")),
    ("en", include_str!("../../data/lexicon/en.txt")),
    ("es", include_str!("../../data/lexicon/es.txt")),
    ("fr", include_str!("../../data/lexicon/fr.txt")),
    ("ru", include_str!("../../data/lexicon/ru.txt")),
    ("zh", include_str!("../../data/lexicon/zh.txt")),
];

/// A multi-way dictionary: one word list per language, line `i` of every list the same
/// concept (entry `i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lexicon {
    langs: Vec<String>,
    words: Vec<Vec<String>>,
    /// Per language and entry: the lower-cased units to match (words, or characters for
    /// unspaced scripts).
    keys: Vec<Vec<Vec<String>>>,
}

/// How a language's text is matched against dictionary words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    /// Words are separated by spaces: whole words (or whole word sequences for multi-word
    /// entries) are matched, case-insensitively.
    Spaced,
    /// No spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Burmese): the entry is
    /// matched as a character sequence anywhere in the text.
    Unspaced,
}

/// The script kind of a language code (`zh`, `zh-CN`, `cmn`, `ja`, `jpn`, `th`, `tha`, `lo`,
/// `km`, `my` are [`ScriptKind::Unspaced`]; everything else is [`ScriptKind::Spaced`]).
pub fn script_kind(lang: &str) -> ScriptKind {
    let base = lang
        .split(['-', '_'])
        .next()
        .unwrap_or(lang)
        .to_ascii_lowercase();
    match base.as_str() {
        "zh" | "cmn" | "zho" | "ja" | "jpn" | "th" | "tha" | "lo" | "km" | "my" => {
            ScriptKind::Unspaced
        }
        _ => ScriptKind::Spaced,
    }
}

impl Lexicon {
    /// The 6-way dictionary of the ML-CTL release (ar, en, es, fr, ru, zh; 4243 entries),
    /// compiled into the library.
    pub fn embedded() -> Self {
        let (langs, words) = EMBEDDED
            .iter()
            .map(|(lang, text)| {
                (
                    lang.to_string(),
                    text.lines().map(|l| l.trim().to_owned()).collect(),
                )
            })
            .unzip();
        Self::build(langs, words)
    }

    fn build(langs: Vec<String>, words: Vec<Vec<String>>) -> Self {
        let keys = langs
            .iter()
            .zip(&words)
            .map(|(lang, list)| {
                let kind = script_kind(lang);
                list.iter().map(|w| entry_units(w, kind)).collect()
            })
            .collect();
        Self { langs, words, keys }
    }

    /// Reads `dir/{lang}.txt` for each language (one word per line, UTF-8). Every file must have
    /// the same number of lines.
    pub fn load(dir: impl AsRef<Path>, langs: &[&str]) -> Result<Self> {
        let dir = dir.as_ref();
        let mut words: Vec<Vec<String>> = Vec::with_capacity(langs.len());
        let mut first: Option<(std::path::PathBuf, usize)> = None;
        for lang in langs {
            let path = dir.join(format!("{lang}.txt"));
            let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
            let list: Vec<String> = text.lines().map(|l| l.trim().to_owned()).collect();
            match &first {
                None => first = Some((path.clone(), list.len())),
                Some((p0, n0)) if *n0 != list.len() => {
                    return Err(Error::Data {
                        path,
                        line: list.len().min(*n0) + 1,
                        reason: format!("{} entries, but {} has {n0}: line i of every file must be the same concept", list.len(), p0.display()),
                    })
                }
                _ => {}
            }
            words.push(list);
        }
        Self::from_lists(langs.iter().map(|l| l.to_string()).collect(), words)
    }

    /// A dictionary from word lists of equal length, one per language.
    pub fn from_lists(langs: Vec<String>, words: Vec<Vec<String>>) -> Result<Self> {
        if langs.len() != words.len() || langs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} languages for {} word lists",
                langs.len(),
                words.len()
            )));
        }
        if words.iter().any(|w| w.len() != words[0].len()) {
            return Err(Error::InvalidArgument("word lists differ in length".into()));
        }
        Ok(Self::build(langs, words))
    }

    /// The language codes, in order.
    pub fn langs(&self) -> &[String] {
        &self.langs
    }

    /// Number of entries (concepts).
    pub fn len(&self) -> usize {
        self.words.first().map_or(0, Vec::len)
    }

    /// True when the dictionary has no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The word of entry `entry` in `lang`.
    pub fn word(&self, lang: &str, entry: usize) -> Option<&str> {
        self.words
            .get(self.lang_index(lang).ok()?)?
            .get(entry)
            .map(String::as_str)
    }

    fn lang_index(&self, lang: &str) -> Result<usize> {
        self.langs.iter().position(|l| l == lang).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "language `{lang}` is not in the dictionary ({})",
                self.langs.join(", ")
            ))
        })
    }

    /// Entries that occur exactly once in `src_text` (language `src_lang`) and exactly once in
    /// `tgt_text`, with where they occur, ordered by source position then entry index.
    ///
    /// Matching follows [`script_kind`]: spaced scripts match whole words, case-insensitively
    /// (words are maximal runs of characters that are neither whitespace nor punctuation, so
    /// `l'homme` holds the word `homme`; a multi-word entry matches the same words in a row);
    /// unspaced scripts match the entry's characters anywhere, overlapping occurrences counted.
    /// An entry occurring twice on a side is skipped. Every qualifying entry is returned (the
    /// caller, e.g. a trainer, picks one); entries may overlap each other.
    pub fn find_anchors(
        &self,
        src_lang: &str,
        src_text: &str,
        tgt_lang: &str,
        tgt_text: &str,
    ) -> Result<Vec<AnchorMatch>> {
        let (s, t) = (self.lang_index(src_lang)?, self.lang_index(tgt_lang)?);
        let src = Matcher::new(src_text, script_kind(src_lang));
        let tgt = Matcher::new(tgt_text, script_kind(tgt_lang));
        let mut found = Vec::new();
        for (entry, (sk, tk)) in self.keys[s].iter().zip(&self.keys[t]).enumerate() {
            let Some(src_bytes) = src.unique(sk) else {
                continue;
            };
            let Some(tgt_bytes) = tgt.unique(tk) else {
                continue;
            };
            found.push(AnchorMatch {
                entry,
                src_word: src_text[src_bytes.0..src_bytes.1].to_owned(),
                src_bytes,
                tgt_word: tgt_text[tgt_bytes.0..tgt_bytes.1].to_owned(),
                tgt_bytes,
            });
        }
        found.sort_by_key(|m| (m.src_bytes.0, m.entry));
        Ok(found)
    }
}

/// A dictionary entry found once on each side of a sentence pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorMatch {
    /// The dictionary entry (line index, 0-based).
    pub entry: usize,
    /// The matched source text, as written in the sentence.
    pub src_word: String,
    /// Its byte range `[start, end)` in the source text.
    pub src_bytes: (usize, usize),
    /// The matched target text, as written in the sentence.
    pub tgt_word: String,
    /// Its byte range in the target text.
    pub tgt_bytes: (usize, usize),
}

/// An anchor with its token spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Where it was found.
    pub found: AnchorMatch,
    /// Inclusive token span in the source encoding, `[CLS]` at 0.
    pub src_span: TokenSpan,
    /// Inclusive token span in the target encoding, `[CLS]` at 0.
    pub tgt_span: TokenSpan,
}

impl Anchor {
    /// The ML-CTL reference's TSV line (no newline):
    /// `src \t src_word \t start \t end \t tgt \t tgt_word \t start \t end`, spans inclusive with
    /// `[CLS]` at 0. Sentences holding a tab or a line break cannot be written.
    pub fn to_tsv(&self, src_text: &str, tgt_text: &str) -> Result<String> {
        for text in [src_text, tgt_text] {
            if text.contains(['\t', '\n', '\r']) {
                return Err(Error::InvalidArgument(format!(
                    "a TSV field cannot hold a tab or line break: {text:?}"
                )));
            }
        }
        Ok(format!(
            "{src_text}\t{}\t{}\t{}\t{tgt_text}\t{}\t{}\t{}",
            self.found.src_word,
            self.src_span.start,
            self.src_span.end,
            self.found.tgt_word,
            self.tgt_span.start,
            self.tgt_span.end
        ))
    }
}

/// The inclusive span of the tokens (of `text` encoded alone, `[CLS]` at 0) overlapping the
/// byte range `bytes`; `None` when every such token was truncated away.
pub fn token_span(
    tokenizer: &Tokenizer,
    text: &str,
    bytes: (usize, usize),
) -> Result<Option<TokenSpan>> {
    let batch = tokenizer.encode_batch(&[text], &Device::Cpu)?;
    Ok(span_of(&batch.offsets[0], &batch.word_ids[0], bytes))
}

pub(crate) fn span_of(
    offsets: &[(usize, usize)],
    word_ids: &[Option<u32>],
    bytes: (usize, usize),
) -> Option<TokenSpan> {
    let mut hits = offsets
        .iter()
        .zip(word_ids)
        .enumerate()
        .filter(|(_, (&(s, e), w))| w.is_some() && s < bytes.1 && e > bytes.0)
        .map(|(k, _)| k);
    let start = hits.next()?;
    let end = hits.next_back().unwrap_or(start);
    Some(TokenSpan { start, end })
}

/// [`Lexicon::find_anchors`] plus the token spans of each match (each sentence encoded alone
/// by `tokenizer`, with its truncation). Matches whose tokens were truncated away on either side
/// are dropped.
pub fn find_anchor_spans(
    lexicon: &Lexicon,
    tokenizer: &Tokenizer,
    src_lang: &str,
    src_text: &str,
    tgt_lang: &str,
    tgt_text: &str,
) -> Result<Vec<Anchor>> {
    let found = lexicon.find_anchors(src_lang, src_text, tgt_lang, tgt_text)?;
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let batch = tokenizer.encode_batch(&[src_text, tgt_text], &Device::Cpu)?;
    Ok(found
        .into_iter()
        .filter_map(|m| {
            let src_span = span_of(&batch.offsets[0], &batch.word_ids[0], m.src_bytes)?;
            let tgt_span = span_of(&batch.offsets[1], &batch.word_ids[1], m.tgt_bytes)?;
            Some(Anchor {
                found: m,
                src_span,
                tgt_span,
            })
        })
        .collect())
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            c,
            '«' | '»'
                | '“'
                | '”'
                | '„'
                | '‘'
                | '’'
                | '‚'
                | '‹'
                | '›'
                | '…'
                | '–'
                | '—'
                | '¿'
                | '¡'
                | '·'
                | '،'
                | '؛'
                | '؟'
                | '。'
                | '，'
                | '、'
                | '！'
                | '？'
                | '：'
                | '；'
                | '（'
                | '）'
                | '「'
                | '」'
                | '『'
                | '』'
                | '《'
                | '》'
                | '【'
                | '】'
                | '〈'
                | '〉'
        )
}

fn fold(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// The lower-cased units of a dictionary entry: its words (spaced scripts) or its
/// non-space characters (unspaced scripts).
fn entry_units(entry: &str, kind: ScriptKind) -> Vec<String> {
    match kind {
        ScriptKind::Spaced => word_ranges(entry)
            .into_iter()
            .map(|(s, e)| fold(&entry[s..e]))
            .collect(),
        ScriptKind::Unspaced => entry
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| fold(c.encode_utf8(&mut [0; 4])))
            .collect(),
    }
}

/// Words (spaced) or characters (unspaced) of a text with byte offsets, lower-cased and
/// indexed.
struct Matcher {
    /// Spaced: byte ranges of the words. Unspaced: byte ranges of the characters.
    units: Vec<(usize, usize)>,
    /// The units' lower-cased text.
    folded: Vec<String>,
    /// Where each lower-cased unit occurs.
    positions: HashMap<String, Vec<usize>>,
}

fn word_ranges(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for (b, c) in text.char_indices() {
        let inside = !c.is_whitespace() && !is_punct(c);
        match (inside, start) {
            (true, None) => start = Some(b),
            (false, Some(s)) => {
                out.push((s, b));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

impl Matcher {
    fn new(text: &str, kind: ScriptKind) -> Self {
        let units: Vec<(usize, usize)> = match kind {
            ScriptKind::Spaced => word_ranges(text),
            ScriptKind::Unspaced => text
                .char_indices()
                .map(|(b, c)| (b, b + c.len_utf8()))
                .collect(),
        };
        let folded: Vec<String> = units.iter().map(|&(s, e)| fold(&text[s..e])).collect();
        let mut positions: HashMap<String, Vec<usize>> = HashMap::new();
        for (k, u) in folded.iter().enumerate() {
            positions.entry(u.clone()).or_default().push(k);
        }
        Self {
            units,
            folded,
            positions,
        }
    }

    /// The byte range of the only occurrence of the unit sequence `pattern`, or `None` for
    /// zero or several.
    fn unique(&self, pattern: &[String]) -> Option<(usize, usize)> {
        let first = pattern.first()?;
        let mut found = None;
        for &start in self.positions.get(first)? {
            let end = start + pattern.len();
            if end <= self.folded.len() && self.folded[start..end] == *pattern {
                if found.is_some() {
                    return None;
                }
                found = Some((self.units[start].0, self.units[end - 1].1));
            }
        }
        found
    }
}
