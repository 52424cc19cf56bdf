//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn golden(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(path), &Device::Cpu).expect("golden fixture loads")
}

/// Largest absolute difference, computed in f64; NaN where either side has a NaN (or both an
/// infinity of the same sign) at the same place, so that no tolerance accepts it.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    flat(a)
        .iter()
        .zip(&flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, nan_max)
}

/// `max`, except that a NaN on either side wins (`f64::max` drops it).
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Asserts that `var` got a gradient with a finite, non-zero norm.
pub fn assert_gradient_reaches(grads: &candle_core::backprop::GradStore, var: &Tensor, name: &str) {
    let g = grads
        .get(var)
        .unwrap_or_else(|| panic!("no gradient reaches {name}"));
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        norm > 0.0 && norm.is_finite(),
        "{name}: gradient norm {norm}"
    );
}

pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let diff = max_abs_diff(actual, expected);
    eprintln!("{name}: max abs diff {diff:.3e}");
    assert!(diff <= tol, "{name}: max abs diff {diff:e} > {tol:e}");
}

/// Whole words of the tiny vocabulary (each one token).
pub const WORDS: [&str; 40] = [
    "cat", "dog", "bird", "fish", "fox", "mat", "house", "tree", "park", "garden", "book", "ball",
    "car", "red", "blue", "green", "big", "small", "happy", "sad", "quick", "brown", "lazy",
    "today", "sun", "moon", "water", "home", "friend", "day", "night", "play", "run", "jump",
    "walk", "eat", "sleep", "read", "sing", "rain",
];

/// A synthetic "translation": a fixed permutation of `WORDS`, so target sentences share no
/// surface tokens with their sources but are a consistent function of them.
pub fn translate(word: &str) -> &'static str {
    let i = WORDS.iter().position(|w| *w == word).expect("known word");
    WORDS[(i * 7 + 3) % WORDS.len()]
}

/// `n` reference-TSV lines of 4-7 word sentences and their translations, anchored on the
/// word at a varying position; spans count tokens with [CLS] at 0 (each word is one token).
pub fn synthetic_tsv(n: usize, seed: u64) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::new();
    for _ in 0..n {
        let len = rng.random_range(4..=7);
        let mut src: Vec<&str> = Vec::new();
        while src.len() < len {
            let w = WORDS[rng.random_range(0..WORDS.len())];
            if !src.contains(&w) {
                src.push(w);
            }
        }
        let tgt: Vec<&str> = src.iter().rev().map(|w| translate(w)).collect();
        let k = rng.random_range(0..len);
        let tk = len - 1 - k;
        out += &format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            src.join(" "),
            src[k],
            k + 1,
            k + 1,
            tgt.join(" "),
            tgt[tk],
            tk + 1,
            tk + 1
        );
    }
    out
}

/// A freshly initialised tiny model (the fixture's config) with the fixture's tokenizer.
pub fn tiny_model(seed: u64) -> mlctl::model::MlCtlModel {
    use mlctl::encoder::BertConfig;
    use mlctl::pretrained::PretrainedBert;
    let cfg = BertConfig::from_file(fixture("tiny_bert/config.json")).unwrap();
    let tok = mlctl::tokenize::Tokenizer::from_file(fixture("tiny_bert/tokenizer.json")).unwrap();
    let bert = PretrainedBert::from_config(cfg, Some(tok), &Device::Cpu, DType::F32, seed).unwrap();
    mlctl::model::MlCtlModel::new(bert, Default::default(), seed).unwrap()
}

/// A loader over a TSV file with the tiny tokenizer.
pub fn tsv_loader(
    path: &std::path::Path,
    batch_size: usize,
    max_len: usize,
    seed: u64,
) -> mlctl::data::PairLoader {
    use mlctl::data::{CorpusFormat, LoaderConfig, PairLoader, ParallelCorpus};
    let tok = mlctl::tokenize::Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))
        .unwrap()
        .with_max_len(max_len)
        .unwrap();
    let corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(path.to_path_buf())).unwrap();
    PairLoader::new(
        corpus,
        tok,
        LoaderConfig {
            batch_size,
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The tiny model's forward pass on the golden inputs of `tiny_bert/golden.safetensors`.
pub fn forward_golden(
    bert: &mlctl::pretrained::PretrainedBert,
    train: bool,
) -> mlctl::encoder::MaskedLmOutput {
    let g = golden("tiny_bert/golden.safetensors");
    bert.model
        .forward_t(
            &g["input_ids"],
            Some(&g["token_type_ids"]),
            Some(&g["attention_mask"]),
            train,
        )
        .unwrap()
}

/// Asserts that a tokenizer's special tokens equal transformers' (`exp`: `{"mask": [token, id],
/// ..., "all_special_ids": [...]}`, as the fixture scripts write them).
pub fn assert_special_tokens(special: &mlctl::tokenize::SpecialTokens, exp: &serde_json::Value) {
    for (name, got) in [
        ("mask", &special.mask),
        ("pad", &special.pad),
        ("cls", &special.cls),
        ("sep", &special.sep),
        ("unk", &special.unk),
    ] {
        let got = got.as_ref().unwrap_or_else(|| panic!("no {name} token"));
        assert_eq!(got.token, exp[name][0].as_str().unwrap(), "{name}");
        assert_eq!(u64::from(got.id), exp[name][1].as_u64().unwrap(), "{name}");
    }
    let all: Vec<u32> = exp["all_special_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(special.ids, all);
}

/// Held by every test that sets `HF_HOME` or `HF_HUB_OFFLINE`: the tests of a binary share one
/// environment and run on parallel threads.
pub fn hf_env_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
