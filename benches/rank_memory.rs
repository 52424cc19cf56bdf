//! Memory of one data-parallel rank's CZ-NCE blocks in the cached loss, counted by the
//! allocator: every rank holds all `N = W·n` rows' embeddings; each rank used to evaluate the
//! whole `[N, N]` loss (the fused op), it now evaluates its own `n` rows
//! ([`CzNce::forward_rows`], `[n, N]` blocks), with the fused band of rows on the CPU; the
//! composite band (its twin, and what other devices run) is reported beside them. This program
//! plays one rank at a time in one process and reports the peak bytes allocated during the
//! loss's forward and backward, above the embeddings themselves, which every path shares.
//!
//! ```text
//! cargo bench --bench rank_memory -- [--rows 256] [--dim 1536]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use mlctl::loss::CzNce;

/// The system allocator with a count of the bytes held and their peak.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to `System` unchanged; the counters are atomics, so counting never
// allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(held, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated while `f` runs, above what was held when it started.
fn peak_during(f: impl FnOnce() -> mlctl::Result<()>) -> mlctl::Result<usize> {
    let before = HELD.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    f()?;
    Ok(PEAK.load(Ordering::Relaxed) - before)
}

/// How a rank evaluates its loss.
#[derive(Clone, Copy)]
enum Path {
    /// The whole `[N, N]` loss, fused.
    Whole,
    /// Rows `0..n`, fused.
    FusedRows(usize),
    /// Rows `0..n`, composite.
    CompositeRows(usize),
}

/// Forward and backward of rank 0's loss by `path`.
fn rank_step(q: &Var, k: &Var, path: Path) -> mlctl::Result<()> {
    let loss = CzNce::new();
    let (q, k) = (q.as_tensor(), k.as_tensor());
    let value = match path {
        Path::Whole => loss.forward_fused(q, k)?,
        Path::FusedRows(n) => loss.forward_rows_fused(q, k, 0..n)?,
        Path::CompositeRows(n) => loss.forward_rows_composite(q, k, 0..n)?,
    };
    let grads = value.backward()?;
    std::hint::black_box(grads);
    Ok(())
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() -> mlctl::Result<()> {
    let (n, d) = (arg("--rows", 256), arg("--dim", 1536));
    let dev = Device::Cpu;
    println!(
        "| W | N | whole `[N, N]`, fused | `[n, N]` rows, composite | `[n, N]` rows, fused | fused rows / whole |"
    );
    println!("|---|---|---|---|---|---|");
    for w in [1usize, 2, 4, 8] {
        let big = w * n;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (big, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (big, d), &dev)?)?;
        assert_eq!(q.dtype(), DType::F32);
        let paths = [Path::Whole, Path::CompositeRows(n), Path::FusedRows(n)];
        // Each once unmeasured: the GEMM's per-thread packing buffers grow to the largest
        // product seen and stay, and would count against whichever ran first.
        for path in paths {
            rank_step(&q, &k, path)?;
        }
        let mut peaks = vec![];
        for path in paths {
            peaks.push(peak_during(|| rank_step(&q, &k, path))?);
        }
        let mb = |b: usize| b as f64 / 1e6;
        println!(
            "| {w} | {big} | {:.1} MB | {:.1} MB | {:.1} MB | {:.2} |",
            mb(peaks[0]),
            mb(peaks[1]),
            mb(peaks[2]),
            peaks[2] as f64 / peaks[0] as f64
        );
    }
    Ok(())
}
