//! The `pretrain_xnli` example end to end on a very small configuration: the run directory
//! holds a loadable checkpoint, parseable metrics, a results table with every language and
//! valid SVG plots.

use crate::common;

use std::process::Command;

use common::fixture;
use mlctl::model::MlCtlModel;
use mlctl::train::StepRecord;

#[test]
fn a_small_run_writes_a_complete_run_directory() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    // The first 16 ro-en pairs keep the debug-build run short (evaluation encodes at full length).
    let head = |name: &str| {
        let text = std::fs::read_to_string(fixture(&format!("align/{name}"))).unwrap();
        let path = out.path().join(name);
        std::fs::write(
            &path,
            text.lines().take(16).collect::<Vec<_>>().join("\n") + "\n",
        )
        .unwrap();
        path
    };
    let (gold, gold_input) = (head("roen.gold"), head("roen.src-tgt"));
    let status = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "pretrain_xnli", "--"])
        .args([
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--max-len",
            "16",
            "--train-pairs",
            "40",
            "--eval-pairs",
            "8",
        ])
        .args([
            "--xnli-train-examples",
            "12",
            "--xnli-epochs",
            "1",
            "--device",
            "cpu",
        ])
        .arg("--xnli-dir")
        .arg(fixture("xnli"))
        .arg("--gold")
        .arg(&gold)
        .arg("--gold-input")
        .arg(&gold_input)
        .args(["--mean-last-pooling", "--text-prefix", "query: "])
        .arg("--out")
        .arg(&run)
        .status()
        .unwrap();
    assert!(status.success(), "pretrain_xnli failed");

    let checkpoint = run.join("checkpoints/step-00000003");
    let model = MlCtlModel::load(
        checkpoint.to_str().unwrap(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        0,
    )
    .expect("the checkpoint loads");
    assert_eq!(model.bert.config.num_hidden_layers, 4);

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let records: Vec<StepRecord> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(records
        .iter()
        .all(|r| r.loss.is_finite() && r.sentence.is_some() && r.mlm.is_some()));

    let results = std::fs::read_to_string(run.join("results.md")).unwrap();
    for lang in ["ara-eng", "cmn-eng", "fra-eng", "rus-eng", "spa-eng"] {
        assert_eq!(
            results.matches(&format!("| {lang} |")).count(),
            3,
            "{lang} in the retrieval tables of both poolings and the anchor table:\n{results}"
        );
    }
    for metric in [
        "| sentence acc@1, ML-CTL pooling |",
        "| sentence acc@1, mean of last layer, `query: ` prefix |",
        "| anchor-word acc@1 |",
        "| AER roen argmax bpe |",
        "| AER roen itermax word |",
    ] {
        assert!(results.contains(metric), "{metric} missing:\n{results}");
    }

    // The saved evaluations hold every query and sentence pair, and compare_runs reads them.
    let saved = mlctl::pretrain::read_evaluations(&run).unwrap();
    let sentence = saved.after.sentence_first().unwrap();
    assert!(sentence
        .values()
        .all(|s| s.src_hits.len() == 8 && s.tgt_hits.len() == 8));
    assert_eq!(saved.after.alignment.len(), 4, "2 methods x 2 token types");
    assert!(saved.after.alignment.iter().all(|a| a.pairs.len() == 16));
    let compared = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "compare_runs", "--"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(compared.status.success(), "compare_runs failed");
    let tables = String::from_utf8(compared.stdout).unwrap();
    assert!(
        tables.contains("| anchor-word acc@1 |") && tables.contains("`run` − start"),
        "{tables}"
    );
    assert!(
        results.contains("## XNLI") && results.contains("| average |"),
        "{results}"
    );

    for plot in ["loss.svg", "retrieval.svg"] {
        let text = std::fs::read_to_string(run.join(plot)).unwrap();
        let doc = roxmltree::Document::parse(&text)
            .unwrap_or_else(|e| panic!("{plot} is not valid XML: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let shapes = doc
            .descendants()
            .filter(|n| matches!(n.tag_name().name(), "polyline" | "rect" | "path"))
            .count();
        assert!(shapes > 3, "{plot} draws almost nothing");
    }
}

/// `pretrain_xnli` with `args`, small: its exit status and standard error.
fn small_run(run: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--example", "pretrain_xnli", "--"])
        .args(["--steps", "1", "--batch-size", "4", "--max-len", "16"])
        .args([
            "--train-pairs",
            "40",
            "--eval-pairs",
            "8",
            "--device",
            "cpu",
        ])
        .args(args)
        .arg("--out")
        .arg(run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

#[test]
fn runs_reuse_a_starting_evaluation_only_when_it_was_made_the_same_way() {
    let out = tempfile::tempdir().unwrap();
    let first = out.path().join("first");
    let (ok, err) = small_run(&first, &[]);
    assert!(ok, "{err}");
    let first_arg = first.to_str().unwrap();

    // Another objective with its word-level choices reuses the first run's evaluation.
    let second = out.path().join("second");
    let (ok, err) = small_run(
        &second,
        &[
            "--objective",
            "sentence-and-word-terms",
            "--word-layers",
            "1",
            "--word-weight",
            "0.5",
            "--before-from",
            first_arg,
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("from --before-from"), "{err}");
    let (a, b) = (
        mlctl::pretrain::read_evaluations(&first).unwrap(),
        mlctl::pretrain::read_evaluations(&second).unwrap(),
    );
    assert_eq!(a.before, b.before);
    let head =
        std::fs::read_to_string(second.join("checkpoints/step-00000001/mlctl.json")).unwrap();
    let head: mlctl::model::HeadConfig = serde_json::from_str(&head).unwrap();
    assert_eq!(head.word_layers, Some(vec![1]));
    let results = std::fs::read_to_string(second.join("results.md")).unwrap();
    assert!(results.contains("word-level term weight 0.5"), "{results}");

    // An evaluation made another way is refused, naming the setting; so are flags the
    // objective has no use for.
    for (args, says) in [
        (
            vec!["--align-layer", "1", "--before-from", first_arg],
            "align layer",
        ),
        (vec!["--seed", "1", "--before-from", first_arg], "seed"),
        (vec!["--word-weight", "2"], "--word-weight"),
        (
            vec!["--objective", "sentence-cz-nce", "--word-layers", "8"],
            "--word-layers",
        ),
    ] {
        let (ok, err) = small_run(&out.path().join("refused"), &args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
}
