//! Criterion benchmarks of the BERT encoder: fused CPU ops vs their composite twins, inference
//! forward and training step (training forward, backward of `mean(h[1]) + mean(h[L])`, AdamW).
//!
//! ```text
//! cargo bench --bench encoder                       # the embedded default shape
//! MLCTL_BENCH_FULL=1 cargo bench --bench encoder    # adds the e5-small and mBERT shapes
//! cargo bench --bench encoder -- 'train/fused'      # a criterion filter
//! ```
//!
//! Shapes as in `benches/compare_encoder.py`: embedded (4 layers, H 128, vocab 8000, B 32,
//! L 32), e5-small (12 layers, H 384, vocab 250037, B 32, L 64), mbert (12 layers, H 768,
//! vocab 119547, B 8, L 128); random weights, every other sequence padded to 3/4.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mlctl::encoder::{BertConfig, BertEncoder, ParamStore};
use mlctl::ops::Kernels;
use mlctl::train::{AdamW, AdamWConfig, Gradients};

fn shape(name: &str) -> (BertConfig, usize, usize) {
    let (layers, hidden, heads, inter, vocab, b, l) = match name {
        "mbert" => (12, 768, 12, 3072, 119_547, 8, 128),
        "e5-small" => (12, 384, 12, 1536, 250_037, 32, 64),
        _ => (4, 128, 2, 512, 8000, 32, 32),
    };
    let cfg = BertConfig {
        num_hidden_layers: layers,
        hidden_size: hidden,
        num_attention_heads: heads,
        intermediate_size: inter,
        vocab_size: vocab,
        ..BertConfig::default()
    };
    (cfg, b, l)
}

fn bench(c: &mut Criterion) {
    let full = std::env::var("MLCTL_BENCH_FULL").is_ok_and(|v| v == "1");
    let shapes: &[&str] = if full {
        &["embedded", "e5-small", "mbert"]
    } else {
        &["embedded"]
    };
    let dev = Device::Cpu;
    for &name in shapes {
        let (cfg, b, l) = shape(name);
        let params = ParamStore::new(0);
        let encoder =
            BertEncoder::load(params.var_builder(DType::F32, &dev), &cfg).expect("encoder");
        let vars = params.named_vars();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).expect("adamw");
        let ids = Tensor::rand(0f32, cfg.vocab_size as f32 - 1.0, (b, l), &dev)
            .and_then(|t| t.to_dtype(DType::U32))
            .expect("ids");
        let mask: Vec<f32> = (0..b)
            .flat_map(|i| {
                let n = if i % 2 == 0 { l } else { 3 * l / 4 };
                (0..l).map(move |j| f32::from(u8::from(j < n)))
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev).expect("mask");
        for mode in ["fwd", "train"] {
            let mut group = c.benchmark_group(mode);
            group.sample_size(10);
            group.warm_up_time(Duration::from_millis(500));
            group.measurement_time(Duration::from_secs(if full { 20 } else { 5 }));
            for (path, kernels) in [("fused", Kernels::Auto), ("composite", Kernels::Composite)] {
                let enc = encoder.clone().with_kernels(kernels);
                group.bench_function(BenchmarkId::new(path, name), |bench| {
                    bench.iter(|| {
                        if mode == "fwd" {
                            let out = enc.forward(&ids, None, Some(&mask)).expect("forward");
                            std::hint::black_box(out);
                            return;
                        }
                        let out = enc
                            .forward_t(&ids, None, Some(&mask), true)
                            .expect("forward");
                        let h = &out.hidden_states;
                        let loss = (h[1].mean_all().expect("mean")
                            + h[h.len() - 1].mean_all().expect("mean"))
                        .expect("loss");
                        let grads = loss.backward().expect("backward");
                        let grads: Gradients = vars
                            .iter()
                            .filter_map(|(n, v)| {
                                grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone()))
                            })
                            .collect();
                        opt.step(&grads, 1e-5).expect("step");
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
