//! Plain timing of CZ-NCE (fused vs composite), one JSON object per line, for
//! `benches/compare_pytorch.py` (which runs it and adds PyTorch eager timings).
//!
//! ```text
//! cargo bench --bench cz_nce_timing -- [--shapes 32x768,64x1536,...] [--dtype f32] [--reps 5]
//!     [--paths fused,composite] [--device cpu|cuda]
//! ```
//!
//! `--device cuda` needs `--features cuda` (`cargo bench --features cuda --bench cz_nce_timing
//! -- --device cuda`); the clock stops after `device.synchronize()`.
//!
//! Each line: `{"path", "b", "d", "dtype", "fwd_ms", "fwd_bwd_ms", "fwd_min_ms",
//! "fwd_bwd_min_ms", "threads", "candle_workers"}`: median and minimum over `reps` runs after two
//! warm-ups. `candle_workers` counts the worker threads of candle's elementwise pool: none, as
//! in training, unless `CANDLE_NUM_THREADS` asks for them
//! (see `mlctl::device::single_cpu_thread_pool`).

use candle_core::{DType, Device, Tensor, Var};
use mlctl::loss::CzNce;
use std::time::Instant;

/// `(median, min)` of the timings.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN timings"));
    (v[v.len() / 2], v[0])
}

fn time<F: FnMut() -> candle_core::Result<()>>(
    dev: &Device,
    reps: usize,
    mut f: F,
) -> candle_core::Result<(f64, f64)> {
    for _ in 0..2 {
        f()?; // warm-up
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(stats(ts))
}

fn main() -> candle_core::Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let shapes: Vec<(usize, usize)> = arg("--shapes")
        .unwrap_or_else(|| {
            // ML-CTL's training batches (32-256) and a large one, at two embedding widths.
            "32x768,32x1536,64x768,64x1536,256x768,256x1536,1024x768,1024x1536".into()
        })
        .split(',')
        .map(|s| {
            let (b, d) = s.split_once('x').expect("shape BxD");
            (b.parse().expect("B"), d.parse().expect("D"))
        })
        .collect();
    let dtype = match arg("--dtype").as_deref().unwrap_or("f32") {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => panic!("unknown dtype {other}"),
    };
    let reps: usize = arg("--reps").map_or(5, |r| r.parse().expect("reps"));
    let paths = arg("--paths").unwrap_or_else(|| "fused,composite".into());
    let dev = match arg("--device").as_deref().unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => panic!("unknown device {other} (cpu or cuda)"),
    };
    let cfg = CzNce::new();
    let threads = rayon::current_num_threads();
    let candle_workers = candle_core::utils::barrier_pool().n_workers();
    for (b, d) in shapes {
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, d), &dev)?.to_dtype(dtype)?)?;
        let k0 = Tensor::randn(0f32, 1.0, (b, d), &dev)?.to_dtype(dtype)?;
        let device = if dev.is_cuda() { "cuda" } else { "cpu" };
        let k = Var::from_tensor(&(q.as_tensor() + k0)?)?;
        let (qc, kc) = (q.as_tensor().detach(), k.as_tensor().detach());
        for path in paths.split(',') {
            let run = |t1: &Tensor, t2: &Tensor| match path {
                "fused" => cfg.forward_fused(t1, t2),
                _ => cfg.forward_composite(t1, t2),
            };
            let fwd = time(&dev, reps, || {
                let l = run(&qc, &kc).map_err(candle_core::Error::wrap)?;
                l.to_scalar::<f32>().map(|_| ())
            })?;
            let fwd_bwd = time(&dev, reps, || {
                let l = run(q.as_tensor(), k.as_tensor()).map_err(candle_core::Error::wrap)?;
                let g = l.backward()?;
                let dq = g.get(q.as_tensor()).expect("dq");
                let dk = g.get(k.as_tensor()).expect("dk");
                std::hint::black_box((dq, dk));
                Ok(())
            })?;
            println!(
                "{{\"path\": \"{path}\", \"device\": \"{device}\", \"b\": {b}, \"d\": {d}, \"dtype\": \"{dtype:?}\", \
                 \"fwd_ms\": {:.3}, \"fwd_bwd_ms\": {:.3}, \"fwd_min_ms\": {:.3}, \
                 \"fwd_bwd_min_ms\": {:.3}, \"threads\": {threads}, \
                 \"candle_workers\": {candle_workers}}}",
                fwd.0, fwd_bwd.0, fwd.1, fwd_bwd.1
            );
        }
    }
    Ok(())
}
