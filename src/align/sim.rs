//! Similarity matrices between the words of a source and a target sentence.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Rows of a row-major `[rows, dim]` matrix scaled to unit L2 norm (norms accumulated in f64);
/// a zero row stays zero, so it has cosine 0 with everything (as scikit-learn's
/// `cosine_similarity`, which SimAlign uses).
pub fn l2_normalize_rows(rows: &[f32], dim: usize) -> Vec<f32> {
    let mut out = rows.to_vec();
    for row in out.chunks_mut(dim.max(1)) {
        let norm = row
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            for x in row {
                *x = (f64::from(*x) / norm) as f32;
            }
        }
    }
    out
}

/// `a · bᵀ` for row-major `a: [m, k]` and `b: [n, k]`, in f32, row-major `[m, n]`.
fn gemm_abt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Result<Vec<f32>> {
    let a = Tensor::from_slice(a, (m, k), &Device::Cpu)?;
    let b = Tensor::from_slice(b, (n, k), &Device::Cpu)?;
    Ok(a.matmul(&b.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// How word vectors are compared to build a [`SimMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    /// Cosine similarity, in `[-1, 1]`.
    Cosine,
    /// SimAlign's similarity: `(cosine + 1) / 2`, in `[0, 1]`. SimAlign's argmax, itermax and
    /// match methods are defined on it (itermax multiplies similarities by masks in `[0, 1]`, so
    /// it needs non-negative values).
    ScaledCosine,
    /// Dot product of the raw vectors, as awesome-align's softmax extraction uses.
    Dot,
}

/// A dense `rows x cols` matrix of finite similarities; row `i` is source word `i`, column `j`
/// target word `j`. Either side may be empty.
#[derive(Debug, Clone, PartialEq)]
pub struct SimMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl SimMatrix {
    /// A matrix from row-major values; every value must be finite.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::ShapeMismatch {
                name: "similarity matrix".into(),
                expected: vec![rows, cols],
                actual: vec![data.len()],
            });
        }
        if let Some(pos) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "similarity ({}, {}) is {}, not a finite number",
                pos / cols.max(1),
                pos % cols.max(1),
                data[pos]
            )));
        }
        Ok(Self { rows, cols, data })
    }

    /// A matrix from rows of equal length (`cols` is 0 when `rows` is empty).
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let cols = rows.first().map_or(0, Vec::len);
        if let Some(r) = rows.iter().find(|r| r.len() != cols) {
            return Err(Error::ShapeMismatch {
                name: "similarity row".into(),
                expected: vec![cols],
                actual: vec![r.len()],
            });
        }
        Self::new(rows.len(), cols, rows.concat())
    }

    /// Compares every source vector with every target vector. All vectors must have the same
    /// length. A zero vector has cosine 0 with everything.
    pub fn compute(src: &[Vec<f32>], tgt: &[Vec<f32>], kind: Similarity) -> Result<Self> {
        let dim = src.first().or(tgt.first()).map_or(0, Vec::len);
        if let Some(v) = src.iter().chain(tgt).find(|v| v.len() != dim) {
            return Err(Error::ShapeMismatch {
                name: "word vector".into(),
                expected: vec![dim],
                actual: vec![v.len()],
            });
        }
        Self::from_flat(&src.concat(), &tgt.concat(), dim, kind)
    }

    /// Like [`SimMatrix::compute`] on row-major `[rows, dim]` and `[cols, dim]` matrices: one
    /// f32 GEMM (candle's CPU matmul), after [`l2_normalize_rows`] for the cosine kinds.
    pub fn from_flat(src: &[f32], tgt: &[f32], dim: usize, kind: Similarity) -> Result<Self> {
        if dim == 0 || src.len() % dim != 0 || tgt.len() % dim != 0 {
            if src.is_empty() && tgt.is_empty() {
                return Self::new(0, 0, Vec::new());
            }
            return Err(Error::InvalidArgument(format!(
                "similarity inputs of {} and {} values are not rows of {dim} values",
                src.len(),
                tgt.len()
            )));
        }
        let (rows, cols) = (src.len() / dim, tgt.len() / dim);
        if rows == 0 || cols == 0 {
            return Self::new(rows, cols, Vec::new());
        }
        let data = match kind {
            Similarity::Dot => gemm_abt(src, tgt, rows, cols, dim)?,
            Similarity::Cosine | Similarity::ScaledCosine => {
                let (s, t) = (l2_normalize_rows(src, dim), l2_normalize_rows(tgt, dim));
                let mut cos = gemm_abt(&s, &t, rows, cols, dim)?;
                // Rounding can take a unit vector's cosine with itself just past 1.
                for c in &mut cos {
                    *c = c.clamp(-1.0, 1.0);
                    if kind == Similarity::ScaledCosine {
                        *c = (*c + 1.0) / 2.0;
                    }
                }
                cos
            }
        };
        Self::new(rows, cols, data)
    }

    /// Number of source words.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of target words.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// True when either side has no words.
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }

    /// The similarity of source word `i` and target word `j`.
    ///
    /// # Panics
    /// When `i` or `j` is out of range.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.rows && j < self.cols,
            "({i}, {j}) outside {}x{}",
            self.rows,
            self.cols
        );
        self.data[i * self.cols + j]
    }

    /// Row `i` (source word `i` against every target word).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// SimAlign's distortion prior: every entry is multiplied by
    /// `1 - ratio * (j / (cols - 1) - i / (rows - 1))^2`, which favours links near the
    /// diagonal. As in SimAlign, a matrix with fewer than 2 rows or columns, or `ratio == 0`, is
    /// returned unchanged. SimAlign's default when enabled is `ratio = 0.5`.
    pub fn with_distortion(&self, ratio: f32) -> Self {
        if self.rows < 2 || self.cols < 2 || ratio == 0.0 {
            return self.clone();
        }
        let mut out = self.clone();
        for i in 0..self.rows {
            let y = i as f64 / (self.rows - 1) as f64;
            for j in 0..self.cols {
                let x = j as f64 / (self.cols - 1) as f64;
                let factor = 1.0 - (x - y).powi(2) * f64::from(ratio);
                out.data[i * self.cols + j] =
                    (f64::from(self.data[i * self.cols + j]) * factor) as f32;
            }
        }
        out
    }
}
