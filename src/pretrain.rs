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
//! println!("{}", comparison_markdown(&before, &after));
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::align::{find_anchor_spans, io as align_io, AlignmentCounts, IterMax, Lexicon};
use crate::align::{GoldAlignment, SentencePair, WordAligner};
use crate::data::{NliExample, NliReadOptions, XnliDir};
use crate::encoder::write_atomic;
use crate::eval::{embed_sentences, embed_spans, evaluate_nli, finetune_nli, retrieval_accuracy};
use crate::eval::{NliFinetuneConfig, NliReport, RetrievalScores};
use crate::model::MlCtlModel;
use crate::pooling::TokenSpan;
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

/// Word alignment scored against gold links (AER, with [`IterMax`]).
#[derive(Debug, Clone)]
pub struct AlignmentTask {
    /// The sentence pairs.
    pub pairs: Vec<SentencePair>,
    /// Their gold alignments.
    pub gold: Vec<GoldAlignment>,
    /// Hidden layer aligned on; `None`: layer 8, or the last of encoders with fewer layers.
    pub layer: Option<isize>,
}

impl AlignmentTask {
    /// Reads `src ||| tgt` sentences and their gold alignments (1-based `i-j` / `ipj`).
    pub fn read(input: &Path, gold: &Path) -> Result<Self> {
        Ok(Self {
            pairs: align_io::read_parallel(input)?,
            gold: align_io::read_gold(gold, true)?,
            layer: None,
        })
    }

    /// Aligns on `layer`.
    pub fn with_layer(mut self, layer: Option<isize>) -> Self {
        self.layer = layer;
        self
    }

    /// The alignment error rate of `model`'s encoder.
    pub fn aer(&self, model: &MlCtlModel, tokenizer: &Tokenizer) -> Result<f64> {
        let layers = model.bert.config.num_hidden_layers as isize;
        let layer = self.layer.unwrap_or(8.min(layers));
        let aligner =
            WordAligner::new(&model.bert.model.encoder, tokenizer.clone()).with_layer(layer);
        let predicted = aligner.align_pairs(&self.pairs, &IterMax::default())?;
        Ok(AlignmentCounts::corpus(&predicted, &self.gold)?.aer())
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

/// Scores of one model on an [`EvalSuite`].
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Sentence retrieval accuracy of each set, by name.
    pub sentence: BTreeMap<String, RetrievalScores>,
    /// Anchor-word retrieval accuracy of each set with at least two anchored pairs, by name.
    pub anchor: BTreeMap<String, RetrievalScores>,
    /// Alignment error rate, with an [`AlignmentTask`].
    pub aer: Option<f64>,
    /// XNLI accuracy, with an [`XnliTask`].
    pub xnli: Option<NliReport>,
    /// Which XNLI split was evaluated, and why ([`XnliTask::split`]).
    pub xnli_split: Option<String>,
}

/// What a model is measured on, before and after training.
#[derive(Debug, Clone)]
pub struct EvalSuite {
    /// Held-apart sentence pairs: retrieval of each sentence's translation, and of each anchor
    /// word's translation (the first dictionary anchor of each pair).
    pub sets: Vec<ParallelSet>,
    /// The dictionary that finds the anchor words of `sets`.
    pub lexicon: Arc<Lexicon>,
    /// Word alignment against gold links, if any.
    pub alignment: Option<AlignmentTask>,
    /// Zero-shot XNLI, if any.
    pub xnli: Option<XnliTask>,
    /// Sentences encoded at once.
    pub batch_size: usize,
}

impl EvalSuite {
    /// Retrieval on `sets`, anchors found with `lexicon`; no alignment, no XNLI.
    pub fn new(sets: Vec<ParallelSet>, lexicon: Arc<Lexicon>) -> Self {
        Self {
            sets,
            lexicon,
            alignment: None,
            xnli: None,
            batch_size: 64,
        }
    }

    /// Adds word alignment.
    pub fn with_alignment(mut self, alignment: Option<AlignmentTask>) -> Self {
        self.alignment = alignment;
        self
    }

    /// Adds XNLI.
    pub fn with_xnli(mut self, xnli: Option<XnliTask>) -> Self {
        self.xnli = xnli;
        self
    }

    /// Measures `model`, its sentences tokenized by `tokenizer`, with its own pooling.
    pub fn evaluate(&self, model: &MlCtlModel, tokenizer: &Tokenizer) -> Result<Evaluation> {
        let (mut sentence, mut anchor) = (BTreeMap::new(), BTreeMap::new());
        for set in &self.sets {
            sentence.insert(
                set.name.clone(),
                self.sentence_retrieval(model, tokenizer, set)?,
            );
            if let Some(scores) = self.anchor_retrieval(model, tokenizer, set)? {
                anchor.insert(set.name.clone(), scores);
            }
        }
        let aer = self
            .alignment
            .as_ref()
            .map(|a| a.aer(model, tokenizer))
            .transpose()?;
        let xnli = self.xnli.as_ref().map(|x| x.accuracy(model)).transpose()?;
        Ok(Evaluation {
            sentence,
            anchor,
            aer,
            xnli,
            xnli_split: self.xnli.as_ref().map(|x| x.split.clone()),
        })
    }

    fn sentence_retrieval(
        &self,
        model: &MlCtlModel,
        tokenizer: &Tokenizer,
        set: &ParallelSet,
    ) -> Result<RetrievalScores> {
        let encoder = &model.bert.model.encoder;
        let embed = |texts: &[String]| {
            embed_sentences(encoder, tokenizer, &model.pooling, texts, self.batch_size)
        };
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

/// The Markdown tables comparing two evaluations of the same suite: sentence retrieval,
/// anchor-word retrieval, AER and XNLI (the last two when measured).
pub fn comparison_markdown(before: &Evaluation, after: &Evaluation) -> String {
    let mut s = String::from(
        "\n## Sentence retrieval acc@1 (%), xx→en / en→xx\n\n\
         | language | before | after |\n|---|---|---|\n",
    );
    for (name, b) in &before.sentence {
        let a = after.sentence.get(name);
        s += &format!("| {name} | {} | {} |\n", directions(Some(b)), directions(a));
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
    if let (Some(b), Some(a)) = (before.aer, after.aer) {
        s += &format!("\n## Word alignment\n\nAER (itermax): before {b:.3}, after {a:.3}\n");
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
    s
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
                "{} already holds a run (checkpoint at step {step}): resume it, or start the \
                 new run in another directory",
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
