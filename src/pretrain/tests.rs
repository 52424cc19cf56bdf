//! Tests of the results tables and the run directory.

use std::collections::BTreeMap;

use super::*;
use crate::align::AlignmentCounts;
use crate::eval::RetrievalScores;

fn scores(hits: &[bool]) -> RetrievalScores {
    let share = hits.iter().filter(|&&h| h).count() as f32 / hits.len() as f32;
    RetrievalScores {
        src_to_tgt: share,
        tgt_to_src: share,
        n: hits.len(),
        src_hits: hits.to_vec(),
        tgt_hits: hits.to_vec(),
    }
}

fn evaluation(hits: &[bool], aligned: bool) -> Evaluation {
    let sets = BTreeMap::from([("fra-eng".to_string(), scores(hits))]);
    let counts = AlignmentCounts {
        predicted: 2,
        sure: 2,
        predicted_sure: 1,
        predicted_possible: 1,
    };
    Evaluation {
        sentence: BTreeMap::from([("ML-CTL pooling".to_string(), sets)]),
        anchor: BTreeMap::new(),
        alignment: aligned
            .then(|| AlignmentScores {
                task: "roen".into(),
                method: "itermax".into(),
                token_type: "bpe".into(),
                aer: 0.5,
                pairs: vec![counts; 3],
            })
            .into_iter()
            .collect(),
        xnli: None,
        xnli_split: None,
        tatoeba: None,
    }
}

#[test]
fn runs_are_compared_on_the_same_metrics_only() {
    let start = evaluation(&[true, false, false, true], true);
    let better = evaluation(&[true, true, true, true], true);
    let table = objectives_markdown(&start, &[("a".into(), better.clone())]).unwrap();
    // 50% -> 100% on the same four queries, each both ways.
    assert!(
        table.contains("| sentence acc@1, ML-CTL pooling | 50.0 ["),
        "{table}"
    );
    assert!(table.contains("+50.0 ["), "{table}");
    assert!(
        table.contains("| AER roen itermax bpe | 0.500 ["),
        "{table}"
    );
    let other_suite = evaluation(&[true, true, true, true], false);
    assert!(objectives_markdown(&start, &[("b".into(), other_suite)]).is_err());
}

#[test]
fn evaluations_round_trip_through_the_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let saved = RunEvaluations {
        before: evaluation(&[true, false], true),
        after: evaluation(&[true, true], true),
    };
    write_evaluations(dir.path(), &saved).unwrap();
    assert_eq!(read_evaluations(dir.path()).unwrap(), saved);
}
