//! The evaluation tasks besides retrieval: word alignment against gold links, zero-shot XNLI, and
//! the sentence poolings retrieval is measured with.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::align::{io as align_io, method_by_name, AlignMethod};
use crate::align::{AlignmentCounts, GoldAlignment, SentencePair, TokenType, WordAligner};
use crate::model::MlCtlModel;
use crate::nli::{evaluate_nli, finetune_nli, NliFinetuneConfig, NliReport};
use crate::nli::{NliExample, NliReadOptions, XnliDir};
use crate::pooling::Pooling;
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

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
/// pair (the items of its bootstrap interval, [`bootstrap::aer_interval`](crate::eval::bootstrap::aer_interval)).
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
        let encoder = model.encoder();
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
