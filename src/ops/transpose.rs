//! The transpose of a row-major matrix into a new buffer. CZ-NCE multiplies row-major by
//! row-major and transposes one side first (see `cz_nce::cpu::gram`): at B 64 × D 1536 its
//! transposes by tiles took a sixth of the op (a `perf` profile).

use std::mem::MaybeUninit;

use candle_core::DType;
use rayon::prelude::*;

use super::num::Real;

/// Output rows per task: 16 input columns, one 64-byte line of f32 from each input row.
const STRIP: usize = 16;

/// The transpose (`cols × rows`, row-major) of a row-major `rows × cols` matrix, spread over
/// rayon's pool when `par`.
///
/// f32 on a CPU with AVX moves `8 × 8` blocks through vector registers; other types and CPUs
/// copy `16 × 16` tiles through a local buffer, so that every read and write is still a run of
/// contiguous values. Measured on a 2-vCPU AVX-512 AMD EPYC: 64 × 1536 in 17–24 µs by blocks
/// against 46 µs by tiles (one thread), 256 × 1536 in 104 against 209 µs (two threads). (Writing
/// one element per output row at a time, to output rows far apart, took 2.6–3.5x the tiles'
/// time at 1000–1024 rows and about 1.5x at 64–256.)
pub(crate) fn transposed<T: Real>(x: &[T], rows: usize, cols: usize, par: bool) -> Vec<T> {
    assert_eq!(x.len(), rows * cols, "matrix size");
    let mut out = Vec::with_capacity(rows * cols);
    if rows == 0 || cols == 0 {
        return out;
    }
    let blocks = T::DTYPE == DType::F32 && has_avx();
    let strip = |(s, block): (usize, &mut [MaybeUninit<T>])| {
        if blocks {
            // SAFETY: `T` is f32 (checked above) and the CPU has AVX.
            unsafe { strip_by_blocks(x, rows, cols, s * STRIP, block) }
        } else {
            strip_by_tiles(x, rows, cols, s * STRIP, block)
        }
    };
    let spare = &mut out.spare_capacity_mut()[..rows * cols];
    match par {
        true => spare
            .par_chunks_mut(STRIP * rows)
            .enumerate()
            .for_each(strip),
        false => spare.chunks_mut(STRIP * rows).enumerate().for_each(strip),
    }
    // SAFETY: each strip writes every element of its output rows (both strip functions loop
    // over all `rows` input rows for each of its columns), and the strips cover the output.
    unsafe { out.set_len(rows * cols) };
    out
}

fn has_avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Output rows `c0..c0 + block.len() / rows` (input columns) through `16 × 16` tiles.
fn strip_by_tiles<T: Real>(
    x: &[T],
    rows: usize,
    cols: usize,
    c0: usize,
    block: &mut [MaybeUninit<T>],
) {
    let w = block.len() / rows;
    let mut tile = [[T::ZERO; STRIP]; STRIP];
    for r0 in (0..rows).step_by(STRIP) {
        let h = STRIP.min(rows - r0);
        for r in 0..h {
            let src = &x[(r0 + r) * cols + c0..][..w];
            for (c, &v) in src.iter().enumerate() {
                tile[c][r] = v;
            }
        }
        for (c, t) in tile.iter().enumerate().take(w) {
            for (d, &v) in block[c * rows + r0..][..h].iter_mut().zip(t) {
                d.write(v);
            }
        }
    }
}

/// [`strip_by_tiles`] for f32, by `8 × 8` blocks in AVX registers (columns and rows left over
/// one element at a time).
///
/// # Safety
/// `T` must be f32 and the CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn strip_by_blocks<T: Real>(
    x: &[T],
    rows: usize,
    cols: usize,
    c0: usize,
    block: &mut [MaybeUninit<T>],
) {
    let w = block.len() / rows;
    assert!(c0 + w <= cols && x.len() == rows * cols);
    let (src, dst) = (x.as_ptr() as *const f32, block.as_mut_ptr() as *mut f32);
    for r0 in (0..rows).step_by(8) {
        let h = 8.min(rows - r0);
        let mut c = 0;
        while c < w {
            if h == 8 && c + 8 <= w {
                // Input rows r0..r0 + 8, columns c0 + c.. + 8: inside `x`; output rows
                // c..c + 8, columns r0..r0 + 8: inside `block`.
                block_8x8(
                    src.add(r0 * cols + c0 + c),
                    cols,
                    dst.add(c * rows + r0),
                    rows,
                );
                c += 8;
            } else {
                for r in 0..h {
                    *dst.add(c * rows + r0 + r) = *src.add((r0 + r) * cols + c0 + c);
                }
                c += 1;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn strip_by_blocks<T: Real>(
    x: &[T],
    rows: usize,
    cols: usize,
    c0: usize,
    block: &mut [MaybeUninit<T>],
) {
    strip_by_tiles(x, rows, cols, c0, block)
}

/// Writes the transpose of the `8 × 8` block at `src` (rows `ss` apart) to `dst` (rows `ds`
/// apart): pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
///
/// # Safety
/// The CPU must have AVX; 8 rows of 8 values must be readable at `src` and writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn block_8x8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
    let lo: [__m256; 4] = std::array::from_fn(|i| _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]));
    let hi: [__m256; 4] = std::array::from_fn(|i| _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]));
    // u[0..4] hold rows 0–3's columns (0, 1, 2, 3) and (4, 5, 6, 7) per 128-bit half; u[4..8]
    // rows 4–7's.
    let u = [
        _mm256_shuffle_ps::<0x44>(lo[0], lo[1]),
        _mm256_shuffle_ps::<0xEE>(lo[0], lo[1]),
        _mm256_shuffle_ps::<0x44>(hi[0], hi[1]),
        _mm256_shuffle_ps::<0xEE>(hi[0], hi[1]),
        _mm256_shuffle_ps::<0x44>(lo[2], lo[3]),
        _mm256_shuffle_ps::<0xEE>(lo[2], lo[3]),
        _mm256_shuffle_ps::<0x44>(hi[2], hi[3]),
        _mm256_shuffle_ps::<0xEE>(hi[2], hi[3]),
    ];
    for i in 0..4 {
        _mm256_storeu_ps(
            dst.add(i * ds),
            _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]),
        );
        _mm256_storeu_ps(
            dst.add((i + 4) * ds),
            _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Real + std::fmt::Debug>(x: &[T], rows: usize, cols: usize) {
        for par in [false, true] {
            let t = transposed(x, rows, cols, par);
            assert_eq!(t.len(), rows * cols);
            for (r, c) in (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))) {
                assert_eq!(t[c * rows + r], x[r * cols + c], "{rows}x{cols} ({r},{c})");
            }
        }
    }

    /// Every entry lands where the definition puts it, in f32 (blocks, with rows and columns
    /// left over at both ends of 8 and 16) and f64 (tiles), serially and on the pool.
    #[test]
    fn transpose_matches_definition() {
        let shapes = [
            (0, 3),
            (3, 0),
            (1, 1),
            (8, 8),
            (17, 33),
            (33, 17),
            (64, 64),
            (5, 40),
            (24, 23),
            (9, 70),
        ];
        for (rows, cols) in shapes {
            let x: Vec<f64> = (0..rows * cols).map(|i| i as f64).collect();
            check(&x, rows, cols);
            let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            check(&x, rows, cols);
        }
    }
}
