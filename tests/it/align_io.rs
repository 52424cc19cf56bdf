//! Parallel, Pharaoh and gold files; AER / precision / recall / F1 on the shared gold sets.

use crate::common;

use std::path::{Path, PathBuf};

use mlctl::align::io::{
    check_gold, check_links, pharaoh_text, read_gold, read_parallel, read_pharaoh, write_pharaoh,
};
use mlctl::align::{Alignment, AlignmentCounts, GoldAlignment, SentencePair};
use mlctl::Error;

fn fixture(name: &str) -> PathBuf {
    common::fixture(&format!("align/{name}"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The error is `Error::Data` for `path` at `line`.
fn assert_data_error(err: Error, path: &Path, line: usize) {
    match err {
        Error::Data {
            path: p,
            line: l,
            reason,
        } => {
            assert_eq!((p.as_path(), l), (path, line), "{reason}");
            let shown = format!(
                "{}",
                Error::Data {
                    path: p,
                    line: l,
                    reason
                }
            );
            assert!(
                shown.starts_with(&format!("{}:{line}: ", path.display())),
                "{shown}"
            );
        }
        other => panic!(
            "expected a data error at {}:{line}, got {other:?}",
            path.display()
        ),
    }
}

fn gold_as_prediction(gold: &[GoldAlignment]) -> Vec<Alignment> {
    gold.iter()
        .map(|g| g.sure().iter().copied().collect())
        .collect()
}

#[test]
fn shared_gold_sets_score_perfectly_against_themselves() {
    for (set, lines) in [("roen", 248), ("jaen", 582)] {
        let pairs = read_parallel(fixture(&format!("{set}.src-tgt"))).unwrap();
        let gold_path = fixture(&format!("{set}.gold"));
        let gold = read_gold(&gold_path, true).unwrap();
        assert_eq!((pairs.len(), gold.len()), (lines, lines), "{set}");
        check_gold(&gold_path, &gold, &pairs, true).unwrap();
        // these sets have sure links only
        assert!(gold.iter().all(|g| g.sure() == g.possible()), "{set}");

        let perfect = AlignmentCounts::corpus(&gold_as_prediction(&gold), &gold).unwrap();
        assert_eq!(perfect.aer(), 0.0, "{set}");
        assert_eq!(
            (perfect.precision(), perfect.recall(), perfect.f1()),
            (1.0, 1.0, 1.0)
        );

        let empty = AlignmentCounts::corpus(&vec![Alignment::default(); lines], &gold).unwrap();
        assert_eq!(empty.aer(), 1.0, "{set}");
        assert_eq!(
            (empty.precision(), empty.recall(), empty.f1()),
            (0.0, 0.0, 0.0)
        );
        assert!(empty.sure > 0);
    }
}

#[test]
fn first_roen_lines_are_read_as_written() {
    let pairs = read_parallel(fixture("roen.src-tgt")).unwrap();
    assert_eq!(
        pairs[0],
        SentencePair::from_text("ajunge !", "that 's enough !")
    );
    let gold = read_gold(fixture("roen.gold"), true).unwrap();
    // "2-4 1-3" 1-based
    assert_eq!(gold[0], GoldAlignment::new([(1, 3), (0, 2)], []));
    // The same file read as 0-based keeps the numbers, and then (2, 4) is out of range.
    let zero = read_gold(fixture("roen.gold"), false).unwrap();
    assert_eq!(zero[0], GoldAlignment::new([(2, 4), (1, 3)], []));
    let err = check_gold(fixture("roen.gold"), &zero, &pairs, false).unwrap_err();
    assert_data_error(err, &fixture("roen.gold"), 1);
}

#[test]
fn hand_computed_scores() {
    // S = {0-0, 1-1}, P = S + {1-2}; A = {0-0, 1-2, 2-2}.
    let gold = GoldAlignment::parse("1-1 2p3 2-2", true).unwrap();
    assert_eq!(gold.sure().len(), 2);
    assert_eq!(gold.possible().len(), 3);
    let pred = Alignment::new(vec![(0, 0), (1, 2), (2, 2)]);
    let c =
        AlignmentCounts::corpus(std::slice::from_ref(&pred), std::slice::from_ref(&gold)).unwrap();
    assert_eq!(
        (c.predicted, c.sure, c.predicted_sure, c.predicted_possible),
        (3, 2, 1, 2)
    );
    assert!((c.precision() - 2.0 / 3.0).abs() < 1e-12);
    assert!((c.recall() - 0.5).abs() < 1e-12);
    assert!((c.f1() - 4.0 / 7.0).abs() < 1e-12);
    assert!((c.aer() - 0.4).abs() < 1e-12);

    // Corpus level sums the counts first: adding a second pair with A = S = {0-0} gives
    // AER = 1 - (2 + 3) / (4 + 3) = 2/7, not the mean of 0.4 and 0.
    let second = GoldAlignment::parse("0-0", false).unwrap();
    let c =
        AlignmentCounts::corpus(&[pred, Alignment::new(vec![(0, 0)])], &[gold, second]).unwrap();
    assert!((c.aer() - 2.0 / 7.0).abs() < 1e-12);
    assert!(AlignmentCounts::corpus(&[], &[GoldAlignment::default()]).is_err());
    assert_eq!(
        GoldAlignment::parse("1-1 2p3", true).unwrap().to_line(true),
        "1-1 2p3"
    );
}

#[test]
fn pharaoh_round_trip_and_atomic_write() {
    let dir = tempfile::tempdir().unwrap();
    let aligns = vec![
        Alignment::new(vec![(0, 1), (1, 0)]),
        Alignment::default(),
        Alignment::new(vec![(3, 3)]),
    ];
    assert_eq!(pharaoh_text(&aligns), "0-1 1-0\n\n3-3\n");
    let path = dir.path().join("out.align");
    write_pharaoh(&path, &aligns).unwrap();
    assert_eq!(read_pharaoh(&path).unwrap(), aligns);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
    // A directory that does not exist: an I/O error naming it, nothing written.
    let err = write_pharaoh(dir.path().join("missing/out.align"), &aligns).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn bad_input_is_a_typed_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // A line without `|||` (blank lines are empty pairs and fine).
    let p = write(d, "a.src-tgt", "a b ||| c\n\nno separator here\n");
    assert_data_error(read_parallel(&p).unwrap_err(), &p, 3);
    let p = write(d, "b.src-tgt", "a ||| b ||| c\n");
    assert_data_error(read_parallel(&p).unwrap_err(), &p, 1);

    // Non-numeric and malformed links.
    let p = write(d, "a.gold", "1-1\n1-x\n");
    assert_data_error(read_gold(&p, true).unwrap_err(), &p, 2);
    let p = write(d, "b.gold", "1-1 3\n");
    assert_data_error(read_gold(&p, true).unwrap_err(), &p, 1);
    let p = write(d, "c.gold", "1-1\n\n0-2\n");
    assert_data_error(read_gold(&p, true).unwrap_err(), &p, 3);
    let p = write(d, "a.align", "0-0\n0-1 1_2\n");
    assert_data_error(read_pharaoh(&p).unwrap_err(), &p, 2);

    // An index out of range, and mismatched line counts.
    let pairs = read_parallel(write(d, "c.src-tgt", "a b ||| c d e\nf ||| g\n")).unwrap();
    let p = write(d, "d.gold", "1-1 2-3\n1-2\n");
    let gold = read_gold(&p, true).unwrap();
    let err = check_gold(&p, &gold, &pairs, true).unwrap_err();
    assert!(
        format!("{err}").contains("link 1-2 is out of range"),
        "{err}"
    );
    assert_data_error(err, &p, 2);
    let p = write(d, "e.gold", "1-1\n1-1\n1-1\n");
    let gold = read_gold(&p, true).unwrap();
    assert_data_error(check_gold(&p, &gold, &pairs, true).unwrap_err(), &p, 3);
    let p = write(d, "b.align", "0-0\n");
    let a = read_pharaoh(&p).unwrap();
    assert_data_error(
        check_links(&p, a.iter().map(|a| a.links()), &pairs, false).unwrap_err(),
        &p,
        2,
    );

    // A missing file is an I/O error naming it.
    let missing = d.join("nope.gold");
    match read_gold(&missing, true).unwrap_err() {
        Error::Io { path, .. } => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
}
