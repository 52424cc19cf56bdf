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
