//! Every CUDA kernel of the crate: one loader for the PTX of this folder's `.cu` files ([`Ptx`]),
//! the launch configurations, and the host side of each op. This file launches the fused
//! encoder ops, the kernels of `ops.cu` (compiled to PTX by `build.rs`) for
//! f32, f16 and bf16 storage, computing in f32. f64 has no CUDA kernel: the plain functions run
//! the composite twin for it and the `*_fused` ones return a typed error.
//!
//! Inputs reach these functions contiguous (the op wrappers call `contiguous()`); outputs are
//! fresh, contiguous buffers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

/// The PTX that `build.rs` compiles from each `.cu` file of this folder.
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ops_ptx.rs"));
    include!(concat!(env!("OUT_DIR"), "/cz_nce_ptx.rs"));
}

/// The compiled `.cu` files: each is its own CUDA module, loaded once per device.
#[derive(Clone, Copy)]
pub(crate) enum Ptx {
    /// `ops.cu`: the fused encoder ops and AdamW.
    Ops,
    /// `cz_nce.cu`: the fused CZ-NCE op.
    CzNce,
}

impl Ptx {
    /// The module's name and PTX text.
    pub(crate) fn module(self) -> (&'static str, &'static str) {
        match self {
            Ptx::Ops => ("mlctl_ops", ptx::OPS),
            Ptx::CzNce => ("mlctl_cz_nce", ptx::CZ_NCE),
        }
    }
}

/// Loads kernel `$name` of `$ptx` (a [`Ptx`]) on `$dev`; the module is loaded on first use.
/// (A macro: candle does not export the type of the loaded function.)
macro_rules! load_func {
    ($dev:expr, $ptx:expr, $name:expr) => {{
        let (module, text) = $ptx.module();
        $dev.get_or_load_custom_func($name, module, text)
    }};
}

/// The storage types with kernels, with the suffix of their kernel names.
pub(crate) trait Kernel: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}

impl Kernel for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Kernel for half::f16 {
    const SUFFIX: &'static str = "f16";
}

impl Kernel for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Runs `$body` with `$T` bound to the storage type of `$dtype` (f32, f16, bf16).
macro_rules! dispatch_cuda {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, $op)),
        }
    };
}

/// Loads kernel `$name` for storage type `$T` (the module is loaded once per device).
macro_rules! func {
    ($dev:expr, $name:literal, $T:ty) => {
        load_func!(
            $dev,
            Ptx::Ops,
            &format!("{}_{}", $name, <$T as Kernel>::SUFFIX)
        )
    };
}

// Declared after the macros above, which they use.
pub(crate) mod adamw;
pub(crate) mod cz_nce;

/// The contiguous elements of `s` under `l`.
pub(crate) fn view<'a, T: Kernel>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("fused op (cuda): input is not contiguous"),
    }
}

/// Threads per block of a row kernel for rows of `n`: one element per thread up to 1024
/// threads, a multiple of 32 as `block_sum` needs.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn rows_cfg(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(n), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` work items.
pub(crate) fn elementwise_cfg(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An output buffer of `n` elements that the kernel writes entirely.
pub(crate) fn output<T: Kernel>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements before any read (or
    // `n` is 0).
    unsafe { dev.alloc::<T>(n) }
}

fn i32_arg(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| candle_core::Error::Msg(format!("fused op (cuda): {what} {x} exceeds i32")))
}

/// LayerNorm forward: `(y, mean, rstd)`, one block per row.
pub(crate) fn layer_norm_fwd(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<(CudaStorage, CudaSlice<f32>, CudaSlice<f32>)> {
    let dev = x.device.clone();
    let hidden = xl.dims().last().copied().unwrap_or(1);
    let n = xl.shape().elem_count();
    let rows = n.checked_div(hidden).unwrap_or(0);
    dispatch_cuda!(x.dtype(), "fused-layer-norm", |T| {
        let mut y = output::<T>(&dev, n)?;
        let mut mean = output::<f32>(&dev, rows)?;
        let mut rstd = output::<f32>(&dev, rows)?;
        if rows > 0 {
            let (xv, wv, bv) = (view::<T>(x, xl)?, view::<T>(w, wl)?, view::<T>(b, bl)?);
            let (h, e) = (i32_arg(hidden, "hidden size")?, eps as f32);
            let f = func!(dev, "ln_fwd", T)?;
            let mut args = f.builder();
            args.arg(&xv)
                .arg(&wv)
                .arg(&bv)
                .arg(&h)
                .arg(&e)
                .arg(&mut y)
                .arg(&mut mean)
                .arg(&mut rstd);
            // SAFETY: block r reads row r of x (rows·hidden elements) and hidden elements of w
            // and b; it writes row r of y and entry r of mean and rstd.
            unsafe { args.launch(rows_cfg(rows, hidden)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), mean, rstd))
    })
}

/// Rows per block of the LayerNorm backward: at most 1024 blocks, each writing `2 · hidden`
/// partial sums.
fn ln_bwd_blocks(rows: usize) -> (usize, usize) {
    let per_block = rows.div_ceil(1024).max(1);
    (rows.div_ceil(per_block), per_block)
}

/// LayerNorm backward: `[dx (flattened) | dweight | dbias]` in one buffer of x's dtype.
pub(crate) fn layer_norm_bwd(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let hidden = xl.dims().last().copied().unwrap_or(1);
    let n = xl.shape().elem_count();
    let rows = n.checked_div(hidden).unwrap_or(0);
    dispatch_cuda!(x.dtype(), "fused-layer-norm-bwd", |T| {
        if rows == 0 {
            // No rows: dweight and dbias are empty sums.
            let zeros = dev.alloc_zeros::<T>(n + 2 * hidden)?;
            return Ok(CudaStorage::wrap_cuda_slice(zeros, dev.clone()));
        }
        let mut packed = output::<T>(&dev, n + 2 * hidden)?;
        let (blocks, per_block) = ln_bwd_blocks(rows);
        let mut partial = output::<f32>(&dev, blocks * 2 * hidden)?;
        let (xv, wv, gv) = (view::<T>(x, xl)?, view::<T>(w, wl)?, view::<T>(g, gl)?);
        let (rows_i, per_i, h) = (
            i32_arg(rows, "rows")?,
            i32_arg(per_block, "rows")?,
            i32_arg(hidden, "hidden size")?,
        );
        let blocks_i = blocks as i32;
        {
            let f = func!(dev, "ln_bwd", T)?;
            let mut dx = packed.slice_mut(0..n);
            let mut args = f.builder();
            args.arg(&xv)
                .arg(&wv)
                .arg(&gv)
                .arg(mean)
                .arg(rstd)
                .arg(&rows_i)
                .arg(&per_i)
                .arg(&h)
                .arg(&mut dx)
                .arg(&mut partial);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (row_threads(hidden), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: block k reads and writes rows [k·per_block, min(rows, (k+1)·per_block))
            // of x, g, dx (rows·hidden elements), mean and rstd (rows), and its own 2·hidden
            // partial sums (blocks·2·hidden allocated).
            unsafe { args.launch(cfg) }.w()?;
        }
        {
            let f = func!(dev, "ln_bwd_reduce", T)?;
            let mut tail = packed.slice_mut(n..);
            let (mut dw, mut db) = tail.split_at_mut(hidden);
            let mut args = f.builder();
            args.arg(&partial)
                .arg(&blocks_i)
                .arg(&h)
                .arg(&mut dw)
                .arg(&mut db);
            // SAFETY: reads blocks·2·hidden partial sums, writes hidden elements of each output.
            unsafe { args.launch(elementwise_cfg(2 * hidden)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(packed, dev.clone()))
    })
}

/// The leading dimensions of a softmax input, merged into exactly four (padded with size-1
/// dimensions in front), with the mask's stride along each.
pub(crate) type LeadIndex = ([i64; 4], [i64; 4]);

/// Scaled masked softmax over rows of `dims.last()`; `lead` indexes the mask, `col_stride` is
/// the mask's stride along a row.
pub(crate) fn softmax_fwd(
    (x, xl): (&CudaStorage, &Layout),
    mask: Option<(&CudaStorage, &Layout)>,
    (lead, col_stride): (LeadIndex, usize),
    scale: f64,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let len = xl.dims().last().copied().unwrap_or(1).max(1);
    let total = xl.shape().elem_count();
    let rows = total / len;
    dispatch_cuda!(x.dtype(), "fused-softmax", |T| {
        let mut y = output::<T>(&dev, total)?;
        if rows > 0 {
            let xv = view::<T>(x, xl)?;
            let mv = match mask {
                Some((m, ml)) => view::<T>(m, ml)?,
                None => view::<T>(x, xl)?,
            };
            let (has_mask, n, cs, sc) = (
                mask.is_some() as i32,
                i32_arg(len, "row length")?,
                col_stride as i64,
                scale as f32,
            );
            let (d, s) = lead;
            let f = func!(dev, "softmax_fwd", T)?;
            let mut args = f.builder();
            args.arg(&xv).arg(&mv).arg(&has_mask).arg(&n).arg(&cs);
            for v in d.iter().chain(s.iter()) {
                args.arg(v);
            }
            args.arg(&sc).arg(&mut y);
            // SAFETY: block r reads row r of x and the mask row at the offset of r's
            // coordinates (inside the mask by `check`'s strides), and writes row r of y.
            unsafe { args.launch(rows_cfg(rows, len)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `scale · y · (g − Σ g·y)` per row.
pub(crate) fn softmax_bwd(
    (y, yl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    scale: f64,
) -> Result<CudaStorage> {
    let dev = y.device.clone();
    let len = yl.dims().last().copied().unwrap_or(1).max(1);
    let total = yl.shape().elem_count();
    let rows = total / len;
    dispatch_cuda!(y.dtype(), "fused-softmax-bwd", |T| {
        let mut dx = output::<T>(&dev, total)?;
        if rows > 0 {
            let (yv, gv) = (view::<T>(y, yl)?, view::<T>(g, gl)?);
            let (n, sc) = (i32_arg(len, "row length")?, scale as f32);
            let f = func!(dev, "softmax_bwd", T)?;
            let mut args = f.builder();
            args.arg(&yv).arg(&gv).arg(&n).arg(&sc).arg(&mut dx);
            // SAFETY: block r reads row r of y and g and writes row r of dx.
            unsafe { args.launch(rows_cfg(rows, len)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    })
}

/// GELU forward.
pub(crate) fn gelu_fwd((x, xl): (&CudaStorage, &Layout), form: i32) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let n = xl.shape().elem_count();
    dispatch_cuda!(x.dtype(), "fused-gelu", |T| {
        let mut y = output::<T>(&dev, n)?;
        if n > 0 {
            let xv = view::<T>(x, xl)?;
            let (len, f_i) = (n as i64, form);
            let f = func!(dev, "gelu_fwd", T)?;
            let mut args = f.builder();
            args.arg(&xv).arg(&len).arg(&f_i).arg(&mut y);
            // SAFETY: element i of y from element i of x, i < n.
            unsafe { args.launch(elementwise_cfg(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `g · gelu'(x)`.
pub(crate) fn gelu_bwd(
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    form: i32,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let n = xl.shape().elem_count();
    dispatch_cuda!(x.dtype(), "fused-gelu-bwd", |T| {
        let mut dx = output::<T>(&dev, n)?;
        if n > 0 {
            let (xv, gv) = (view::<T>(x, xl)?, view::<T>(g, gl)?);
            let (len, f_i) = (n as i64, form);
            let f = func!(dev, "gelu_bwd", T)?;
            let mut args = f.builder();
            args.arg(&xv).arg(&gv).arg(&len).arg(&f_i).arg(&mut dx);
            // SAFETY: element i of dx from element i of x and g, i < n.
            unsafe { args.launch(elementwise_cfg(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    })
}

/// What a dropout launch needs besides its input: the key words, the site, the keep threshold
/// and the scale of kept entries.
pub(crate) struct DropoutArgs {
    pub seed: u64,
    pub step: u64,
    pub sample_offset: u64,
    pub site: u32,
    pub threshold: u32,
    pub scale: f32,
}

/// Inverted dropout of `rows` samples (the first dimension), masks from Philox as on the CPU.
pub(crate) fn dropout(
    (x, xl): (&CudaStorage, &Layout),
    rows: usize,
    a: &DropoutArgs,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let n = xl.shape().elem_count();
    let row_len = n.checked_div(rows).unwrap_or(0);
    dispatch_cuda!(x.dtype(), "fused-dropout", |T| {
        let mut y = output::<T>(&dev, n)?;
        if n > 0 {
            let xv = view::<T>(x, xl)?;
            let (rows_i, len_i) = (rows as i64, row_len as i64);
            let f = func!(dev, "dropout", T)?;
            let mut args = f.builder();
            args.arg(&xv)
                .arg(&rows_i)
                .arg(&len_i)
                .arg(&a.seed)
                .arg(&a.step)
                .arg(&a.sample_offset)
                .arg(&a.site)
                .arg(&a.threshold)
                .arg(&a.scale)
                .arg(&mut y);
            // SAFETY: each work item reads and writes up to four elements of its row, inside
            // rows·row_len = n.
            unsafe { args.launch(elementwise_cfg(rows * row_len.div_ceil(4))) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}
