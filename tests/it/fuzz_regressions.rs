//! Inputs found by fuzzing the readers (`fuzz/`), each of which once panicked, hung or
//! misbehaved: every one must now give a typed error or a correct result.

use crate::common;

use candle_core::Device;
use common::fixture;
use mlctl::tokenize::Tokenizer;
use mlctl::Error;

fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixture("tiny_bert/tokenizer.json")).unwrap()
}

/// A maximum length shorter than the special tokens BERT adds (`[CLS] a [SEP] b [SEP]`: 3)
/// overflowed an unchecked subtraction in the `tokenizers` crate (a panic in a debug build, a
/// wrapped length in a release one).
#[test]
fn max_len_without_room_for_text_is_an_invalid_argument() {
    for max_len in 0..=3 {
        match tiny_tokenizer().with_max_len(max_len) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("no room"), "{msg}"),
            other => panic!("max_len {max_len}: {:?}", other.map(|t| t.max_len())),
        }
    }
    // The shortest accepted length keeps one token of text, for single sentences and pairs.
    let tok = tiny_tokenizer().with_max_len(4).unwrap();
    let batch = tok
        .encode_pair_batch(&["the cat"], &["a dog"], &Device::Cpu)
        .unwrap();
    assert_eq!(batch.lengths, vec![4]);
    let batch = tok.encode_batch(&["the big cat"], &Device::Cpu).unwrap();
    assert_eq!(batch.lengths, vec![4]);
}

/// A `tokenizer.json` cut off inside its `decoder` object (a partial download, say) made the
/// `tokenizers` crate panic while parsing it (an `expect` on the decoder's helper): reading it
/// is an [`Error::Checkpoint`] naming the file.
#[test]
fn tokenizer_json_cut_inside_the_decoder_is_a_checkpoint_error() {
    let text = std::fs::read_to_string(fixture("tiny_bert/tokenizer.json")).unwrap();
    let cut = text.find("\"decoder\"").unwrap() + "\"decoder\": {\"type\": \"WordPiece\",".len();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, &text[..cut]).unwrap();
    match Tokenizer::from_file(&path) {
        Err(Error::Checkpoint { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("tokenizer.json"), "{reason}");
        }
        other => panic!("{:?}", other.map(|t| t.max_len())),
    }
}

/// A `TemplateProcessing` post-processor whose template names a special token its
/// `special_tokens` table lacks loads, then made the `tokenizers` crate panic on every encode
/// (an unchecked map index): encoding is an [`Error::Tokenizer`].
#[test]
fn template_naming_an_undeclared_special_token_is_a_tokenizer_error() {
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny_bert/tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap()
        .remove("[SEP]");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    for result in [
        tok.encode_batch(&["the cat"], &Device::Cpu).map(|_| ()),
        tok.encode_pair_batch(&["the cat"], &["a dog"], &Device::Cpu)
            .map(|_| ()),
        tok.encode_each(&["the cat"]).map(|_| ()),
    ] {
        match result {
            Err(Error::Tokenizer(e)) => assert!(e.to_string().contains("panicked"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A model vocabulary giving one id to two tokens loaded, but the tokenizer written back by
/// `save_pretrained` kept only one of them and no longer loaded (its `[CLS]` was gone): such a
/// `tokenizer.json` is an [`Error::Checkpoint`] naming it.
#[test]
fn vocabulary_giving_one_id_to_two_tokens_is_a_checkpoint_error() {
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny_bert/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let sep = json["model"]["vocab"]["[SEP]"].clone();
    json["model"]["vocab"]["[CLS]"] = sep;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    match Tokenizer::from_file(&path) {
        Err(Error::Checkpoint { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("to both `[CLS]` and `[SEP]`"), "{reason}");
        }
        other => panic!("{:?}", other.map(|t| t.max_len())),
    }
}

/// `config.json` with `"layer_norm_eps": 1e-25` read as one `f64`, was written back as `1e-25`
/// and read back as the next `f64` down (serde_json's default float parsing is not correctly
/// rounded): a saved model did not load with the configuration it was saved with.
#[test]
fn config_json_floats_read_back_to_the_same_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(fixture("tiny_bert/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for eps in [
        "1e-25",
        "1e-12",
        "2.2250738585072014e-308",
        "0.30000000000000004",
    ] {
        json["layer_norm_eps"] = "EPS".into();
        let text = json.to_string().replace("\"EPS\"", eps);
        std::fs::write(&path, &text).unwrap();
        let cfg = mlctl::encoder::BertConfig::from_file(&path).unwrap();
        assert_eq!(
            cfg.layer_norm_eps,
            eps.parse::<f64>().unwrap(),
            "{eps} as read"
        );
        std::fs::write(&path, cfg.to_json_string()).unwrap();
        let back = mlctl::encoder::BertConfig::from_file(&path).unwrap();
        assert_eq!(
            back.layer_norm_eps.to_bits(),
            cfg.layer_norm_eps.to_bits(),
            "{eps} written back as {}",
            cfg.to_json_string()
        );
    }
}
