//! Matrix products on host slices, written straight into (or added onto) their destination
//! through the `gemm` crate, the GEMM candle's CPU backend uses. The explicit encoder backward
//! builds on these so that a gradient is written once, where it lives.

use rayon::prelude::*;

use super::num::Real;

/// A strided read-only matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a, T> View<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "view larger than its slice");
        View {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// A `rows × cols` block of a row-major matrix whose rows are `stride` apart; `data` starts
    /// at the block's first element.
    pub fn block(data: &'a [T], rows: usize, cols: usize, stride: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: stride as isize,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows as isize - 1) * self.rs + (self.cols as isize - 1) * self.cs;
            assert!(
                last >= 0 && (last as usize) < self.data.len(),
                "view out of bounds"
            );
        }
    }
}

/// How a product runs: spread over rayon's pool, or on the calling thread (inside a task that
/// is already one of many).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Every thread of the pool.
    Pool,
    /// The calling thread only.
    One,
}

thread_local! {
    /// Set while this thread runs a task that is already one of many (see
    /// [`on_calling_thread`]): every product it starts then stays on it.
    static ON_CALLING_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every product it starts on the calling thread, whatever its [`Threads`].
///
/// For work split into independent tasks, one per thread (a batch's sequences in inference): the
/// threads then run whole tasks without meeting at every product. Other passes inside `f` may
/// still use rayon's pool; when every thread is busy they stay where they are.
pub(crate) fn on_calling_thread<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON_CALLING_THREAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ON_CALLING_THREAD.with(|c| c.replace(true)));
    f()
}

/// `dst = [dst +] alpha · lhs · rhs`, with `dst` an `m × n` row-major block whose rows are
/// `dst_rs` apart (`dst` starts at its first element). `accumulate: false` overwrites `dst`
/// without reading it (it may hold garbage, even NaN).
pub(crate) fn gemm<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    alpha: T,
    accumulate: bool,
    threads: Threads,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    assert!(n <= dst_rs);
    assert!(m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len());
    lhs.check();
    rhs.check();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(T::ZERO);
            }
        }
        return;
    }
    let pool = rayon::current_num_threads();
    let here = ON_CALLING_THREAD.with(|c| c.get());
    let par = match threads {
        Threads::Pool if pool > 1 && !here => gemm::Parallelism::Rayon(pool),
        _ => gemm::Parallelism::None,
    };
    let padded = padded_columns(&rhs, matches!(par, gemm::Parallelism::Rayon(_)));
    let rhs = match &padded {
        Some((data, stride)) => View::block(data, n, k, *stride).t(),
        None => rhs,
    };
    // SAFETY: `T` is f32 or f64 (the only `Real` impls), which `gemm` supports; every index
    // `gemm` touches is `row * rs + col * cs` with row and col inside the dimensions checked
    // above against the slices; `dst` is uniquely borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            T::ONE,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Column strides, in bytes, that the `gemm` crate's AVX-512 kernels pack slowly: measured
/// single-threaded on an AVX-512 AMD EPYC, a right-hand side stored transposed (each column
/// contiguous) with a column stride that is a multiple of 2 KiB multiplied at 66–94 GFLOP/s
/// where the plain layout ran at 99–117 (k 512–4096, 256–1024 rows), and at 30–50 against 90–100
/// for 64–128 rows; strides of 2.5, 3 or 5 KiB lost 0–7 %. The crate's AVX2 kernels (the same
/// machine, the crate built without AVX-512) packed those strides at full speed.
const SLOW_STRIDE: usize = 2048;

/// The bytes a padded column stride adds: one cache line.
const PAD_BYTES: usize = 64;

/// `rhs` (`k × n`) copied by [`padded_copy`] when the `gemm` crate would pack it slowly
/// ([`packs_slowly`]); `None` otherwise.
fn padded_columns<T: Real>(rhs: &View<'_, T>, parallel: bool) -> Option<(Vec<T>, usize)> {
    (packs_slowly(rhs) && gemm_runs_avx512()).then(|| padded_copy(rhs, parallel))
}

/// Whether `rhs` is stored transposed with a column stride that is a multiple of
/// [`SLOW_STRIDE`] and columns at least that long: the weight of a linear layer whose input
/// width is a multiple of 512 (f32). The copy costs far less than the packing it saves there.
fn packs_slowly<T: Real>(rhs: &View<'_, T>) -> bool {
    let size = std::mem::size_of::<T>();
    rhs.rs == 1
        && rhs.cs > 0
        && (rhs.cs as usize * size) % SLOW_STRIDE == 0
        && rhs.rows * size >= SLOW_STRIDE
        && rhs.cols > 1
}

/// Whether the `gemm` crate runs its AVX-512 kernels here (it checks the same feature).
fn gemm_runs_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `rhs` (`k × n`, columns contiguous) copied to columns `k + 64 bytes` apart, reading and
/// writing the matrix once. Returns the copy and its column stride in elements.
fn padded_copy<T: Real>(rhs: &View<'_, T>, parallel: bool) -> (Vec<T>, usize) {
    let size = std::mem::size_of::<T>();
    let (k, n) = (rhs.rows, rhs.cols);
    assert_eq!(rhs.rs, 1, "columns must be contiguous");
    let stride = k + PAD_BYTES / size;
    let src = rhs.cs as usize;
    let mut out = Vec::with_capacity(n * stride);
    let copy = |(c, column): (usize, &mut [std::mem::MaybeUninit<T>])| {
        let from = &rhs.data[c * src..c * src + k];
        for (d, s) in column.iter_mut().zip(from) {
            d.write(*s);
        }
        for d in &mut column[k..] {
            d.write(T::ZERO);
        }
    };
    let spare = &mut out.spare_capacity_mut()[..n * stride];
    match parallel {
        true => spare.par_chunks_mut(stride).enumerate().for_each(copy),
        false => spare.chunks_mut(stride).enumerate().for_each(copy),
    }
    // SAFETY: the loops above wrote every one of the first `n * stride` elements.
    unsafe { out.set_len(n * stride) };
    (out, stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_into_blocks_and_onto_them_match_the_definition() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        // Written into columns 2..5 of an m × 6 matrix full of NaN, then added onto.
        let mut dst = vec![f64::NAN; m * 6];
        let (va, vb) = (View::rows(&a, m, k), View::rows(&b, k, n));
        gemm(&mut dst[2..], 6, va, vb, 1.0, false, Threads::Pool);
        gemm(&mut dst[2..], 6, va, vb, 0.5, true, Threads::One);
        for i in 0..m {
            for j in 0..n {
                assert!((dst[i * 6 + 2 + j] - 1.5 * want[i * n + j]).abs() < 1e-12);
            }
            assert!(dst[i * 6].is_nan() && dst[i * 6 + 1].is_nan());
        }
        // A transposed view: (bᵀ)ᵀ = b.
        let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c = vec![0.0; m * n];
        gemm(
            &mut c,
            n,
            va,
            View::rows(&bt, n, k).t(),
            1.0,
            false,
            Threads::Pool,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    /// `a · rhs` through [`gemm`], serially and on the pool, checked against `want` within `tol`.
    fn check_product<T: Real + Into<f64>>(a: &[T], rhs: View<'_, T>, want: &[f64], tol: f64) {
        let (m, n) = (a.len() / rhs.rows, rhs.cols);
        for threads in [Threads::One, Threads::Pool] {
            let mut c = vec![T::lit(f64::NAN); m * n];
            gemm(
                &mut c,
                n,
                View::rows(a, m, rhs.rows),
                rhs,
                T::ONE,
                false,
                threads,
            );
            for (c, w) in c.into_iter().zip(want) {
                let c: f64 = c.into();
                assert!((c - w).abs() <= tol, "{c} {w}");
            }
        }
    }

    /// [`check_product`] through an explicit [`padded_copy`] of `rhs`, made serially and on the
    /// pool; the copy's own stride is not one the rule picks again.
    fn check_padded_copy<T: Real + Into<f64>>(a: &[T], rhs: &View<'_, T>, want: &[f64], tol: f64) {
        for parallel in [false, true] {
            let (copy, stride) = padded_copy(rhs, parallel);
            let padded = View::block(&copy, rhs.cols, rhs.rows, stride).t();
            assert!(!packs_slowly(&padded));
            check_product(a, padded, want, tol);
        }
    }

    /// A right-hand side stored transposed at a 2 KiB-multiple column stride, its columns
    /// shorter than their stride (NaN in the gap): the stride rule picks it, and its product is
    /// the definition's both as it is (copied first where `gemm` runs AVX-512) and through an
    /// explicit padded copy (on every CPU), in f64 and f32.
    #[test]
    fn transposed_right_sides_at_slow_strides_match_the_definition() {
        let (m, k, n, stride) = (3, 600, 5, 1024);
        let mut bt = vec![f64::NAN; n * stride];
        for c in 0..n {
            for r in 0..k {
                bt[c * stride + r] = ((r * n + c) as f64 * 0.13).cos();
            }
        }
        let b: Vec<f64> = (0..k * n).map(|i| bt[(i % n) * stride + i / n]).collect();
        // |a| ≤ 1/k and |b| ≤ 1, so each entry's terms sum to at most 1 in absolute value.
        let a: Vec<f64> = (0..m * k)
            .map(|i| (i as f64 * 0.37).sin() / k as f64)
            .collect();
        let want = naive(&a, &b, m, k, n);
        let (a32, bt32): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|&x| x as f32).collect(),
            bt.iter().map(|&x| x as f32).collect(),
        );
        // Any order of summing k terms whose magnitudes sum to at most 1 errs by at most
        // γ_k ≈ k·u (u = ε/2), FMA or not; the reference errs as much again. In f32 the inputs'
        // rounding adds 2·u₃₂ and the accumulation k·u₃₂: (k + 2)·u₃₂ ≤ 2k·ε₃₂.
        let (tol64, tol32) = (
            k as f64 * f64::EPSILON,
            2.0 * k as f64 * f32::EPSILON as f64,
        );
        let rhs = View::block(&bt, n, k, stride).t();
        let rhs32 = View::block(&bt32, n, k, stride).t();
        assert!(packs_slowly(&rhs) && packs_slowly(&rhs32));
        check_product(&a, rhs, &want, tol64);
        check_product(&a32, rhs32, &want, tol32);
        check_padded_copy(&a, &rhs, &want, tol64);
        check_padded_copy(&a32, &rhs32, &want, tol32);
    }
}
