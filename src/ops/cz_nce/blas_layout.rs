//! Row-major products through a column-major BLAS (cuBLAS): the argument mapping used by the
//! CUDA path, kept free of CUDA types so that it is tested on every machine.
//!
//! A row-major `r × c` matrix with row stride `ld` is, read column-major, the `c × r` matrix
//! of its transpose with leading dimension `ld`. So the row-major `C = op(A)·op(B)` is the
//! column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: swap the operands, swap `m` and `n`, and keep each
//! operand's transpose flag (a row-major operand read column-major is already transposed, and
//! the product needs it transposed once more). The test runs the mapping through a reference
//! column-major GEMM.

/// The arguments of a column-major `C = α·op(A)·op(B) + β·C` call (cuBLAS `gemm`), where
/// BLAS' `A` is the row-major right operand and BLAS' `B` the row-major left operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColMajorGemm {
    /// Transpose BLAS' `A` (the row-major right operand).
    pub trans_a: bool,
    /// Transpose BLAS' `B` (the row-major left operand).
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// The column-major call for the row-major `C (m × n, row stride ldc) = op(L)·op(R)`, where
/// `op(L)` is `m × k`, stored row-major as `m × k` (`l_t = false`) or `k × m` (`l_t = true`)
/// with row stride `ldl`, and likewise `op(R)` (`k × n`; stored `k × n` or `n × k`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn row_major_gemm(
    (m, n, k): (usize, usize, usize),
    (l_t, ldl): (bool, usize),
    (r_t, ldr): (bool, usize),
    ldc: usize,
) -> ColMajorGemm {
    ColMajorGemm {
        trans_a: r_t,
        trans_b: l_t,
        m: n,
        n: m,
        k,
        lda: ldr,
        ldb: ldl,
        ldc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major GEMM exactly as the BLAS reference defines it (`C = op(A)·op(B) + β·C`,
    /// element (i, j) of a column-major matrix with leading dimension `ld` at `i + j·ld`).
    fn blas_gemm(g: ColMajorGemm, a: &[f64], b: &[f64], beta: f64, c: &mut [f64]) {
        let op_a = |i: usize, p: usize| {
            if g.trans_a {
                a[p + i * g.lda]
            } else {
                a[i + p * g.lda]
            }
        };
        let op_b = |p: usize, j: usize| {
            if g.trans_b {
                b[j + p * g.ldb]
            } else {
                b[p + j * g.ldb]
            }
        };
        for i in 0..g.m {
            for j in 0..g.n {
                let s: f64 = (0..g.k).map(|p| op_a(i, p) * op_b(p, j)).sum();
                let at = i + j * g.ldc;
                c[at] = s + beta * c[at];
            }
        }
    }

    #[test]
    fn row_major_products_through_column_major_blas() {
        let value = |seed: usize| ((seed * 7919 % 101) as f64 - 50.0) / 17.0;
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 2), (4, 2, 7), (6, 6, 6)] {
            for l_t in [false, true] {
                for r_t in [false, true] {
                    for pad in [0, 3] {
                        // Stored shapes (row-major) and row strides with padding columns.
                        let (l_rows, l_cols) = if l_t { (k, m) } else { (m, k) };
                        let (r_rows, r_cols) = if r_t { (n, k) } else { (k, n) };
                        let (ldl, ldr, ldc) = (l_cols + pad, r_cols + pad, n + pad);
                        let l: Vec<f64> = (0..l_rows * ldl).map(value).collect();
                        let r: Vec<f64> = (0..r_rows * ldr).map(|i| value(i + 1000)).collect();
                        let get_l = |i: usize, p: usize| {
                            if l_t {
                                l[p * ldl + i]
                            } else {
                                l[i * ldl + p]
                            }
                        };
                        let get_r = |p: usize, j: usize| {
                            if r_t {
                                r[j * ldr + p]
                            } else {
                                r[p * ldr + j]
                            }
                        };
                        let c0: Vec<f64> = (0..m * ldc).map(|i| value(i + 2000)).collect();
                        for beta in [0.0, 1.0] {
                            let mut c = c0.clone();
                            let g = row_major_gemm((m, n, k), (l_t, ldl), (r_t, ldr), ldc);
                            blas_gemm(g, &r, &l, beta, &mut c);
                            for i in 0..m {
                                for j in 0..n {
                                    let want: f64 =
                                        (0..k).map(|p| get_l(i, p) * get_r(p, j)).sum::<f64>()
                                            + beta * c0[i * ldc + j];
                                    let got = c[i * ldc + j];
                                    assert!(
                                        (got - want).abs() < 1e-12,
                                        "m={m} n={n} k={k} l_t={l_t} r_t={r_t} pad={pad} beta={beta} ({i},{j}): {got} vs {want}"
                                    );
                                }
                                // Padding columns are never written.
                                for j in n..ldc {
                                    assert_eq!(c[i * ldc + j], c0[i * ldc + j]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
