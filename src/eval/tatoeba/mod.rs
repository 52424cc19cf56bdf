//! XTREME's Tatoeba sentence-retrieval task: 36 languages, each with up to 1000 sentences and
//! their English translations (the LASER test sets), scored by nearest-neighbour retrieval.
//!
//! The protocol follows XTREME's reference code (`third_party/evaluate_retrieval.py` of
//! google-research/xtreme, called by `scripts/run_tatoeba.sh`):
//! - each line is stripped and tokenized with the model's tokenizer, with its special tokens
//!   (`[CLS] … [SEP]`, `<s> … </s>`), truncated at 512 tokens;
//! - a sentence is the mean of one hidden state over all its tokens, special tokens included
//!   (`pool_skip_special_token` is off): hidden state 8 of a 12-layer encoder (XTREME's
//!   `--specific_layer 7`, counted over the 12 layer outputs after the embeddings);
//! - similarity is the cosine (XTREME L2-normalises, then searches by L2 distance: the same
//!   ranking);
//! - the English sentences are the queries: each retrieves its nearest sentence of the other
//!   language (`similarity_search(x, y)` indexes the `xx` side and searches it with the English
//!   one), and the score is the share of English sentences whose nearest neighbour is their
//!   translation (en→xx).
//!
//! Ties go to the lowest line ([`retrieval_accuracy`]). Besides XTREME's direction the report
//! keeps the other one (xx→en) and any other pooling asked for, such as the model's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::encode::encode_batches;
use crate::encoder::BertEncoder;
use crate::eval::retrieval::{retrieval_accuracy, RetrievalScores};
use crate::pooling::Pooling;
use crate::progress::Progress;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

mod markdown;
pub use markdown::tatoeba_markdown;

/// XTREME's 36 Tatoeba languages in XTREME's order (`XTREME_TASK2LANGS` of its `evaluate.py`):
/// XTREME's language code and the LASER file code (`tatoeba.{laser}-eng.{laser}`), as mapped by
/// its `utils_preprocess.py`.
pub const XTREME_TATOEBA_LANGUAGES: [(&str, &str); 36] = [
    ("ar", "ara"),
    ("he", "heb"),
    ("vi", "vie"),
    ("id", "ind"),
    ("jv", "jav"),
    ("tl", "tgl"),
    ("eu", "eus"),
    ("ml", "mal"),
    ("ta", "tam"),
    ("te", "tel"),
    ("af", "afr"),
    ("nl", "nld"),
    ("de", "deu"),
    ("el", "ell"),
    ("bn", "ben"),
    ("hi", "hin"),
    ("mr", "mar"),
    ("ur", "urd"),
    ("fa", "pes"),
    ("fr", "fra"),
    ("it", "ita"),
    ("pt", "por"),
    ("es", "spa"),
    ("bg", "bul"),
    ("ru", "rus"),
    ("ja", "jpn"),
    ("ka", "kat"),
    ("ko", "kor"),
    ("th", "tha"),
    ("sw", "swh"),
    ("zh", "cmn"),
    ("kk", "kaz"),
    ("tr", "tur"),
    ("et", "est"),
    ("fi", "fin"),
    ("hu", "hun"),
];

/// The hidden state XTREME pools for a 12-layer encoder such as mBERT (0 is the embeddings).
pub const XTREME_LAYER: isize = 8;

/// One language's pairs with English, as scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TatoebaLanguage {
    /// XTREME's code, e.g. `fr`.
    pub code: String,
    /// LASER's file code, e.g. `fra`.
    pub laser: String,
    /// 1-based line of the files where `src` starts (1 unless the lines before were trained on).
    pub first_line: usize,
    /// Whether the lines before `first_line` are training data (scored on the rest only).
    pub trained: bool,
    /// The sentences of the language.
    pub src: Vec<String>,
    /// Their English translations, `eng[i]` of `src[i]`.
    pub eng: Vec<String>,
}

/// Which hidden states a [`TatoebaPooling`] averages.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolingChoice {
    /// XTREME's: the mean of one hidden state over every token. `None`: [`XTREME_LAYER`], or
    /// the last layer of a shallower encoder.
    Xtreme(Option<isize>),
    /// The pooling the model was trained with (given to [`TatoebaTask::evaluate`]).
    Model,
    /// Any other pooling.
    Fixed(Pooling),
}

/// A way of turning a sentence into a vector for retrieval, with its label in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct TatoebaPooling {
    /// Column label in the report.
    pub label: String,
    /// The hidden states and how they are pooled.
    pub choice: PoolingChoice,
    /// Text put before every sentence (e.g. `query: ` for multilingual-e5).
    pub prefix: Option<String>,
}

impl TatoebaPooling {
    /// XTREME's protocol, on hidden state `layer` (`None`: [`XTREME_LAYER`], or the last of a
    /// shallower encoder).
    pub fn xtreme(layer: Option<isize>) -> Self {
        let label = match layer {
            Some(l) => format!("XTREME: mean of hidden state {l}"),
            None => format!("XTREME: mean of hidden state {XTREME_LAYER}"),
        };
        Self {
            label,
            choice: PoolingChoice::Xtreme(layer),
            prefix: None,
        }
    }

    /// The model's own pooling (ML-CTL's sum of the means of layers 1 and L by default).
    pub fn model() -> Self {
        Self {
            label: "model's pooling".into(),
            choice: PoolingChoice::Model,
            prefix: None,
        }
    }

    /// The mean of the last layer over `prefix`ed text, as multilingual-e5 pools (`query: `).
    pub fn mean_last(prefix: Option<&str>) -> Self {
        let label = match prefix {
            Some(p) => format!("mean of last layer, `{p}` prefix"),
            None => "mean of last layer".into(),
        };
        Self {
            label,
            choice: PoolingChoice::Fixed(Pooling::layer(-1)),
            prefix: prefix.map(Into::into),
        }
    }

    /// The concrete pooling for an encoder of `layers` layers whose own pooling is `model`.
    fn resolve(&self, layers: usize, model: &Pooling) -> Pooling {
        match &self.choice {
            PoolingChoice::Xtreme(Some(layer)) => Pooling::layer(*layer),
            PoolingChoice::Xtreme(None) => Pooling::layer(XTREME_LAYER.min(layers as isize)),
            PoolingChoice::Model => model.clone(),
            PoolingChoice::Fixed(p) => p.clone(),
        }
    }
}

/// Reads `dir/tatoeba.{laser}-eng.{laser}` and `dir/tatoeba.{laser}-eng.eng`: every line
/// stripped of surrounding white space (an empty line stays, as a pair's side). Files that
/// are not UTF-8, are empty, or differ in length are an [`Error::Data`].
pub fn read_tatoeba(dir: &Path, laser: &str) -> Result<(Vec<String>, Vec<String>)> {
    let src_path = dir.join(format!("tatoeba.{laser}-eng.{laser}"));
    let eng_path = dir.join(format!("tatoeba.{laser}-eng.eng"));
    let (src, eng) = (read_lines(&src_path)?, read_lines(&eng_path)?);
    if src.len() != eng.len() {
        let (path, line) = if src.len() < eng.len() {
            (src_path, src.len() + 1)
        } else {
            (eng_path, eng.len() + 1)
        };
        return Err(Error::Data {
            path,
            line,
            reason: format!(
                "{} sentences against {} English ones: the files must be line-aligned",
                src.len(),
                eng.len()
            ),
        });
    }
    Ok((src, eng))
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let data_error = |line: usize, reason: &str| Error::Data {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    };
    if bytes.is_empty() {
        return Err(data_error(1, "empty file: no sentence to retrieve"));
    }
    // Split on bytes first so that a bad line is reported with its number.
    let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    text.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| match std::str::from_utf8(line) {
            Ok(s) => Ok(s.trim().to_string()),
            Err(_) => Err(data_error(i + 1, "not valid UTF-8")),
        })
        .collect()
}

/// XTREME's Tatoeba task: the languages, the poolings compared, how many sentences are encoded
/// at once.
#[derive(Debug, Clone, PartialEq)]
pub struct TatoebaTask {
    /// The languages, in report order.
    pub languages: Vec<TatoebaLanguage>,
    /// The poolings scored; the first is the headline (XTREME's by default).
    pub poolings: Vec<TatoebaPooling>,
    /// Sentences per encoder pass.
    pub batch_size: usize,
    /// Show a progress bar over the languages on standard error.
    pub progress: bool,
}

impl TatoebaTask {
    /// The 36 XTREME languages read from `dir` (files named as LASER names them). Languages
    /// whose LASER code is in `trained` are scored on their lines after the first
    /// `held_apart_from` only (those lines are training data); the others on every line.
    /// Scored with XTREME's pooling, then the model's own.
    pub fn xtreme(dir: &Path, trained: &[&str], held_apart_from: usize) -> Result<Self> {
        let mut languages = Vec::with_capacity(XTREME_TATOEBA_LANGUAGES.len());
        for (code, laser) in XTREME_TATOEBA_LANGUAGES {
            let (mut src, mut eng) = read_tatoeba(dir, laser)?;
            let is_trained = trained.contains(&laser);
            if is_trained {
                if src.len() <= held_apart_from {
                    return Err(Error::Data {
                        path: dir.join(format!("tatoeba.{laser}-eng.{laser}")),
                        line: src.len(),
                        reason: format!("no line left after the {held_apart_from} trained on"),
                    });
                }
                src.drain(..held_apart_from);
                eng.drain(..held_apart_from);
            }
            languages.push(TatoebaLanguage {
                code: code.into(),
                laser: laser.into(),
                first_line: if is_trained { held_apart_from + 1 } else { 1 },
                trained: is_trained,
                src,
                eng,
            });
        }
        Ok(Self {
            languages,
            poolings: vec![TatoebaPooling::xtreme(None), TatoebaPooling::model()],
            batch_size: 64,
            progress: false,
        })
    }

    /// Scores these poolings instead (the first is the headline).
    pub fn with_poolings(mut self, poolings: Vec<TatoebaPooling>) -> Self {
        self.poolings = poolings;
        self
    }

    /// Encodes `batch_size` sentences at once.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Shows a progress bar over the languages.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Scores `encoder`, whose own pooling is `model_pooling`, in eval mode. Poolings that
    /// share a prefix share one encoder pass; sentences are truncated at the encoder's full
    /// length, whatever `tokenizer`'s truncation.
    pub fn evaluate(
        &self,
        encoder: &BertEncoder,
        tokenizer: &Tokenizer,
        model_pooling: &Pooling,
    ) -> Result<TatoebaReport> {
        let tokenizer = tokenizer
            .clone()
            .with_max_len(encoder.config().max_sequence_length())?;
        let layers = encoder.config().num_hidden_layers;
        let poolings: Vec<Pooling> = self
            .poolings
            .iter()
            .map(|p| p.resolve(layers, model_pooling))
            .collect();
        // A shallower encoder is pooled on its last layer: the label says which.
        let mut task = self.clone();
        for pooling in &mut task.poolings {
            if pooling.choice == PoolingChoice::Xtreme(None) && (layers as isize) < XTREME_LAYER {
                pooling.label = format!("XTREME: mean of hidden state {layers}");
            }
        }
        task.score_with(|texts, which| {
            let prefix = self.poolings[which[0]].prefix.as_deref();
            let chosen: Vec<Pooling> = which.iter().map(|&i| poolings[i].clone()).collect();
            let texts: Vec<String> = match prefix {
                Some(p) => texts.iter().map(|t| format!("{p}{t}")).collect(),
                None => texts.to_vec(),
            };
            embed_pooled(encoder, &tokenizer, &texts, &chosen, self.batch_size)
        })
    }

    /// Scores the task with any embedder: `embed(texts, poolings)` returns one `[texts, d]`
    /// tensor per index of [`TatoebaTask::poolings`] in `poolings` (those sharing a prefix,
    /// asked for together). [`TatoebaTask::evaluate`] embeds with an encoder; a test can embed
    /// by hand.
    pub fn score_with<F>(&self, mut embed: F) -> Result<TatoebaReport>
    where
        F: FnMut(&[String], &[usize]) -> Result<Vec<Tensor>>,
    {
        if self.poolings.is_empty() {
            return Err(Error::InvalidArgument(
                "the Tatoeba task needs at least one pooling".into(),
            ));
        }
        let groups = prefix_groups(&self.poolings);
        let mut scores = vec![BTreeMap::new(); self.poolings.len()];
        let progress = Progress::new(
            self.progress,
            self.languages.len() as u64,
            "Tatoeba {bar:30} {pos}/{len} languages ({msg}), eta {eta}",
        );
        for language in &self.languages {
            progress.inc(0, || Some(language.code.clone()));
            for group in &groups {
                let src = embed(&language.src, group)?;
                let eng = embed(&language.eng, group)?;
                if src.len() != group.len() || eng.len() != group.len() {
                    return Err(Error::InvalidArgument(format!(
                        "the embedder returned {} and {} tensors for {} poolings",
                        src.len(),
                        eng.len(),
                        group.len()
                    )));
                }
                for ((&i, s), e) in group.iter().zip(&src).zip(&eng) {
                    scores[i].insert(language.code.clone(), retrieval_accuracy(s, e)?);
                }
            }
            progress.inc(1, || None);
        }
        progress.finish_and_clear();
        Ok(TatoebaReport {
            languages: self.languages.iter().map(TatoebaLanguageInfo::of).collect(),
            poolings: self
                .poolings
                .iter()
                .zip(scores)
                .map(|(p, scores)| TatoebaPoolingScores {
                    label: p.label.clone(),
                    scores,
                })
                .collect(),
        })
    }
}

/// Indices of `poolings` grouped by prefix, in first-seen order.
fn prefix_groups(poolings: &[TatoebaPooling]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<&str>, Vec<usize>)> = Vec::new();
    for (i, p) in poolings.iter().enumerate() {
        let prefix = p.prefix.as_deref();
        match groups.iter_mut().find(|(q, _)| *q == prefix) {
            Some((_, members)) => members.push(i),
            None => groups.push((prefix, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// One `[texts, hidden]` tensor (f32, CPU) per pooling, from a single encoder pass in eval mode.
///
/// # Shapes
/// - output: `poolings.len()` tensors of `[texts.len(), hidden]`
pub fn embed_pooled(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    texts: &[String],
    poolings: &[Pooling],
    batch_size: usize,
) -> Result<Vec<Tensor>> {
    if texts.is_empty() {
        return Err(Error::InvalidArgument("nothing to encode".into()));
    }
    let encodings = tokenizer.encode_each(texts)?;
    let mut rows: Vec<Vec<Option<Tensor>>> = vec![vec![None; texts.len()]; poolings.len()];
    encode_batches(
        encoder,
        tokenizer,
        encodings,
        batch_size,
        true,
        |indices, batch, out| {
            for (pooling, rows) in poolings.iter().zip(rows.iter_mut()) {
                let vectors = pooling.sentence(out, &batch.attention_mask)?;
                let vectors = vectors
                    .to_dtype(candle_core::DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?;
                for (row, &i) in indices.iter().enumerate() {
                    rows[i] = Some(vectors.get(row)?);
                }
            }
            Ok(())
        },
    )?;
    rows.into_iter()
        .map(|rows| {
            let rows: Vec<Tensor> = rows
                .into_iter()
                .map(|r| r.expect("encode_batches visits every row once"))
                .collect();
            Ok(Tensor::stack(&rows, 0)?)
        })
        .collect()
}

/// What was scored of one language.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TatoebaLanguageInfo {
    /// XTREME's code.
    pub code: String,
    /// LASER's file code.
    pub laser: String,
    /// 1-based first line scored.
    pub first_line: usize,
    /// Pairs scored.
    pub pairs: usize,
    /// Whether the lines before `first_line` are training data.
    pub trained: bool,
}

impl TatoebaLanguageInfo {
    fn of(language: &TatoebaLanguage) -> Self {
        Self {
            code: language.code.clone(),
            laser: language.laser.clone(),
            first_line: language.first_line,
            pairs: language.src.len(),
            trained: language.trained,
        }
    }
}

/// One pooling's retrieval scores, by language code. In each [`RetrievalScores`] the source is
/// the other language: `tgt_to_src` is XTREME's en→xx, `src_to_tgt` the xx→en direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TatoebaPoolingScores {
    /// [`TatoebaPooling::label`].
    pub label: String,
    /// Scores by XTREME language code.
    pub scores: BTreeMap<String, RetrievalScores>,
}

/// The languages averaged over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LanguageGroup {
    /// Languages no training touched (all lines scored).
    ZeroShot,
    /// Languages whose first lines were trained on (held-apart lines scored).
    Trained,
    /// Every language.
    All,
}

impl LanguageGroup {
    fn contains(self, info: &TatoebaLanguageInfo) -> bool {
        match self {
            LanguageGroup::ZeroShot => !info.trained,
            LanguageGroup::Trained => info.trained,
            LanguageGroup::All => true,
        }
    }
}

/// A retrieval direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// English sentences retrieve their translation: XTREME's score.
    EnToXx,
    /// Sentences of the other language retrieve their English translation.
    XxToEn,
}

impl Direction {
    /// The accuracy of `scores` in this direction, in `[0, 1]`.
    pub fn of(self, scores: &RetrievalScores) -> f32 {
        match self {
            Direction::EnToXx => scores.tgt_to_src,
            Direction::XxToEn => scores.src_to_tgt,
        }
    }
}

/// Scores of one model on a [`TatoebaTask`]: saved in `evaluation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TatoebaReport {
    /// The languages, in report order.
    pub languages: Vec<TatoebaLanguageInfo>,
    /// Each pooling's scores, the headline first.
    pub poolings: Vec<TatoebaPoolingScores>,
}

impl TatoebaReport {
    /// The languages of `group`, in report order.
    pub fn group(&self, group: LanguageGroup) -> Vec<&TatoebaLanguageInfo> {
        self.languages
            .iter()
            .filter(|l| group.contains(l))
            .collect()
    }

    /// Accuracy in percent of pooling `pooling` (an index of [`TatoebaReport::poolings`])
    /// averaged over the languages of `group` (each language counts once, as XTREME
    /// averages); `None` when the group is empty or a language was not scored.
    pub fn average(
        &self,
        pooling: usize,
        group: LanguageGroup,
        direction: Direction,
    ) -> Option<f64> {
        let scores = &self.poolings.get(pooling)?.scores;
        let languages = self.group(group);
        if languages.is_empty() {
            return None;
        }
        let mut sum = 0.0;
        for language in &languages {
            sum += f64::from(direction.of(scores.get(&language.code)?));
        }
        Some(100.0 * sum / languages.len() as f64)
    }

    /// XTREME's summary figures, labelled: for each pooling, the zero-shot and the trained
    /// languages' [`TatoebaReport::average`] in both directions (en→xx first), in percent.
    /// Groups without languages are left out.
    pub fn averages(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (p, pooling) in self.poolings.iter().enumerate() {
            for (group, name) in [
                (LanguageGroup::ZeroShot, "zero-shot"),
                (LanguageGroup::Trained, "trained, held-apart lines"),
            ] {
                let n = self.group(group).len();
                for (direction, arrow) in
                    [(Direction::EnToXx, "en→xx"), (Direction::XxToEn, "xx→en")]
                {
                    if let Some(value) = self.average(p, group, direction) {
                        let label = format!("Tatoeba {n} {name}, {}, {arrow}", pooling.label);
                        out.push((label, value));
                    }
                }
            }
        }
        out
    }

    /// Bootstrap items of the summary metrics: for each pooling and for the zero-shot and the
    /// trained languages, every query's hit (1) or miss (0), both directions; and XTREME's
    /// direction alone for the headline pooling. Labels name the pooling and the group. Every
    /// query counts once, so a language with more pairs weighs more than in
    /// [`TatoebaReport::average`].
    pub fn metric_hits(&self) -> Vec<(String, Vec<f64>)> {
        let mut out = Vec::new();
        let groups = [
            (LanguageGroup::ZeroShot, "zero-shot"),
            (LanguageGroup::Trained, "trained, held-apart lines"),
        ];
        for (p, pooling) in self.poolings.iter().enumerate() {
            for (group, name) in groups {
                let languages = self.group(group);
                let scores: Vec<&RetrievalScores> = languages
                    .iter()
                    .filter_map(|l| pooling.scores.get(&l.code))
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let n = languages.len();
                if p == 0 {
                    let hits = scores.iter().flat_map(|s| &s.tgt_hits);
                    out.push((
                        format!(
                            "Tatoeba {n} {name} (queries pooled), {}, en→xx",
                            pooling.label
                        ),
                        hits.map(|&h| f64::from(u8::from(h))).collect(),
                    ));
                }
                out.push((
                    format!(
                        "Tatoeba {n} {name} (queries pooled), {}, both directions",
                        pooling.label
                    ),
                    scores.iter().flat_map(|s| s.hits()).collect(),
                ));
            }
        }
        out
    }
}

/// Where the XTREME Tatoeba files of this crate are: `data/tatoeba/` of its source tree.
pub fn shipped_tatoeba_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("tatoeba")
}
