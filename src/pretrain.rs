//! The steps of an ML-CTL pre-training run around the [`Trainer`](crate::train::Trainer), for a
//! program of its own: anchored training data from parallel text, one evaluation suite run
//! before and after training (sentence and anchor-word retrieval on held-apart pairs, word
//! alignment, zero-shot XNLI), the results tables, and the run directory.
//!
//! The `pretrain_xnli` example is a command line over these steps.
//!
//! ```no_run
//! # fn main() -> mlctl::Result<()> {
//! use std::sync::Arc;
//! use mlctl::align::Lexicon;
//! use mlctl::model::MlCtlModel;
//! use mlctl::pretrain::{comparison_markdown, EvalSuite, ParallelSet};
//!
//! use mlctl::tokenize::Tokenizer;
//!
//! let device = candle_core::Device::Cpu;
//! let model = MlCtlModel::load("path/to/model", &device, candle_core::DType::F32, 0)?;
//! let tokenizer = Tokenizer::from_file("path/to/model/tokenizer.json")?;
//! let held_apart = ParallelSet::new(
//!     "fra-eng", "fr", "en",
//!     vec!["Le chat dort.".into(), "Il pleut.".into()],
//!     vec!["The cat sleeps.".into(), "It is raining.".into()],
//! )?;
//! let suite = EvalSuite::new(vec![held_apart], Arc::new(Lexicon::embedded()));
//! let before = suite.evaluate(&model, &tokenizer)?;
//! // ... train `model` with `mlctl::train::Trainer` ...
//! let after = suite.evaluate(&model, &tokenizer)?;
//! println!("{}", comparison_markdown(&before, &after)?);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::align::{find_anchor_spans, io as align_io, method_by_name, AlignMethod};
use crate::align::{AlignmentCounts, GoldAlignment, Lexicon, SentencePair, TokenType, WordAligner};
use crate::data::{NliExample, NliReadOptions, XnliDir};
use crate::encode::{encode, EncodeOptions};
use crate::encoder::write_atomic;
use crate::eval::bootstrap::{self, Interval};
use crate::eval::tatoeba::{tatoeba_markdown, TatoebaReport, TatoebaTask};
use crate::eval::{embed_spans, evaluate_nli, finetune_nli, retrieval_accuracy};
use crate::eval::{NliFinetuneConfig, NliReport, RetrievalScores};
use crate::model::MlCtlModel;
use crate::pooling::{Pooling, TokenSpan};
use crate::tokenize::Tokenizer;
use crate::train::{latest_checkpoint, StepRecord, METRICS_FILE};
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

/// Word alignment scored against gold links: AER for each extraction method and token type.
#[derive(Debug, Clone)]
pub struct AlignmentTask {
    /// Row label in the results (by default the gold file's stem, e.g. `roen`).
    pub name: String,
    /// The sentence pairs.
    pub pairs: Vec<SentencePair>,
    /// Their gold alignments.
    pub gold: Vec<GoldAlignment>,
    /// Hidden layer aligned on; `None`: layer 8, or the last of encoders with fewer layers.
    pub layer: Option<isize>,
    /// Extraction methods, by [`method_by_name`] name (default `argmax` and `itermax`).
    pub methods: Vec<String>,
    /// Units the methods link (default: subwords, then words).
    pub token_types: Vec<TokenType>,
}

/// AER of one method and token type on one [`AlignmentTask`], with the counts of every sentence
/// pair (the items of its bootstrap interval, [`bootstrap::aer_interval`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignmentScores {
    /// [`AlignmentTask::name`].
    pub task: String,
    /// Extraction method.
    pub method: String,
    /// `bpe` or `word`.
    pub token_type: String,
    /// Corpus alignment error rate.
    pub aer: f64,
    /// Counts of each sentence pair, in input order.
    pub pairs: Vec<AlignmentCounts>,
}

impl AlignmentScores {
    /// `task method token_type`, the label of a results row.
    pub fn label(&self) -> String {
        format!("{} {} {}", self.task, self.method, self.token_type)
    }
}

impl AlignmentTask {
    /// Reads `src ||| tgt` sentences and their gold alignments (1-based `i-j` / `ipj`), named
    /// after the gold file.
    pub fn read(input: &Path, gold: &Path) -> Result<Self> {
        let name = gold
            .file_stem()
            .map_or_else(|| "alignment".into(), |s| s.to_string_lossy().into_owned());
        Ok(Self {
            name,
            pairs: align_io::read_parallel(input)?,
            gold: align_io::read_gold(gold, true)?,
            layer: None,
            methods: vec!["argmax".into(), "itermax".into()],
            token_types: vec![TokenType::Bpe, TokenType::Word],
        })
    }

    /// Aligns on `layer`.
    pub fn with_layer(mut self, layer: Option<isize>) -> Self {
        self.layer = layer;
        self
    }

    /// Scores the extraction `methods` (by [`method_by_name`] name).
    pub fn with_methods(mut self, methods: Vec<String>) -> Self {
        self.methods = methods;
        self
    }

    /// AER of `model`'s encoder for every method and token type: one encoder pass per token
    /// type serves every method. Sentences are encoded at the encoder's full length, whatever
    /// `tokenizer`'s truncation.
    pub fn scores(
        &self,
        model: &MlCtlModel,
        tokenizer: &Tokenizer,
    ) -> Result<Vec<AlignmentScores>> {
        let encoder = &model.bert.model.encoder;
        let layers = model.bert.config.num_hidden_layers as isize;
        let layer = self.layer.unwrap_or(8.min(layers));
        let tokenizer = tokenizer
            .clone()
            .with_max_len(encoder.config().max_sequence_length())?;
        let methods = self
            .methods
            .iter()
            .map(|m| method_by_name(m))
            .collect::<Result<Vec<_>>>()?;
        let methods: Vec<&dyn AlignMethod> = methods.iter().map(AsRef::as_ref).collect();
        let mut out = Vec::new();
        for &token_type in &self.token_types {
            let aligner = WordAligner::new(encoder, tokenizer.clone())
                .with_layer(layer)
                .with_token_type(token_type);
            let predicted = aligner.align_pairs_multi(&self.pairs, &methods)?;
            for (method, alignments) in self.methods.iter().zip(predicted) {
                if alignments.len() != self.gold.len() {
                    return Err(Error::ShapeMismatch {
                        name: format!("{} alignments vs gold", self.name),
                        expected: vec![self.gold.len()],
                        actual: vec![alignments.len()],
                    });
                }
                let pairs: Vec<AlignmentCounts> = alignments
                    .iter()
                    .zip(&self.gold)
                    .map(|(a, g)| AlignmentCounts::pair(a, g))
                    .collect();
                out.push(AlignmentScores {
                    task: self.name.clone(),
                    method: method.clone(),
                    token_type: token_type_name(token_type).into(),
                    aer: pairs.iter().copied().sum::<AlignmentCounts>().aer(),
                    pairs,
                });
            }
        }
        Ok(out)
    }
}

fn token_type_name(t: TokenType) -> &'static str {
    match t {
        TokenType::Bpe => "bpe",
        TokenType::Word => "word",
    }
}

/// Zero-shot cross-lingual NLI: fine-tune a copy of the encoder on English, evaluate every
/// language.
#[derive(Debug, Clone)]
pub struct XnliTask {
    /// English training examples.
    pub train: Vec<NliExample>,
    /// Evaluation examples of every language.
    pub eval: Vec<NliExample>,
    /// Which split `eval` is, and why ([`XnliEval::split_note`](crate::nli::XnliEval::split_note)).
    pub split: String,
    /// How the copy is fine-tuned.
    pub finetune: NliFinetuneConfig,
}

impl XnliTask {
    /// Reads an XNLI directory (see [`XnliDir::discover`]): its English training file and its
    /// test split, or its dev split when there is no test file ([`XnliDir::read_eval`]).
    pub fn read(dir: &Path, finetune: NliFinetuneConfig) -> Result<Self> {
        let xnli = XnliDir::discover(dir)?;
        let train = xnli.read_train(&NliReadOptions::default())?.examples;
        let eval = xnli.read_eval(&NliReadOptions::default())?;
        Ok(Self {
            train,
            split: eval.split_note(),
            eval: eval.data.examples,
            finetune,
        })
    }

    /// Fine-tunes a copy of `model`'s encoder (the model is untouched) and evaluates it.
    pub fn accuracy(&self, model: &MlCtlModel) -> Result<NliReport> {
        let classifier = finetune_nli(&model.bert, &self.train, &self.finetune)?;
        evaluate_nli(&classifier, &self.eval)
    }
}

/// How sentences are pooled for retrieval: the model's own ML-CTL pooling, or another one
/// (e.g. multilingual-e5's mean of the last layer over `query: `-prefixed text).
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePooling {
    /// Column label in the results.
    pub label: String,
    /// `None`: the model's pooling ([`MlCtlModel::pooling`], ML-CTL's layers 1 and L).
    pub pooling: Option<Pooling>,
    /// Text put before every sentence, e.g. e5's `query: `.
    pub prefix: Option<String>,
}

impl SentencePooling {
    /// The model's own pooling: ML-CTL's sum of the token means of hidden layers 1 and L.
    pub fn mlctl() -> Self {
        Self {
            label: "ML-CTL pooling".into(),
            pooling: None,
            prefix: None,
        }
    }

    /// The mean of the last layer over `prefix`ed text, as sentence-embedding models such as
    /// multilingual-e5 (`query: `) pool.
    pub fn mean_last(prefix: Option<&str>) -> Self {
        let label = match prefix {
            Some(p) => format!("mean of last layer, `{p}` prefix"),
            None => "mean of last layer".into(),
        };
        Self {
            label,
            pooling: Some(Pooling::layer(-1)),
            prefix: prefix.map(Into::into),
        }
    }
}

/// Scores of one model on an [`EvalSuite`]; saved beside a run's results
/// ([`write_evaluations`]) so that runs can be compared later ([`objectives_markdown`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Sentence retrieval of each set, by pooling label ([`SentencePooling::label`]) then set
    /// name.
    pub sentence: BTreeMap<String, BTreeMap<String, RetrievalScores>>,
    /// Anchor-word retrieval (ML-CTL pooling over the word's span) of each set with at least
    /// two anchored pairs, by name.
    pub anchor: BTreeMap<String, RetrievalScores>,
    /// Word alignment of every task, method and token type.
    pub alignment: Vec<AlignmentScores>,
    /// XNLI accuracy, with an [`XnliTask`].
    pub xnli: Option<NliReport>,
    /// Which XNLI split was evaluated, and why ([`XnliTask::split`]).
    pub xnli_split: Option<String>,
    /// XTREME's Tatoeba task, with a [`TatoebaTask`].
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

    /// Whether lower is better (AER).
    pub fn lower_is_better(&self) -> bool {
        matches!(self.items, MetricItems::Alignment(_))
    }
}

/// What a model is measured on, before and after training.
#[derive(Debug, Clone)]
pub struct EvalSuite {
    /// Held-apart sentence pairs: retrieval of each sentence's translation, and of each anchor
    /// word's translation (the first dictionary anchor of each pair).
    pub sets: Vec<ParallelSet>,
    /// The dictionary that finds the anchor words of `sets`.
    pub lexicon: Arc<Lexicon>,
    /// How sentences are pooled for retrieval (each one is scored).
    pub poolings: Vec<SentencePooling>,
    /// Word alignment against gold links.
    pub alignment: Vec<AlignmentTask>,
    /// Zero-shot XNLI, if any.
    pub xnli: Option<XnliTask>,
    /// XTREME's Tatoeba task, if any.
    pub tatoeba: Option<TatoebaTask>,
    /// Sentences encoded at once.
    pub batch_size: usize,
}

impl EvalSuite {
    /// Retrieval on `sets` with the model's pooling, anchors found with `lexicon`; no
    /// alignment, no XNLI.
    pub fn new(sets: Vec<ParallelSet>, lexicon: Arc<Lexicon>) -> Self {
        Self {
            sets,
            lexicon,
            poolings: vec![SentencePooling::mlctl()],
            alignment: Vec::new(),
            xnli: None,
            tatoeba: None,
            batch_size: 64,
        }
    }

    /// Scores sentence retrieval with each of `poolings`.
    pub fn with_poolings(mut self, poolings: Vec<SentencePooling>) -> Self {
        self.poolings = poolings;
        self
    }

    /// Adds word alignment tasks.
    pub fn with_alignment(mut self, alignment: Vec<AlignmentTask>) -> Self {
        self.alignment = alignment;
        self
    }

    /// Adds XNLI.
    pub fn with_xnli(mut self, xnli: Option<XnliTask>) -> Self {
        self.xnli = xnli;
        self
    }

    /// Adds XTREME's Tatoeba task.
    pub fn with_tatoeba(mut self, tatoeba: Option<TatoebaTask>) -> Self {
        self.tatoeba = tatoeba;
        self
    }

    /// Measures `model`, its sentences tokenized by `tokenizer` at the encoder's full length
    /// (whatever the truncation training used).
    pub fn evaluate(&self, model: &MlCtlModel, tokenizer: &Tokenizer) -> Result<Evaluation> {
        let max_len = model.bert.model.encoder.config().max_sequence_length();
        let tokenizer = &tokenizer.clone().with_max_len(max_len)?;
        let mut sentence = BTreeMap::new();
        for pooling in &self.poolings {
            let mut sets = BTreeMap::new();
            for set in &self.sets {
                let scores = self.sentence_retrieval(model, tokenizer, pooling, set)?;
                sets.insert(set.name.clone(), scores);
            }
            sentence.insert(pooling.label.clone(), sets);
        }
        let mut anchor = BTreeMap::new();
        for set in &self.sets {
            if let Some(scores) = self.anchor_retrieval(model, tokenizer, set)? {
                anchor.insert(set.name.clone(), scores);
            }
        }
        let mut alignment = Vec::new();
        for task in &self.alignment {
            alignment.extend(task.scores(model, tokenizer)?);
        }
        let xnli = self.xnli.as_ref().map(|x| x.accuracy(model)).transpose()?;
        let encoder = &model.bert.model.encoder;
        let tatoeba = self.tatoeba.as_ref();
        let tatoeba = tatoeba
            .map(|t| t.evaluate(encoder, tokenizer, &model.pooling))
            .transpose()?;
        Ok(Evaluation {
            sentence,
            anchor,
            alignment,
            xnli,
            xnli_split: self.xnli.as_ref().map(|x| x.split.clone()),
            tatoeba,
        })
    }

    fn sentence_retrieval(
        &self,
        model: &MlCtlModel,
        tokenizer: &Tokenizer,
        pooling: &SentencePooling,
        set: &ParallelSet,
    ) -> Result<RetrievalScores> {
        let mut options = EncodeOptions::default()
            .with_pooling(
                pooling
                    .pooling
                    .clone()
                    .unwrap_or_else(|| model.pooling.clone()),
            )
            .with_batch_size(self.batch_size);
        if let Some(prefix) = &pooling.prefix {
            options = options.with_prefix(prefix.clone());
        }
        let encoder = &model.bert.model.encoder;
        let embed = |texts: &[String]| encode(encoder, tokenizer, texts, &options);
        retrieval_accuracy(&embed(&set.src)?, &embed(&set.tgt)?)
    }

    /// Does each anchor word retrieve its translation? `None` with fewer than two anchors.
    fn anchor_retrieval(
        &self,
        model: &MlCtlModel,
        tokenizer: &Tokenizer,
        set: &ParallelSet,
    ) -> Result<Option<RetrievalScores>> {
        let (mut texts, mut spans) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for (s, t) in set.src.iter().zip(&set.tgt) {
            let found =
                find_anchor_spans(&self.lexicon, tokenizer, &set.src_lang, s, &set.tgt_lang, t)?;
            if let Some(a) = found.first() {
                texts.0.push(s.as_str());
                texts.1.push(t.as_str());
                spans.0.push(a.src_span);
                spans.1.push(a.tgt_span);
            }
        }
        if texts.0.len() < 2 {
            return Ok(None);
        }
        let words = |t: &[&str], s: &[TokenSpan]| {
            let encoder = &model.bert.model.encoder;
            embed_spans(encoder, tokenizer, &model.pooling, t, s, self.batch_size)
        };
        let (src, tgt) = (words(&texts.0, &spans.0)?, words(&texts.1, &spans.1)?);
        Ok(Some(retrieval_accuracy(&src, &tgt)?))
    }
}

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
        if m.len() != base.len() || m.iter().zip(&base).any(|(a, b)| a.label != b.label) {
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

/// Name of the file [`write_evaluations`] writes in a run directory.
pub const EVALUATION_FILE: &str = "evaluation.json";

/// The evaluations of a run's starting and trained models, as saved in its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvaluations {
    /// The starting model.
    pub before: Evaluation,
    /// The trained model.
    pub after: Evaluation,
}

/// Writes `dir/evaluation.json` atomically; [`read_evaluations`] reads it back.
pub fn write_evaluations(dir: &Path, evaluations: &RunEvaluations) -> Result<std::path::PathBuf> {
    let path = dir.join(EVALUATION_FILE);
    let json = serde_json::to_vec(evaluations).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    write_atomic(&path, &json)?;
    Ok(path)
}

/// Reads a run directory's `evaluation.json`.
pub fn read_evaluations(dir: &Path) -> Result<RunEvaluations> {
    let path = dir.join(EVALUATION_FILE);
    let text = std::fs::read(&path).map_err(Error::io(&path))?;
    serde_json::from_slice(&text).map_err(|source| Error::Json { path, source })
}

/// Name of the results file a run directory gets from [`write_results`].
pub const RESULTS_FILE: &str = "results.md";

/// Writes `markdown` to `dir/results.md` atomically (a temporary file renamed into place, so an
/// interrupted run never leaves a half-written report) and returns the file's path.
pub fn write_results(dir: &Path, markdown: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(RESULTS_FILE);
    crate::encoder::write_atomic(&path, markdown.as_bytes())?;
    Ok(path)
}

/// Makes `dir` a run directory. Unless `resume`, one that already holds checkpoints is refused:
/// a new run never overwrites or mixes with an earlier one.
pub fn prepare_run_dir(dir: &Path, resume: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    if !resume {
        if let Some((step, _)) = latest_checkpoint(&dir.join("checkpoints"))? {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a run (checkpoint at step {step}): pass --resume to continue \
                 it, or --out DIR to start the new run in another directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The per-step records the trainer wrote to a run directory's `metrics.jsonl`.
pub fn read_metrics(dir: &Path) -> Result<Vec<StepRecord>> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
    text.lines()
        .map(|line| {
            serde_json::from_str(line).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(hits: &[bool]) -> RetrievalScores {
        let share = hits.iter().filter(|&&h| h).count() as f32 / hits.len() as f32;
        RetrievalScores {
            src_to_tgt: share,
            tgt_to_src: share,
            n: hits.len(),
            src_hits: hits.to_vec(),
            tgt_hits: hits.to_vec(),
        }
    }

    fn evaluation(hits: &[bool], aligned: bool) -> Evaluation {
        let sets = BTreeMap::from([("fra-eng".to_string(), scores(hits))]);
        let counts = AlignmentCounts {
            predicted: 2,
            sure: 2,
            predicted_sure: 1,
            predicted_possible: 1,
        };
        Evaluation {
            sentence: BTreeMap::from([("ML-CTL pooling".to_string(), sets)]),
            anchor: BTreeMap::new(),
            alignment: aligned
                .then(|| AlignmentScores {
                    task: "roen".into(),
                    method: "itermax".into(),
                    token_type: "bpe".into(),
                    aer: 0.5,
                    pairs: vec![counts; 3],
                })
                .into_iter()
                .collect(),
            xnli: None,
            xnli_split: None,
            tatoeba: None,
        }
    }

    #[test]
    fn runs_are_compared_on_the_same_metrics_only() {
        let start = evaluation(&[true, false, false, true], true);
        let better = evaluation(&[true, true, true, true], true);
        let table = objectives_markdown(&start, &[("a".into(), better.clone())]).unwrap();
        // 50% -> 100% on the same four queries, each both ways.
        assert!(
            table.contains("| sentence acc@1, ML-CTL pooling | 50.0 ["),
            "{table}"
        );
        assert!(table.contains("+50.0 ["), "{table}");
        assert!(
            table.contains("| AER roen itermax bpe | 0.500 ["),
            "{table}"
        );
        let other_suite = evaluation(&[true, true, true, true], false);
        assert!(objectives_markdown(&start, &[("b".into(), other_suite)]).is_err());
    }

    #[test]
    fn evaluations_round_trip_through_the_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let saved = RunEvaluations {
            before: evaluation(&[true, false], true),
            after: evaluation(&[true, true], true),
        };
        write_evaluations(dir.path(), &saved).unwrap();
        assert_eq!(read_evaluations(dir.path()).unwrap(), saved);
    }
}
