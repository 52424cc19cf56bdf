//! Word alignments and the methods that extract them from a [`SimMatrix`].

use std::fmt;

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;

use super::sim::{SimMatrix, Similarity};
use crate::{Error, Result};

/// A set of links `(i, j)` between source word `i` and target word `j` (0-based), kept sorted
/// and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Alignment {
    links: Vec<(usize, usize)>,
}

impl Alignment {
    /// An alignment from links in any order; duplicates are dropped.
    pub fn new(mut links: Vec<(usize, usize)>) -> Self {
        links.sort_unstable();
        links.dedup();
        Self { links }
    }

    /// The links, sorted by source then target index.
    pub fn links(&self) -> &[(usize, usize)] {
        &self.links
    }

    /// Number of links.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// True when there is no link.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Whether `(i, j)` is a link.
    pub fn contains(&self, i: usize, j: usize) -> bool {
        self.links.binary_search(&(i, j)).is_ok()
    }

    /// The links in Pharaoh format: `i-j` pairs, 0-based, separated by single spaces (the empty
    /// string for no link).
    pub fn to_pharaoh(&self) -> String {
        self.to_string()
    }

    /// Parses one Pharaoh line (`i-j` pairs, 0-based, separated by whitespace). The error is
    /// the reason, for the caller to attach a file and line.
    pub fn parse_pharaoh(line: &str) -> std::result::Result<Self, String> {
        line.split_whitespace()
            .map(|pair| {
                let (i, j) = pair
                    .split_once('-')
                    .ok_or_else(|| format!("`{pair}` is not an `i-j` link"))?;
                let parse = |s: &str| {
                    s.parse::<usize>()
                        .map_err(|_| format!("`{pair}`: `{s}` is not a non-negative integer"))
                };
                Ok((parse(i)?, parse(j)?))
            })
            .collect::<std::result::Result<Vec<_>, String>>()
            .map(Self::new)
    }
}

impl FromIterator<(usize, usize)> for Alignment {
    fn from_iter<T: IntoIterator<Item = (usize, usize)>>(iter: T) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

impl fmt::Display for Alignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, (i, j)) in self.links.iter().enumerate() {
            if k > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{i}-{j}")?;
        }
        Ok(())
    }
}

/// A way to turn a similarity matrix into links.
///
/// Methods never fail: an empty side gives an empty alignment.
pub trait AlignMethod: Send + Sync {
    /// Short name (`argmax`, `itermax`, `match`, `softmax`).
    fn name(&self) -> &'static str;

    /// The similarity the method expects its matrix to hold. The pipeline
    /// ([`super::WordAligner`]) builds the matrix accordingly.
    fn similarity(&self) -> Similarity {
        Similarity::ScaledCosine
    }

    /// Extracts the links.
    fn align(&self, sim: &SimMatrix) -> Alignment;
}

/// Index of the largest value; the first one on ties (as NumPy's `argmax`).
fn first_argmax(values: impl Iterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (k, v) in values.enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map(|(k, _)| k)
}

fn row_argmax(sim: &SimMatrix, i: usize) -> Option<usize> {
    first_argmax(sim.row(i).iter().copied())
}

fn col_argmax(sim: &SimMatrix, j: usize) -> Option<usize> {
    first_argmax((0..sim.rows()).map(|i| sim.get(i, j)))
}

/// SimAlign's `argmax` ("inter"): `(i, j)` is a link when `j` is the best target of `i` and
/// `i` the best source of `j`.
///
/// Ties: the first (lowest) index wins, as NumPy's `argmax`, for rows and for columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArgMax;

impl AlignMethod for ArgMax {
    fn name(&self) -> &'static str {
        "argmax"
    }

    fn align(&self, sim: &SimMatrix) -> Alignment {
        if sim.is_empty() {
            return Alignment::default();
        }
        let col_best: Vec<usize> = (0..sim.cols()).filter_map(|j| col_argmax(sim, j)).collect();
        (0..sim.rows())
            .filter_map(|i| {
                row_argmax(sim, i)
                    .filter(|&j| col_best[j] == i)
                    .map(|j| (i, j))
            })
            .collect()
    }
}

/// SimAlign's `itermax`: mutual argmax, then up to `max_iter - 1` more rounds that add the
/// mutual argmaxes of a masked matrix.
///
/// A round, exactly as SimAlign's `iter_max`: with `x_i = 1` when source `i` has no link yet
/// and `y_j = 1` when target `j` has none, similarities are multiplied by
/// `min(1, alpha * x_i + alpha * y_j)` (so a cell whose row and column are both free keeps its
/// value, a cell with one side already linked is discounted by `alpha`, and a cell whose row and
/// column are both linked becomes 0); the mutual argmaxes (first index on ties) of that matrix
/// are added where the row or the column is still free. It stops when a round adds nothing,
/// when every row or every column is linked, or after `max_iter` rounds in all. As in SimAlign,
/// a matrix with 2 or fewer rows or columns gets only the first (argmax) round.
///
/// Defaults: `max_iter = 2`, `alpha = 0.9`. The masking assumes non-negative similarities
/// ([`Similarity::ScaledCosine`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterMax {
    /// Rounds in all, the first (plain argmax) included; SimAlign uses 2.
    pub max_iter: usize,
    /// The discount for a cell whose row or column is already linked; SimAlign uses 0.9.
    pub alpha: f32,
}

impl Default for IterMax {
    fn default() -> Self {
        Self {
            max_iter: 2,
            alpha: 0.9,
        }
    }
}

impl AlignMethod for IterMax {
    fn name(&self) -> &'static str {
        "itermax"
    }

    fn align(&self, sim: &SimMatrix) -> Alignment {
        let (m, n) = (sim.rows(), sim.cols());
        let first = ArgMax.align(sim);
        if m.min(n) <= 2 {
            return first;
        }
        let mut linked = vec![false; m * n];
        for &(i, j) in first.links() {
            linked[i * n + j] = true;
        }
        let alpha = f64::from(self.alpha);
        let mut count = 1;
        while count < self.max_iter {
            let row_free: Vec<bool> = (0..m)
                .map(|i| !linked[i * n..(i + 1) * n].iter().any(|&l| l))
                .collect();
            let col_free: Vec<bool> = (0..n).map(|j| !(0..m).any(|i| linked[i * n + j])).collect();
            if !row_free.iter().any(|&f| f) || !col_free.iter().any(|&f| f) {
                break;
            }
            let masked: Vec<f32> = (0..m * n)
                .map(|k| {
                    let (i, j) = (k / n, k % n);
                    let x = if row_free[i] { alpha } else { 0.0 };
                    let y = if col_free[j] { alpha } else { 0.0 };
                    (f64::from(sim.get(i, j)) * (x + y).min(1.0)) as f32
                })
                .collect();
            let masked = SimMatrix::new(m, n, masked).expect("finite values in, finite values out");
            let added: Vec<(usize, usize)> = ArgMax
                .align(&masked)
                .links()
                .iter()
                .copied()
                .filter(|&(i, j)| row_free[i] || col_free[j])
                .collect();
            if added.is_empty() {
                break;
            }
            for (i, j) in added {
                linked[i * n + j] = true;
            }
            count += 1;
        }
        (0..m * n)
            .filter(|&k| linked[k])
            .map(|k| (k / n, k % n))
            .collect()
    }
}

/// SimAlign's `match` (`mwmf`): the maximum-weight bipartite matching of size
/// `min(rows, cols)`, by the Kuhn-Munkres (Hungarian) algorithm of the `pathfinding` crate.
///
/// `pathfinding` needs integer weights: similarities are mapped affinely onto
/// `0..=2^30` (`round((s - min) / (max - min) * 2^30)`, all 0 when every value is equal) and
/// rounded to `i64`. Adding a constant to every weight does not change which full matching is
/// heaviest, and `2^30` steps keep f32 values in `[0.5, 1]` (24-bit mantissa) distinct, so the
/// result is the float optimum unless two matchings' total weights differ by less than about
/// `min(rows, cols) * 2^-30` of the value range. Among equally heavy matchings the one
/// `pathfinding` returns is kept (deterministic, but no particular one is promised).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaxWeightMatch;

/// Number of integer steps the value range of a matrix is mapped onto for [`MaxWeightMatch`].
pub(crate) const MATCH_SCALE: f64 = (1u64 << 30) as f64;

impl AlignMethod for MaxWeightMatch {
    fn name(&self) -> &'static str {
        "match"
    }

    fn align(&self, sim: &SimMatrix) -> Alignment {
        if sim.is_empty() {
            return Alignment::default();
        }
        let lo = sim.data().iter().copied().fold(f32::INFINITY, f32::min);
        let hi = sim.data().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let range = f64::from(hi) - f64::from(lo);
        let weight = |v: f32| -> i64 {
            if range > 0.0 {
                ((f64::from(v) - f64::from(lo)) / range * MATCH_SCALE).round() as i64
            } else {
                0
            }
        };
        let transpose = sim.rows() > sim.cols();
        let (r, c) = if transpose {
            (sim.cols(), sim.rows())
        } else {
            (sim.rows(), sim.cols())
        };
        let weights = Matrix::from_fn(r, c, |(a, b)| {
            if transpose {
                weight(sim.get(b, a))
            } else {
                weight(sim.get(a, b))
            }
        });
        let (_, assignment) = kuhn_munkres(&weights);
        assignment
            .into_iter()
            .enumerate()
            .map(|(a, b)| if transpose { (b, a) } else { (a, b) })
            .collect()
    }
}

/// awesome-align's `softmax` extraction: a softmax over each row (source to target) and over
/// each column (target to source) of the dot-product matrix; `(i, j)` is a link when both
/// probabilities are strictly above `threshold` (awesome-align's default 0.001).
///
/// No ties to break. Computed in f64 with the maximum subtracted before exponentiating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxAlign {
    /// Both probabilities must exceed it; awesome-align uses 0.001.
    pub threshold: f64,
}

impl Default for SoftmaxAlign {
    fn default() -> Self {
        Self { threshold: 1e-3 }
    }
}

fn softmax(values: &[f64]) -> Vec<f64> {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// awesome-align's extraction rule: normalise every row and every column of `sim` with
/// `normalize` and keep `(i, j)` where both the row and the column probability exceed
/// `threshold`.
fn bidirectional(sim: &SimMatrix, normalize: fn(&[f64]) -> Vec<f64>, threshold: f64) -> Alignment {
    if sim.is_empty() {
        return Alignment::default();
    }
    let (m, n) = (sim.rows(), sim.cols());
    let fwd: Vec<Vec<f64>> = (0..m)
        .map(|i| normalize(&sim.row(i).iter().map(|&v| f64::from(v)).collect::<Vec<_>>()))
        .collect();
    let bwd: Vec<Vec<f64>> = (0..n)
        .map(|j| normalize(&(0..m).map(|i| f64::from(sim.get(i, j))).collect::<Vec<_>>()))
        .collect();
    (0..m)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .filter(|&(i, j)| fwd[i][j] > threshold && bwd[j][i] > threshold)
        .collect()
}

impl AlignMethod for SoftmaxAlign {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn similarity(&self) -> Similarity {
        Similarity::Dot
    }

    fn align(&self, sim: &SimMatrix) -> Alignment {
        bidirectional(sim, softmax, self.threshold)
    }
}

/// Sparsemax (Martins and Astudillo, 2016), the Euclidean projection of `z` onto the simplex:
/// `max(z - tau, 0)` with `tau` chosen so the result sums to 1.
fn sparsemax(z: &[f64]) -> Vec<f64> {
    let mut sorted = z.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let (mut cumsum, mut tau) = (0.0, 0.0);
    for (k, &v) in sorted.iter().enumerate() {
        cumsum += v;
        let candidate = (cumsum - 1.0) / (k + 1) as f64;
        if v > candidate {
            tau = candidate;
        } else {
            break;
        }
    }
    z.iter().map(|&v| (v - tau).max(0.0)).collect()
}

/// awesome-align's softmax rule with sparsemax in place of softmax (in the spirit of its
/// `entmax` option, which uses the 1.5-entmax; this crate implements sparsemax, i.e. 2-entmax):
/// sparsemax over each row and each column of the dot-product matrix, `(i, j)` is a link when
/// both probabilities are strictly above `threshold` (default 0: both non-zero).
///
/// Every row and column keeps its maximum with a non-zero probability, but a link needs both
/// directions, so a pair may get no link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SparsemaxAlign {
    /// Both probabilities must exceed it; 0 by default.
    pub threshold: f64,
}

impl AlignMethod for SparsemaxAlign {
    fn name(&self) -> &'static str {
        "sparsemax"
    }

    fn similarity(&self) -> Similarity {
        Similarity::Dot
    }

    fn align(&self, sim: &SimMatrix) -> Alignment {
        bidirectional(sim, sparsemax, self.threshold)
    }
}

/// The method names [`method_by_name`] accepts.
pub const METHOD_NAMES: [&str; 5] = ["argmax", "itermax", "match", "softmax", "sparsemax"];

/// A method with its default settings by name: `argmax` (alias `inter`), `itermax`, `match`
/// (alias `mwmf`), `softmax` or `sparsemax`.
pub fn method_by_name(name: &str) -> Result<Box<dyn AlignMethod>> {
    Ok(match name {
        "argmax" | "inter" => Box::new(ArgMax),
        "itermax" => Box::new(IterMax::default()),
        "match" | "mwmf" => Box::new(MaxWeightMatch),
        "softmax" => Box::new(SoftmaxAlign::default()),
        "sparsemax" => Box::new(SparsemaxAlign::default()),
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown alignment method `{other}` (expected one of {})",
                METHOD_NAMES.join(", ")
            )))
        }
    })
}

/// Drops the links whose similarity is below `threshold` (a simple null-alignment rule: a word
/// whose best match is too dissimilar stays unaligned). This is a plain similarity cut-off, not
/// SimAlign's entropy-based null extension.
pub fn drop_below(alignment: &Alignment, sim: &SimMatrix, threshold: f32) -> Alignment {
    alignment
        .links()
        .iter()
        .copied()
        .filter(|&(i, j)| i < sim.rows() && j < sim.cols() && sim.get(i, j) >= threshold)
        .collect()
}

/// One method's word links with a score for each link, in the order of
/// [`Alignment::links`] (awesome-align's `--output_prob_file`).
///
/// The score of a word link is the largest of its unit links' (one unit link for
/// `TokenType::Word`; several subword pairs may link one word pair for `TokenType::Bpe`):
/// - argmax, itermax, match (SimAlign's methods): the similarity the method linked on,
///   `(cos + 1) / 2` in `[0, 1]` (after the distortion prior, when one is set);
/// - softmax, sparsemax (awesome-align's): awesome-align's link probability, the harmonic mean
///   `2pq / (p + q)` of the source-to-target softmax `p` and the target-to-source softmax `q` of
///   the dot products, each divided by the square root of the other sentence's length in
///   units. awesome-align counts `[CLS]` and `[SEP]` in those softmaxes and lengths; mlctl's
///   units leave special tokens out, so the values are close to, not equal to, awesome-align's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoredAlignment {
    /// The links.
    pub alignment: Alignment,
    /// One score per link, in the order of `alignment.links()`.
    pub scores: Vec<f32>,
}
