//! Memory of one data-parallel rank's CZ-NCE blocks in the cached loss, counted by the
//! allocator: every rank holds all `N = W·n` rows' embeddings; before, each rank evaluated the
//! whole `[N, N]` loss (the fused op), now it evaluates its own `n` rows
//! ([`CzNce::forward_rows`], `[n, N]` blocks). This program plays one rank at a time in one
//! process and reports the peak bytes allocated during the loss's forward and backward, above
//! the embeddings themselves, which both paths share.
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

/// Forward and backward of rank 0's loss: the whole batch, or rows `0..n` of it.
fn rank_step(q: &Var, k: &Var, rows: Option<usize>) -> mlctl::Result<()> {
    let loss = CzNce::new();
    let value = match rows {
        None => loss.forward(q.as_tensor(), k.as_tensor())?,
        Some(n) => loss.forward_rows(q.as_tensor(), k.as_tensor(), 0..n)?,
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
    println!("| W | N | before: `[N, N]` fused | after: `[n, N]` rows | after / before |");
    println!("|---|---|---|---|---|");
    for w in [1usize, 2, 4, 8] {
        let big = w * n;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (big, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (big, d), &dev)?)?;
        assert_eq!(q.dtype(), DType::F32);
        // One rank keeps the fused whole-batch path.
        let rows = (w > 1).then_some(n);
        // Each once unmeasured: the GEMM's per-thread packing buffers grow to the largest
        // product seen and stay, and would count against whichever ran first.
        rank_step(&q, &k, None)?;
        rank_step(&q, &k, rows)?;
        let before = peak_during(|| rank_step(&q, &k, None))?;
        let after = peak_during(|| rank_step(&q, &k, rows))?;
        let mb = |b: usize| b as f64 / 1e6;
        println!(
            "| {w} | {big} | {:.1} MB | {:.1} MB | {:.2} |",
            mb(before),
            mb(after),
            after as f64 / before as f64
        );
    }
    Ok(())
}
