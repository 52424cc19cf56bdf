//! Tatoeba-style retrieval: for each source sentence (or anchor word), is its translation the
//! nearest target by cosine similarity, and vice versa.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::encoder::BertEncoder;
use crate::pooling::{Pooling, TokenSpan};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// Accuracy at 1 of retrieval in both directions over `n` aligned pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrievalScores {
    /// Share of sources whose nearest target is their translation.
    pub src_to_tgt: f32,
    /// Share of targets whose nearest source is their translation.
    pub tgt_to_src: f32,
    /// Number of pairs.
    pub n: usize,
}

impl RetrievalScores {
    /// Mean of both directions.
    pub fn mean(&self) -> f32 {
        (self.src_to_tgt + self.tgt_to_src) / 2.0
    }
}

/// Unit-length rows, computed in f32 (zero rows stay zero).
fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
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
    let sim = normalize_rows(src)?
        .matmul(&normalize_rows(tgt)?.t()?)?
        .to_device(&Device::Cpu)?;
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
    let forward = (0..n)
        .filter(|&i| argmax(&mut rows[i].iter().copied()) == i)
        .count();
    let backward = (0..n)
        .filter(|&j| argmax(&mut rows.iter().map(|r| r[j])) == j)
        .count();
    Ok(RetrievalScores {
        src_to_tgt: forward as f32 / n as f32,
        tgt_to_src: backward as f32 / n as f32,
        n,
    })
}

/// Sentence embeddings `[texts, hidden]` (f32, on the CPU) in eval mode, `batch_size` at a time.
pub fn embed_sentences<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    pooling: &Pooling,
    texts: &[S],
    batch_size: usize,
) -> Result<Tensor> {
    embed(encoder, tokenizer, pooling, texts, None, batch_size)
}

/// Word embeddings `[texts, hidden]` over one inclusive token span per text (as produced by
/// the same tokenizer), f32 on the CPU.
pub fn embed_spans<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    pooling: &Pooling,
    texts: &[S],
    spans: &[TokenSpan],
    batch_size: usize,
) -> Result<Tensor> {
    if spans.len() != texts.len() {
        return Err(Error::ShapeMismatch {
            name: "spans".into(),
            expected: vec![texts.len()],
            actual: vec![spans.len()],
        });
    }
    embed(encoder, tokenizer, pooling, texts, Some(spans), batch_size)
}

fn embed<S: AsRef<str>>(
    encoder: &BertEncoder,
    tokenizer: &Tokenizer,
    pooling: &Pooling,
    texts: &[S],
    spans: Option<&[TokenSpan]>,
    batch_size: usize,
) -> Result<Tensor> {
    if texts.is_empty() || batch_size == 0 {
        return Err(Error::InvalidArgument(
            "nothing to embed (no texts or batch size 0)".into(),
        ));
    }
    let device = encoder.word_embeddings().device();
    let mut parts = Vec::new();
    for (chunk_index, chunk) in texts.chunks(batch_size).enumerate() {
        let batch = tokenizer.encode_batch(chunk, device)?;
        let out = encoder.forward(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            Some(&batch.attention_mask),
        )?;
        let pooled = match spans {
            None => pooling.sentence(&out, &batch.attention_mask)?,
            Some(spans) => {
                let start = chunk_index * batch_size;
                pooling.spans(&out, &spans[start..start + chunk.len()])?
            }
        };
        parts.push(pooled.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
