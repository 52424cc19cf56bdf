//! Alignment methods on hand-built similarity matrices with known answers.

use mlctl::align::{
    drop_below, method_by_name, AlignMethod, Alignment, ArgMax, IterMax, MaxWeightMatch, SimMatrix,
    Similarity, SoftmaxAlign, SparsemaxAlign, METHOD_NAMES,
};

fn sim(rows: &[&[f32]]) -> SimMatrix {
    SimMatrix::from_rows(&rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>()).unwrap()
}

fn links(a: &Alignment) -> Vec<(usize, usize)> {
    a.links().to_vec()
}

fn methods() -> Vec<Box<dyn AlignMethod>> {
    ["argmax", "itermax", "match", "softmax"]
        .iter()
        .map(|m| method_by_name(m).unwrap())
        .collect()
}

#[test]
fn argmax_is_mutual() {
    // row 0 -> col 0, col 0 -> row 0: link; row 1 -> col 0 but col 0 prefers row 0: no link;
    // row 2 -> col 2, col 2 -> row 2: link; col 1 -> row 1 but row 1 prefers col 0.
    let m = sim(&[&[0.9, 0.1, 0.2], &[0.8, 0.7, 0.1], &[0.1, 0.2, 0.6]]);
    assert_eq!(links(&ArgMax.align(&m)), vec![(0, 0), (2, 2)]);
}

#[test]
fn argmax_ties_go_to_the_first_index() {
    // Every value equal: row i's argmax is column 0, column j's argmax is row 0 -> only (0, 0).
    let m = SimMatrix::new(3, 4, vec![0.5; 12]).unwrap();
    assert_eq!(links(&ArgMax.align(&m)), vec![(0, 0)]);
    // A tie inside row 1 between columns 1 and 2: column 1 wins.
    let m = sim(&[&[0.9, 0.0, 0.0], &[0.0, 0.8, 0.8]]);
    assert_eq!(links(&ArgMax.align(&m)), vec![(0, 0), (1, 1)]);
}

#[test]
fn every_method_handles_empty_sides() {
    for method in methods() {
        for (r, c) in [(0, 0), (0, 3), (3, 0)] {
            let m = SimMatrix::new(r, c, vec![]).unwrap();
            assert!(method.align(&m).is_empty(), "{} on {r}x{c}", method.name());
        }
    }
}

#[test]
fn one_row_and_one_column() {
    let row = sim(&[&[0.1, 0.7, 0.3, 0.7]]);
    let col = sim(&[&[0.1], &[0.7], &[0.3], &[0.7]]);
    for name in ["argmax", "itermax", "match"] {
        let method = method_by_name(name).unwrap();
        // Ties between 1 and 3: argmax takes the first; match takes the single heaviest edge.
        assert_eq!(links(&method.align(&row)), vec![(0, 1)], "{name} 1xN");
        assert_eq!(links(&method.align(&col)), vec![(1, 0)], "{name} Nx1");
    }
    // softmax over a single row is 1 along the column axis, so only the row softmax decides.
    // Row softmax of [0, 5, -10]: [0.0067, 0.993, 3e-7].
    let one = sim(&[&[0.0, 5.0, -10.0]]);
    assert_eq!(
        links(&SoftmaxAlign::default().align(&one)),
        vec![(0, 0), (0, 1)]
    );
}

#[test]
fn itermax_adds_links_for_unaligned_words() {
    // Round 1: mutual argmax gives (0,0) and (2,2) (row 1 prefers column 0, which prefers row 0;
    // column 1 prefers row 0, which prefers column 0).
    // Round 2: row 1 is free, column 1 is free. Masked values: (1,1) keeps 0.6 (both free);
    // (1,0) = 0.85*0.9 = 0.765 (column 0 linked); (0,1) = 0.8*0.9 = 0.72. Row 1's argmax is
    // column 0 (0.765), column 0's argmax is row 1 (row 0 and 2 are linked, rows' mask 0) ->
    // (1,0) is added. Column 1's argmax is row 0 (0.72 > 0.6) and row 0's argmax is column 1
    // (0.72 > 0.0 for the linked cells) -> (0,1) is added too.
    let m = sim(&[&[0.95, 0.8, 0.1], &[0.85, 0.6, 0.1], &[0.1, 0.1, 0.9]]);
    assert_eq!(links(&ArgMax.align(&m)), vec![(0, 0), (2, 2)]);
    assert_eq!(
        links(&IterMax::default().align(&m)),
        vec![(0, 0), (0, 1), (1, 0), (2, 2)]
    );
    // One round only = argmax.
    let once = IterMax {
        max_iter: 1,
        ..Default::default()
    };
    assert_eq!(links(&once.align(&m)), vec![(0, 0), (2, 2)]);
    // With alpha = 0.5 the discounted cells drop below (1,1): row 1 -> col 1 (0.6 vs 0.425),
    // column 1 -> row 1 (0.6 vs 0.4): (1,1) is added instead.
    let half = IterMax {
        alpha: 0.5,
        ..Default::default()
    };
    assert_eq!(links(&half.align(&m)), vec![(0, 0), (1, 1), (2, 2)]);
}

#[test]
fn itermax_on_two_rows_is_argmax() {
    // SimAlign returns the argmax round only when min(rows, cols) <= 2.
    let m = sim(&[&[0.9, 0.8, 0.1], &[0.85, 0.2, 0.3]]);
    assert_eq!(
        links(&IterMax::default().align(&m)),
        links(&ArgMax.align(&m))
    );
    assert_eq!(links(&ArgMax.align(&m)), vec![(0, 0)]);
}

fn brute_force_best(m: &SimMatrix) -> f64 {
    // Heaviest matching of size min(rows, cols), by trying every injection of the smaller side.
    fn go(m: &SimMatrix, i: usize, used: &mut Vec<bool>, transpose: bool) -> f64 {
        let (r, c) = if transpose {
            (m.cols(), m.rows())
        } else {
            (m.rows(), m.cols())
        };
        if i == r {
            return 0.0;
        }
        let mut best = f64::NEG_INFINITY;
        for j in 0..c {
            if !used[j] {
                used[j] = true;
                let w = if transpose { m.get(j, i) } else { m.get(i, j) };
                best = best.max(f64::from(w) + go(m, i + 1, used, transpose));
                used[j] = false;
            }
        }
        best
    }
    let transpose = m.rows() > m.cols();
    let c = if transpose { m.rows() } else { m.cols() };
    go(m, 0, &mut vec![false; c], transpose)
}

#[test]
fn match_is_a_maximum_weight_matching() {
    // Greedy would take (0,0)=0.9 then (1,1)=0.1: 1.0; the optimum is (0,1)+(1,0) = 0.8+0.8.
    let m = sim(&[&[0.9, 0.8], &[0.8, 0.1]]);
    assert_eq!(links(&MaxWeightMatch.align(&m)), vec![(0, 1), (1, 0)]);
    // Rectangular both ways, with negative values, and ties (all-equal: any full matching).
    let cases = [
        sim(&[
            &[0.3, -0.2, 0.9, 0.4],
            &[0.8, 0.7, 0.95, -1.0],
            &[0.1, 0.6, 0.2, 0.5],
        ]),
        sim(&[
            &[0.3, -0.2],
            &[0.8, 0.7],
            &[0.95, -1.0],
            &[0.1, 0.6],
            &[0.2, 0.5],
        ]),
        SimMatrix::new(3, 5, vec![0.5; 15]).unwrap(),
        sim(&[&[1.0, 1.0, 0.0], &[1.0, 1.0, 0.0], &[0.0, 0.0, 1.0]]),
    ];
    for m in &cases {
        let a = MaxWeightMatch.align(m);
        assert_eq!(a.len(), m.rows().min(m.cols()));
        let mut rows: Vec<_> = a.links().iter().map(|l| l.0).collect();
        let mut cols: Vec<_> = a.links().iter().map(|l| l.1).collect();
        rows.dedup();
        cols.sort();
        cols.dedup();
        assert_eq!(rows.len(), a.len(), "each source word once");
        assert_eq!(cols.len(), a.len(), "each target word once");
        let total: f64 = a.links().iter().map(|&(i, j)| f64::from(m.get(i, j))).sum();
        assert!(
            (total - brute_force_best(m)).abs() < 1e-5,
            "{total} vs {}",
            brute_force_best(m)
        );
        // deterministic
        assert_eq!(MaxWeightMatch.align(m), a);
    }
}

#[test]
fn softmax_thresholds_both_directions() {
    // Row 0: softmax of [0, ln(999)] = [0.001, 0.999] -> (0,0) fails the 0.001 threshold
    // (not strictly above); column softmaxes of [0, 0] are 0.5 each.
    let ln999 = 999f32.ln();
    let m = sim(&[&[0.0, ln999], &[0.0, ln999]]);
    assert_eq!(
        links(&SoftmaxAlign::default().align(&m)),
        vec![(0, 1), (1, 1)]
    );
    // A lower threshold keeps everything; a high one keeps only the dominant links.
    let low = SoftmaxAlign { threshold: 1e-4 };
    assert_eq!(low.align(&m).len(), 4);
    let m = sim(&[&[5.0, 0.0, 0.0], &[0.0, 5.0, 0.0], &[0.0, 0.0, 5.0]]);
    assert_eq!(
        links(&SoftmaxAlign { threshold: 0.5 }.align(&m)),
        vec![(0, 0), (1, 1), (2, 2)]
    );
    assert_eq!(SoftmaxAlign::default().similarity(), Similarity::Dot);
    assert_eq!(ArgMax.similarity(), Similarity::ScaledCosine);
}

#[test]
fn similarity_kinds() {
    let src = vec![vec![1.0, 0.0], vec![0.0, 2.0], vec![0.0, 0.0]];
    let tgt = vec![vec![3.0, 0.0], vec![-1.0, 1.0]];
    let cos = SimMatrix::compute(&src, &tgt, Similarity::Cosine).unwrap();
    let h = std::f32::consts::FRAC_1_SQRT_2;
    let expect = [1.0, -h, 0.0, h, 0.0, 0.0];
    for (a, b) in cos.data().iter().zip(expect) {
        assert!((a - b).abs() < 1e-6, "{:?}", cos.data());
    }
    let scaled = SimMatrix::compute(&src, &tgt, Similarity::ScaledCosine).unwrap();
    for (a, b) in scaled.data().iter().zip(expect) {
        assert!((a - (b + 1.0) / 2.0).abs() < 1e-6);
    }
    let dot = SimMatrix::compute(&src, &tgt, Similarity::Dot).unwrap();
    assert_eq!(dot.data(), &[3.0, -1.0, 0.0, 2.0, 0.0, 0.0]);
    assert!(SimMatrix::compute(&src, &[vec![1.0]], Similarity::Cosine).is_err());
}

#[test]
fn bad_matrices_are_errors() {
    assert!(SimMatrix::new(2, 2, vec![0.0; 3]).is_err());
    assert!(SimMatrix::new(1, 2, vec![0.0, f32::NAN]).is_err());
    assert!(SimMatrix::new(1, 1, vec![f32::INFINITY]).is_err());
    assert!(SimMatrix::from_rows(&[vec![0.0, 1.0], vec![0.0]]).is_err());
    assert!(method_by_name("fastalign").is_err());
}

#[test]
fn distortion_favours_the_diagonal() {
    let m = SimMatrix::new(3, 3, vec![1.0; 9]).unwrap();
    let d = m.with_distortion(0.5);
    // factor 1 - 0.5 * (j/2 - i/2)^2
    let expect = [1.0, 0.875, 0.5, 0.875, 1.0, 0.875, 0.5, 0.875, 1.0];
    assert_eq!(d.data(), &expect);
    assert_eq!(m.with_distortion(0.0), m);
    let row = sim(&[&[0.2, 0.4]]);
    assert_eq!(
        row.with_distortion(0.5),
        row,
        "fewer than 2 rows: unchanged, as SimAlign"
    );
}

#[test]
fn null_threshold_drops_weak_links() {
    let m = sim(&[&[0.9, 0.1], &[0.1, 0.3]]);
    let a = ArgMax.align(&m);
    assert_eq!(links(&a), vec![(0, 0), (1, 1)]);
    assert_eq!(links(&drop_below(&a, &m, 0.5)), vec![(0, 0)]);
}

#[test]
fn pharaoh_lines() {
    let a = Alignment::new(vec![(2, 1), (0, 0), (2, 1), (1, 3)]);
    assert_eq!(a.to_pharaoh(), "0-0 1-3 2-1");
    assert_eq!(Alignment::parse_pharaoh("  2-1 0-0\t1-3 ").unwrap(), a);
    assert_eq!(Alignment::parse_pharaoh("").unwrap(), Alignment::default());
    assert_eq!(Alignment::default().to_pharaoh(), "");
    for bad in ["0-", "a-1", "1:2", "-1-2", "1-2-3"] {
        assert!(Alignment::parse_pharaoh(bad).is_err(), "{bad}");
    }
}

#[test]
fn sparsemax_keeps_only_the_support() {
    // Row [2, 0.5]: tau = 1, probabilities [1, 0]; so only the diagonal survives both ways.
    let m = sim(&[&[2.0, 0.5], &[0.5, 2.0]]);
    assert_eq!(
        links(&SparsemaxAlign::default().align(&m)),
        vec![(0, 0), (1, 1)]
    );
    // Row [1, 0.8]: tau = 0.4, probabilities [0.6, 0.4]: every link survives; with threshold
    // 0.5 only the diagonal.
    let m = sim(&[&[1.0, 0.8], &[0.8, 1.0]]);
    assert_eq!(SparsemaxAlign::default().align(&m).len(), 4);
    let strict = SparsemaxAlign { threshold: 0.5 };
    assert_eq!(links(&strict.align(&m)), vec![(0, 0), (1, 1)]);
    assert_eq!(METHOD_NAMES.len(), 5);
}

#[test]
fn gemm_similarities_equal_the_f64_definition() {
    // Deterministic pseudo-random vectors (an LCG), one zero row, dimension 384 as e5-small.
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let dim = 384;
    let mut src: Vec<Vec<f32>> = (0..7).map(|_| (0..dim).map(|_| next()).collect()).collect();
    src[3] = vec![0.0; dim];
    let tgt: Vec<Vec<f32>> = (0..5)
        .map(|_| (0..dim).map(|_| next() * 3.0).collect())
        .collect();
    for kind in [
        Similarity::Cosine,
        Similarity::ScaledCosine,
        Similarity::Dot,
    ] {
        let m = SimMatrix::compute(&src, &tgt, kind).unwrap();
        assert_eq!((m.rows(), m.cols()), (7, 5));
        for (i, s) in src.iter().enumerate() {
            for (j, t) in tgt.iter().enumerate() {
                let dot: f64 = s
                    .iter()
                    .zip(t)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let ns = s.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
                let nt = t.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
                let cos = if ns > 0.0 { dot / (ns * nt) } else { 0.0 };
                let (expected, tol) = match kind {
                    Similarity::Cosine => (cos, 1e-6),
                    Similarity::ScaledCosine => ((cos + 1.0) / 2.0, 1e-6),
                    Similarity::Dot => (dot, 1e-5 * dot.abs().max(1.0)),
                };
                let got = f64::from(m.get(i, j));
                assert!(
                    (got - expected).abs() <= tol,
                    "{kind:?} ({i}, {j}): {got} vs {expected}"
                );
            }
        }
    }
    // A vector with itself: cosine 1 exactly at most (rounding never goes past it).
    let same = SimMatrix::compute(&src, &src, Similarity::Cosine).unwrap();
    assert!(same.data().iter().all(|&c| c <= 1.0));
    assert!((same.get(0, 0) - 1.0).abs() < 1e-6);
    // Flat input that is not whole rows is an error, not a panic.
    assert!(SimMatrix::from_flat(&[1.0, 2.0, 3.0], &[1.0, 2.0], 2, Similarity::Dot).is_err());
}
