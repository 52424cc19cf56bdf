//! awesome-align's extra outputs on the tiny fixture: the aligned word pairs
//! (`--output_word_file`) and a score per link (`--output_prob_file`), against lines checked
//! by hand, and the scores recomputed here from the word vectors by their definition.

use crate::common;

use candle_core::{DType, Device};
use mlctl::align::io::{scores_line, word_pairs_line, write_scores, write_word_pairs};
use mlctl::align::{
    AlignMethod, ArgMax, ScoredAlignment, SentencePair, SoftmaxAlign, TokenType, WordAligner,
};
use mlctl::pretrained::PretrainedBert;

const PAIRS: [&str; 2] = [
    "the cat sat on the mat ||| the dog sat on a mat",
    "a bird sings ||| the bird sings today",
];

/// The pairs, each method's scored alignments, and each sentence's word vectors.
type Aligned = (
    Vec<SentencePair>,
    Vec<Vec<ScoredAlignment>>,
    Vec<Vec<Vec<f32>>>,
);

fn aligned() -> Aligned {
    let bert =
        PretrainedBert::from_dir(&common::fixture("tiny_bert"), &Device::Cpu, DType::F32).unwrap();
    let aligner = WordAligner::new(bert.encoder(), bert.tokenizer().unwrap().clone())
        .with_layer(2)
        .with_token_type(TokenType::Word);
    let pairs: Vec<SentencePair> = PAIRS
        .iter()
        .map(|l| SentencePair::parse(l).unwrap())
        .collect();
    let methods: [&dyn AlignMethod; 2] = [&ArgMax, &SoftmaxAlign::default()];
    let scored = aligner.align_pairs_scored(&pairs, &methods).unwrap();
    // The word vectors, for recomputing the scores: sentence k of pairs' src, tgt, src, ...
    let sentences: Vec<Vec<&str>> = pairs
        .iter()
        .flat_map(|p| [&p.src, &p.tgt])
        .map(|s| s.iter().map(String::as_str).collect())
        .collect();
    let vectors = aligner
        .embed(&sentences)
        .unwrap()
        .into_iter()
        .map(|v| v.vectors.chunks(v.dim).map(<[f32]>::to_vec).collect())
        .collect();
    (pairs, scored, vectors)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// SimAlign's similarity of two word vectors, `(cos + 1) / 2`.
fn scaled_cosine(a: &[f32], b: &[f32]) -> f64 {
    (dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt()) + 1.0) / 2.0
}

/// awesome-align's link probability of `(i, j)`: the harmonic mean of the row softmax and
/// the column softmax of the dot products, each scaled by 1/sqrt(other side's length).
fn awesome_probability(src: &[Vec<f32>], tgt: &[Vec<f32>], i: usize, j: usize) -> f64 {
    let (m, n) = (src.len() as f64, tgt.len() as f64);
    let row: Vec<f64> = tgt.iter().map(|t| dot(&src[i], t) / n.sqrt()).collect();
    let col: Vec<f64> = src.iter().map(|s| dot(s, &tgt[j]) / m.sqrt()).collect();
    let softmax = |v: &[f64], k: usize| {
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (v[k] - max).exp() / v.iter().map(|x| (x - max).exp()).sum::<f64>()
    };
    let (p, q) = (softmax(&row, j), softmax(&col, i));
    2.0 * p * q / (p + q + 1e-9)
}

#[test]
fn word_pairs_and_scores_match_hand_checked_lines() {
    let (pairs, scored, _) = aligned();
    let line = |m: usize, k: usize| {
        (
            scored[m][k].alignment.to_pharaoh(),
            word_pairs_line(&pairs[k], &scored[m][k].alignment).unwrap(),
            scores_line(&scored[m][k]).unwrap(),
        )
    };
    // argmax: the mutual best matches of the random tiny model (its cosines are all high).
    assert_eq!(
        line(0, 0),
        (
            "0-0 1-1 5-5".to_string(),
            "the<sep>the cat<sep>dog mat<sep>mat".to_string(),
            "0.9868 0.9852 0.9889".to_string()
        )
    );
    assert_eq!(
        line(0, 1),
        (
            "0-0 1-1".to_string(),
            "a<sep>the bird<sep>bird".to_string(),
            "0.9735 0.9873".to_string()
        )
    );
    // softmax (threshold 0.001) links nearly every pair on this random model; the second pair:
    assert_eq!(
        line(1, 1),
        (
            "0-0 0-3 1-0 1-1 1-2 1-3 2-0 2-2 2-3".to_string(),
            "a<sep>the a<sep>today bird<sep>the bird<sep>bird bird<sep>sings bird<sep>today \
             sings<sep>the sings<sep>sings sings<sep>today"
                .to_string(),
            "0.7271 0.3720 0.0613 0.8424 0.1122 0.2009 0.2148 0.1775 0.1775".to_string()
        )
    );
}

#[test]
fn scores_follow_their_definitions() {
    let (pairs, scored, vectors) = aligned();
    for k in 0..pairs.len() {
        let (src, tgt) = (&vectors[2 * k], &vectors[2 * k + 1]);
        for (m, score) in [
            &(|i: usize, j: usize| scaled_cosine(&src[i], &tgt[j])) as &dyn Fn(usize, usize) -> f64,
            &|i, j| awesome_probability(src, tgt, i, j),
        ]
        .iter()
        .enumerate()
        {
            let s = &scored[m][k];
            assert_eq!(s.scores.len(), s.alignment.len());
            assert!(!s.scores.is_empty());
            for (&(i, j), &got) in s.alignment.links().iter().zip(&s.scores) {
                let want = score(i, j);
                assert!(
                    (f64::from(got) - want).abs() < 1e-5,
                    "method {m}, pair {k}, link {i}-{j}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn files_hold_one_line_per_pair_and_mismatches_are_errors() {
    let (pairs, scored, _) = aligned();
    let dir = tempfile::tempdir().unwrap();
    let alignments: Vec<_> = scored[0].iter().map(|s| s.alignment.clone()).collect();
    write_word_pairs(dir.path().join("words"), &pairs, &alignments).unwrap();
    write_scores(dir.path().join("probs"), &scored[0]).unwrap();
    let words = std::fs::read_to_string(dir.path().join("words")).unwrap();
    assert_eq!(
        words,
        "the<sep>the cat<sep>dog mat<sep>mat\na<sep>the bird<sep>bird\n"
    );
    let probs = std::fs::read_to_string(dir.path().join("probs")).unwrap();
    assert_eq!(probs, "0.9868 0.9852 0.9889\n0.9735 0.9873\n");
    assert!(matches!(
        write_word_pairs(dir.path().join("w2"), &pairs[..1], &alignments),
        Err(mlctl::Error::ShapeMismatch { .. })
    ));
    let mut bad = scored[0][0].clone();
    bad.scores.pop();
    assert!(matches!(
        scores_line(&bad),
        Err(mlctl::Error::ShapeMismatch { .. })
    ));
    let outside = mlctl::align::Alignment::new(vec![(9, 0)]);
    assert!(matches!(
        word_pairs_line(&pairs[0], &outside),
        Err(mlctl::Error::InvalidArgument(_))
    ));
}
