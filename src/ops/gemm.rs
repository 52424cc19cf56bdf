//! Matrix products on host slices, written straight into (or added onto) their destination
//! through the `gemm` crate, the GEMM candle's CPU backend uses. The explicit encoder backward
//! builds on these so that a gradient is written once, where it lives.

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
}
