//! Criterion benchmarks of CZ-NCE: fused vs composite, forward and forward+backward.
//!
//! ```text
//! cargo bench --bench cz_nce                      # B in {64, 256, 1024}, D in {768, 1536}
//! MLCTL_BENCH_FULL=1 cargo bench --bench cz_nce   # adds B = 4096
//! cargo bench --bench cz_nce -- 'fwd_bwd/fused/f32/256x'   # a criterion filter
//! MLCTL_BENCH_DEVICE=cuda cargo bench --features cuda --bench cz_nce   # on the GPU
//! ```
//!
//! Dtypes: f32, bf16 and f16 inputs (both paths compute in f32). The composite path is skipped
//! for B = 4096 in half precision on the CPU to keep the full run under control. Every
//! iteration ends with `device.synchronize()`.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mlctl::loss::CzNce;
use std::time::Duration;

fn inputs(b: usize, d: usize, dtype: DType, dev: &Device) -> (Var, Var) {
    let q = Tensor::randn(0f32, 1.0, (b, d), dev).expect("randn");
    let k = (&q + Tensor::randn(0f32, 1.0, (b, d), dev).expect("randn")).expect("add");
    (
        Var::from_tensor(&q.to_dtype(dtype).expect("cast")).expect("var"),
        Var::from_tensor(&k.to_dtype(dtype).expect("cast")).expect("var"),
    )
}

fn bench(c: &mut Criterion) {
    let full = std::env::var("MLCTL_BENCH_FULL").is_ok_and(|v| v == "1");
    let mut batches = vec![64, 256, 1024];
    if full {
        batches.push(4096);
    }
    let dev = match std::env::var("MLCTL_BENCH_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).expect("MLCTL_BENCH_DEVICE=cuda needs a GPU and --features cuda")
        }
        _ => Device::Cpu,
    };
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    let loss = CzNce::new();
    for (mode, with_bwd) in [("fwd", false), ("fwd_bwd", true)] {
        let mut group = c.benchmark_group(mode);
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(3));
        for &dtype in &dtypes {
            for &d in &[768usize, 1536] {
                for &b in &batches {
                    let (q, k) = inputs(b, d, dtype, &dev);
                    for path in ["fused", "composite"] {
                        if path == "composite" && b == 4096 && dtype != DType::F32 && dev.is_cpu() {
                            continue;
                        }
                        let id = BenchmarkId::new(
                            format!("{path}/{}", dtype.as_str()),
                            format!("{b}x{d}"),
                        );
                        group.bench_function(id, |bench| {
                            bench.iter(|| {
                                let (qt, kt) = if with_bwd {
                                    (q.as_tensor().clone(), k.as_tensor().clone())
                                } else {
                                    (q.as_tensor().detach(), k.as_tensor().detach())
                                };
                                let l = match path {
                                    "fused" => loss.forward_fused(&qt, &kt),
                                    _ => loss.forward_composite(&qt, &kt),
                                }
                                .expect("loss");
                                if with_bwd {
                                    let g = l.backward().expect("backward");
                                    std::hint::black_box(g.get(q.as_tensor()).expect("dq"));
                                } else {
                                    std::hint::black_box(l);
                                }
                                dev.synchronize().expect("sync");
                            })
                        });
                    }
                }
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
