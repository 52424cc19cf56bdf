//! multilingual-e5-small against transformers (goldens from `tests/fixtures/make_e5_fixtures.py`).
//!
//! Ignored: they need the model. Run them with
//! `MLCTL_E5_DIR=/path/to/e5 cargo test --release e5 -- --ignored`.

use crate::common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::{assert_close, fixture, golden};
use mlctl::data::MlmMasking;
use mlctl::pretrained::PretrainedBert;
use mlctl::tokenize::{TokenBatch, Tokenizer};
use serde_json::Value;

/// The sentences of `tests/fixtures/e5/golden.safetensors`, as the script encoded them.
const GOLDEN_SENTENCES: [&str; 6] = [
    "query: how much protein should a female eat",
    "Le chat dort sur le tapis.",
    "Кошка спит на ковре.",
    "猫在垫子上睡觉。",
    "القطة نائمة على السجادة",
    "El gato duerme.",
];

fn e5_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("MLCTL_E5_DIR").expect("set MLCTL_E5_DIR to the e5 model directory"),
    )
}

#[test]
#[ignore = "needs MLCTL_E5_DIR"]
fn e5_every_hidden_state_matches_transformers() {
    let bert = PretrainedBert::from_dir(&e5_dir(), &Device::Cpu, DType::F32).unwrap();
    assert!(bert.report.unexpected.is_empty(), "{}", bert.report);
    let g = golden("e5/golden.safetensors");
    let batch = bert
        .tokenizer()
        .unwrap()
        .encode_batch(&GOLDEN_SENTENCES, &Device::Cpu)
        .unwrap();
    // The fast tokenizer returns no token types for e5 (transformers then uses zeros).
    assert_eq!(
        batch
            .token_type_ids
            .max_keepdim(1)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<u32>()
            .unwrap(),
        0
    );
    for name in ["input_ids", "attention_mask"] {
        let ours = match name {
            "input_ids" => &batch.input_ids,
            _ => &batch.attention_mask,
        };
        assert_eq!(
            ours.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
            g[name].to_vec2::<i64>().unwrap(),
            "{name} differ from transformers'"
        );
    }
    let out = bert.encoder().forward_batch(&batch, false).unwrap();
    assert_eq!(out.hidden_states.len(), 13);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(
            &format!("e5 hidden_states.{i}"),
            h,
            &g[&format!("hidden_states.{i}")],
            1e-4,
        );
    }
}

#[test]
#[ignore = "needs MLCTL_E5_DIR"]
fn e5_special_tokens_and_vocabulary_come_from_its_files() {
    let bert = PretrainedBert::from_dir(&e5_dir(), &Device::Cpu, DType::F32).unwrap();
    let tok = bert.tokenizer().unwrap();
    let exp = &expected()["specials"];
    common::assert_special_tokens(tok.special_tokens(), exp);
    // 250,002 pieces for 250,037 embedding rows: a smaller tokenizer is fine.
    assert_eq!(tok.vocab_size(), 250_002);
    assert_eq!(bert.config.vocab_size, 250_037);
    MlmMasking::for_tokenizer(tok).expect("e5 has a mask token");
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("e5/tokenization.json")).unwrap())
        .unwrap()
}

fn tatoeba(lang: &str, side: &str, stride: usize) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/tatoeba")
        .join(format!("tatoeba.{lang}-eng.{side}"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .step_by(stride)
        .map(str::to_owned)
        .collect()
}

/// Each row of `batch` equals transformers' unpadded encoding; the rest is padding.
fn assert_rows(what: &str, batch: &TokenBatch, rows: &Value, pad: u32) {
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), ids.len(), "{what}: rows");
    for (r, row) in rows.iter().enumerate() {
        let want: Vec<u32> = row["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = want.len();
        assert_eq!(ids[r][..n], want[..], "{what} row {r}: ids");
        let words: Vec<Option<u32>> = row["words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().map(|w| w as u32))
            .collect();
        assert_eq!(
            batch.word_ids[r][..n],
            words[..],
            "{what} row {r}: word ids"
        );
        let special: Vec<u32> = row["special"]
            .as_str()
            .unwrap()
            .bytes()
            .map(|b| u32::from(b - b'0'))
            .collect();
        assert_eq!(
            batch.special_tokens_mask[r][..n],
            special[..],
            "{what} row {r}: special-token mask"
        );
        assert_eq!(batch.lengths[r], n, "{what} row {r}: length");
        assert!(
            ids[r][n..].iter().all(|&id| id == pad),
            "{what} row {r}: pad"
        );
    }
}

#[test]
#[ignore = "needs MLCTL_E5_DIR"]
fn e5_tokenizer_matches_transformers_on_tatoeba() {
    let tok = Tokenizer::from_dir(e5_dir())
        .unwrap()
        .with_max_len(512)
        .unwrap();
    let exp = expected();
    let stride = exp["stride"].as_u64().unwrap() as usize;
    let truncate = exp["truncate"].as_u64().unwrap() as usize;
    let short = tok.clone().with_max_len(truncate).unwrap();
    let pad = tok.pad_token().unwrap().id;
    let cpu = Device::Cpu;
    let mut checked = 0;
    for (lang, entry) in exp["languages"].as_object().unwrap() {
        let xxx = tatoeba(lang, lang, stride);
        let eng = tatoeba(lang, "eng", stride);
        for (side, texts) in [("xxx", &xxx), ("eng", &eng)] {
            let e = &entry[side];
            let what = format!("{lang} {side}");
            let raw = tok.encode_batch(texts, &cpu).unwrap();
            assert_rows(&format!("{what} raw"), &raw, &e["raw"], pad);
            let words: Vec<Vec<&str>> = texts
                .iter()
                .map(|t| t.split_whitespace().collect())
                .collect();
            let pre = tok.encode_pretokenized_batch(&words, &cpu).unwrap();
            assert_rows(&format!("{what} words"), &pre, &e["words"], pad);
            let cut = short.encode_batch(texts, &cpu).unwrap();
            assert_rows(&format!("{what} truncated"), &cut, &e["truncated"], pad);
            checked += 3 * texts.len();
        }
        let pairs = tok.encode_pair_batch(&xxx, &eng, &cpu).unwrap();
        assert_rows(&format!("{lang} pairs"), &pairs, &entry["pairs"], pad);
        let cut = short.encode_pair_batch(&xxx, &eng, &cpu).unwrap();
        assert_rows(
            &format!("{lang} truncated pairs"),
            &cut,
            &entry["pairs_truncated"],
            pad,
        );
        checked += 2 * xxx.len();
    }
    eprintln!("{checked} encodings equal transformers'");
    assert!(checked >= 2_000);
}
