//! ML-CTL dictionary anchors: matching rules per script and token spans.

use crate::common;

use mlctl::align::{
    find_anchor_spans, script_kind, token_span, word_spans, AnchorMatch, Lexicon, ScriptKind,
    LEXICON_LANGS,
};
use mlctl::pooling::TokenSpan;
use mlctl::tokenize::Tokenizer;

// Entries (0-based line numbers of data/lexicon/*.txt).
const SWORD: usize = 2;
const CAT: usize = 38;
const WATER: usize = 1316;
const DOG: usize = 1724;
const FRIEND: usize = 2365;

fn tiny() -> Tokenizer {
    Tokenizer::from_file(common::fixture("tiny_bert/tokenizer.json")).unwrap()
}

fn found(lex: &Lexicon, s: &str, src: &str, t: &str, tgt: &str) -> Vec<(usize, String, String)> {
    lex.find_anchors(s, src, t, tgt)
        .unwrap()
        .into_iter()
        .map(|m| (m.entry, m.src_word, m.tgt_word))
        .collect()
}

fn span(start: usize, end: usize) -> TokenSpan {
    TokenSpan { start, end }
}

#[test]
fn embedded_lexicon_matches_the_files() {
    let lex = Lexicon::embedded();
    assert_eq!(lex.langs(), LEXICON_LANGS);
    assert_eq!(lex.len(), 4243);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/lexicon");
    assert_eq!(Lexicon::load(&dir, &LEXICON_LANGS).unwrap(), lex);
    assert_eq!(lex.word("en", CAT), Some("cat"));
    assert_eq!(lex.word("zh", CAT), Some("猫"));
    assert_eq!(lex.word("fr", WATER), Some("l'eau"));
    assert_eq!(lex.word("ar", SWORD), Some("سيف"));
    assert!(lex.find_anchors("de", "a", "en", "b").is_err());
}

#[test]
fn lexicon_files_must_have_equal_lengths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("en.txt"), "cat\ndog\n").unwrap();
    std::fs::write(dir.path().join("fr.txt"), "chat\n").unwrap();
    match Lexicon::load(dir.path(), &["en", "fr"]).unwrap_err() {
        mlctl::Error::Data { path, line, .. } => {
            assert_eq!(path, dir.path().join("fr.txt"));
            assert_eq!(line, 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Lexicon::load(dir.path(), &["en", "de"]).unwrap_err(),
        mlctl::Error::Io { .. }
    ));
}

#[test]
fn script_kinds() {
    for l in ["zh", "zh-CN", "ja", "th", "cmn"] {
        assert_eq!(script_kind(l), ScriptKind::Unspaced, "{l}");
    }
    for l in ["en", "ar", "fr", "ru", "es"] {
        assert_eq!(script_kind(l), ScriptKind::Spaced, "{l}");
    }
}

#[test]
fn zh_en_matches_characters_and_words() {
    let lex = Lexicon::embedded();
    let en = "the cat sat with a dog";
    let zh = "猫和狗坐着";
    let got = found(&lex, "en", en, "zh", zh);
    assert_eq!(
        got,
        vec![
            (CAT, "cat".into(), "猫".into()),
            (DOG, "dog".into(), "狗".into())
        ]
    );
    // byte ranges: 猫 is bytes 0..3, 狗 6..9 (3 bytes per character)
    let m = lex.find_anchors("en", en, "zh", zh).unwrap();
    assert_eq!((m[0].src_bytes, m[0].tgt_bytes), ((4, 7), (0, 3)));
    assert_eq!((m[1].src_bytes, m[1].tgt_bytes), ((19, 22), (6, 9)));
    // Unspaced side works with spaces too, and as the source.
    let got = found(&lex, "zh", "猫 和 狗", "en", "the dog and the cat");
    assert_eq!(
        got,
        vec![
            (CAT, "猫".into(), "cat".into()),
            (DOG, "狗".into(), "dog".into())
        ]
    );

    // Token spans with the tiny tokenizer: [CLS] the cat sat with a dog [SEP] -> cat 2, dog 6;
    // every CJK character is its own word ([UNK]): [CLS] 猫 和 狗 坐 着 [SEP] -> 猫 1, 狗 3.
    let anchors = find_anchor_spans(&lex, &tiny(), "en", en, "zh", zh).unwrap();
    let spans: Vec<_> = anchors.iter().map(|a| (a.src_span, a.tgt_span)).collect();
    assert_eq!(
        spans,
        vec![(span(2, 2), span(1, 1)), (span(6, 6), span(3, 3))]
    );
    assert_eq!(
        anchors[0].to_tsv(en, zh).unwrap(),
        "the cat sat with a dog\tcat\t2\t2\t猫和狗坐着\t猫\t1\t1"
    );
}

#[test]
fn ar_en_whole_words() {
    let lex = Lexicon::embedded();
    let en = "My friend has a dog and a sword.";
    let ar = "لدى صديق كلب و سيف";
    let got = found(&lex, "ar", ar, "en", en);
    let ids: Vec<usize> = got.iter().map(|g| g.0).collect();
    assert_eq!(ids, vec![FRIEND, DOG, SWORD], "{got:?}");
    assert_eq!(got[0].1, "صديق");
    assert_eq!(got[2].2, "sword", "punctuation is not part of the word");
    // A word with an attached clitic is a different word: "بالسيف" (with the sword) has no "سيف".
    assert!(found(&lex, "ar", "ضربه بالسيف", "en", "hit him with the sword").is_empty());
    // Spans: [CLS] لدى صديق كلب و سيف [SEP] (each an [UNK] word); [CLS] my friend has a dog and a
    // sword . [SEP] -> friend 2, dog 5, sword 8.
    let anchors = find_anchor_spans(&lex, &tiny(), "ar", ar, "en", en).unwrap();
    let spans: Vec<_> = anchors.iter().map(|a| (a.src_span, a.tgt_span)).collect();
    assert_eq!(
        spans,
        vec![
            (span(2, 2), span(2, 2)),
            (span(3, 3), span(5, 5)),
            (span(5, 5), span(8, 8))
        ]
    );
}

#[test]
fn words_occurring_twice_are_skipped() {
    let lex = Lexicon::embedded();
    // "cat" twice in English: no cat anchor; "dog" once on each side still is one.
    let got = found(
        &lex,
        "en",
        "the cat saw the other cat and a dog",
        "fr",
        "le chat a vu un chien",
    );
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![DOG]);
    // Twice on the unspaced side.
    assert!(found(&lex, "en", "a cat", "zh", "猫和猫").is_empty());
    // Case-insensitive counting: "Cat" and "cat" are the same word.
    assert!(found(&lex, "en", "Cat eats cat food", "fr", "chat").is_empty());
    // Whole words only in spaced scripts: "cats" and "category" are not "cat".
    assert!(found(&lex, "en", "cats in a category", "fr", "chat").is_empty());
}

#[test]
fn case_apostrophes_and_multiword_entries() {
    let lex = Lexicon::embedded();
    let got = found(
        &lex,
        "en",
        "The Cat drinks water",
        "fr",
        "Le CHAT boit de l'eau",
    );
    assert_eq!(
        got,
        vec![
            (CAT, "Cat".into(), "CHAT".into()),
            (WATER, "water".into(), "l'eau".into())
        ]
    );
    // Cyrillic has case too.
    let got = found(&lex, "ru", "Кот спит", "en", "the cat sleeps");
    assert_eq!(got, vec![(CAT, "Кот".into(), "cat".into())]);
}

#[test]
fn spans_cover_every_subword_and_agree_with_word_ids() {
    // A custom dictionary whose English word has several subwords in the tiny vocabulary.
    let lex = Lexicon::from_lists(
        vec!["en".into(), "fr".into()],
        vec![
            vec!["playing".into(), "sleep".into()],
            vec!["jouer".into(), "dormir".into()],
        ],
    )
    .unwrap();
    let tok = tiny();
    let en = "the dog was playing today";
    let anchors = find_anchor_spans(&lex, &tok, "en", en, "fr", "le chien aime jouer").unwrap();
    assert_eq!(anchors.len(), 1);
    // [CLS] the dog was play ##ing today [SEP]
    assert_eq!(anchors[0].src_span, span(4, 5));
    // the same span as the tokenizer's word ids give for word 3 of the pre-tokenized sentence
    let words: Vec<&str> = en.split(' ').collect();
    let batch = tok
        .encode_pretokenized_batch(std::slice::from_ref(&words), &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(
        word_spans(&batch.word_ids[0], words.len())[3],
        Some(anchors[0].src_span)
    );
    assert_eq!(
        token_span(&tok, en, anchors[0].found.src_bytes).unwrap(),
        Some(span(4, 5))
    );
    // fr words are all unknown to the tiny vocabulary: [CLS] le chien aime jouer [SEP]
    assert_eq!(anchors[0].tgt_span, span(4, 4));

    // Truncated away: the anchor is dropped.
    let short = tok.clone().with_max_len(4).unwrap();
    assert!(find_anchor_spans(&lex, &short, "en", en, "fr", "jouer")
        .unwrap()
        .is_empty());
    let m: Vec<AnchorMatch> = lex.find_anchors("en", en, "fr", "jouer").unwrap();
    assert_eq!(token_span(&short, en, m[0].src_bytes).unwrap(), None);
}

#[test]
fn tsv_rejects_tabs() {
    let lex = Lexicon::embedded();
    let anchors = find_anchor_spans(&lex, &tiny(), "en", "a cat", "fr", "un chat").unwrap();
    assert_eq!(
        anchors[0].to_tsv("a cat", "un chat").unwrap(),
        "a cat\tcat\t2\t2\tun chat\tchat\t2\t2"
    );
    assert!(anchors[0].to_tsv("a\tcat", "un chat").is_err());
}
