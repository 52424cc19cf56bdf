//! XTREME's Tatoeba task: accuracies counted by hand on a tiny fixture (ties, an empty line),
//! the language list and the shipped files, the encoder path, and agreement with an independent
//! implementation in Python (`tests/fixtures/make_tatoeba_reference.py`).

use crate::common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use mlctl::align::Lexicon;
use mlctl::eval::tatoeba::{
    read_tatoeba, shipped_tatoeba_dir, tatoeba_markdown, Direction, LanguageGroup, TatoebaLanguage,
    TatoebaPooling, TatoebaReport, TatoebaTask, XTREME_TATOEBA_LANGUAGES,
};
use mlctl::model::MlCtlModel;
use mlctl::pretrain::{EvalSuite, Evaluation};
use serde_json::Value;

/// The fixture's sentences: line 3 of the `tst` side is empty, and an English line ends in a
/// carriage return (both sides are stripped, as XTREME strips them).
const TST: &str = "a\nb\n\nd\n";
const ENG: &str = "A\nB\r\nC\nD\n";

/// Hand-made 2-d embeddings. `a` and `b` are identical, so every English query ties on them.
fn vector(text: &str) -> [f32; 2] {
    match text {
        "a" | "b" | "A" => [1.0, 0.0],
        "" => [0.0, 1.0],
        "d" | "C" => [1.0, 2.0],
        "B" => [1.0, 3.0],
        "D" => [1.0, 4.0],
        other => panic!("no vector for {other:?}"),
    }
}

fn embed(texts: &[String], poolings: &[usize]) -> mlctl::Result<Vec<Tensor>> {
    let rows: Vec<Vec<f32>> = texts.iter().map(|t| vector(t).to_vec()).collect();
    let t = Tensor::new(rows, &Device::Cpu)?;
    Ok(poolings.iter().map(|_| t.clone()).collect())
}

fn write_fixture(dir: &Path) {
    std::fs::write(dir.join("tatoeba.tst-eng.tst"), TST).unwrap();
    std::fs::write(dir.join("tatoeba.tst-eng.eng"), ENG).unwrap();
}

fn fixture_task(dir: &Path) -> TatoebaTask {
    let (src, eng) = read_tatoeba(dir, "tst").unwrap();
    let zero_shot = TatoebaLanguage {
        code: "xx".into(),
        laser: "tst".into(),
        first_line: 1,
        trained: false,
        src,
        eng,
    };
    // A "trained" language scored on its last two lines only: both retrieve their translation.
    let trained = TatoebaLanguage {
        code: "yy".into(),
        laser: "tsy".into(),
        first_line: 3,
        trained: true,
        src: vec!["a".into(), "".into()],
        eng: vec!["A".into(), "C".into()],
    };
    TatoebaTask {
        languages: vec![zero_shot, trained],
        poolings: vec![TatoebaPooling::xtreme(None)],
        batch_size: 8,
        progress: false,
    }
}

#[test]
fn hand_counted_accuracies_with_ties_and_an_empty_line() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let (src, eng) = read_tatoeba(dir.path(), "tst").unwrap();
    assert_eq!(src, ["a", "b", "", "d"], "the empty line keeps its place");
    assert_eq!(eng, ["A", "B", "C", "D"], "lines are stripped");
    let report = fixture_task(dir.path()).score_with(embed).unwrap();
    let xx = &report.poolings[0].scores["xx"];
    // en→xx (cosines): A ties a and b at 1 → a, the first: hit. B (.32 .32 .95 .99) → d: miss.
    // C (.45 .45 .89 1) → d: miss. D (.24 .24 .970 .976) → d: hit. 2 of 4.
    assert_eq!(xx.tgt_hits, [true, false, false, true]);
    // xx→en: a → A (1): hit. b → A as well: miss. "" (0 .95 .89 .97) → D: miss.
    // d (.45 .99 1 .98) → C: miss. 1 of 4.
    assert_eq!(xx.src_hits, [true, false, false, false]);
    assert_eq!(Direction::EnToXx.of(xx), 0.5);
    assert_eq!(Direction::XxToEn.of(xx), 0.25);
    let yy = &report.poolings[0].scores["yy"];
    assert_eq!((yy.tgt_to_src, yy.src_to_tgt, yy.n), (1.0, 1.0, 2));
    // Averages count each language once.
    let avg = |g, d| report.average(0, g, d).unwrap();
    assert_eq!(avg(LanguageGroup::ZeroShot, Direction::EnToXx), 50.0);
    assert_eq!(avg(LanguageGroup::ZeroShot, Direction::XxToEn), 25.0);
    assert_eq!(avg(LanguageGroup::Trained, Direction::EnToXx), 100.0);
    assert_eq!(avg(LanguageGroup::All, Direction::EnToXx), 75.0);
    assert_eq!(avg(LanguageGroup::All, Direction::XxToEn), 62.5);
    // The labelled summary: each group's averages, en→xx then xx→en.
    let values: Vec<f64> = report.averages().into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, [50.0, 25.0, 100.0, 100.0]);
    let labels: Vec<String> = report.averages().into_iter().map(|(l, _)| l).collect();
    assert!(
        labels[0].starts_with("Tatoeba 1 zero-shot") && labels[0].ends_with("en→xx"),
        "{labels:?}"
    );
    assert!(
        labels[3].starts_with("Tatoeba 1 trained") && labels[3].ends_with("xx→en"),
        "{labels:?}"
    );
}

#[test]
fn the_report_prints_groups_apart_and_yields_bootstrap_items() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let report = fixture_task(dir.path()).score_with(embed).unwrap();
    let table = tatoeba_markdown(&[("model", &report)]);
    assert!(
        table.contains("| xx (tst) | 1-4 | 50.0 / 25.0 |"),
        "{table}"
    );
    assert!(
        table.contains("| yy (tsy) | 3-4 | 100.0 / 100.0 |"),
        "{table}"
    );
    assert!(
        table.contains("| **average, 1 zero-shot** | | **50.0** / 25.0 |"),
        "{table}"
    );
    assert!(
        table.contains("| **average, all languages** | | **75.0** / 62.5 |"),
        "{table}"
    );
    let items = report.metric_hits();
    let labels: Vec<&str> = items.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels.len(), 4, "{labels:?}");
    let (label, hits) = &items[0];
    assert!(
        label.contains("1 zero-shot") && label.ends_with("en→xx"),
        "{label}"
    );
    assert_eq!(hits, &[1.0, 0.0, 0.0, 1.0]);
    // Both directions: sources' hits then targets'.
    assert_eq!(items[1].1, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
}

#[test]
fn malformed_files_are_data_errors_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tatoeba.tst-eng.tst"), "a\nb\nc\n").unwrap();
    std::fs::write(d.join("tatoeba.tst-eng.eng"), "A\nB\n").unwrap();
    match read_tatoeba(d, "tst") {
        Err(mlctl::Error::Data { path, line, .. }) => {
            assert!(path.ends_with("tatoeba.tst-eng.eng"));
            assert_eq!(line, 3);
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(d.join("tatoeba.tst-eng.eng"), b"A\nB\n\xff\n").unwrap();
    assert!(matches!(
        read_tatoeba(d, "tst"),
        Err(mlctl::Error::Data { line: 3, .. })
    ));
    std::fs::write(d.join("tatoeba.tst-eng.tst"), "").unwrap();
    assert!(matches!(
        read_tatoeba(d, "tst"),
        Err(mlctl::Error::Data { line: 1, .. })
    ));
    assert!(matches!(
        read_tatoeba(d, "zzz"),
        Err(mlctl::Error::Io { .. })
    ));
}

#[test]
fn xtreme_languages_and_the_shipped_files() {
    // XTREME's `XTREME_TASK2LANGS["tatoeba"]` (evaluate.py), in its order.
    let codes: Vec<&str> = XTREME_TATOEBA_LANGUAGES.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes.join(","),
        "ar,he,vi,id,jv,tl,eu,ml,ta,te,af,nl,de,el,bn,hi,mr,ur,fa,fr,it,pt,es,bg,ru,ja,ka,ko,\
         th,sw,zh,kk,tr,et,fi,hu"
    );
    // Line counts of the LASER files (the English side has as many); 1000 unless listed.
    let short = [
        ("jav", 205),
        ("kat", 746),
        ("kaz", 575),
        ("mal", 687),
        ("swh", 390),
        ("tam", 307),
        ("tel", 234),
        ("tha", 548),
    ];
    let dir = shipped_tatoeba_dir();
    let mut total = 0;
    for (_, laser) in XTREME_TATOEBA_LANGUAGES {
        let (src, eng) = read_tatoeba(&dir, laser).unwrap();
        let expected = short
            .iter()
            .find(|(l, _)| *l == laser)
            .map_or(1000, |s| s.1);
        assert_eq!((laser, src.len(), eng.len()), (laser, expected, expected));
        total += expected;
    }
    assert_eq!(total, 31_692);
    let task = TatoebaTask::xtreme(&dir, &["ara", "cmn", "fra", "rus", "spa"], 800).unwrap();
    assert_eq!(task.languages.len(), 36);
    for language in &task.languages {
        let trained = ["ar", "zh", "fr", "ru", "es"].contains(&language.code.as_str());
        assert_eq!(language.trained, trained, "{}", language.code);
        if trained {
            assert_eq!((language.first_line, language.src.len()), (801, 200));
        } else {
            assert_eq!(language.first_line, 1);
        }
    }
    let fr = task.languages.iter().find(|l| l.code == "fr").unwrap();
    let (all_fr, _) = read_tatoeba(&dir, "fra").unwrap();
    assert_eq!(
        fr.src[0], all_fr[800],
        "line 801 is the first held-apart line"
    );
}

#[test]
fn the_suite_scores_a_model_through_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let mut task = fixture_task(dir.path());
    task.poolings = vec![TatoebaPooling::xtreme(None), TatoebaPooling::model()];
    let model_dir = common::fixture("tiny_bert");
    let model = MlCtlModel::load(
        model_dir.to_str().unwrap(),
        &Device::Cpu,
        candle_core::DType::F32,
        0,
    )
    .unwrap();
    let tokenizer = model.bert.tokenizer().unwrap().clone();
    let suite = EvalSuite::new(Vec::new(), Arc::new(Lexicon::embedded()))
        .with_poolings(Vec::new())
        .with_tatoeba(Some(task));
    let evaluation: Evaluation = suite.evaluate(&model, &tokenizer).unwrap();
    let report = evaluation.tatoeba.as_ref().unwrap();
    assert_eq!(report.poolings.len(), 2);
    for pooling in &report.poolings {
        assert_eq!(pooling.scores["xx"].n, 4);
        assert_eq!(pooling.scores["yy"].n, 2);
    }
    let labels: Vec<String> = evaluation.metrics().into_iter().map(|m| m.label).collect();
    assert!(
        labels
            .iter()
            .any(|l| l.starts_with("Tatoeba 1 zero-shot (queries pooled), XTREME")),
        "{labels:?}"
    );
    // The report survives evaluation.json.
    let json = serde_json::to_string(&evaluation).unwrap();
    let back: Evaluation = serde_json::from_str(&json).unwrap();
    assert_eq!(back.tatoeba.as_ref(), Some(report));
}

/// The committed Rust evaluation of multilingual-e5-small against the Python implementation's
/// output on all 36 languages: within 0.1 points (one query in 1000) in both directions.
#[test]
fn rust_and_python_agree_on_e5_small() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("tatoeba/e5_small_xtreme.json")).unwrap(),
    )
    .unwrap();
    let rust: Evaluation = serde_json::from_str(
        &std::fs::read_to_string(
            root.join("examples/pretrain_xnli/results/e5-small-tatoeba/evaluation.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let report: &TatoebaReport = rust.tatoeba.as_ref().unwrap();
    let xtreme = &report.poolings[0];
    assert!(xtreme.label.starts_with("XTREME"), "{}", xtreme.label);
    let languages = python["languages"].as_object().unwrap();
    assert_eq!(languages.len(), 36);
    for (code, py) in languages {
        let info = report.languages.iter().find(|l| &l.code == code).unwrap();
        assert_eq!(
            py["pairs"].as_u64(),
            Some(info.pairs as u64),
            "{}",
            info.code
        );
        assert_eq!(py["first_line"].as_u64(), Some(info.first_line as u64));
        let ours = &xtreme.scores[&info.code];
        for (direction, key) in [
            (Direction::EnToXx, "en_to_xx"),
            (Direction::XxToEn, "xx_to_en"),
        ] {
            let diff = (100.0 * f64::from(direction.of(ours)) - py[key].as_f64().unwrap()).abs();
            assert!(
                diff <= 0.1 + 1e-4,
                "{} {key}: differs by {diff:.2} points",
                info.code
            );
        }
    }
}
