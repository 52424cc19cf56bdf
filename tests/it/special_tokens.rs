//! Special tokens come from the model's files, and a model directory that lacks one the crate
//! needs, or whose tokenizer outgrows the embedding table, is a typed error naming the file.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::fixture;
use mlctl::data::MlmMasking;
use mlctl::pretrained::PretrainedBert;
use mlctl::tokenize::Tokenizer;
use mlctl::Error;
use serde_json::Value;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Every file of `dir` with its bytes: "nothing is written" means this does not change.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Drops `token` from the tokenizer's added (special) tokens and from tokenizer_config.json, so
/// that nothing declares it any more (it stays an ordinary vocabulary piece).
fn undeclare(dir: &Path, token: &str, key: &str) {
    edit_json(&dir.join("tokenizer.json"), |v| {
        let added = v["added_tokens"].as_array_mut().unwrap();
        added.retain(|t| t["content"] != token);
    });
    edit_json(&dir.join("tokenizer_config.json"), |v| {
        v.as_object_mut().unwrap().remove(key);
    });
}

fn assert_names(err: &Error, file: &str, words: &[&str]) {
    match err {
        Error::Checkpoint { path, reason } => {
            assert_eq!(
                path.file_name().unwrap(),
                file,
                "error names {path:?}: {reason}"
            );
            for w in words {
                assert!(reason.contains(w), "`{reason}` does not mention {w}");
            }
        }
        other => panic!("expected a Checkpoint error naming {file}, got {other:?}"),
    }
}

#[test]
fn bert_special_tokens_come_from_tokenizer_config() {
    let tok = Tokenizer::from_dir(fixture("tiny_bert")).unwrap();
    let s = tok.special_tokens();
    let got: Vec<(&str, u32)> = [&s.pad, &s.unk, &s.cls, &s.sep, &s.mask]
        .iter()
        .map(|t| {
            let t = t.as_ref().unwrap();
            (t.token.as_str(), t.id)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("[PAD]", 0),
            ("[UNK]", 1),
            ("[CLS]", 2),
            ("[SEP]", 3),
            ("[MASK]", 4)
        ]
    );
    assert_eq!(s.ids, [0, 1, 2, 3, 4]);
}

#[test]
fn declared_tokens_win_over_spellings() {
    // A model whose tokenizer_config.json names another mask token: it is the one used.
    let dir = copy_fixture("tiny_bert");
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["mask_token"] = Value::from("cat");
        v["pad_token"] = serde_json::json!({"content": "[UNK]", "special": true});
    });
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let cat = tok.token_to_id("cat").unwrap();
    assert_eq!(tok.mask_token().unwrap().id, cat);
    assert_eq!(tok.pad_token().unwrap().id, 1);
    assert!(tok.special_tokens().ids.contains(&cat));
    let batch = tok
        .encode_batch(&["cat", "the cat sat"], &Device::Cpu)
        .unwrap();
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    assert_eq!(
        *ids[0].last().unwrap(),
        1,
        "padded with the declared pad token"
    );
    // A saved model keeps them, and the rest of its tokenizer_config.json.
    let bert = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let saved = tempfile::tempdir().unwrap();
    bert.save(saved.path()).unwrap();
    let again = Tokenizer::from_dir(saved.path()).unwrap();
    assert_eq!(again.special_tokens(), tok.special_tokens());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(saved.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["mask_token"], "cat");
    assert_eq!(config["tokenizer_class"], "BertTokenizer");
}

#[test]
fn a_bare_sentencepiece_tokenizer_json_pads_with_pad_not_id_0() {
    // Like multilingual-e5's tokenizer.json: no padding section, and id 0 is <s>.
    let tok = Tokenizer::from_file(fixture("tiny_xlmr/tokenizer.json")).unwrap();
    assert_eq!(tok.pad_token().unwrap().token, "<pad>");
    let batch = tok
        .encode_batch(&["the cat sleeps on the mat", "a dog"], &Device::Cpu)
        .unwrap();
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let pad = tok.token_to_id("<pad>").unwrap();
    assert_ne!(pad, 0);
    assert_eq!(*ids[1].last().unwrap(), pad);
    assert_eq!(tok.mask_token().unwrap().token, "<mask>");
}

#[test]
fn pad_token_id_of_config_json_is_used_when_the_tokenizer_names_none() {
    let dir = copy_fixture("tiny_xlmr");
    undeclare(dir.path(), "<pad>", "pad_token");
    edit_json(&dir.path().join("config.json"), |v| {
        v["pad_token_id"] = Value::from(3)
    });
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.pad_token().unwrap().id, 3);
}

#[test]
fn vocabulary_larger_than_the_embedding_table_is_a_typed_error_naming_the_file() {
    let dir = copy_fixture("tiny_xlmr");
    let rows = {
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        cfg["vocab_size"].as_u64().unwrap()
    };
    // Ten more pieces: the tokenizer now has more ids than the table has rows.
    let mut pieces = 0;
    edit_json(&dir.path().join("tokenizer.json"), |v| {
        let vocab = v["model"]["vocab"].as_array_mut().unwrap();
        for i in 0..10 {
            vocab.push(serde_json::json!([format!("extra{i}"), -20.0]));
        }
        pieces = vocab.len() as u64;
    });
    assert!(pieces > rows);
    let before = snapshot(dir.path());
    let err = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap_err();
    assert_names(
        &err,
        "tokenizer.json",
        &[&pieces.to_string(), &rows.to_string()],
    );
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a failed load wrote something"
    );
}

#[test]
fn missing_mask_token_is_a_typed_error_naming_the_file_when_masking() {
    let dir = copy_fixture("tiny_xlmr");
    undeclare(dir.path(), "<mask>", "mask_token");
    let before = snapshot(dir.path());
    // Loading is fine (alignment and embedding need no mask token) ...
    let bert = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let tok = bert.tokenizer().unwrap();
    assert!(tok.special_tokens().mask.is_none());
    // ... masking is not.
    let err = MlmMasking::for_tokenizer(tok).unwrap_err();
    assert_names(&err, "tokenizer_config.json", &["mask"]);
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn missing_pad_token_is_a_typed_error_naming_the_file_when_padding() {
    let dir = copy_fixture("tiny_xlmr");
    undeclare(dir.path(), "<pad>", "pad_token");
    edit_json(&dir.path().join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("pad_token_id");
    });
    let before = snapshot(dir.path());
    let bert = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let tok = bert.tokenizer().unwrap();
    // Sentences of one length need no padding ...
    tok.encode_batch(&["a dog", "a cat"], &Device::Cpu).unwrap();
    // ... others do.
    let err = tok
        .encode_batch(&["a dog", "the cat sleeps"], &Device::Cpu)
        .unwrap_err();
    assert_names(&err, "tokenizer_config.json", &["pad"]);
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn a_declared_token_missing_from_the_vocabulary_names_the_declaring_file() {
    let dir = copy_fixture("tiny_xlmr");
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["mask_token"] = Value::from("<no-such-token>")
    });
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert_names(&err, "tokenizer_config.json", &["<no-such-token>"]);
}

#[test]
fn a_model_directory_without_tokenizer_json_names_it_when_one_is_needed() {
    let dir = copy_fixture("tiny_xlmr");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let bert = PretrainedBert::from_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_names(&bert.tokenizer().unwrap_err(), "tokenizer.json", &[]);
}
