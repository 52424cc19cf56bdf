//! Time and peak memory of the MLM loss's vocabulary projection, log-softmax and cross-entropy:
//! `ops::vocab_nll_fused` (chunks of the vocabulary) against `ops::vocab_nll_composite` (the
//! whole `[n, vocab]` logits), f32 on the CPU.
//!
//! ```text
//! cargo bench --bench mlm_loss_timing -- [--reps 3] [--chunk 4096] [--shapes mbert,e5]
//! ```
//!
//! Shapes: `mbert` is n = 1229 masked rows (15% of batch 64 × length 128), hidden 768, vocabulary
//! 119547; `e5` is n = 307 (15% of 32 × 64), hidden 384, vocabulary 250037 (multilingual-e5-small).
//! Inputs are random (logits of a few units), targets spread over the vocabulary.
//!
//! For each shape and form: one warm-up, then `reps` timed runs of the forward alone (inputs
//! detached) and of forward + backward (the loss, `backward()`, reading the three gradients).
//! Memory is counted by this program's allocator: the peak of live heap bytes during a run minus
//! the bytes live before it (the inputs). The forward + backward figure includes the gradients
//! themselves (`[vocab, hidden]` + `[vocab]` + `[n, hidden]`, the same for both forms), printed
//! apart; the rest is temporaries.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use mlctl::ops;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let now = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's arguments; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MIB: f64 = 1024.0 * 1024.0;

struct Shape {
    name: &'static str,
    n: usize,
    hidden: usize,
    vocab: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "mbert",
        n: 1229,
        hidden: 768,
        vocab: 119_547,
    },
    Shape {
        name: "e5",
        n: 307,
        hidden: 384,
        vocab: 250_037,
    },
];

/// Runs `f` and returns its wall time in ms and the peak of live heap bytes above the start.
fn measure(f: impl FnOnce() -> Result<()>) -> Result<(f64, usize)> {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let start = Instant::now();
    f()?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    Ok((ms, PEAK.load(Relaxed).saturating_sub(base)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type Loss = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> mlctl::Result<Tensor>;

/// Median forward and forward + backward times (ms) and the largest peaks (bytes) over `reps`.
fn time_form(inputs: &[Var; 3], targets: &Tensor, f: &Loss, reps: usize) -> Result<[f64; 4]> {
    let [x, w, b] = inputs;
    let fwd = || -> Result<()> {
        let (x, w, b) = (
            x.as_detached_tensor(),
            w.as_detached_tensor(),
            b.as_detached_tensor(),
        );
        f(&x, &w, &b, targets)?.to_scalar::<f32>()?;
        Ok(())
    };
    let fwd_bwd = || -> Result<()> {
        let loss = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), targets)?;
        let grads = loss.backward()?;
        for v in inputs {
            grads.get(v.as_tensor()).ok_or("missing gradient")?;
        }
        Ok(())
    };
    fwd()?;
    fwd_bwd()?;
    let (mut tf, mut tb, mut mf, mut mb) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..reps {
        let (t, m) = measure(fwd)?;
        tf.push(t);
        mf = mf.max(m);
        let (t, m) = measure(fwd_bwd)?;
        tb.push(t);
        mb = mb.max(m);
    }
    Ok([median(tf), mf as f64, median(tb), mb as f64])
}

fn inputs(s: &Shape) -> Result<([Var; 3], Tensor)> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (s.n, s.hidden), &dev)?;
    let w = Tensor::randn(
        0f32,
        2.0 / (s.hidden as f32).sqrt(),
        (s.vocab, s.hidden),
        &dev,
    )?;
    let b = Tensor::randn(0f32, 0.5, s.vocab, &dev)?;
    let t: Vec<u32> = (0..s.n)
        .map(|i| ((i * 7919 + 11) % s.vocab) as u32)
        .collect();
    let vars = [
        Var::from_tensor(&x)?,
        Var::from_tensor(&w)?,
        Var::from_tensor(&b)?,
    ];
    Ok((vars, Tensor::new(t, &dev)?))
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let simd = if info.contains("avx512f") {
        "AVX-512"
    } else if info.contains("avx2") {
        "AVX2"
    } else {
        "no AVX2"
    };
    format!(
        "{model} ({simd}), {} rayon threads",
        rayon::current_num_threads()
    )
}

fn arg(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn main() -> Result<()> {
    // First, while this is the process's only thread (see its docs).
    mlctl::device::single_cpu_thread_pool();
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = arg(&args, "--reps").map_or(Ok(3), |v| v.parse())?;
    let chunk: usize = arg(&args, "--chunk").map_or(Ok(ops::VOCAB_NLL_CHUNK), |v| v.parse())?;
    let only = arg(&args, "--shapes").unwrap_or_else(|| "mbert,e5".into());
    println!(
        "CPU: {}; f32; chunk {chunk}; median of {reps} runs",
        cpu_model()
    );
    println!();
    println!("| shape | n | hidden | vocab | form | fwd | fwd peak | fwd+bwd | fwd+bwd peak | of which gradients |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in SHAPES
        .iter()
        .filter(|s| only.split(',').any(|o| o == s.name))
    {
        let (vars, targets) = inputs(s)?;
        let grads = 4 * (s.vocab * s.hidden + s.vocab + s.n * s.hidden);
        let fused = move |x: &Tensor, w: &Tensor, b: &Tensor, t: &Tensor| {
            ops::vocab_nll_fused(x, w, b, t, chunk)
        };
        let forms: [(&str, &Loss); 2] =
            [("fused", &fused), ("composite", &ops::vocab_nll_composite)];
        for (form, f) in forms {
            let [tf, mf, tb, mb] = time_form(&vars, &targets, f, reps)?;
            println!(
                "| {} | {} | {} | {} | {form} | {tf:.0} ms | {:.0} MiB | {tb:.0} ms | {:.0} MiB | {:.0} MiB |",
                s.name,
                s.n,
                s.hidden,
                s.vocab,
                mf / MIB,
                mb / MIB,
                grads as f64 / MIB
            );
        }
    }
    Ok(())
}
