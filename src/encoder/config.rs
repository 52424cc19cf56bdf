//! `BertConfig`: the fields of a Hugging Face BERT or XLM-RoBERTa `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Activation function of the feed-forward block and of the MLM head transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU, `x * Φ(x)` with the error function (BERT's `"gelu"`).
    Gelu,
    /// GELU's tanh approximation (`"gelu_new"`).
    GeluNew,
    /// GELU's tanh approximation as PyTorch names it (`"gelu_pytorch_tanh"`).
    GeluPytorchTanh,
    /// `max(x, 0)`.
    Relu,
}

/// Configuration of a BERT encoder, read from and written to Hugging Face's `config.json`.
///
/// XLM-RoBERTa and RoBERTa configs (`model_type` `xlm-roberta` or `roberta`) describe the same
/// encoder with two differences this crate follows: position ids start at `pad_token_id + 1` and
/// skip padding ([`BertConfig::position_padding_idx`]), and checkpoint names use `roberta.` and
/// `lm_head.` instead of `bert.` and `cls.predictions.`.
///
/// [`BertConfig::default`] is multilingual BERT (`bert-base-multilingual-cased`): 12 layers,
/// hidden size 768, 12 heads, vocabulary 119 547. Fields this crate does not use are kept in
/// [`BertConfig::extra`] so that a loaded config is written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Vocabulary size (rows of the word-embedding matrix).
    pub vocab_size: usize,
    /// Hidden size H.
    pub hidden_size: usize,
    /// Number of transformer layers L.
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Inner size of the feed-forward block.
    pub intermediate_size: usize,
    /// Activation of the feed-forward block and the MLM head transform.
    pub hidden_act: HiddenAct,
    /// Dropout after embeddings, attention output and feed-forward output.
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f32,
    /// Number of learned absolute positions (maximum sequence length).
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    pub type_vocab_size: usize,
    /// Standard deviation of the normal initialisation of weights.
    pub initializer_range: f64,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    pub pad_token_id: Option<u32>,
    /// Only `"absolute"` is supported.
    pub position_embedding_type: String,
    /// The MLM decoder shares the word-embedding matrix; only `true` is supported.
    pub tie_word_embeddings: bool,
    /// Every other field of `config.json`, written back as it was read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for BertConfig {
    fn default() -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("model_type".into(), "bert".into());
        extra.insert(
            "architectures".into(),
            serde_json::json!(["BertForMaskedLM"]),
        );
        Self {
            vocab_size: 119_547,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            position_embedding_type: "absolute".into(),
            tie_word_embeddings: true,
            extra,
        }
    }
}

impl BertConfig {
    /// Multilingual BERT (cased), the encoder of the ML-CTL paper. Same as `default()`.
    pub fn mbert() -> Self {
        Self::default()
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the config as pretty JSON that transformers reads back as the same model type
    /// (`BertForMaskedLM`, or `XLMRobertaForMaskedLM` / `RobertaForMaskedLM`).
    pub fn to_json_string(&self) -> String {
        let mut cfg = self.clone();
        let architecture = match self.model_type() {
            "xlm-roberta" => "XLMRobertaForMaskedLM",
            "roberta" => "RobertaForMaskedLM",
            _ => "BertForMaskedLM",
        };
        cfg.extra
            .entry("model_type")
            .or_insert_with(|| "bert".into());
        cfg.extra
            .insert("architectures".into(), serde_json::json!([architecture]));
        // Serialising a struct of plain fields and a JSON map cannot fail.
        serde_json::to_string_pretty(&cfg).expect("config serialises")
    }

    /// The `model_type` of `config.json` (`"bert"` when it has none).
    pub fn model_type(&self) -> &str {
        self.extra
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("bert")
    }

    /// True for the RoBERTa family (`xlm-roberta`, `roberta`): checkpoints name the encoder
    /// `roberta.*` and the MLM head `lm_head.*`.
    pub fn is_roberta(&self) -> bool {
        matches!(self.model_type(), "xlm-roberta" | "roberta")
    }

    /// For the RoBERTa family, the padding index its position ids are counted from: a token at
    /// (non-padding) position `i` gets position id `padding_idx + 1 + i` and padding gets
    /// `padding_idx`, as transformers' `create_position_ids_from_input_ids`. `None` for BERT,
    /// whose position ids are `0..seq_len`.
    pub fn position_padding_idx(&self) -> Option<u32> {
        self.is_roberta().then(|| self.pad_token_id.unwrap_or(1))
    }

    /// The longest sequence the position table allows, special tokens included:
    /// `max_position_embeddings`, less `padding_idx + 1` for the RoBERTa family (514 - 2 = 512
    /// for XLM-R).
    pub fn max_sequence_length(&self) -> usize {
        let offset = self.position_padding_idx().map_or(0, |p| p as usize + 1);
        self.max_position_embeddings.saturating_sub(offset)
    }

    /// Checks that the sizes are consistent and the options supported.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return bad("hidden_size and num_attention_heads must be positive".into());
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.type_vocab_size == 0 {
            return bad(
                "vocab_size, max_position_embeddings and type_vocab_size must be positive".into(),
            );
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        if !self.tie_word_embeddings {
            return bad(
                "an untied MLM decoder (tie_word_embeddings = false) is not supported".into(),
            );
        }
        if self.max_sequence_length() == 0 {
            return bad(format!(
                "max_position_embeddings {} leaves no position after the padding offset {}",
                self.max_position_embeddings,
                self.position_padding_idx().map_or(0, |p| p + 1)
            ));
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
