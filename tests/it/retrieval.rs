//! Retrieval accuracy against hand-counted cases.

use candle_core::{Device, Tensor};
use mlctl::eval::retrieval_accuracy;

#[test]
fn accuracy_counts_both_directions_by_cosine() {
    // Source i is closest to target i except source 2, whose nearest target is 0; target 0's
    // nearest source is still 0. Scaling a row must not matter (cosine).
    let src = Tensor::new(
        &[[1f32, 0.0, 0.0], [0.0, 5.0, 0.0], [0.9, 0.1, 0.3]],
        &Device::Cpu,
    )
    .unwrap();
    let tgt = Tensor::new(
        &[[2f32, 0.0, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0]],
        &Device::Cpu,
    )
    .unwrap();
    let scores = retrieval_accuracy(&src, &tgt).unwrap();
    assert_eq!(scores.n, 3);
    assert!((scores.src_to_tgt - 2.0 / 3.0).abs() < 1e-6, "{scores:?}");
    // Target 2 (0,0,1): cosines with sources are 0, 0, 0.3/|.| > 0 -> source 2: correct.
    assert!((scores.tgt_to_src - 1.0).abs() < 1e-6, "{scores:?}");
}

#[test]
fn identical_embeddings_do_not_count_as_correct_and_shapes_are_checked() {
    let same = Tensor::ones((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let scores = retrieval_accuracy(&same, &same).unwrap();
    assert_eq!(
        scores.src_to_tgt, 0.25,
        "ties go to the first index: only row 0 is 'correct'"
    );
    let other = Tensor::ones((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        retrieval_accuracy(&same, &other),
        Err(mlctl::Error::ShapeMismatch { .. })
    ));
}

#[test]
fn hits_are_saved_as_a_string_and_read_in_either_form() {
    let scores = mlctl::eval::RetrievalScores {
        src_to_tgt: 0.5,
        tgt_to_src: 0.25,
        n: 4,
        src_hits: vec![true, false, false, true],
        tgt_hits: vec![false, false, true, false],
    };
    let json = serde_json::to_string(&scores).unwrap();
    assert!(
        json.contains(r#""src_hits":"1001""#) && json.contains(r#""tgt_hits":"0010""#),
        "{json}"
    );
    let back: mlctl::eval::RetrievalScores = serde_json::from_str(&json).unwrap();
    assert_eq!(back, scores);
    // The arrays of booleans earlier versions wrote, and files without hits at all.
    let old = r#"{"src_to_tgt":0.5,"tgt_to_src":0.25,"n":4,
        "src_hits":[true,false,false,true],"tgt_hits":[false,false,true,false]}"#;
    assert_eq!(
        serde_json::from_str::<mlctl::eval::RetrievalScores>(old).unwrap(),
        scores
    );
    let bare = r#"{"src_to_tgt":0.5,"tgt_to_src":0.25,"n":4}"#;
    let bare: mlctl::eval::RetrievalScores = serde_json::from_str(bare).unwrap();
    assert!(bare.src_hits.is_empty() && bare.tgt_hits.is_empty());
    let bad = r#"{"src_to_tgt":0.5,"tgt_to_src":0.25,"n":4,"src_hits":"10x1","tgt_hits":""}"#;
    let err = serde_json::from_str::<mlctl::eval::RetrievalScores>(bad).unwrap_err();
    assert!(err.to_string().contains("0 and 1"), "{err}");
}
