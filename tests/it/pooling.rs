//! Pooling against means computed by hand with plain loops.

use candle_core::{Device, Tensor};
use mlctl::encoder::EncoderOutput;
use mlctl::pooling::{Pooling, TokenSpan};

const B: usize = 2;
const L: usize = 4;
const H: usize = 3;

fn value(layer: usize, b: usize, l: usize, h: usize) -> f32 {
    (layer * 100 + b * 20 + l * 3 + h) as f32 * 0.5 - 7.0
}

fn output(layers: usize) -> EncoderOutput {
    let hidden_states: Vec<Tensor> = (0..layers)
        .map(|layer| {
            let v: Vec<f32> = (0..B * L * H)
                .map(|i| value(layer, i / (L * H), (i / H) % L, i % H))
                .collect();
            Tensor::from_vec(v, (B, L, H), &Device::Cpu).unwrap()
        })
        .collect();
    EncoderOutput {
        last_hidden_state: hidden_states.last().unwrap().clone(),
        hidden_states,
    }
}

fn expected(layers: &[usize], rows: &[Vec<usize>]) -> Vec<Vec<f32>> {
    rows.iter()
        .enumerate()
        .map(|(b, tokens)| {
            (0..H)
                .map(|h| {
                    layers
                        .iter()
                        .map(|&layer| {
                            tokens.iter().map(|&l| value(layer, b, l, h)).sum::<f32>()
                                / tokens.len() as f32
                        })
                        .sum()
                })
                .collect()
        })
        .collect()
}

fn close(a: &[Vec<f32>], b: &[Vec<f32>]) {
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-4, "{a:?} != {b:?}");
        }
    }
}

#[test]
fn sentence_pooling_sums_layer_one_and_the_last_over_attended_tokens() {
    let out = output(5);
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu).unwrap();
    let pooled = Pooling::mlctl()
        .sentence(&out, &mask)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    close(&pooled, &expected(&[1, 4], &[vec![0, 1, 2, 3], vec![0, 1]]));
}

#[test]
fn span_pooling_averages_inclusive_spans() {
    let out = output(3);
    let spans = [
        TokenSpan { start: 1, end: 2 },
        TokenSpan { start: 3, end: 3 },
    ];
    let pooled = Pooling::layer(2)
        .spans(&out, &spans)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    close(&pooled, &expected(&[2], &[vec![1, 2], vec![3]]));
}

#[test]
fn bad_layers_and_spans_are_typed_errors() {
    let out = output(3);
    let mask = Tensor::ones((B, L), candle_core::DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        Pooling::layer(3).sentence(&out, &mask),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Pooling::layer(-4).sentence(&out, &mask),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    let outside = [
        TokenSpan { start: 0, end: 0 },
        TokenSpan { start: 2, end: 4 },
    ];
    assert!(matches!(
        Pooling::mlctl().spans(&out, &outside),
        Err(mlctl::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Pooling::mlctl().spans(&out, &outside[..1]),
        Err(mlctl::Error::ShapeMismatch { .. })
    ));
}
