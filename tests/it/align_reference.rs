//! Alignment methods against the original SimAlign code and a NumPy re-implementation of
//! awesome-align's softmax rule, on fixed random matrices
//! (tests/fixtures/align/make_align_golden.py writes tests/fixtures/align/golden.json).

use crate::common;

use mlctl::align::{
    AlignMethod, ArgMax, IterMax, MaxWeightMatch, SimMatrix, SoftmaxAlign, SparsemaxAlign,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    simalign: Vec<SimAlignCase>,
    softmax: Vec<SoftmaxCase>,
    sparsemax: Vec<SparsemaxCase>,
}

#[derive(Deserialize)]
struct SparsemaxCase {
    rows: usize,
    cols: usize,
    dot: Vec<f32>,
    sparsemax: Vec<(usize, usize)>,
}

#[derive(Deserialize)]
struct SimAlignCase {
    name: String,
    rows: usize,
    cols: usize,
    sim: Vec<f32>,
    argmax: Vec<(usize, usize)>,
    itermax: Vec<(usize, usize)>,
    itermax3: Vec<(usize, usize)>,
    #[serde(rename = "match")]
    matching: Option<Vec<(usize, usize)>>,
    distorted: Option<Vec<f32>>,
    itermax_distorted: Option<Vec<(usize, usize)>>,
}

#[derive(Deserialize)]
struct SoftmaxCase {
    rows: usize,
    cols: usize,
    threshold: f64,
    dot: Vec<f32>,
    softmax: Vec<(usize, usize)>,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(common::fixture("align/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn simalign_argmax_itermax_match_distortion() {
    let g = golden();
    assert_eq!(g.simalign.len(), 26);
    let (mut matches, mut distortions) = (0, 0);
    for case in &g.simalign {
        let m = SimMatrix::new(case.rows, case.cols, case.sim.clone()).unwrap();
        assert_eq!(
            ArgMax.align(&m).links(),
            case.argmax.as_slice(),
            "{} argmax",
            case.name
        );
        assert_eq!(
            IterMax::default().align(&m).links(),
            case.itermax.as_slice(),
            "{} itermax",
            case.name
        );
        let three = IterMax {
            max_iter: 3,
            ..Default::default()
        };
        assert_eq!(
            three.align(&m).links(),
            case.itermax3.as_slice(),
            "{} itermax x3",
            case.name
        );
        if let Some(expected) = &case.matching {
            assert_eq!(
                MaxWeightMatch.align(&m).links(),
                expected.as_slice(),
                "{} match",
                case.name
            );
            matches += 1;
        }
        if let (Some(dist), Some(expected)) = (&case.distorted, &case.itermax_distorted) {
            let d = m.with_distortion(0.5);
            for (k, (a, b)) in d.data().iter().zip(dist).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{} distortion at {k}: {a} vs {b}",
                    case.name
                );
            }
            assert_eq!(
                IterMax::default().align(&d).links(),
                expected.as_slice(),
                "{} distorted itermax",
                case.name
            );
            distortions += 1;
        }
    }
    assert_eq!((matches, distortions), (13, 13));
}

#[test]
fn awesome_align_softmax() {
    let g = golden();
    assert_eq!(g.softmax.len(), 8);
    for (k, case) in g.softmax.iter().enumerate() {
        let m = SimMatrix::new(case.rows, case.cols, case.dot.clone()).unwrap();
        let got = SoftmaxAlign {
            threshold: case.threshold,
        }
        .align(&m);
        assert_eq!(got.links(), case.softmax.as_slice(), "softmax case {k}");
    }
}

#[test]
fn sparsemax_against_a_bisection_reference() {
    let g = golden();
    assert_eq!(g.sparsemax.len(), 7);
    for (k, case) in g.sparsemax.iter().enumerate() {
        let m = SimMatrix::new(case.rows, case.cols, case.dot.clone()).unwrap();
        let got = SparsemaxAlign::default().align(&m);
        assert_eq!(got.links(), case.sparsemax.as_slice(), "sparsemax case {k}");
    }
}
