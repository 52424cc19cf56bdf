//! [`EvalSuite`]: every task of a run, evaluated on one model.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::corpus::ParallelSet;
use super::metrics::Evaluation;
use super::tasks::{AlignmentTask, SentencePooling, XnliTask};
use crate::align::{find_anchor_spans, Lexicon};
use crate::encode::{encode, EncodeOptions};
use crate::eval::tatoeba::TatoebaTask;
use crate::eval::{embed_spans, retrieval_accuracy, RetrievalScores};
use crate::model::MlCtlModel;
use crate::pooling::TokenSpan;
use crate::tokenize::Tokenizer;
use crate::Result;

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
        let max_len = model.encoder().config().max_sequence_length();
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
        let tatoeba = self.tatoeba.as_ref();
        let tatoeba = tatoeba
            .map(|t| t.evaluate(model.encoder(), tokenizer, &model.pooling))
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
        let encoder = model.encoder();
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
        // The sentence pooling's layers, not the head's word layers: heads that pool words
        // differently are scored on the same representation.
        let words = |t: &[&str], s: &[TokenSpan]| {
            let encoder = model.encoder();
            embed_spans(encoder, tokenizer, &model.pooling, t, s, self.batch_size)
        };
        let (src, tgt) = (words(&texts.0, &spans.0)?, words(&texts.1, &spans.1)?);
        Ok(Some(retrieval_accuracy(&src, &tgt)?))
    }
}
