//! The fused op on CUDA: the `B²D` products run in cuBLAS (f32, no TF32), everything else in
//! the kernels of `cz_nce.cu` (compiled to PTX by `build.rs`). Same algorithm and formulas as
//! the CPU kernel (`ops::cz_nce::cpu`), always accumulating in f32.
//!
//! The forward returns the loss and, when asked for, the gradients packed in one f32 buffer
//! `[∂L/∂q (B·D) | ∂L/∂k (B·D) | ∂L/∂log s (1)]` for an upstream gradient of 1.

use super::{elementwise_cfg, Ptx};
use crate::ops::cz_nce::{row_major_gemm, Spec, NORM_EPS};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{
    sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

/// Threads per block of the row kernels (a multiple of 32).
const ROW_THREADS: u32 = 256;

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Row-major `C (m × n, row stride ldc) = α·op(A)·op(B) + β·C` through column-major cuBLAS:
/// `op(A)` is `m × k`, stored row-major as `m × k` (`a_t = false`) or `k × m` (`a_t = true`)
/// with row stride `lda`; likewise `op(B)` (`k × n`). The argument mapping is
/// [`row_major_gemm`], tested against a reference column-major GEMM.
#[allow(clippy::too_many_arguments)]
fn gemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    blas: &CudaBlas,
    mnk: (usize, usize, usize),
    (a, a_t, lda): (&A, bool, usize),
    (b, b_t, ldb): (&B, bool, usize),
    (c, ldc): (&mut C, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let g = row_major_gemm(mnk, (a_t, lda), (b_t, ldb), ldc);
    let cfg = GemmConfig {
        transa: op(g.trans_a),
        transb: op(g.trans_b),
        m: g.m as i32,
        n: g.n as i32,
        k: g.k as i32,
        alpha,
        lda: g.lda as i32,
        ldb: g.ldb as i32,
        beta,
        ldc: g.ldc as i32,
    };
    // SAFETY: the callers pass buffers holding `op(A)`: m·k, `op(B)`: k·n and `C`: m·ldc
    // elements with the given leading dimensions (all buffers are allocated in this file with
    // exactly those sizes), on the stream cuBLAS was created with. BLAS' A is our B.
    unsafe { blas.gemm(cfg, b, a, c) }.w()
}

/// Unit rows of one input: `x̂` (`B × D`, contiguous), `1 / max(‖x‖, ε)` and the "‖x‖ > ε"
/// flags (as 0.0 / 1.0).
struct Normed {
    hat: CudaSlice<f32>,
    inv: CudaSlice<f32>,
    active: CudaSlice<f32>,
}

fn load_normalize(
    dev: &CudaDevice,
    (x, layout): (&CudaStorage, &Layout),
    normalize: bool,
) -> Result<Normed> {
    let (b, d) = layout.shape().dims2()?;
    let (rs, cs) = (layout.stride()[0] as i64, layout.stride()[1] as i64);
    let off = layout.start_offset();
    // SAFETY: the kernel writes every element of the three buffers before anything reads them.
    let mut hat = unsafe { dev.alloc::<f32>(b * d)? };
    let mut inv = unsafe { dev.alloc::<f32>(b)? };
    let mut active = unsafe { dev.alloc::<f32>(b)? };
    let (d_i, norm_i, eps) = (d as i32, normalize as i32, NORM_EPS as f32);
    macro_rules! launch {
        ($slice:expr, $name:literal) => {{
            let src = $slice.slice(off..);
            let f = load_func!(dev, Ptx::CzNce, $name)?;
            let mut args = f.builder();
            args.arg(&src)
                .arg(&rs)
                .arg(&cs)
                .arg(&d_i)
                .arg(&norm_i)
                .arg(&eps)
                .arg(&mut hat)
                .arg(&mut inv)
                .arg(&mut active);
            // SAFETY: row i reads x[off + i·rs + j·cs] for j < D, inside the storage by the
            // layout's construction; writes stay inside the B·D and B buffers.
            unsafe { args.launch(rows_cfg(b)) }.w()?;
        }};
    }
    match &x.slice {
        CudaStorageSlice::F32(s) => launch!(s, "cz_load_normalize_f32"),
        CudaStorageSlice::F16(s) => launch!(s, "cz_load_normalize_f16"),
        CudaStorageSlice::BF16(s) => launch!(s, "cz_load_normalize_bf16"),
        _ => candle_core::bail!(
            "cz_nce fused (cuda): unsupported dtype {:?} (use f32, f16 or bf16)",
            x.dtype()
        ),
    }
    Ok(Normed { hat, inv, active })
}

/// Runs [`cz_row_pass`](cz_nce.cu) for one direction; rows write `row_loss[i]`, `row_gx[i]`.
#[allow(clippy::too_many_arguments)]
fn row_pass(
    dev: &CudaDevice,
    blocks: &[&CudaSlice<f32>],
    grads: Option<&mut [CudaSlice<f32>]>,
    b: usize,
    scale: f32,
    include_positive: bool,
    wb: f32,
    row_loss: &mut CudaViewMut<'_, f32>,
    row_gx: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let nblk = blocks.len() as i32;
    let x = |i: usize| blocks.get(i).copied().unwrap_or(blocks[0]);
    // Without gradients the kernel never touches g0..g2; it still needs valid pointers.
    let mut scratch = Vec::new();
    let want_grad = grads.is_some() as i32;
    let gs: &mut [CudaSlice<f32>] = match grads {
        Some(g) => g,
        None => {
            scratch.push(dev.alloc_zeros::<f32>(1)?);
            &mut scratch
        }
    };
    let f = load_func!(dev, Ptx::CzNce, "cz_row_pass")?;
    let mut args = f.builder();
    let (x0, x1, x2) = (x(0), x(1), x(2));
    args.arg(x0).arg(x1).arg(x2).arg(&nblk);
    // g pointers: one distinct buffer per real block; the unused slots get x0 (never touched).
    let (g_first, g_rest) = gs.split_first_mut().expect("at least one buffer");
    let mut g_rest = g_rest.iter_mut();
    args.arg(g_first);
    for _ in 1..3 {
        match g_rest.next() {
            Some(g) => {
                args.arg(g);
            }
            None => {
                args.arg(x0);
            }
        }
    }
    let (b_i, inc) = (b as i32, include_positive as i32);
    args.arg(&want_grad)
        .arg(&b_i)
        .arg(&scale)
        .arg(&inc)
        .arg(&wb)
        .arg(row_loss)
        .arg(row_gx);
    // SAFETY: every block and gradient buffer holds B·B floats (the unused slots are never
    // dereferenced: `nblk` bounds the loops), row_loss/row_gx hold at least B.
    unsafe { args.launch(rows_cfg(b)) }.w()?;
    Ok(())
}

fn sym_add(
    dev: &CudaDevice,
    a: &CudaSlice<f32>,
    c: Option<&CudaSlice<f32>>,
    b: usize,
) -> Result<CudaSlice<f32>> {
    // SAFETY: the kernel writes all B·B elements.
    let mut out = unsafe { dev.alloc::<f32>(b * b)? };
    let f = load_func!(dev, Ptx::CzNce, "cz_sym_add")?;
    let mut args = f.builder();
    let (has_c, b_i) = (c.is_some() as i32, b as i32);
    args.arg(a)
        .arg(c.unwrap_or(a))
        .arg(&has_c)
        .arg(&b_i)
        .arg(&mut out);
    // SAFETY: all buffers hold B·B floats.
    unsafe { args.launch(elementwise_cfg(b * b)) }.w()?;
    Ok(out)
}

/// The fused forward on CUDA: `(loss, packed gradients if want_grad)`, both f32.
pub(crate) fn cz_nce(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    scale: f32,
    spec: Spec,
    want_grad: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = q.0.device.clone();
    let (b, d) = q.1.shape().dims2()?;
    let qn = load_normalize(&dev, q, spec.normalize)?;
    let kn = load_normalize(&dev, k, spec.normalize)?;
    let blas = dev.cublas_handle();
    let sims = Similarities::new(&dev, &blas, (&qn, &kn), (b, d), spec)?;
    let dirs = if spec.symmetric { 2 } else { 1 };
    let weight = if spec.symmetric { 0.5 } else { 1.0 };
    let wb = weight / b as f32;
    let mut row_loss = dev.alloc_zeros::<f32>(dirs * b)?;
    let mut row_gx = dev.alloc_zeros::<f32>(dirs * b)?;
    let (qk, kq) = sims.directions(spec);
    let alloc_grads = |n: usize| -> Result<Vec<CudaSlice<f32>>> {
        // SAFETY: cz_row_pass writes every element of its gradient blocks.
        (0..n).map(|_| unsafe { dev.alloc::<f32>(b * b) }).collect()
    };
    let mut g_qk = alloc_grads(if want_grad { qk.len() } else { 0 })?;
    let mut g_kq = alloc_grads(if want_grad { kq.len() } else { 0 })?;
    for (dir, (blocks, grads)) in [(&qk, &mut g_qk), (&kq, &mut g_kq)]
        .into_iter()
        .enumerate()
        .take(dirs)
    {
        // Each direction writes its own part of the per-row buffers.
        row_pass(
            &dev,
            blocks,
            want_grad.then_some(grads.as_mut_slice()),
            b,
            scale,
            spec.include_positive,
            wb,
            &mut row_loss.slice_mut(dir * b..(dir + 1) * b),
            &mut row_gx.slice_mut(dir * b..(dir + 1) * b),
        )?;
    }
    // The similarity blocks are no longer needed: free them before the gradient products.
    drop((qk, kq));
    drop(sims);
    let mut packed = want_grad
        .then(|| dev.alloc_zeros::<f32>(2 * b * d + 1))
        .transpose()?;
    let loss = finish(
        &dev,
        (&row_loss, &row_gx),
        dirs * b,
        packed.as_mut(),
        2 * b * d,
    )?;
    let loss = CudaStorage::wrap_cuda_slice(loss, dev.clone());
    let Some(mut packed) = packed else {
        return Ok((loss, None));
    };
    let (g_out, g_in, g_kk) = logit_grads(&dev, g_qk, g_kq, spec, b)?;
    // ∂L/∂q̂ = s (G_out k̂ + G_in,sym q̂), ∂L/∂k̂ = s (G_outᵀ q̂ + G_kk,sym k̂).
    for (side, own, other, g_own, cross_t) in [
        (0, &qn, &kn, g_in.as_ref(), false),
        (1, &kn, &qn, g_kk.as_ref(), true),
    ] {
        let mut dst = packed.slice_mut(side * b * d..(side + 1) * b * d);
        let gemm_cfg = ((b, d), scale);
        input_grad(
            &dev,
            &blas,
            gemm_cfg,
            (&g_out, cross_t),
            g_own,
            (own, other),
            &mut dst,
        )?;
    }
    Ok((loss, Some(CudaStorage::wrap_cuda_slice(packed, dev))))
}

/// The similarity blocks: `Ŝ_out = q̂ k̂ᵀ`, and as the spec needs them `Ŝ_in = q̂ q̂ᵀ`,
/// `Ŝ_kk = k̂ k̂ᵀ` and the k→q cross block `Ŝ_outᵀ = k̂ q̂ᵀ` (from cuBLAS rather than a transpose
/// kernel).
struct Similarities {
    s_out: CudaSlice<f32>,
    s_in: Option<CudaSlice<f32>>,
    s_kk: Option<CudaSlice<f32>>,
    s_out_t: Option<CudaSlice<f32>>,
}

impl Similarities {
    fn new(
        dev: &CudaDevice,
        blas: &CudaBlas,
        (qn, kn): (&Normed, &Normed),
        (b, d): (usize, usize),
        spec: Spec,
    ) -> Result<Self> {
        let gram = |x: &CudaSlice<f32>, y: &CudaSlice<f32>| -> Result<CudaSlice<f32>> {
            // SAFETY: the GEMM (β = 0) writes all B·B elements.
            let mut out = unsafe { dev.alloc::<f32>(b * b)? };
            let (a, bt) = ((x, false, d), (y, true, d));
            gemm(blas, (b, b, d), a, bt, (&mut out, b), 1.0, 0.0)?;
            Ok(out)
        };
        Ok(Self {
            s_out: gram(&qn.hat, &kn.hat)?,
            s_in: spec
                .needs_in()
                .then(|| gram(&qn.hat, &qn.hat))
                .transpose()?,
            s_kk: spec
                .needs_kk()
                .then(|| gram(&kn.hat, &kn.hat))
                .transpose()?,
            s_out_t: spec.symmetric.then(|| gram(&kn.hat, &qn.hat)).transpose()?,
        })
    }

    /// The blocks of each direction's rows: q→k `[Ŝ_out | Ŝ_in | Ŝ_kk]`, k→q
    /// `[Ŝ_outᵀ | Ŝ_kk | Ŝ_in]` (empty unless symmetric), each with the negatives asked for.
    fn directions(&self, spec: Spec) -> (Vec<&CudaSlice<f32>>, Vec<&CudaSlice<f32>>) {
        let mut qk = vec![&self.s_out];
        let mut kq = Vec::new();
        let (s_in, s_kk) = (self.s_in.as_ref(), self.s_kk.as_ref());
        qk.extend(s_in.filter(|_| spec.anchor_negatives));
        qk.extend(s_kk.filter(|_| spec.target_negatives));
        if let Some(t) = &self.s_out_t {
            kq.push(t);
            kq.extend(s_kk.filter(|_| spec.anchor_negatives));
            kq.extend(s_in.filter(|_| spec.target_negatives));
        }
        (qk, kq)
    }
}

/// Runs `cz_finish` over the `n` per-row losses and `∂/∂log s` parts: returns the loss, and
/// writes `∂L/∂log s` at `packed[gx_at]` (when there are gradients).
fn finish(
    dev: &CudaDevice,
    (row_loss, row_gx): (&CudaSlice<f32>, &CudaSlice<f32>),
    n: usize,
    packed: Option<&mut CudaSlice<f32>>,
    gx_at: usize,
) -> Result<CudaSlice<f32>> {
    let mut loss = dev.alloc_zeros::<f32>(1)?;
    let mut gx_scratch = dev.alloc_zeros::<f32>(1)?;
    let f = load_func!(dev, Ptx::CzNce, "cz_finish")?;
    let mut args = f.builder();
    let n = n as i32;
    args.arg(row_loss).arg(row_gx).arg(&n).arg(&mut loss);
    let mut gx_slot = match packed {
        Some(p) => p.slice_mut(gx_at..),
        None => gx_scratch.slice_mut(..),
    };
    args.arg(&mut gx_slot);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: row_loss/row_gx hold `n` floats; both outputs hold at least one.
    unsafe { args.launch(cfg) }.w()?;
    drop(args);
    Ok(loss)
}

/// Gradient blocks of the three similarity matrices, both directions summed:
/// `G_out = G_qk,out + G_kq,crossᵀ`; `G_in,sym` and `G_kk,sym` = `G + Gᵀ` over both directions.
#[allow(clippy::type_complexity)]
fn logit_grads(
    dev: &CudaDevice,
    g_qk: Vec<CudaSlice<f32>>,
    g_kq: Vec<CudaSlice<f32>>,
    spec: Spec,
    b: usize,
) -> Result<(
    CudaSlice<f32>,
    Option<CudaSlice<f32>>,
    Option<CudaSlice<f32>>,
)> {
    let missing = || candle_core::Error::Msg("cz_nce (cuda): a gradient block is missing".into());
    let mut g_qk = g_qk.into_iter();
    let mut g_kq = g_kq.into_iter();
    let mut g_out = g_qk.next().ok_or_else(missing)?;
    let (mut in_parts, mut kk_parts) = (Vec::new(), Vec::new());
    if spec.anchor_negatives {
        in_parts.push(g_qk.next().ok_or_else(missing)?);
    }
    if spec.target_negatives {
        kk_parts.push(g_qk.next().ok_or_else(missing)?);
    }
    if spec.symmetric {
        let cross = g_kq.next().ok_or_else(missing)?;
        let f = load_func!(dev, Ptx::CzNce, "cz_add_transposed")?;
        let mut args = f.builder();
        let b_i = b as i32;
        args.arg(&cross).arg(&b_i).arg(&mut g_out);
        // SAFETY: both buffers hold B·B floats.
        unsafe { args.launch(elementwise_cfg(b * b)) }.w()?;
        if spec.anchor_negatives {
            kk_parts.push(g_kq.next().ok_or_else(missing)?);
        }
        if spec.target_negatives {
            in_parts.push(g_kq.next().ok_or_else(missing)?);
        }
    }
    let sym = |parts: &[CudaSlice<f32>]| -> Result<Option<CudaSlice<f32>>> {
        match parts {
            [] => Ok(None),
            [a] => sym_add(dev, a, None, b).map(Some),
            [a, c] => sym_add(dev, a, Some(c), b).map(Some),
            _ => Err(candle_core::Error::Msg(
                "cz_nce (cuda): too many gradient blocks".into(),
            )),
        }
    };
    Ok((g_out, sym(&in_parts)?, sym(&kk_parts)?))
}

/// One side's input gradient into `dst`: `s (G_out other̂ + G_own own̂)` (`G_outᵀ` for the k side,
/// `cross_t`), then the normalisation's backward.
fn input_grad(
    dev: &CudaDevice,
    blas: &CudaBlas,
    ((b, d), scale): ((usize, usize), f32),
    (g_out, cross_t): (&CudaSlice<f32>, bool),
    g_own: Option<&CudaSlice<f32>>,
    (own, other): (&Normed, &Normed),
    dst: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (g, o) = ((g_out, cross_t, b), (&other.hat, false, d));
    gemm(blas, (b, d, b), g, o, (&mut *dst, d), scale, 0.0)?;
    if let Some(g) = g_own {
        let (g, o) = ((g, false, b), (&own.hat, false, d));
        gemm(blas, (b, d, b), g, o, (&mut *dst, d), scale, 1.0)?;
    }
    let f = load_func!(dev, Ptx::CzNce, "cz_norm_backward")?;
    let mut args = f.builder();
    let d_i = d as i32;
    args.arg(&own.hat)
        .arg(&own.inv)
        .arg(&own.active)
        .arg(&d_i)
        .arg(dst);
    // SAFETY: hat and dst hold B·D floats, inv and active B.
    unsafe { args.launch(rows_cfg(b)) }.w()?;
    Ok(())
}
