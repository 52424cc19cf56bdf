//! Batch encoding against transformers' tokenizer output (`tests/fixtures/tiny_bert/tokenization.json`).

use crate::common;

use candle_core::Device;
use common::fixture;
use mlctl::tokenize::Tokenizer;
use serde_json::Value;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_bert/tokenization.json")).unwrap())
        .unwrap()
}

fn rows_u32(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn word_ids(v: &Value) -> Vec<Vec<Option<u32>>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn tokenizer(max_len: usize) -> Tokenizer {
    Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))
        .unwrap()
        .with_max_len(max_len)
        .unwrap()
}

#[test]
fn raw_text_batch_matches_transformers_with_padding_truncation_and_offsets() {
    let exp = expected();
    let max_len = exp["max_length"].as_u64().unwrap() as usize;
    let sentences: Vec<String> = serde_json::from_value(exp["sentences"].clone()).unwrap();
    let batch = tokenizer(max_len)
        .encode_batch(&sentences, &Device::Cpu)
        .unwrap();
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        rows_u32(&exp["input_ids"])
    );
    assert_eq!(
        batch.attention_mask.to_vec2::<u32>().unwrap(),
        rows_u32(&exp["attention_mask"])
    );
    assert_eq!(
        batch.token_type_ids.to_vec2::<u32>().unwrap(),
        rows_u32(&exp["token_type_ids"])
    );
    assert_eq!(batch.word_ids, word_ids(&exp["word_ids"]));
    // transformers reports character offsets; ours are byte offsets into the same string.
    let char_offsets: Vec<Vec<(usize, usize)>> =
        serde_json::from_value(exp["offsets"].clone()).unwrap();
    for ((row, sentence), actual) in char_offsets.iter().zip(&sentences).zip(&batch.offsets) {
        let byte_at = |c: usize| {
            sentence
                .char_indices()
                .nth(c)
                .map_or(sentence.len(), |(b, _)| b)
        };
        let expected: Vec<(usize, usize)> = row
            .iter()
            .map(|&(s, e)| {
                if (s, e) == (0, 0) {
                    (0, 0)
                } else {
                    (byte_at(s), byte_at(e))
                }
            })
            .collect();
        assert_eq!(actual, &expected, "offsets of {sentence:?}");
    }
    let lengths: Vec<usize> = rows_u32(&exp["attention_mask"])
        .iter()
        .map(|r| r.iter().sum::<u32>() as usize)
        .collect();
    assert_eq!(batch.lengths, lengths);
    assert!(batch.lengths.iter().all(|&l| l <= max_len));
}

#[test]
fn pretokenized_batch_matches_transformers() {
    let exp = expected();
    let max_len = exp["max_length"].as_u64().unwrap() as usize;
    let pre = &exp["pretokenized"];
    let words: Vec<Vec<String>> = serde_json::from_value(pre["words"].clone()).unwrap();
    let batch = tokenizer(max_len)
        .encode_pretokenized_batch(&words, &Device::Cpu)
        .unwrap();
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        rows_u32(&pre["input_ids"])
    );
    assert_eq!(
        batch.attention_mask.to_vec2::<u32>().unwrap(),
        rows_u32(&pre["attention_mask"])
    );
    assert_eq!(batch.word_ids, word_ids(&pre["word_ids"]));
}

#[test]
fn empty_batch_and_unreadable_tokenizer_are_typed_errors() {
    let empty: [&str; 0] = [];
    assert!(matches!(
        tokenizer(8).encode_batch(&empty, &Device::Cpu),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(
        Tokenizer::from_file(&path),
        Err(mlctl::Error::Checkpoint { .. })
    ));
}

#[test]
fn trained_wordpiece_has_bert_specials_splits_cjk_and_round_trips() {
    let corpus = [
        "The cat sleeps on the mat.",
        "Le chat dort sur le tapis.",
        "El gato duerme en la alfombra.",
        "Кошка спит на коврике.",
        "猫在垫子上睡觉。",
        "القطة تنام على السجادة.",
    ];
    let texts: Vec<String> = corpus
        .iter()
        .cycle()
        .take(60)
        .map(|s| s.to_string())
        .collect();
    let tok = mlctl::tokenize::train_wordpiece(texts.iter(), 300).unwrap();
    for (id, token) in mlctl::tokenize::BERT_SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(token), Some(id as u32), "{token}");
    }
    assert!(tok.vocab_size() <= 300);
    let batch = tok
        .encode_batch(&["猫在垫子上睡觉。", "The cat"], &Device::Cpu)
        .unwrap();
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    assert_eq!(ids[0][0], 2, "[CLS] first");
    assert_eq!(
        batch.lengths[0],
        8 + 2,
        "each CJK character is a word: 8 characters + [CLS] + [SEP]"
    );
    assert!(!ids[0].contains(&1), "no [UNK] for seen characters");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let reloaded = Tokenizer::from_file(&path).unwrap();
    let again = reloaded
        .encode_batch(&["猫在垫子上睡觉。", "The cat"], &Device::Cpu)
        .unwrap();
    assert_eq!(again.input_ids.to_vec2::<u32>().unwrap(), ids);
}
