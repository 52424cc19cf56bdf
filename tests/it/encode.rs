//! `encode`, the embedding front door, against sentence vectors pooled by hand from
//! transformers' hidden states (`tests/fixtures/tiny_bert/golden.safetensors`).

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, golden};
use mlctl::encode::{encode, encode_spans, EncodeOptions};
use mlctl::pooling::{Pooling, TokenSpan};
use mlctl::pretrained::PretrainedBert;

/// The golden's two single sentences (rows 0 and 1; row 2 is a sentence pair).
const SENTENCES: [&str; 2] = ["the dogs sat on the [MASK]", "a bird sings"];

fn load() -> PretrainedBert {
    PretrainedBert::from_dir(&fixture("tiny_bert"), &Device::Cpu, DType::F32).unwrap()
}

/// Mean over the attended tokens of golden row `row` at each of `layers`, summed: plain loops
/// over transformers' hidden states.
fn pooled_by_hand(
    row: usize,
    layers: &[usize],
    tokens: std::ops::RangeInclusive<usize>,
) -> Vec<f32> {
    let g = golden("tiny_bert/golden.safetensors");
    let mask: Vec<u32> = g["attention_mask"]
        .get(row)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut sum: Vec<f32> = Vec::new();
    for &layer in layers {
        let h: Vec<Vec<f32>> = g[&format!("hidden_states.{layer}")]
            .get(row)
            .unwrap()
            .to_vec2()
            .unwrap();
        let picked: Vec<usize> = tokens.clone().filter(|&t| mask[t] == 1).collect();
        sum.resize(h[0].len(), 0.0);
        for (d, s) in sum.iter_mut().enumerate() {
            *s += picked.iter().map(|&t| h[t][d]).sum::<f32>() / picked.len() as f32;
        }
    }
    sum
}

fn row(t: &Tensor, i: usize) -> Tensor {
    t.get(i).unwrap()
}

#[test]
fn encode_equals_mlctl_pooling_of_transformers_hidden_states_in_input_order() {
    let bert = load();
    let tok = bert.tokenizer().unwrap().clone();
    let layers = bert.config.num_hidden_layers;
    // Shortest first, so sorting by length reorders the batch and must restore the order.
    let texts = [SENTENCES[1], SENTENCES[0], SENTENCES[1]];
    for sort in [true, false] {
        for batch_size in [1, 2, 3] {
            let options = EncodeOptions::default()
                .with_batch_size(batch_size)
                .with_sort_by_length(sort);
            let got = encode(bert.encoder(), &tok, &texts, &options).unwrap();
            assert_eq!(got.dims(), [3, bert.config.hidden_size]);
            for (i, golden_row) in [1usize, 0, 1].into_iter().enumerate() {
                let want = pooled_by_hand(golden_row, &[1, layers], 0..=8);
                let want = Tensor::new(want, &Device::Cpu).unwrap();
                let name = format!("sort {sort}, batch {batch_size}, row {i}");
                assert_close(&name, &row(&got, i), &want, 1e-5);
            }
        }
    }
}

#[test]
fn encode_normalizes_pools_the_chosen_layer_and_prefixes() {
    let bert = load();
    let tok = bert.tokenizer().unwrap().clone();
    let last = bert.config.num_hidden_layers;
    let options = EncodeOptions::default()
        .with_pooling(Pooling::layer(-1))
        .with_normalize(true);
    let got = encode(bert.encoder(), &tok, &SENTENCES, &options).unwrap();
    for i in 0..2 {
        let want = pooled_by_hand(i, &[last], 0..=8);
        let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
        let want: Vec<f32> = want.iter().map(|v| v / norm).collect();
        assert_close(
            &format!("normalized row {i}"),
            &row(&got, i),
            &Tensor::new(want, &Device::Cpu).unwrap(),
            1e-5,
        );
    }
    // A prefix is the same as writing it in front of every text.
    let prefixed = encode(
        bert.encoder(),
        &tok,
        &["bird sings"],
        &EncodeOptions::default().with_prefix("a "),
    )
    .unwrap();
    let written = encode(
        bert.encoder(),
        &tok,
        &["a bird sings"],
        &EncodeOptions::default(),
    )
    .unwrap();
    assert_close("prefix", &prefixed, &written, 0.0);
}

#[test]
fn encode_spans_pools_the_anchor_tokens() {
    let bert = load();
    let tok = bert.tokenizer().unwrap().clone();
    let layers = bert.config.num_hidden_layers;
    // "dogs" is token 2 of row 0 ([CLS] the dogs ...); "bird sings" tokens 2..=3 of row 1.
    let spans = [
        TokenSpan { start: 2, end: 2 },
        TokenSpan { start: 2, end: 3 },
    ];
    let got = encode_spans(
        bert.encoder(),
        &tok,
        &SENTENCES,
        &spans,
        &EncodeOptions::default().with_batch_size(1),
    )
    .unwrap();
    for (i, span) in spans.iter().enumerate() {
        let want = pooled_by_hand(i, &[1, layers], span.start..=span.end);
        assert_close(
            &format!("span row {i}"),
            &row(&got, i),
            &Tensor::new(want, &Device::Cpu).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn encode_rejects_bad_arguments_with_typed_errors() {
    let bert = load();
    let tok = bert.tokenizer().unwrap().clone();
    let enc = bert.encoder();
    let zero = EncodeOptions::default().with_batch_size(0);
    assert!(matches!(
        encode(enc, &tok, &SENTENCES, &zero),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    let none: [&str; 0] = [];
    assert!(matches!(
        encode(enc, &tok, &none, &EncodeOptions::default()),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    let one_span = [TokenSpan { start: 1, end: 1 }];
    assert!(matches!(
        encode_spans(enc, &tok, &SENTENCES, &one_span, &EncodeOptions::default()),
        Err(mlctl::Error::ShapeMismatch { .. })
    ));
    let two_spans = [one_span[0], one_span[0]];
    assert!(matches!(
        encode_spans(
            enc,
            &tok,
            &SENTENCES,
            &two_spans,
            &EncodeOptions::default().with_prefix("query: ")
        ),
        Err(mlctl::Error::InvalidArgument(_))
    ));
}

#[test]
fn model_encode_and_cosine_similarity_agree_with_hand_computed_cosines() {
    let bert = load();
    let options = EncodeOptions::default();
    let v = bert.encode(&SENTENCES, &options).unwrap();
    let tok = bert.tokenizer().unwrap().clone();
    let direct = encode(bert.encoder(), &tok, &SENTENCES, &options).unwrap();
    assert_close("model.encode", &v, &direct, 0.0);
    let sim = mlctl::encode::cosine_similarity(&v, &v).unwrap();
    let rows: Vec<Vec<f32>> = v.to_vec2().unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for i in 0..2 {
        for j in 0..2 {
            let want = dot(&rows[i], &rows[j])
                / (dot(&rows[i], &rows[i]).sqrt() * dot(&rows[j], &rows[j]).sqrt());
            let got = sim
                .get(i)
                .unwrap()
                .get(j)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((got - want).abs() < 1e-6, "sim[{i}][{j}] {got} vs {want}");
        }
    }
    let other = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        mlctl::encode::cosine_similarity(&v, &other),
        Err(mlctl::Error::ShapeMismatch { .. })
    ));
}

#[test]
fn forward_detached_equals_forward_and_keeps_no_graph() {
    let bert = load();
    let tok = bert.tokenizer().unwrap().clone();
    let batch = tok.encode_batch(&SENTENCES, &Device::Cpu).unwrap();
    let enc = bert.encoder();
    let args = (
        &batch.input_ids,
        Some(&batch.token_type_ids),
        Some(&batch.attention_mask),
    );
    let with_graph = enc.forward(args.0, args.1, args.2).unwrap();
    let detached = enc.forward_detached(args.0, args.1, args.2).unwrap();
    assert_eq!(with_graph.hidden_states.len(), detached.hidden_states.len());
    for (i, (a, b)) in with_graph
        .hidden_states
        .iter()
        .zip(&detached.hidden_states)
        .enumerate()
    {
        assert_close(&format!("hidden_states.{i}"), b, a, 0.0);
    }
    let table = bert
        .params
        .named_vars()
        .into_iter()
        .find(|(name, _)| name.ends_with("word_embeddings.weight"))
        .expect("a word-embedding table")
        .1;
    let loss = |out: &mlctl::encoder::EncoderOutput| out.last_hidden_state.sum_all().unwrap();
    assert!(loss(&with_graph).backward().unwrap().get(&table).is_some());
    assert!(loss(&detached).backward().unwrap().get(&table).is_none());
}
