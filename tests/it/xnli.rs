//! XNLI / MultiNLI readers on hand-written samples in the official layouts
//! (`tests/fixtures/xnli/`), sentence-pair tokenization, and the NLI classifier: fine-tuning
//! on a synthetic task, per-language accounting, the caller's model left untouched.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture, WORDS};
use mlctl::encoder::BertConfig;
use mlctl::nli::{
    evaluate_nli, finetune_nli, read_nli_jsonl, read_nli_tsv, LanguageCounts, NliClassifier,
    NliData, NliExample, NliFinetuneConfig, NliFormat, NliLabel, NliPooling, NliPredictor,
    NliReadOptions, NliReadStats, NliReport, XnliDir, XnliSplit,
};
use mlctl::pretrained::PretrainedBert;
use mlctl::tokenize::Tokenizer;
use mlctl::Error;
use rand::{Rng, SeedableRng};

use NliLabel::{Contradiction as C, Entailment as E, Neutral as N};

fn xnli(path: &str) -> PathBuf {
    fixture("xnli").join(path)
}

fn data_error<T: std::fmt::Debug>(result: mlctl::Result<T>) -> (PathBuf, usize, String) {
    match result {
        Err(Error::Data { path, line, reason }) => (path, line, reason),
        other => panic!("expected a data error, got {other:?}"),
    }
}

fn labels(data: &NliData) -> Vec<NliLabel> {
    data.examples.iter().map(|e| e.label).collect()
}

fn languages(data: &NliData) -> Vec<&str> {
    data.examples.iter().map(|e| e.language.as_str()).collect()
}

/// Every data line lands in exactly one count.
fn assert_accounted(stats: &NliReadStats) {
    assert_eq!(
        stats.lines,
        stats.kept
            + stats.no_gold_label
            + stats.other_language
            + stats.bad_lines
            + stats.blank_lines,
        "{stats:?}"
    );
}

fn ex(premise: &str, hypothesis: &str, label: NliLabel, language: &str) -> NliExample {
    NliExample {
        premise: premise.into(),
        hypothesis: hypothesis.into(),
        label,
        language: language.into(),
    }
}

// ---------------------------------------------------------------- readers

#[test]
fn labels_parse_in_every_official_spelling() {
    assert_eq!(NliLabel::parse("entailment"), Some(E));
    assert_eq!(NliLabel::parse("neutral"), Some(N));
    assert_eq!(NliLabel::parse("contradiction"), Some(C));
    assert_eq!(NliLabel::parse("contradictory"), Some(C));
    assert_eq!(NliLabel::parse(" Neutral "), Some(N));
    assert_eq!(NliLabel::parse("-"), None);
    assert_eq!(NliLabel::parse("entail"), None);
    assert_eq!(NliLabel::parse(""), None);
    for (i, label) in NliLabel::ALL.into_iter().enumerate() {
        assert_eq!(label.index(), i);
        assert_eq!(NliLabel::from_index(i), Some(label));
        assert_eq!(NliLabel::parse(label.as_str()), Some(label));
    }
    assert_eq!(NliLabel::from_index(3), None);
}

#[test]
fn xnli_dev_tsv_finds_columns_by_header_name() {
    let data = read_nli_tsv(xnli("XNLI-1.0/xnli.dev.tsv"), &NliReadOptions::default()).unwrap();
    assert_eq!(data.examples.len(), 9);
    assert_eq!(
        data.examples[0],
        ex("The cat sat on the mat.", "A cat is sitting.", E, "en")
    );
    // sentence2 with quotes, taken as written (no CSV quoting).
    assert_eq!(data.examples[2].hypothesis, "The book is \"very\" old.");
    assert_eq!(data.examples[5].hypothesis, "Le livre est « très » vieux.");
    assert_eq!(
        data.examples[8],
        ex("狗今天在公园里玩。", "狗在家里睡觉。", C, "zh")
    );
    assert_eq!(labels(&data), [E, C, N, E, C, N, E, N, C]);
    assert_eq!(
        languages(&data),
        ["en", "en", "en", "fr", "fr", "fr", "de", "de", "zh"]
    );
    let counts = data.language_counts();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("de".into(), 2),
            ("en".into(), 3),
            ("fr".into(), 3),
            ("zh".into(), 1)
        ])
    );
    assert_eq!(
        data.stats,
        NliReadStats {
            lines: 9,
            kept: 9,
            ..Default::default()
        }
    );
}

#[test]
fn xnli_language_filter_keeps_only_the_asked_languages_and_counts_the_rest() {
    let options = NliReadOptions::default().with_languages(["fr", "zh"]);
    let data = read_nli_tsv(xnli("XNLI-1.0/xnli.dev.tsv"), &options).unwrap();
    assert_eq!(languages(&data), ["fr", "fr", "fr", "zh"]);
    assert_eq!(labels(&data), [E, C, N, C]);
    assert_eq!(data.stats.other_language, 5);
    assert_accounted(&data.stats);
    let none = read_nli_tsv(
        xnli("XNLI-1.0/xnli.dev.tsv"),
        &NliReadOptions::default().with_languages(["sw"]),
    )
    .unwrap();
    assert!(none.examples.is_empty());
    assert_eq!(none.stats.other_language, 9);
}

#[test]
fn xnli_test_tsv_with_crlf_line_ends() {
    let raw = std::fs::read(xnli("XNLI-1.0/xnli.test.tsv")).unwrap();
    assert!(raw.windows(2).any(|w| w == b"\r\n"), "fixture keeps CRLF");
    let data = read_nli_tsv(xnli("XNLI-1.0/xnli.test.tsv"), &NliReadOptions::default()).unwrap();
    assert_eq!(languages(&data), ["en", "en", "fr", "fr", "ar"]);
    assert_eq!(labels(&data), [N, E, N, E, C]);
    assert_eq!(data.examples[4].hypothesis, "إنها تمطر الآن.");
    for e in &data.examples {
        assert!(!e.premise.contains('\r') && !e.hypothesis.contains('\r'));
    }
}

#[test]
fn xnli_mt_train_tsv_accepts_contradictory() {
    let data = read_nli_tsv(
        xnli("XNLI-MT-1.0/multinli/multinli.train.en.tsv"),
        &NliReadOptions::default(),
    )
    .unwrap();
    assert_eq!(labels(&data), [E, C, N, C, E]);
    assert_eq!(
        data.examples[1],
        ex("He said \"hello\" and left.", "He stayed silent.", C, "en")
    );
    assert!(data.examples.iter().all(|e| e.language == "en"));
    // The language of a file without a language column is the default one.
    let options = NliReadOptions {
        default_language: "xx".into(),
        ..Default::default()
    };
    let data = read_nli_tsv(xnli("XNLI-MT-1.0/multinli/multinli.train.en.tsv"), &options).unwrap();
    assert!(data.examples.iter().all(|e| e.language == "xx"));
}

#[test]
fn mnli_jsonl_skips_and_counts_no_consensus_labels() {
    let data = read_nli_jsonl(
        xnli("multinli_1.0/multinli_1.0_train.jsonl"),
        &NliReadOptions::default(),
    )
    .unwrap();
    assert_eq!(labels(&data), [N, C, E, E]);
    assert_eq!(
        data.examples[1],
        ex("A bird sings on the tree.", "No bird is singing.", C, "en")
    );
    assert_eq!(
        data.stats,
        NliReadStats {
            lines: 7,
            kept: 4,
            no_gold_label: 2,
            blank_lines: 1,
            ..Default::default()
        }
    );
}

#[test]
fn bad_tsv_lines_fail_with_file_and_line_or_are_skipped_and_counted() {
    let path = xnli("bad/xnli.bad.tsv");
    let (p, line, reason) = data_error(read_nli_tsv(&path, &NliReadOptions::default()));
    assert_eq!(p, path);
    assert_eq!(line, 3, "{reason}");
    assert!(
        reason.contains("expected 19") && reason.contains("found 4"),
        "{reason}"
    );

    let data = read_nli_tsv(&path, &NliReadOptions::default().skipping_bad_lines()).unwrap();
    assert_eq!(labels(&data), [E, N]);
    assert_eq!(languages(&data), ["en", "fr"]);
    assert_eq!(
        data.stats,
        NliReadStats {
            lines: 5,
            kept: 2,
            bad_lines: 2,
            no_gold_label: 1,
            ..Default::default()
        }
    );

    // The unknown label (line 4) is reported once line 3 is gone.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let without_3: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, l)| l)
        .collect();
    let edited = dir.path().join("edited.tsv");
    std::fs::write(&edited, without_3.join("\n")).unwrap();
    let (_, line, reason) = data_error(read_nli_tsv(&edited, &NliReadOptions::default()));
    assert_eq!(line, 3);
    assert!(reason.contains("unknown label `maybe`"), "{reason}");
}

#[test]
fn bad_jsonl_lines_fail_with_file_and_line_or_are_skipped_and_counted() {
    let path = xnli("bad/mnli.bad.jsonl");
    let (p, line, reason) = data_error(read_nli_jsonl(&path, &NliReadOptions::default()));
    assert_eq!((p, line), (path.clone(), 2));
    assert!(reason.contains("invalid JSON"), "{reason}");

    let data = read_nli_jsonl(&path, &NliReadOptions::default().skipping_bad_lines()).unwrap();
    assert_eq!(labels(&data), [E, C]);
    assert_eq!(
        data.stats,
        NliReadStats {
            lines: 8,
            kept: 2,
            bad_lines: 5,
            no_gold_label: 1,
            ..Default::default()
        }
    );

    // Each kind of bad line, alone after a good one, is reported at line 2 with its reason.
    let lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for (index, expected) in [
        (2, "missing field `sentence2`"),
        (3, "unknown label `unsure`"),
        (4, "field `sentence2` is not a string"),
        (5, "expected a JSON object"),
    ] {
        let file = dir.path().join(format!("bad{index}.jsonl"));
        std::fs::write(&file, format!("{}\n{}\n", lines[0], lines[index])).unwrap();
        let (_, line, reason) = data_error(read_nli_jsonl(&file, &NliReadOptions::default()));
        assert_eq!(line, 2);
        assert!(reason.contains(expected), "{reason} lacks {expected}");
    }
}

#[test]
fn unusable_files_are_typed_errors() {
    let (_, line, reason) = data_error(read_nli_tsv(
        xnli("bad/no_label_column.tsv"),
        &NliReadOptions::default().skipping_bad_lines(),
    ));
    assert_eq!(line, 1);
    assert!(reason.contains("`gold_label` or `label`"), "{reason}");

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.tsv");
    std::fs::write(&empty, "").unwrap();
    let (_, line, reason) = data_error(read_nli_tsv(&empty, &NliReadOptions::default()));
    assert_eq!(line, 1);
    assert!(reason.contains("empty"), "{reason}");

    let latin1 = dir.path().join("latin1.tsv");
    std::fs::write(
        &latin1,
        b"premise\thypo\tlabel\nca\xe9\tb\tneutral\na\tb\tneutral\n",
    )
    .unwrap();
    let (_, line, reason) = data_error(read_nli_tsv(&latin1, &NliReadOptions::default()));
    assert_eq!(line, 2);
    assert!(reason.contains("UTF-8"), "{reason}");
    let data = read_nli_tsv(&latin1, &NliReadOptions::default().skipping_bad_lines()).unwrap();
    assert_eq!(data.examples.len(), 1);
    assert_eq!(data.stats.bad_lines, 1);

    match read_nli_jsonl(dir.path().join("absent.jsonl"), &NliReadOptions::default()) {
        Err(Error::Io { path, source }) => {
            assert!(path.ends_with("absent.jsonl"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn discover_finds_the_official_layout() {
    let root = fixture("xnli");
    let dir = XnliDir::discover(&root).unwrap();
    // XNLI-MT's English file is preferred over MultiNLI's JSON lines.
    assert_eq!(
        dir.train.path,
        root.join("XNLI-MT-1.0/multinli/multinli.train.en.tsv")
    );
    assert_eq!(dir.train.format, NliFormat::Tsv);
    assert_eq!(dir.train.default_language, "en");
    assert_eq!(
        dir.dev.as_ref().unwrap().path,
        root.join("XNLI-1.0/xnli.dev.tsv")
    );
    assert_eq!(
        dir.test.as_ref().unwrap().path,
        root.join("XNLI-1.0/xnli.test.tsv")
    );
    assert_eq!(
        labels(&dir.read_train(&Default::default()).unwrap()),
        [E, C, N, C, E]
    );
    assert_eq!(dir.read_dev(&Default::default()).unwrap().examples.len(), 9);
    let fr = dir
        .read_test(&NliReadOptions::default().with_languages(["fr"]))
        .unwrap();
    assert_eq!(labels(&fr), [N, E]);
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

fn not_found_message(result: mlctl::Result<XnliDir>) -> String {
    match result {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            source.to_string()
        }
        other => panic!("expected a not-found error, got {other:?}"),
    }
}

#[test]
fn discover_accepts_flat_and_mnli_layouts_and_lists_what_it_searched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let message = not_found_message(XnliDir::discover(root));
    for searched in XnliDir::TRAIN_CANDIDATES
        .iter()
        .chain(&XnliDir::DEV_CANDIDATES)
        .chain(&XnliDir::TEST_CANDIDATES)
    {
        assert!(message.contains(searched), "{message} lacks {searched}");
    }
    not_found_message(XnliDir::discover(root.join("absent")));

    copy(
        &xnli("multinli_1.0/multinli_1.0_train.jsonl"),
        &root.join("multinli_1.0/multinli_1.0_train.jsonl"),
    );
    let message = not_found_message(XnliDir::discover(root));
    assert!(
        message.contains("evaluation file") && !message.contains("training"),
        "{message}"
    );

    copy(&xnli("XNLI-1.0/xnli.test.tsv"), &root.join("xnli.test.tsv"));
    let found = XnliDir::discover(root).unwrap();
    assert_eq!(found.train.format, NliFormat::Jsonl);
    assert_eq!(
        found.test.as_ref().unwrap().path,
        root.join("xnli.test.tsv")
    );
    assert!(found.dev.is_none());
    assert_eq!(
        labels(&found.read_train(&Default::default()).unwrap()),
        [N, C, E, E]
    );
    assert!(matches!(
        found.read_dev(&Default::default()),
        Err(Error::InvalidArgument(_))
    ));

    // A bare train.tsv in GLUE's layout (sentence1/sentence2/gold_label among other columns).
    let glue = tempfile::tempdir().unwrap();
    std::fs::write(
        glue.path().join("train.tsv"),
        "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n\
         0\t1\t1e\tslate\tA cat.\tAn animal.\tentailment\tentailment\n",
    )
    .unwrap();
    copy(
        &xnli("XNLI-1.0/xnli.dev.tsv"),
        &glue.path().join("xnli.dev.tsv"),
    );
    let found = XnliDir::discover(glue.path()).unwrap();
    let train = found.read_train(&Default::default()).unwrap();
    assert_eq!(train.examples, [ex("A cat.", "An animal.", E, "en")]);
}

/// Only an absent test file falls back to the dev split, and the result says so; a test file
/// that is there but unreadable is an error, not a silent switch to another split.
#[test]
fn the_eval_split_is_test_and_falls_back_to_dev_only_when_the_test_file_is_absent() {
    let official = XnliDir::discover(fixture("xnli")).unwrap();
    let eval = official.read_eval(&Default::default()).unwrap();
    assert_eq!(eval.split, XnliSplit::Test);
    assert_eq!(eval.fallback, None);
    assert_eq!(eval.path, xnli("XNLI-1.0/xnli.test.tsv"));
    assert_eq!(eval.data, official.read_test(&Default::default()).unwrap());
    let note = eval.split_note();
    assert!(
        note.contains("test split") && !note.contains("dev"),
        "{note}"
    );

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy(
        &xnli("XNLI-MT-1.0/multinli/multinli.train.en.tsv"),
        &root.join("multinli.train.en.tsv"),
    );
    copy(&xnli("XNLI-1.0/xnli.dev.tsv"), &root.join("xnli.dev.tsv"));

    // No test file: the dev split, and why.
    let eval = XnliDir::discover(root)
        .unwrap()
        .read_eval(&Default::default())
        .unwrap();
    assert_eq!(eval.split, XnliSplit::Dev);
    assert_eq!(eval.path, root.join("xnli.dev.tsv"));
    assert_eq!(eval.data.examples.len(), 9);
    let why = eval.fallback.as_deref().expect("the fallback is explained");
    for searched in XnliDir::TEST_CANDIDATES {
        assert!(why.contains(searched), "{why} lacks {searched}");
    }
    let note = eval.split_note();
    assert!(
        note.contains("dev split") && note.contains("not test") && note.contains(why),
        "{note}"
    );

    // A malformed test file: an error naming the test file's line, not the dev split.
    copy(&xnli("bad/xnli.bad.tsv"), &root.join("xnli.test.tsv"));
    let found = XnliDir::discover(root).unwrap();
    let (path, line, _) = data_error(found.read_eval(&Default::default()));
    assert_eq!((path, line), (root.join("xnli.test.tsv"), 3));
    // Skipping bad lines reads the test file as it can, still the test split.
    let eval = found
        .read_eval(&NliReadOptions::default().skipping_bad_lines())
        .unwrap();
    assert_eq!(
        (eval.split, eval.fallback.as_deref()),
        (XnliSplit::Test, None)
    );
    assert!(eval.data.stats.bad_lines > 0);

    // A test file that cannot be read at all: an I/O error, not the dev split.
    std::fs::remove_file(root.join("xnli.test.tsv")).unwrap();
    std::fs::create_dir(root.join("xnli.test.tsv")).unwrap();
    let mut unreadable = found.clone();
    unreadable.test = Some(mlctl::nli::NliFile::new(root.join("xnli.test.tsv")));
    assert!(matches!(
        unreadable.read_eval(&Default::default()),
        Err(Error::Io { .. })
    ));
}

// ---------------------------------------------------------------- pair tokenization

fn tiny_tokenizer(max_len: usize) -> Tokenizer {
    Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))
        .unwrap()
        .with_max_len(max_len)
        .unwrap()
}

#[test]
fn pair_batches_are_cls_a_sep_b_sep_with_segment_ids() {
    let tok = tiny_tokenizer(64);
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let batch = tok
        .encode_pair_batch(
            &["the cat sat", "a dog"],
            &["a dog", "the cat sat on"],
            &Device::Cpu,
        )
        .unwrap();
    let (cls, sep) = (id("[CLS]"), id("[SEP]"));
    assert_eq!((cls, sep), (2, 3));
    let row0 = [
        cls,
        id("the"),
        id("cat"),
        id("sat"),
        sep,
        id("a"),
        id("dog"),
        sep,
        0,
    ];
    let row1 = [
        cls,
        id("a"),
        id("dog"),
        sep,
        id("the"),
        id("cat"),
        id("sat"),
        id("on"),
        sep,
    ];
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        [row0.to_vec(), row1.to_vec()]
    );
    assert_eq!(
        batch.token_type_ids.to_vec2::<u32>().unwrap(),
        [
            vec![0, 0, 0, 0, 0, 1, 1, 1, 0],
            vec![0, 0, 0, 0, 1, 1, 1, 1, 1]
        ]
    );
    assert_eq!(
        batch.attention_mask.to_vec2::<u32>().unwrap(),
        [vec![1, 1, 1, 1, 1, 1, 1, 1, 0], vec![1; 9]]
    );
    assert_eq!(batch.lengths, [8, 9]);

    // Longest-first truncation to 7 tokens: 3 specials + 4 words, taken from the longer side.
    let short = tiny_tokenizer(7)
        .encode_pair_batch(&["the cat sat on the mat"], &["a dog"], &Device::Cpu)
        .unwrap();
    assert_eq!(
        short.input_ids.to_vec2::<u32>().unwrap(),
        [vec![
            cls,
            id("the"),
            id("cat"),
            sep,
            id("a"),
            id("dog"),
            sep
        ]]
    );

    match tok.encode_pair_batch(&["a"], &["b", "c"], &Device::Cpu) {
        Err(Error::ShapeMismatch {
            expected, actual, ..
        }) => {
            assert_eq!((expected, actual), (vec![1], vec![2]))
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert!(matches!(
        tok.encode_pair_batch::<&str>(&[], &[], &Device::Cpu),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------- evaluation

/// Predicts from a fixed table keyed by premise.
struct Fixed(BTreeMap<String, NliLabel>);

impl NliPredictor for Fixed {
    fn predict(&self, examples: &[NliExample]) -> mlctl::Result<Vec<NliLabel>> {
        Ok(examples.iter().map(|e| self.0[&e.premise]).collect())
    }
}

#[test]
fn evaluate_counts_per_language_by_hand() {
    // premise, gold, language, predicted
    let rows = [
        ("p1", E, "en", E), // right
        ("p2", N, "en", E), // wrong
        ("p3", C, "en", C), // right
        ("p4", E, "en", E), // right   -> en 3/4
        ("p5", N, "fr", N), // right
        ("p6", C, "fr", E), // wrong   -> fr 1/2
        ("p7", E, "zh", N), // wrong   -> zh 0/1
        ("p8", C, "de", C), // right
        ("p9", C, "de", C), // right
        ("pa", N, "de", N), // right   -> de 3/3
    ];
    let examples: Vec<NliExample> = rows.iter().map(|r| ex(r.0, "h", r.1, r.2)).collect();
    let predictor = Fixed(rows.iter().map(|r| (r.0.to_string(), r.3)).collect());
    let report = evaluate_nli(&predictor, &examples).unwrap();
    let counts = |correct, total| LanguageCounts { correct, total };
    assert_eq!(
        report.counts,
        BTreeMap::from([
            ("de".to_string(), counts(3, 3)),
            ("en".to_string(), counts(3, 4)),
            ("fr".to_string(), counts(1, 2)),
            ("zh".to_string(), counts(0, 1)),
        ])
    );
    assert_eq!(
        report.accuracy_by_language,
        BTreeMap::from([
            ("de".to_string(), 1.0),
            ("en".to_string(), 0.75),
            ("fr".to_string(), 0.5),
            ("zh".to_string(), 0.0),
        ])
    );
    assert!((report.overall - 0.7).abs() < 1e-6, "{}", report.overall); // 7 of 10
    assert!((report.average - 0.5625).abs() < 1e-6, "{}", report.average); // (1+.75+.5+0)/4
                                                                           // confusion[gold][predicted]
    assert_eq!(report.confusion, [[2, 1, 0], [1, 2, 0], [1, 0, 3]]);
    let shown = report.to_string();
    assert!(
        shown.contains("en") && shown.contains("75.00%") && shown.contains("(3/4)"),
        "{shown}"
    );

    assert!(matches!(
        evaluate_nli(&predictor, &[]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        NliReport::from_predictions(&examples, &[E; 3]),
        Err(Error::ShapeMismatch { .. })
    ));
}

fn tiny_bert(seed: u64) -> PretrainedBert {
    let cfg = BertConfig::from_file(fixture("tiny_bert/config.json")).unwrap();
    PretrainedBert::from_config(
        cfg,
        Some(tiny_tokenizer(64)),
        &Device::Cpu,
        DType::F32,
        seed,
    )
    .unwrap()
}

fn snapshot(bert: &PretrainedBert) -> BTreeMap<String, Vec<f32>> {
    bert.params
        .named_vars()
        .into_iter()
        .map(|(name, var)| {
            let values = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, values)
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn classifier_logits_match_a_manual_head_over_cls_or_mean_pooling() {
    let bert = tiny_bert(3);
    let premises = ["the cat sat on the mat", "a dog"];
    let hypotheses = ["a cat", "the dog runs in the park today"];
    for pooling in [NliPooling::Cls, NliPooling::Mean] {
        let classifier = NliClassifier::new(tiny_bert(3), pooling, 16, 11).unwrap();
        let batch = classifier.encode(&premises, &hypotheses).unwrap();
        let logits = classifier.forward_t(&batch, false).unwrap();
        assert_eq!(logits.dims(), [2, 3]);

        // Reference: the same encoder run directly, pooled and multiplied out in plain Rust.
        let out = bert
            .model
            .encoder
            .forward(
                &batch.input_ids,
                Some(&batch.token_type_ids),
                Some(&batch.attention_mask),
            )
            .unwrap();
        let hidden = out.last_hidden_state.to_vec3::<f32>().unwrap();
        let mask = batch.attention_mask.to_vec2::<u32>().unwrap();
        let head = classifier.head_params().named_vars();
        let w = head["classifier.weight"]
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        let b = head["classifier.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!((w.len(), w[0].len(), b.len()), (3, 32, 3));
        for (row, logit_row) in rows(&logits).iter().enumerate() {
            let pooled: Vec<f32> = match pooling {
                NliPooling::Cls => hidden[row][0].clone(),
                NliPooling::Mean => {
                    let n = mask[row].iter().filter(|&&m| m == 1).count() as f32;
                    (0..32)
                        .map(|k| {
                            (0..mask[row].len())
                                .filter(|&t| mask[row][t] == 1)
                                .map(|t| hidden[row][t][k])
                                .sum::<f32>()
                                / n
                        })
                        .collect()
                }
            };
            for c in 0..3 {
                let expected: f32 = b[c] + (0..32).map(|k| w[c][k] * pooled[k]).sum::<f32>();
                assert!(
                    (logit_row[c] - expected).abs() < 1e-4,
                    "{pooling:?} row {row} class {c}: {} vs {expected}",
                    logit_row[c]
                );
            }
        }
    }
    let cfg = NliFinetuneConfig::default();
    assert!(matches!(
        NliClassifier::new(tiny_bert(3), NliPooling::Cls, 65, 0),
        Err(Error::InvalidArgument(_))
    ));
    let no_tok = tiny_bert(3).with_tokenizer(None).unwrap();
    assert!(matches!(
        finetune_nli(&no_tok, &[ex("a", "b", E, "en")], &cfg),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        finetune_nli(&bert, &[], &cfg),
        Err(Error::InvalidArgument(_))
    ));
    let zero_epochs = NliFinetuneConfig { epochs: 0, ..cfg };
    assert!(matches!(
        finetune_nli(&bert, &[ex("a", "b", E, "en")], &zero_epochs),
        Err(Error::InvalidArgument(_))
    ));
}

/// A learnable NLI task over the tiny vocabulary. The premise is 4-6 distinct words of the
/// first half of `WORDS`; the hypothesis is 2-3 words of the premise (entailment), the same
/// with `not` in front (contradiction), or 2-3 words of the second half of `WORDS`, disjoint
/// from the premise (neutral).
fn synthetic_nli(n: usize, seed: u64, language: &str) -> Vec<NliExample> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (first, second) = WORDS.split_at(WORDS.len() / 2);
    let pick = |rng: &mut rand_chacha::ChaCha8Rng, from: &[&'static str], k: usize| {
        let mut out: Vec<&'static str> = Vec::new();
        while out.len() < k {
            let w = from[rng.random_range(0..from.len())];
            if !out.contains(&w) {
                out.push(w);
            }
        }
        out
    };
    (0..n)
        .map(|i| {
            let label = NliLabel::ALL[i % 3];
            let len = rng.random_range(4..=6);
            let premise = pick(&mut rng, first, len);
            let k = rng.random_range(2..=3);
            let mut hypothesis = match label {
                N => pick(&mut rng, second, k),
                _ => pick(&mut rng, &premise, k),
            };
            if label == C {
                hypothesis.insert(0, "not");
            }
            ex(&premise.join(" "), &hypothesis.join(" "), label, language)
        })
        .collect()
}

#[test]
fn finetuning_learns_a_synthetic_nli_task_and_leaves_the_callers_model_alone() {
    let bert = tiny_bert(5);
    let before = snapshot(&bert);
    let train = synthetic_nli(160, 1, "en");
    let held_out: Vec<NliExample> = synthetic_nli(60, 2, "en")
        .into_iter()
        .chain(synthetic_nli(30, 3, "xx"))
        .collect();
    let config = NliFinetuneConfig {
        epochs: 4,
        batch_size: 16,
        lr: 3e-3,
        max_len: 16,
        pooling: NliPooling::Mean,
        seed: 7,
        max_examples: None,
        progress: false,
    };
    let untrained = NliClassifier::new(tiny_bert(5), NliPooling::Mean, 16, 7).unwrap();
    let chance = evaluate_nli(&untrained, &held_out).unwrap();
    let classifier = finetune_nli(&bert, &train, &config).unwrap();
    let report = evaluate_nli(&classifier, &held_out).unwrap();
    let summary = classifier.summary().unwrap();
    eprintln!("untrained:\n{chance}\nfine-tuned:\n{report}\n{summary:?}");
    assert_eq!(summary.examples, 160);
    assert_eq!(summary.steps, 4 * 10);
    assert!(summary.last_epoch_loss < summary.first_epoch_loss);
    assert!(
        report.overall >= 0.7,
        "held-out accuracy {}",
        report.overall
    );
    assert_eq!(report.counts["en"].total, 60);
    assert_eq!(report.counts["xx"].total, 30);

    // The caller's weights are bit for bit what they were; the classifier's moved.
    assert_eq!(snapshot(&bert), before);
    let tuned = snapshot(classifier.bert());
    let moved = tuned
        .iter()
        .filter(|(name, values)| before[*name] != **values)
        .count();
    assert!(moved > 20, "only {moved} encoder tensors changed");
}

#[test]
fn finetuning_is_seeded_and_reproducible() {
    let bert = tiny_bert(9);
    let train = synthetic_nli(24, 4, "en");
    let probe = synthetic_nli(6, 5, "en");
    let config = |seed| NliFinetuneConfig {
        epochs: 1,
        batch_size: 8,
        lr: 1e-3,
        max_len: 16,
        pooling: NliPooling::Cls,
        seed,
        max_examples: Some(16),
        progress: false,
    };
    let a = finetune_nli(&bert, &train, &config(1)).unwrap();
    let b = finetune_nli(&bert, &train, &config(1)).unwrap();
    let c = finetune_nli(&bert, &train, &config(2)).unwrap();
    assert_eq!(a.summary().unwrap().examples, 16);
    assert_eq!(a.summary().unwrap().steps, 2);
    let (la, lb, lc) = (
        rows(&a.logits(&probe).unwrap()),
        rows(&b.logits(&probe).unwrap()),
        rows(&c.logits(&probe).unwrap()),
    );
    assert_eq!(la, lb);
    assert_ne!(la, lc);
    assert_eq!(a.predict(&probe).unwrap().len(), 6);
}

/// Fine-tuning takes the pre-training update step; an evaluation must not silently skip an
/// update, so the first non-finite one stops it.
#[test]
fn finetuning_stops_at_the_first_non_finite_update() {
    let bert = tiny_bert(9);
    let var = bert.params.named_vars()["bert.embeddings.word_embeddings.weight"].clone();
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let config = NliFinetuneConfig {
        epochs: 1,
        batch_size: 8,
        lr: 1e-3,
        max_len: 16,
        pooling: NliPooling::Cls,
        seed: 1,
        max_examples: None,
        progress: false,
    };
    match finetune_nli(&bert, &synthetic_nli(24, 4, "en"), &config) {
        Err(Error::Diverged { step, consecutive }) => assert_eq!((step, consecutive), (1, 1)),
        other => panic!("expected divergence at the first update, got {other:?}"),
    }
}
