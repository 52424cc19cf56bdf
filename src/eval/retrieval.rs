//! Tatoeba-style retrieval: for each source sentence (or anchor word), is its translation the
//! nearest target by cosine similarity, and vice versa.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::encode::{cosine_similarity, encode, encode_spans, EncodeOptions};
use crate::encoder::BertEncoder;
use crate::pooling::{Pooling, TokenSpan};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// Accuracy at 1 of retrieval in both directions over `n` aligned pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalScores {
    /// Share of sources whose nearest target is their translation.
    pub src_to_tgt: f32,
    /// Share of targets whose nearest source is their translation.
    pub tgt_to_src: f32,
    /// Number of pairs.
    pub n: usize,
    /// Whether each source retrieved its translation (`n` entries, in pair order): the items
    /// of a bootstrap interval ([`crate::eval::bootstrap`]). In JSON a string of `1` (hit) and
    /// `0` (miss); an array of booleans, as earlier versions wrote, also reads.
    #[serde(default, with = "hit_string")]
    pub src_hits: Vec<bool>,
    /// Whether each target retrieved its translation.
    #[serde(default, with = "hit_string")]
    pub tgt_hits: Vec<bool>,
}

/// Hits as a string of `0` and `1`: a fifth of an array of booleans in JSON, which matters at
/// XTREME Tatoeba's 55,000 queries per pooling and model.
mod hit_string {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hits: &[bool], serializer: S) -> Result<S::Ok, S::Error> {
        let text: String = hits.iter().map(|&h| if h { '1' } else { '0' }).collect();
        serializer.serialize_str(&text)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Hits {
        Text(String),
        Flags(Vec<bool>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<bool>, D::Error> {
        match Hits::deserialize(deserializer)? {
            Hits::Flags(flags) => Ok(flags),
            Hits::Text(text) => text
                .chars()
                .map(|c| match c {
                    '1' => Ok(true),
                    '0' => Ok(false),
                    other => Err(D::Error::custom(format!(
                        "hits are a string of 0 and 1, not {other:?}"
                    ))),
                })
                .collect(),
        }
    }
}

impl RetrievalScores {
    /// Mean of both directions.
    pub fn mean(&self) -> f32 {
        (self.src_to_tgt + self.tgt_to_src) / 2.0
    }

    /// Every query's hit (1) or miss (0), sources first then targets: `2n` items whose mean is
    /// [`RetrievalScores::mean`].
    pub fn hits(&self) -> Vec<f64> {
        self.src_hits
            .iter()
            .chain(&self.tgt_hits)
            .map(|&h| f64::from(u8::from(h)))
            .collect()
    }
}

/// Retrieval accuracy between row-aligned embeddings (`src[i]` translates `tgt[i]`).
///
/// Ties go to the lowest index, so identical embeddings do not count as correct by accident.
///
/// # Shapes
/// - `src`, `tgt`: `[n, dim]`
pub fn retrieval_accuracy(src: &Tensor, tgt: &Tensor) -> Result<RetrievalScores> {
    let (n, d) = src.dims2()?;
    if tgt.dims() != [n, d] {
        return Err(Error::ShapeMismatch {
            name: "target embeddings".into(),
            expected: vec![n, d],
            actual: tgt.dims().to_vec(),
        });
    }
    if n == 0 {
        return Err(Error::InvalidArgument(
            "retrieval needs at least one pair".into(),
        ));
    }
    let sim = cosine_similarity(src, tgt)?.to_device(&Device::Cpu)?;
    let rows = sim.to_vec2::<f32>()?;
    let argmax = |values: &mut dyn Iterator<Item = f32>| {
        let mut best = (0, f32::NEG_INFINITY);
        for (j, v) in values.enumerate() {
            if v > best.1 {
                best = (j, v);
            }
        }
        best.0
    };
    let src_hits: Vec<bool> = (0..n)
        .map(|i| argmax(&mut rows[i].iter().copied()) == i)
        .collect();
    let tgt_hits: Vec<bool> = (0..n)
        .map(|j| argmax(&mut rows.iter().map(|r| r[j])) == j)
        .collect();
    let share = |hits: &[bool]| hits.iter().filter(|&&h| h).count() as f32 / n as f32;
    Ok(RetrievalScores {
        src_to_tgt: share(&src_hits),
        tgt_to_src: share(&tgt_hits),
        n,
        src_hits,
        tgt_hits,
    })
}

/// Sentence embeddings `[texts, hidden]` (f32, on the CPU) in eval mode, `batch_size` at a time:
/// [`encode`] with `pooling`.
pub fn embed_sentences<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    pooling: &Pooling,
    texts: &[S],
    batch_size: usize,
) -> Result<Tensor> {
    let options = EncodeOptions::default()
        .with_pooling(pooling.clone())
        .with_batch_size(batch_size);
    encode(encoder, tokenizer, texts, &options)
}

/// Word embeddings `[texts, hidden]` over one inclusive token span per text (as produced by
/// the same tokenizer), f32 on the CPU: [`encode_spans`] with `pooling`.
pub fn embed_spans<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    pooling: &Pooling,
    texts: &[S],
    spans: &[TokenSpan],
    batch_size: usize,
) -> Result<Tensor> {
    let options = EncodeOptions::default()
        .with_pooling(pooling.clone())
        .with_batch_size(batch_size);
    encode_spans(encoder, tokenizer, texts, spans, &options)
}
