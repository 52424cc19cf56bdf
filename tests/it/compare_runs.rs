//! Mean ± standard deviation over seeds (`mlctl::eval::seeds`, printed by `compare_runs`) on
//! runs of known values.

use mlctl::eval::seeds::{seed_group, seeds_markdown, MeanSd, RunMetrics};

#[test]
fn mean_and_sample_standard_deviation() {
    // 60, 62, 64: mean 62, squares 4 + 0 + 4 = 8 over n - 1 = 2 → sd 2.
    let m = MeanSd::of(&[60.0, 62.0, 64.0]).unwrap();
    assert_eq!((m.mean, m.sd, m.n), (62.0, Some(2.0), 3));
    assert_eq!(m.format(1), "62.0 ± 2.0 (n=3)");
    // 1, 2, 3, 4: mean 2.5, squares 2.25 + 0.25 + 0.25 + 2.25 = 5 over 3 → sd 1.2910.
    let m = MeanSd::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert!((m.sd.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    let one = MeanSd::of(&[0.25]).unwrap();
    assert_eq!((one.sd, one.format(3)), (None, "0.250 (n=1)".to_string()));
    assert!(MeanSd::of(&[]).is_none());
}

#[test]
fn runs_group_by_name_less_their_seed_tag() {
    assert_eq!(seed_group("ml-ctl-seed0"), "ml-ctl");
    assert_eq!(seed_group("sentence-cz-nce_seed12"), "sentence-cz-nce");
    assert_eq!(seed_group("ml-ctl-s2"), "ml-ctl");
    assert_eq!(seed_group("ml-ctl"), "ml-ctl");
    assert_eq!(seed_group("layers-1-12"), "layers-1-12");
    assert_eq!(seed_group("run-seed"), "run-seed");
}

fn run(name: &str, acc: f64, aer: f64) -> RunMetrics {
    (
        name.into(),
        vec![("Tatoeba acc".into(), acc), ("AER roen".into(), aer)],
    )
}

#[test]
fn the_table_gives_each_configuration_its_mean_and_spread() {
    let runs = [
        run("ml-ctl-seed0", 60.0, 0.30),
        run("sentence-cz-nce-seed0", 50.0, 0.40),
        run("ml-ctl-seed1", 62.0, 0.32),
        run("ml-ctl-seed2", 64.0, 0.34),
        run("sentence-cz-nce-seed1", 52.0, 0.40),
    ];
    let table = seeds_markdown(&runs, |l| l.starts_with("AER")).unwrap();
    assert!(
        table.starts_with("| metric | `ml-ctl` | `sentence-cz-nce` |"),
        "{table}"
    );
    // sentence-cz-nce: 50, 52 → mean 51, sd sqrt(2) = 1.414.
    assert!(
        table.contains("| Tatoeba acc | 62.0 ± 2.0 (n=3) | 51.0 ± 1.4 (n=2) |"),
        "{table}"
    );
    assert!(
        table.contains("| AER roen | 0.320 ± 0.020 (n=3) | 0.400 ± 0.000 (n=2) |"),
        "{table}"
    );
    let mut other = run("ml-ctl-seed3", 1.0, 1.0);
    other.1.pop();
    assert!(seeds_markdown(&[runs[0].clone(), other], |_| false).is_err());
    assert!(seeds_markdown(&[], |_| false).is_err());
}

/// An evaluation holding only anchor-word retrieval over four pairs, with these hits.
fn anchors(src: [u8; 4], tgt: [u8; 4]) -> mlctl::pretrain::Evaluation {
    use mlctl::eval::RetrievalScores;
    let hits = |h: [u8; 4]| h.iter().map(|&x| x == 1).collect::<Vec<bool>>();
    let share = |h: [u8; 4]| h.iter().map(|&x| f32::from(x)).sum::<f32>() / 4.0;
    let scores = RetrievalScores {
        src_to_tgt: share(src),
        tgt_to_src: share(tgt),
        n: 4,
        src_hits: hits(src),
        tgt_hits: hits(tgt),
    };
    mlctl::pretrain::Evaluation {
        sentence: Default::default(),
        anchor: [("fra-eng".to_string(), scores)].into(),
        alignment: vec![],
        xnli: None,
        xnli_split: None,
        tatoeba: None,
    }
}

#[test]
fn differences_over_seeds_pair_runs_by_seed_and_average_them() {
    use mlctl::pretrain::seed_differences_markdown;
    // Accuracy over the 8 queries: start 1/8 = 12.5 %.
    let start = anchors([1, 0, 0, 0], [0, 0, 0, 0]);
    let runs = [
        ("a-seed0", anchors([1, 1, 0, 0], [1, 0, 0, 0])), // 37.5: +25.0 over start
        ("b-seed0", anchors([1, 0, 0, 0], [1, 0, 0, 0])), // 25.0: +12.5
        ("a-seed1", anchors([1, 1, 1, 0], [1, 1, 0, 0])), // 62.5: +50.0
        ("b-seed1", anchors([1, 1, 1, 0], [1, 0, 0, 0])), // 50.0: +37.5
        ("b-seed2", anchors([0, 0, 0, 0], [1, 0, 0, 0])), // 12.5: +0.0, no a-seed2 to pair
        ("c-seed1", anchors([1, 1, 1, 1], [0, 0, 0, 0])), // 50.0: only seed 1 pairs with a
    ];
    let runs: Vec<(String, _)> = runs.into_iter().map(|(n, e)| (n.to_string(), e)).collect();
    let table = seed_differences_markdown(&start, &runs).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("| anchor-word acc@1 |"))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert!(
        table.contains("| `a` − start | `b` − start | `c` − start | `a` − `b` | `a` − `c` |"),
        "{table}"
    );
    // a − start: 25 and 50, mean 37.5, sd 17.68. b − start: 12.5, 37.5, 0, mean 16.67, sd
    // 19.09. a − b over seeds 0 and 1 only, each with its own seed: 12.5 and 12.5, sd 0.
    let check = |cell: &str, mean: &str, rest: &str| {
        assert!(
            cell.trim_start_matches("**")
                .starts_with(&format!("{mean} ["))
                && cell.ends_with(rest),
            "{cell:?}: want {mean} … {rest}\n{table}"
        );
    };
    check(cells[2], "+37.5", "±17.7 (n=2)");
    check(cells[3], "+16.7", "±19.1 (n=3)");
    check(cells[4], "+37.5", "(n=1)");
    check(cells[5], "+12.5", "±0.0 (n=2)");
    // a − c: seed 1 alone, 62.5 − 50.
    check(cells[6], "+12.5", "(n=1)");
    // A run evaluated on another suite is refused.
    let mut other = runs.clone();
    other[0].1.anchor.clear();
    assert!(seed_differences_markdown(&start, &other).is_err());
}
