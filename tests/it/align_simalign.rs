//! The aligner end to end against SimAlign's own outputs (written by
//! `examples/align/simalign_reference.py`, see `tests/fixtures/align/README.md`): argmax, itermax
//! and match, subword (`bpe`) and word token types, from one encoder pass per token type.
//!
//! - On the tiny test model (40 ro-en pairs, layer 2): the same links as SimAlign, pair by pair.
//! - On multilingual-e5-small (ignored; `MLCTL_E5_DIR` names its directory): AER within 0.005 of
//!   SimAlign's on all of ro-en (248 pairs) and ja-en (582 pairs), at layer 8. Run with
//!   `cargo test --release e5 -- --ignored`.

use crate::common;

use std::path::Path;

use candle_core::{DType, Device};
use mlctl::align::io::{read_gold, read_parallel, read_pharaoh};
use mlctl::align::{
    AlignMethod, Alignment, AlignmentCounts, ArgMax, IterMax, MaxWeightMatch, TokenType,
    WordAligner,
};
use mlctl::pretrained::PretrainedBert;

const METHODS: [&str; 3] = ["argmax", "itermax", "match"];

/// Per method (in [`METHODS`] order), the aligner's alignments of every pair of `set`.
fn align(
    bert: &PretrainedBert,
    layer: isize,
    token_type: TokenType,
    pairs: &[mlctl::align::SentencePair],
) -> Vec<Vec<Alignment>> {
    // Long sentences truncated only at the model's limit, as SimAlign does (a ja-en side has
    // up to 316 tokens).
    let tokenizer = bert
        .tokenizer()
        .expect("tokenizer.json")
        .clone()
        .with_max_len(bert.config.max_sequence_length())
        .unwrap();
    let aligner = WordAligner::new(bert.encoder(), tokenizer)
        .with_layer(layer)
        .with_token_type(token_type);
    let methods: [&dyn AlignMethod; 3] = [&ArgMax, &IterMax::default(), &MaxWeightMatch];
    aligner.align_pairs_multi(pairs, &methods).unwrap()
}

fn token_types() -> [(TokenType, &'static str); 2] {
    [(TokenType::Bpe, "bpe"), (TokenType::Word, "word")]
}

#[test]
fn tiny_model_links_equal_simalign_pair_by_pair() {
    let dir = common::fixture("align/simalign_tiny");
    let bert = PretrainedBert::load(
        common::fixture("tiny_bert").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let pairs = read_parallel(dir.join("roen.src-tgt")).unwrap();
    assert_eq!(pairs.len(), 40);
    for (token_type, tt) in token_types() {
        let ours = align(&bert, 2, token_type, &pairs);
        for (method, got) in METHODS.iter().zip(&ours) {
            let expected = read_pharaoh(dir.join(format!("roen.{tt}.{method}"))).unwrap();
            assert_eq!(expected.len(), pairs.len());
            for (k, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(a, b, "{tt} {method}, pair {k}: ours {a}, SimAlign {b}");
            }
        }
    }
}

/// Link-level agreement of two corpora of alignments: |A ∩ B| / |A ∪ B|.
fn agreement(a: &[Alignment], b: &[Alignment]) -> f64 {
    let (mut both, mut either) = (0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        let common = x.links().iter().filter(|&&(i, j)| y.contains(i, j)).count();
        both += common;
        either += x.len() + y.len() - common;
    }
    both as f64 / either.max(1) as f64
}

#[test]
#[ignore = "needs multilingual-e5-small in MLCTL_E5_DIR; run with --release"]
fn e5_simalign_parity_roen_jaen_bpe_and_word() {
    let model = std::env::var("MLCTL_E5_DIR")
        .expect("MLCTL_E5_DIR must name the multilingual-e5-small directory");
    let bert = PretrainedBert::load(&model, &Device::Cpu, DType::F32).unwrap();
    let data = common::fixture("align");
    let reference = data.join("simalign_e5");
    let mut failures = Vec::new();
    for set in ["roen", "jaen"] {
        let pairs = read_parallel(data.join(format!("{set}.src-tgt"))).unwrap();
        let gold = read_gold(data.join(format!("{set}.gold")), true).unwrap();
        for (token_type, tt) in token_types() {
            let ours = align(&bert, 8, token_type, &pairs);
            for (method, got) in METHODS.iter().zip(&ours) {
                let path = reference.join(format!("{set}.{tt}.{method}"));
                let simalign = read_pharaoh(Path::new(&path)).unwrap();
                let a = AlignmentCounts::corpus(got, &gold).unwrap().aer();
                let b = AlignmentCounts::corpus(&simalign, &gold).unwrap().aer();
                let same = agreement(got, &simalign);
                eprintln!(
                    "{set} {tt:4} {method:7} AER mlctl {a:.4} SimAlign {b:.4} (links in common {same:.4})"
                );
                if (a - b).abs() > 0.005 {
                    failures.push(format!("{set} {tt} {method}: {a:.4} vs {b:.4}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "AER off by more than 0.005: {failures:?}"
    );
}
