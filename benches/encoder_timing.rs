//! Plain timing of the BERT encoder, one JSON object per line, for `benches/compare_encoder.py`
//! (which runs it and adds PyTorch eager timings of transformers' `BertModel`).
//!
//! ```text
//! cargo bench --bench encoder_timing -- [--shapes embedded,e5-small,mbert] [--reps 5]
//!     [--modes fwd,train] [--paths fused,composite,frozen,sparse,explicit] [--stages]
//!     [--device cpu|cuda]
//! ```
//!
//! `--device cuda` needs `--features cuda`; every timing then stops after `device.synchronize()`.
//!
//! Paths: `fused` (the default kernels), `composite` (their composite twins), and two variants of
//! the fused path that skip work on the word-embedding table in training: `frozen` (the
//! embedding layer fixed, [`BertEncoder::with_frozen_embeddings`]) and `sparse` (AdamW's lazy
//! row update of the table, [`AdamW::with_sparse_rows`]). `explicit` trains through the
//! hand-written encoder backward ([`Backward::Explicit`]) instead of candle's autograd.
//!
//! Shapes: `mbert` (12 layers, H 768, vocab 119547, B 8, L 128), `e5-small` (12 layers, H 384,
//! vocab 250037, B 32, L 64), `embedded` (4 layers, H 128, vocab 8000, B 32, L 32). Random
//! weights, every hidden state returned. `fwd` is an inference pass (`forward_detached`, what
//! `encode` runs; on the CPU with the fused kernels it runs on host slices); `train` is a training
//! forward (dropout on), the backward of `mean(h[1]) + mean(h[L])` and one AdamW step over every
//! parameter. With `--stages`, the train step is also split into its forward, backward and
//! optimizer parts.
//!
//! Each line: `{"shape", "mode", "path", "b", "l", "ms", "min_ms", "seq_per_s", "threads", ...}`:
//! median and minimum over `reps` runs after two warm-ups.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mlctl::encoder::{Backward, BertConfig, BertEncoder, ParamStore};
use mlctl::ops::Kernels;
use mlctl::train::{AdamW, AdamWConfig, Gradients};

/// `(median, min)` of the timings.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN timings"));
    (v[v.len() / 2], v[0])
}

/// CPU time of this process (all threads) in ms, from `/proc/self/stat` (10 ms ticks); 0 where
/// unavailable.
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() * 10.0
}

/// The device the timings run on (`--device`), synchronised before each timing stops.
static DEVICE: OnceLock<Device> = OnceLock::new();

fn device() -> &'static Device {
    DEVICE.get_or_init(|| Device::Cpu)
}

fn time<F: FnMut() -> mlctl::Result<()>>(reps: usize, f: F) -> mlctl::Result<(f64, f64)> {
    let mut f = f;
    let mut f = move || -> mlctl::Result<()> {
        f()?;
        Ok(device().synchronize()?)
    };
    for _ in 0..2 {
        f()?; // warm-up
    }
    if std::env::var_os("MLCTL_BENCH_CPU_TIME").is_some() {
        // On a loaded machine wall time measures the scheduler; CPU time (meaningful with one
        // rayon thread) measures the work. Both fields then hold the mean CPU ms per run.
        let t0 = cpu_ms();
        for _ in 0..reps {
            f()?;
        }
        let ms = (cpu_ms() - t0) / reps as f64;
        return Ok((ms, ms));
    }
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(stats(ts))
}

/// `(config, batch, seq_len)` of a named shape.
fn shape(name: &str) -> (BertConfig, usize, usize) {
    let base = BertConfig::default();
    let (layers, hidden, heads, inter, vocab, b, l) = match name {
        "mbert" => (12, 768, 12, 3072, 119_547, 8, 128),
        "e5-small" => (12, 384, 12, 1536, 250_037, 32, 64),
        "embedded" => (4, 128, 2, 512, 8000, 32, 32),
        other => panic!("unknown shape {other} (mbert, e5-small, embedded)"),
    };
    let cfg = BertConfig {
        num_hidden_layers: layers,
        hidden_size: hidden,
        num_attention_heads: heads,
        intermediate_size: inter,
        vocab_size: vocab,
        ..base
    };
    (cfg, b, l)
}

/// `mean(h[1]) + mean(h[L])`, the loss the comparison trains on.
fn loss(enc: &BertEncoder, ids: &Tensor, mask: &Tensor, train: bool) -> mlctl::Result<Tensor> {
    let out = enc.forward_t(ids, None, Some(mask), train)?;
    let h = &out.hidden_states;
    Ok((h[1].mean_all()? + h[h.len() - 1].mean_all()?)?)
}

/// Forward and forward + backward of each elementwise op at the encoder's shapes.
fn time_ops(
    cfg: &BertConfig,
    b: usize,
    l: usize,
    kernels: Kernels,
    reps: usize,
    print: &dyn Fn(&str, (f64, f64)),
) -> mlctl::Result<()> {
    use mlctl::ops;
    let dev = device().clone();
    let fused = kernels == Kernels::Auto;
    let (h, heads, inter) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
    );
    let x = candle_core::Var::randn(0f32, 1.0, (b, l, h), &dev)?;
    let w = candle_core::Var::ones(h, DType::F32, &dev)?;
    let bias = candle_core::Var::zeros(h, DType::F32, &dev)?;
    let s = candle_core::Var::randn(0f32, 1.0, (b, heads, l, l), &dev)?;
    let mask = Tensor::zeros((b, 1, 1, l), DType::F32, &dev)?;
    let g = candle_core::Var::randn(0f32, 1.0, (b, l, inter), &dev)?;
    let x2 = candle_core::Var::randn(0f32, 1.0, (b * l, h), &dev)?;
    let w_in = candle_core::Var::randn(0f32, 0.02, (inter, h), &dev)?;
    let b_in = candle_core::Var::zeros(inter, DType::F32, &dev)?;
    let key = ops::DropoutKey::new(0, 0);
    type Op<'a> = Box<dyn Fn() -> mlctl::Result<Tensor> + 'a>;
    let cases: Vec<(&str, Op)> = vec![
        (
            "layer_norm",
            Box::new(|| {
                if fused {
                    ops::layer_norm_fused(&x, &w, &bias, 1e-12)
                } else {
                    ops::layer_norm_composite(&x, &w, &bias, 1e-12)
                }
            }),
        ),
        (
            "softmax",
            Box::new(|| {
                if fused {
                    ops::softmax_scaled_masked_fused(&s, 0.125, Some(&mask))
                } else {
                    ops::softmax_scaled_masked_composite(&s, 0.125, Some(&mask))
                }
            }),
        ),
        (
            "gelu",
            Box::new(|| {
                if fused {
                    ops::gelu_fused(&g, ops::GeluForm::Erf)
                } else {
                    ops::gelu_composite(&g, ops::GeluForm::Erf)
                }
            }),
        ),
        (
            "dropout",
            Box::new(|| {
                if fused {
                    ops::dropout_fused(&x, 0.1, key, 0)
                } else {
                    ops::dropout_composite(&x, 0.1, key, 0)
                }
            }),
        ),
        ("matmul_qk", Box::new(|| Ok(s.matmul(&s.t()?)?))),
        // The bias add after that projection, the pass a fused bias + GELU would save.
        ("bias_add", Box::new(|| Ok(g.broadcast_add(&b_in)?))),
        // The feed-forward input projection as the encoder runs it: one GEMM over all rows.
        ("gemm_ffn_in", Box::new(|| Ok(x2.matmul(&w_in.t()?)?))),
    ];
    for (name, f) in &cases {
        print(
            &format!("{name}_fwd"),
            time(reps, || {
                std::hint::black_box(f()?);
                Ok(())
            })?,
        );
        print(
            &format!("{name}_fwd_bwd"),
            time(reps, || {
                std::hint::black_box(f()?.sum_all()?.backward()?);
                Ok(())
            })?,
        );
    }
    Ok(())
}

/// The train step's parts: the training forward, its backward (the explicit path: forward and
/// backward together, its tape being spent by the backward) and the AdamW step.
fn time_stages(
    enc: &BertEncoder,
    ids: &Tensor,
    mask: &Tensor,
    vars: &[(String, candle_core::Var)],
    opt: &mut AdamW,
    reps: usize,
    print: &dyn Fn(&str, (f64, f64)),
) -> mlctl::Result<()> {
    print(
        "train_fwd",
        time(reps, || {
            std::hint::black_box(loss(enc, ids, mask, true)?);
            enc.discard_recorded();
            Ok(())
        })?,
    );
    let grads_of = |store: &candle_core::backprop::GradStore| -> mlctl::Result<Gradients> {
        let mut grads: Gradients = vars
            .iter()
            .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .collect();
        enc.backward_recorded(store)?;
        enc.take_gradients(vars, &mut grads)?;
        Ok(grads)
    };
    if enc.backward_mode() == Backward::Explicit {
        let step = || grads_of(&loss(enc, ids, mask, true)?.backward()?);
        print(
            "train_fwd_bwd",
            time(reps, || {
                std::hint::black_box(step()?);
                Ok(())
            })?,
        );
        let grads = step()?;
        return print_adamw(opt, &grads, reps, print);
    }
    let l = loss(enc, ids, mask, true)?;
    print(
        "train_bwd",
        time(reps, || {
            std::hint::black_box(l.backward()?);
            Ok(())
        })?,
    );
    let grads = grads_of(&l.backward()?)?;
    print_adamw(opt, &grads, reps, print)
}

fn print_adamw(
    opt: &mut AdamW,
    grads: &Gradients,
    reps: usize,
    print: &dyn Fn(&str, (f64, f64)),
) -> mlctl::Result<()> {
    print("adamw", time(reps, || opt.step(grads, 1e-5))?);
    Ok(())
}

fn main() -> mlctl::Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let shapes = arg("--shapes").unwrap_or_else(|| "embedded,e5-small,mbert".into());
    let modes = arg("--modes").unwrap_or_else(|| "fwd,train".into());
    let paths = arg("--paths").unwrap_or_else(|| "fused".into());
    let reps: usize = arg("--reps").map_or(5, |r| r.parse().expect("reps"));
    let stages = args.iter().any(|a| a == "--stages");
    let threads = rayon::current_num_threads();
    let chosen = match arg("--device").as_deref().unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => panic!("unknown device {other} (cpu or cuda)"),
    };
    let dev = DEVICE.get_or_init(|| chosen).clone();
    for name in shapes.split(',') {
        let (cfg, b, l) = shape(name);
        let params = ParamStore::new(0);
        let enc = BertEncoder::load(params.var_builder(DType::F32, &dev), &cfg)?;
        let vars = params.named_vars();
        let var_list: Vec<(String, candle_core::Var)> = vars.clone().into_iter().collect();
        let ids =
            Tensor::rand(0f32, cfg.vocab_size as f32 - 1.0, (b, l), &dev)?.to_dtype(DType::U32)?;
        // Every other sequence is padded to three quarters of the length, as real batches are.
        let lens: Vec<f32> = (0..b)
            .flat_map(|i| {
                let n = if i % 2 == 0 { l } else { 3 * l / 4 };
                (0..l).map(move |j| if j < n { 1.0 } else { 0.0 })
            })
            .collect();
        let mask = Tensor::from_vec(lens, (b, l), &dev)?;
        for path in paths.split(',') {
            let kernels = match path {
                "fused" | "frozen" | "sparse" | "explicit" => Kernels::Auto,
                "composite" => Kernels::Composite,
                other => {
                    panic!("unknown path {other} (fused, composite, frozen, sparse, explicit)")
                }
            };
            let mut enc = enc.clone().with_kernels(kernels);
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
            match path {
                "frozen" => enc = enc.with_frozen_embeddings(),
                "sparse" => opt = opt.with_sparse_rows("embeddings.word_embeddings.weight")?,
                "explicit" => enc = enc.with_backward(Backward::Explicit),
                _ => {}
            }
            let print = |mode: &str, (ms, min_ms): (f64, f64)| {
                println!(
                    "{{\"shape\": \"{name}\", \"mode\": \"{mode}\", \"path\": \"{path}\", \"b\": {b}, \
                     \"l\": {l}, \"ms\": {ms:.3}, \"min_ms\": {min_ms:.3}, \"seq_per_s\": {:.2}, \
                     \"threads\": {threads}}}",
                    b as f64 * 1e3 / ms
                );
            };
            for mode in modes.split(',') {
                match mode {
                    "fwd" => print(
                        mode,
                        time(reps, || {
                            let out = enc.forward_detached(&ids, None, Some(&mask))?;
                            std::hint::black_box(out);
                            Ok(())
                        })?,
                    ),
                    "train" => {
                        print(
                            mode,
                            time(reps, || {
                                let store = loss(&enc, &ids, &mask, true)?.backward()?;
                                let mut grads: Gradients = vars
                                    .iter()
                                    .filter_map(|(n, v)| {
                                        store.get(v.as_tensor()).map(|g| (n.clone(), g.clone()))
                                    })
                                    .collect();
                                // The explicit backward's share (nothing on the autograd path).
                                enc.backward_recorded(&store)?;
                                enc.take_gradients(&var_list, &mut grads)?;
                                opt.step(&grads, 1e-5)
                            })?,
                        );
                        if stages {
                            time_stages(&enc, &ids, &mask, &var_list, &mut opt, reps, &print)?;
                        }
                    }
                    "ops" => time_ops(&cfg, b, l, kernels, reps, &print)?,
                    other => panic!("unknown mode {other} (fwd, train, ops)"),
                }
            }
        }
    }
    Ok(())
}
