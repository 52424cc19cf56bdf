//! The `align` example as a user runs it: output on success, nothing written on bad input.
//!
//! `cargo test` builds the examples before running tests; `cargo test --test it align_example::`
//! alone does not, so build it first (`cargo build --example align`): a missing binary fails the
//! tests rather than letting them pass having checked nothing.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The example binary of the profile this test was built with (`target/<profile>/examples`).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .join("examples");
    let bin = dir.join(format!("align{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --example align` (with the same profile) first; \
         a whole `cargo test` builds it",
        bin.display()
    );
    bin
}

fn run(bin: &Path, args: &[&str]) -> (bool, String, String) {
    let model = common::fixture("tiny_bert");
    let out = Command::new(bin)
        .args(["--model", model.to_str().unwrap(), "--device", "cpu"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_writes_pharaoh_and_scores_or_writes_nothing() {
    let bin = example();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.src-tgt");
    std::fs::write(&input, "the cat sat ||| a dog ran\n\nthe dog ||| the dog\n").unwrap();
    let gold = d.join("in.gold");
    std::fs::write(&gold, "1-1 2-2 3-3\n\n1-1 2-2\n").unwrap();
    let output = d.join("out.align");
    let s = |p: &Path| p.to_str().unwrap().to_owned();

    let (ok, stdout, stderr) = run(
        &bin,
        &[
            "--input",
            &s(&input),
            "--gold",
            &s(&gold),
            "--output",
            &s(&output),
            "--method",
            "itermax",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("AER"), "{stdout}");
    let text = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text:?}");
    assert_eq!(lines[1], "", "empty input line, empty output line");
    assert!(!lines[0].is_empty() && !lines[2].is_empty());

    // Bad input: a line without `|||`, a gold link out of range, a gold file one line short.
    let bad_input = d.join("bad.src-tgt");
    std::fs::write(&bad_input, "a b ||| c\nno separator\n").unwrap();
    let far = d.join("far.gold");
    std::fs::write(&far, "1-1\n\n1-9\n").unwrap();
    let short = d.join("short.gold");
    std::fs::write(&short, "1-1\n").unwrap();
    let fresh = d.join("fresh.align");
    for (args, expect) in [
        (
            vec!["--input", &s(&bad_input)],
            format!("{}:2:", bad_input.display()),
        ),
        (
            vec!["--input", &s(&input), "--gold", &s(&far)],
            format!("{}:3:", far.display()),
        ),
        (
            vec!["--input", &s(&input), "--gold", &s(&short)],
            format!("{}:2:", short.display()),
        ),
    ] {
        for target in [&fresh, &output] {
            let mut all: Vec<&str> = args.clone();
            let t = s(target);
            all.extend(["--output", &t]);
            let (ok, _, stderr) = run(&bin, &all);
            assert!(!ok, "{args:?} should fail");
            assert!(stderr.contains(&expect), "{expect} not in {stderr}");
        }
        assert!(!fresh.exists(), "nothing written on error");
        assert_eq!(
            std::fs::read_to_string(&output).unwrap(),
            text,
            "the old output is untouched"
        );
        assert_eq!(
            std::fs::read_dir(d).unwrap().count(),
            6,
            "no temporary file left"
        );
    }
}

#[test]
fn several_methods_from_one_run_equal_single_runs() {
    let bin = example();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.src-tgt");
    std::fs::write(
        &input,
        "the cat sat on the mat ||| a dog ran to the door\nthe dog ||| the dog\n",
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    for token_type in ["bpe", "word"] {
        let several = d.join(format!("{token_type}.align"));
        let (ok, _, stderr) = run(
            &bin,
            &[
                "--input",
                &s(&input),
                "--token-type",
                token_type,
                "--method",
                "argmax,itermax,match",
                "--output",
                &s(&several),
            ],
        );
        assert!(ok, "{stderr}");
        assert!(
            !several.exists(),
            "one file per method, none under the plain name"
        );
        for method in ["argmax", "itermax", "match"] {
            let (ok, single, stderr) = run(
                &bin,
                &[
                    "--input",
                    &s(&input),
                    "--token-type",
                    token_type,
                    "--method",
                    method,
                ],
            );
            assert!(ok, "{stderr}");
            let file = d.join(format!("{token_type}.{method}.align"));
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(text, single, "{token_type} {method}");
            assert_eq!(text.lines().count(), 2);
        }
    }
    // Several methods and no --output: refused before anything runs.
    let (ok, _, stderr) = run(&bin, &["--input", &s(&input), "--method", "argmax,match"]);
    assert!(!ok && stderr.contains("--output"), "{stderr}");
}

#[test]
fn example_writes_word_pairs_and_link_scores_per_method() {
    let bin = example();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.src-tgt");
    std::fs::write(
        &input,
        "the cat sat on the mat ||| the dog sat on a mat\na bird sings ||| the bird sings today\n",
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (ok, _, stderr) = run(
        &bin,
        &[
            "--input",
            &s(&input),
            "--layer",
            "2",
            "--token-type",
            "word",
            "--method",
            "argmax,softmax",
            "--output",
            &s(&d.join("out.align")),
            "--output-word-file",
            &s(&d.join("out.words")),
            "--output-prob-file",
            &s(&d.join("out.probs")),
        ],
    );
    assert!(ok, "{stderr}");
    let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap();
    // The same lines as the library test on the tiny fixture (tests/it/align_outputs.rs), which
    // aligns word units too.
    assert_eq!(read("out.argmax.align"), "0-0 1-1 5-5\n0-0 1-1\n");
    assert_eq!(
        read("out.argmax.words"),
        "the<sep>the cat<sep>dog mat<sep>mat\na<sep>the bird<sep>bird\n"
    );
    assert_eq!(
        read("out.argmax.probs"),
        "0.9868 0.9852 0.9889\n0.9735 0.9873\n"
    );
    let probs = read("out.softmax.probs");
    let links = read("out.softmax.align");
    for (p, l) in probs.lines().zip(links.lines()) {
        assert_eq!(p.split(' ').count(), l.split(' ').count());
    }
    assert!(probs.ends_with("0.7271 0.3720 0.0613 0.8424 0.1122 0.2009 0.2148 0.1775 0.1775\n"));
}
