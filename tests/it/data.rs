//! Corpus readers, the loader's checks and counts, and MLM masking.

use crate::common;

use std::path::Path;

use candle_core::Device;
use common::{fixture, synthetic_tsv, tsv_loader};
use mlctl::data::{CorpusFormat, LoaderConfig, MaskKey, MlmMasking, PairLoader, ParallelCorpus};
use mlctl::tokenize::Tokenizer;
use mlctl::Error;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn tokenizer(max_len: usize) -> Tokenizer {
    Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))
        .unwrap()
        .with_max_len(max_len)
        .unwrap()
}

fn data_error(result: mlctl::Result<impl std::fmt::Debug>) -> (std::path::PathBuf, usize, String) {
    match result {
        Err(Error::Data { path, line, reason }) => (path, line, reason),
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn reference_tsv_lines_parse_and_malformed_ones_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = "the cat sat\tcat\t2\t2\tthe dog ran\tdog\t2\t2";
    let text = [
        good,
        "only\tthree\tfields",
        "the cat\tcat\tx\t2\tthe dog\tdog\t2\t2",
        "the cat\tcat\t0\t1\tthe dog\tdog\t2\t2",
        "the cat\tcat\t3\t2\tthe dog\tdog\t2\t2",
        "\tcat\t1\t1\tthe dog\tdog\t2\t2",
    ]
    .join("\n");
    let path = write(dir.path(), "a.tsv", &text);
    let mut corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(path.clone())).unwrap();
    assert_eq!(corpus.len(), 6);
    let pair = corpus.get(0).unwrap();
    assert_eq!(
        (pair.src.as_str(), pair.tgt.as_str()),
        ("the cat sat", "the dog ran")
    );
    let (src, tgt) = pair.anchors.unwrap();
    assert_eq!(
        (src.word.as_str(), src.span.start, src.span.end),
        ("cat", 2, 2)
    );
    assert_eq!(
        (tgt.word.as_str(), tgt.span.start, tgt.span.end),
        ("dog", 2, 2)
    );
    for (line, needle) in [
        (2, "8 tab-separated"),
        (3, "not a number"),
        (4, "[CLS]"),
        (5, "empty"),
        (6, "empty sentence"),
    ] {
        let (p, l, reason) = data_error(corpus.get(line - 1));
        assert_eq!((p.as_path(), l), (path.as_path(), line));
        assert!(reason.contains(needle), "line {line}: {reason}");
    }
}

#[test]
fn bitext_and_line_aligned_formats() {
    let dir = tempfile::tempdir().unwrap();
    let bitext = write(
        dir.path(),
        "a.txt",
        "the cat ||| le chat\nno separator here\n",
    );
    let mut corpus = ParallelCorpus::open(CorpusFormat::Bitext(bitext.clone())).unwrap();
    let pair = corpus.get(0).unwrap();
    assert_eq!(
        (pair.src.as_str(), pair.tgt.as_str(), pair.anchors),
        ("the cat", "le chat", None)
    );
    assert_eq!(data_error(corpus.get(1)).1, 2);

    let src = write(dir.path(), "s.txt", "one\ntwo\n");
    let tgt = write(dir.path(), "t.txt", "un\ndeux\n");
    let mut corpus = ParallelCorpus::open(CorpusFormat::LineAligned {
        src: src.clone(),
        tgt: tgt.clone(),
    })
    .unwrap();
    assert_eq!(corpus.get(1).unwrap().tgt, "deux");
    let short = write(dir.path(), "short.txt", "un\n");
    let (path, _, reason) = data_error(ParallelCorpus::open(CorpusFormat::LineAligned {
        src,
        tgt: short.clone(),
    }));
    assert_eq!(path, short);
    assert!(
        reason.contains("2 lines") && reason.contains("1"),
        "{reason}"
    );

    let invalid = dir.path().join("bad.txt");
    std::fs::write(&invalid, b"ok ||| ok\n\xff\xfe ||| x\n").unwrap();
    let mut corpus = ParallelCorpus::open(CorpusFormat::Bitext(invalid)).unwrap();
    assert!(data_error(corpus.get(1)).2.contains("UTF-8"));
    assert!(matches!(
        ParallelCorpus::open(CorpusFormat::Bitext(dir.path().join("missing.txt"))),
        Err(Error::Io { .. })
    ));
}

#[test]
fn loader_batches_pads_and_keeps_spans_on_the_anchor_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.tsv", &synthetic_tsv(10, 3));
    let mut loader = tsv_loader(&path, 4, 16, 0);
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    assert_eq!(batch.len(), 4);
    let ids = batch.src.input_ids.to_vec2::<u32>().unwrap();
    let tok = tokenizer(16);
    // Every span points at the anchor word's token.
    for (row, (s, _)) in batch.anchors.as_ref().unwrap().iter().enumerate() {
        assert_eq!(s.start, s.end);
        let word = tok.inner().id_to_token(ids[row][s.start]).unwrap();
        assert!(common::WORDS.contains(&word.as_str()), "{word}");
    }
    // Endless: after the corpus ends, a new epoch in a new order.
    for _ in 0..5 {
        loader.next_batch(&Device::Cpu).unwrap();
    }
    assert_eq!(loader.cursor().epoch, 2);
    assert_eq!(loader.stats().used, 24);
}

#[test]
fn loader_order_is_seeded_and_resumable_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.tsv", &synthetic_tsv(9, 4));
    let ids = |loader: &mut PairLoader| {
        loader
            .next_batch(&Device::Cpu)
            .unwrap()
            .src
            .input_ids
            .to_vec2::<u32>()
            .unwrap()
    };
    let mut a = tsv_loader(&path, 4, 16, 7);
    let mut b = tsv_loader(&path, 4, 16, 7);
    let mut c = tsv_loader(&path, 4, 16, 8);
    let first = ids(&mut a);
    assert_eq!(first, ids(&mut b));
    assert_ne!(first, ids(&mut c), "another seed, another order");
    ids(&mut a);
    let cursor = a.cursor();
    let next = ids(&mut a); // crosses into epoch 1
    let mut d = tsv_loader(&path, 4, 16, 7);
    d.set_cursor(cursor).unwrap();
    assert_eq!(ids(&mut d), next);
}

#[test]
fn truncated_anchors_are_dropped_and_counted_bad_lines_skipped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let text = [
        "the cat sat on the mat\tmat\t6\t6\tthe dog\tdog\t2\t2", // mat is token 6: cut at max_len 6
        "the cat\tcat\t2\t2\tthe dog\tdog\t2\t2",
        "broken line",
        "the cat\tcat\t2\t2\tthe dog\tdog\t2\t2",
    ]
    .join("\n");
    let path = write(dir.path(), "a.tsv", &text);
    let corpus = || ParallelCorpus::open(CorpusFormat::ReferenceTsv(path.clone())).unwrap();
    let config = LoaderConfig {
        batch_size: 2,
        shuffle: false,
        ..Default::default()
    };
    let mut strict = PairLoader::new(corpus(), tokenizer(6), config.clone()).unwrap();
    assert_eq!(data_error(strict.next_batch(&Device::Cpu)).1, 3);

    let lenient = LoaderConfig {
        skip_bad_lines: true,
        ..config
    };
    let mut loader = PairLoader::new(corpus(), tokenizer(6), lenient).unwrap();
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    assert_eq!(batch.len(), 2);
    let stats = loader.stats();
    assert_eq!(
        (stats.used, stats.anchor_truncated, stats.bad_lines),
        (2, 1, 1)
    );

    // A span beyond an untruncated sentence is bad data, not truncation.
    let path = write(
        dir.path(),
        "b.tsv",
        "the cat\tcat\t5\t5\tthe dog\tdog\t2\t2\n",
    );
    let corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(path)).unwrap();
    let mut loader = PairLoader::new(
        corpus,
        tokenizer(16),
        LoaderConfig {
            batch_size: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(data_error(loader.next_batch(&Device::Cpu))
        .2
        .contains("outside"));
}

#[test]
fn anchor_spans_made_with_another_tokenizer_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let good = "the cat sat\tcat\t2\t2\tthe dog ran\tdog\t2\t2";
    // Each bad line, with what the reason must say: spans from a tokenizer that keeps `cats`
    // whole (here `cat ##s`), spans off by one, a word the sentence does not hold.
    let bad = [
        (
            "the cats sat\tcats\t2\t2\tthe dog ran\tdog\t2\t2",
            "source",
            "2..=3",
        ),
        (
            "the happy cat sat\tcat\t4\t4\tthe dog ran\tdog\t2\t2",
            "source",
            "3..=3",
        ),
        (
            "the cat sat\tcat\t2\t2\tthe dog ran\tdog\t3\t3",
            "target",
            "2..=2",
        ),
        (
            "the cat sat\tcow\t2\t2\tthe dog ran\tdog\t2\t2",
            "source",
            "does not occur",
        ),
    ];
    let config = LoaderConfig {
        batch_size: 2,
        shuffle: false,
        ..Default::default()
    };
    let loader = |path: &Path, config: &LoaderConfig| {
        let corpus = ParallelCorpus::open(CorpusFormat::ReferenceTsv(path.to_path_buf())).unwrap();
        PairLoader::new(corpus, tokenizer(16), config.clone()).unwrap()
    };
    for (k, (line, side, needle)) in bad.iter().enumerate() {
        let path = write(
            dir.path(),
            &format!("{k}.tsv"),
            &format!("{good}\n{line}\n"),
        );
        let (p, l, reason) = data_error(loader(&path, &config).next_batch(&Device::Cpu));
        assert_eq!((p, l), (path, 2));
        assert!(
            reason.starts_with(side) && reason.contains(needle) && reason.contains("tokenizer"),
            "{line}: {reason}"
        );
    }
    // Counted and skipped on request; the word's case does not matter.
    let mut lines = vec![good];
    lines.extend(bad.iter().map(|b| b.0));
    lines.push("the cat sat\tCat\t2\t2\tthe dog ran\tDOG\t2\t2");
    let path = write(dir.path(), "all.tsv", &lines.join("\n"));
    let lenient = LoaderConfig {
        skip_bad_lines: true,
        ..config
    };
    let mut loader = loader(&path, &lenient);
    assert_eq!(loader.next_batch(&Device::Cpu).unwrap().len(), 2);
    assert_eq!((loader.stats().used, loader.stats().bad_lines), (2, 4));
}

#[test]
fn a_corpus_without_usable_pairs_fails_instead_of_looping() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.txt", "the cat ||| the dog\n");
    let corpus = ParallelCorpus::open(CorpusFormat::Bitext(path)).unwrap();
    // Anchors required but none can be found: no anchor finder for plain text.
    let mut loader = PairLoader::new(
        corpus,
        tokenizer(16),
        LoaderConfig {
            batch_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(loader.next_batch(&Device::Cpu).is_err());
}

#[test]
fn masking_follows_bert_recipe_and_never_touches_padding_or_specials() {
    let tok = tokenizer(64);
    let sentences: Vec<String> = (0..200)
        .map(|i| {
            common::WORDS
                .iter()
                .cycle()
                .skip(i % 40)
                .take(5 + i % 20)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let batch = tok.encode_batch(&sentences, &Device::Cpu).unwrap();
    let masking = MlmMasking::for_tokenizer(&tok).unwrap();
    let mask_id = tok.token_to_id("[MASK]").unwrap();
    let draw = |seed| {
        masking
            .mask(&batch, MaskKey::new(seed, 0), &Device::Cpu)
            .unwrap()
    };
    let (a, b) = (draw(1), draw(1));
    assert_eq!(
        a.positions.to_vec1::<u32>().unwrap(),
        b.positions.to_vec1::<u32>().unwrap(),
        "seeded"
    );

    let original: Vec<u32> = batch.input_ids.flatten_all().unwrap().to_vec1().unwrap();
    let attention: Vec<u32> = batch
        .attention_mask
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let corrupted: Vec<u32> = a.input_ids.flatten_all().unwrap().to_vec1().unwrap();
    let positions: Vec<u32> = a.positions.to_vec1().unwrap();
    let targets: Vec<u32> = a.targets.to_vec1().unwrap();
    let specials: Vec<u32> = ["[CLS]", "[SEP]", "[PAD]"]
        .iter()
        .map(|t| tok.token_to_id(t).unwrap())
        .collect();
    let eligible = original
        .iter()
        .zip(&attention)
        .filter(|(id, &m)| m == 1 && !specials.contains(id))
        .count();
    let share = positions.len() as f64 / eligible as f64;
    assert!((share - 0.15).abs() < 0.02, "selected {share}");
    let (mut to_mask, mut kept) = (0, 0);
    for (&p, &t) in positions.iter().zip(&targets) {
        let p = p as usize;
        assert_eq!(original[p], t);
        assert_eq!(attention[p], 1, "padding selected");
        assert!(!specials.contains(&original[p]), "special token selected");
        to_mask += (corrupted[p] == mask_id) as usize;
        kept += (corrupted[p] == original[p]) as usize;
    }
    let n = positions.len() as f64;
    assert!(
        (to_mask as f64 / n - 0.8).abs() < 0.05,
        "[MASK] share {}",
        to_mask as f64 / n
    );
    assert!(
        (kept as f64 / n - 0.1).abs() < 0.05,
        "kept share {}",
        kept as f64 / n
    );
    // Padding is never selected even when the pad id is not listed as special: the attention
    // mask decides.
    let cls_sep = vec![
        tok.token_to_id("[CLS]").unwrap(),
        tok.token_to_id("[SEP]").unwrap(),
    ];
    let unlisted_pad = MlmMasking::new(mask_id, tok.vocab_size(), cls_sep)
        .unwrap()
        .with_prob(1.0)
        .unwrap();
    let all = unlisted_pad
        .mask(&batch, MaskKey::new(2, 0), &Device::Cpu)
        .unwrap();
    let selected: Vec<u32> = all.positions.to_vec1().unwrap();
    assert!(
        selected.iter().all(|&p| attention[p as usize] == 1),
        "padding selected"
    );
    assert_eq!(
        selected.len(),
        attention.iter().filter(|&&m| m == 1).count() - 2 * 200
    );
    // Outside the selected positions nothing changes.
    let changed = corrupted
        .iter()
        .zip(&original)
        .filter(|(c, o)| c != o)
        .count();
    assert!(changed <= positions.len());
}

#[test]
fn line_aligned_text_gets_dictionary_anchors_on_the_fly() {
    use mlctl::align::Lexicon;
    use mlctl::data::LexiconAnchors;
    let dir = tempfile::tempdir().unwrap();
    // "chien"/"dog" is a dictionary entry; in the second pair "chat" occurs twice: no anchor.
    let src = write(dir.path(), "fr.txt", "le chien dort\nle chat et le chat\n");
    let tgt = write(
        dir.path(),
        "en.txt",
        "the dog sleeps\nthe cat and the cat\n",
    );
    let corpus = ParallelCorpus::open(CorpusFormat::LineAligned { src, tgt }).unwrap();
    let finder = LexiconAnchors::new(std::sync::Arc::new(Lexicon::embedded()), "fr", "en").unwrap();
    let config = LoaderConfig {
        batch_size: 1,
        shuffle: false,
        ..Default::default()
    };
    let mut loader = PairLoader::new(corpus, tokenizer(16), config)
        .unwrap()
        .with_anchor_finder(std::sync::Arc::new(finder));
    let batch = loader.next_batch(&Device::Cpu).unwrap();
    let (s, t) = batch.anchors.unwrap()[0];
    let tok = tokenizer(16);
    let tgt_ids = batch.tgt.input_ids.to_vec2::<u32>().unwrap();
    assert_eq!(
        tok.inner().id_to_token(tgt_ids[0][t.start]).as_deref(),
        Some("dog")
    );
    // "le chien dort": [CLS] le chien dort [SEP]; the tiny English vocabulary splits French
    // words into pieces, so the span covers every piece of "chien" and nothing else.
    let src_batch = tok.encode_batch(&["le chien dort"], &Device::Cpu).unwrap();
    let chien: Vec<usize> = src_batch.word_ids[0]
        .iter()
        .enumerate()
        .filter(|(_, w)| **w == Some(1))
        .map(|(k, _)| k)
        .collect();
    assert_eq!((s.start, s.end), (chien[0], *chien.last().unwrap()));
    // The next batch wraps around: the second pair has no anchor and is counted.
    loader.next_batch(&Device::Cpu).unwrap();
    assert_eq!(loader.stats().no_anchor, 1);
    assert!(LexiconAnchors::new(std::sync::Arc::new(Lexicon::embedded()), "fr", "xx").is_err());
}
