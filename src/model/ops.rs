//! Fused CPU kernels for the EVA-X forward pass, as candle custom ops.
//!
//! - [`attention`]: q/k/v split, 2-D RoPE on patch tokens, scaled softmax attention and head
//!   merge in one pass over a fused `qkv` activation, one GEMM pair per (image, head).
//! - [`swiglu`]: `silu(x1) * x2` over a packed `[x1 | x2]` activation.
//!
//! Elementwise loops are written so that the compiler vectorises them; [`simd`] compiles them
//! for AVX-512 / AVX2 and picks the best at run time.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Fast `exp` for f32 (Cephes-style range reduction and degree-6 polynomial, ~1 ulp over the
/// range softmax and SiLU use); branch-free so loops over it vectorise.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' published coefficients
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r2 + r + 1.0;
    // 2^n by integer addition to the exponent; n is read off the bits of n + 1.5 * 2^23 (exact
    // for |n| < 2^22), which vectorises where a float-to-int cast would not.
    const MAGIC: f32 = 12_582_912.0;
    let ni = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(y.to_bits().wrapping_add(ni << 23))
}

/// Kernels compiled for several instruction sets, dispatched at run time.
pub mod simd {
    use super::exp_f32;
    use crate::dispatch;

    /// Lanes of the manual reductions (float sums do not auto-vectorise without them).
    const LANES: usize = 16;

    dispatch! {
        /// In-place softmax of each `n`-long row of `x`.
        fn softmax_rows(x: &mut [f32], n: usize) {
            for row in x.chunks_exact_mut(n) {
                let mut m = [f32::NEG_INFINITY; LANES];
                let mut chunks = row.chunks_exact(LANES);
                for c in &mut chunks {
                    for (m, &v) in m.iter_mut().zip(c) {
                        *m = if v > *m { v } else { *m };
                    }
                }
                let max = chunks
                    .remainder()
                    .iter()
                    .chain(&m)
                    .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                let mut s = [0f32; LANES];
                let mut chunks = row.chunks_exact_mut(LANES);
                for c in &mut chunks {
                    for (s, v) in s.iter_mut().zip(c.iter_mut()) {
                        *v = exp_f32(*v - max);
                        *s += *v;
                    }
                }
                let mut sum: f32 = s.iter().sum();
                for v in chunks.into_remainder() {
                    *v = exp_f32(*v - max);
                    sum += *v;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }

    dispatch! {
        /// `out[i] = silu(x[i]) * x[h + i]` for each `2h`-long row of `x` into `h`-long rows.
        fn swiglu_rows(x: &[f32], out: &mut [f32], h: usize) {
            for (row, o) in x.chunks_exact(2 * h).zip(out.chunks_exact_mut(h)) {
                let (a, b) = row.split_at(h);
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a / (1.0 + exp_f32(-a)) * b;
                }
            }
        }
    }

    dispatch! {
        /// The transpose of [`rope_scale`]: rotate the gradient pairs of `g` back by the angles
        /// in `cos`/`sin` and multiply by `scale`, writing `out`.
        fn rope_back(g: &[f32], cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) {
            for (((o, g), c), s) in out
                .chunks_exact_mut(2)
                .zip(g.chunks_exact(2))
                .zip(cos.chunks_exact(2))
                .zip(sin.chunks_exact(2))
            {
                o[0] = (g[0] * c[0] + g[1] * s[1]) * scale;
                o[1] = (g[1] * c[1] - g[0] * s[0]) * scale;
            }
        }
    }

    dispatch! {
        /// Rotate interleaved pairs of `x` (one token, `cos.len()` wide) by the angles in
        /// `cos`/`sin` and multiply by `scale`, writing `out`.
        fn rope_scale(x: &[f32], cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) {
            for (((o, x), c), s) in out
                .chunks_exact_mut(2)
                .zip(x.chunks_exact(2))
                .zip(cos.chunks_exact(2))
                .zip(sin.chunks_exact(2))
            {
                o[0] = (x[0] * c[0] - x[1] * s[0]) * scale;
                o[1] = (x[1] * c[1] + x[0] * s[1]) * scale;
            }
        }
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// A raw pointer that may be shared by tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only for writes to disjoint regions, synchronised by rayon's join.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Multi-head self-attention over a fused `qkv` activation `[B, T, 3C]` (biases already added).
/// Token 0 is the class token; tokens 1.. are patch tokens and get RoPE.
struct Attention {
    heads: usize,
    rope: Arc<super::rope::RopeTables>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "evax-attention"
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, c3) = qkv.dims3()?;
        let dq = read(qkv, |x| read(dy, |g| Ok(self.backward(x, g, b, t, c3 / 3))))?;
        Ok(Some(Tensor::from_vec(dq, (b, t, c3), qkv.device())?))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, c3) = l.shape().dims3()?;
        let qkv = contiguous_f32(s, l, "attention")?;
        let c = c3 / 3;
        let h = self.heads;
        let d = c / h;
        if c3 != 3 * c || h * d != c || d != self.rope.dim {
            candle_core::bail!(
                "attention: qkv width {c3} does not fit {h} heads of {}",
                self.rope.dim
            );
        }
        if self.rope.cos.len() != (t - 1) * d {
            candle_core::bail!(
                "attention: RoPE tables are for {} tokens, input has {}",
                self.rope.cos.len() / d,
                t - 1
            );
        }
        let mut out: Vec<f32> = Vec::with_capacity(b * t * c);
        let dst = SharedMut(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each_init(
            || {
                (
                    vec![0f32; t * d],
                    vec![0f32; t * d],
                    vec![0f32; t * d],
                    vec![0f32; t * t],
                )
            },
            |(q, k, v, sc), bh| {
                let (bi, hi) = (bh / h, bh % h);
                self.prepare(qkv, bi, hi, t, c, d, q, k, v);
                // SAFETY: all pointers address buffers of the sizes the strides describe.
                unsafe {
                    gemm::gemm(
                        t,
                        t,
                        d,
                        sc.as_mut_ptr(),
                        1,
                        t as isize,
                        false,
                        q.as_ptr(),
                        1,
                        d as isize,
                        k.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                simd::softmax_rows(sc, t);
                let o = dst;
                // SAFETY: each (image, head) task writes its own d columns of its own image's
                // rows of `out`; no two tasks overlap.
                unsafe {
                    gemm::gemm(
                        t,
                        d,
                        t,
                        o.0.add(bi * t * c + hi * d),
                        1,
                        c as isize,
                        false,
                        sc.as_ptr(),
                        1,
                        t as isize,
                        v.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        // SAFETY: the (image, head) tasks together wrote all b * t * c elements.
        unsafe { out.set_len(b * t * c) };
        Ok((CpuStorage::F32(out), Shape::from((b, t, c))))
    }
}

/// `dst (m x n) = a (m x k) * b (k x n)`, each given by row and column strides, single-threaded.
#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    // SAFETY: callers pass pointers to buffers that the sizes and strides describe.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl Attention {
    /// The roped, scaled q, the roped k and v of one (image, head).
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        qkv: &[f32],
        bi: usize,
        hi: usize,
        t: usize,
        c: usize,
        d: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
    ) {
        let c3 = 3 * c;
        let scale = 1.0 / (d as f32).sqrt();
        let base = &qkv[bi * t * c3..(bi + 1) * t * c3];
        for ti in 0..t {
            let row = &base[ti * c3..(ti + 1) * c3];
            let (qs, ks, vs) = (
                &row[hi * d..(hi + 1) * d],
                &row[c + hi * d..c + (hi + 1) * d],
                &row[2 * c + hi * d..2 * c + (hi + 1) * d],
            );
            let (qd, kd) = (&mut q[ti * d..(ti + 1) * d], &mut k[ti * d..(ti + 1) * d]);
            if ti == 0 {
                qd.iter_mut().zip(qs).for_each(|(o, &x)| *o = x * scale);
                kd.copy_from_slice(ks);
            } else {
                let cos = &self.rope.cos[(ti - 1) * d..ti * d];
                let sin = &self.rope.sin[(ti - 1) * d..ti * d];
                simd::rope_scale(qs, cos, sin, scale, qd);
                simd::rope_scale(ks, cos, sin, 1.0, kd);
            }
            v[ti * d..(ti + 1) * d].copy_from_slice(vs);
        }
    }

    /// Gradient of the fused attention with respect to `qkv`, recomputing the probabilities.
    fn backward(&self, qkv: &[f32], dy: &[f32], b: usize, t: usize, c: usize) -> Vec<f32> {
        let h = self.heads;
        let d = c / h;
        let c3 = 3 * c;
        let scale = 1.0 / (d as f32).sqrt();
        let mut dqkv: Vec<f32> = vec![0f32; b * t * c3];
        let dst = SharedMut(dqkv.as_mut_ptr());
        (0..b * h).into_par_iter().for_each_init(
            || {
                (
                    vec![0f32; t * d],
                    vec![0f32; t * d],
                    vec![0f32; t * d],
                    vec![0f32; t * t],
                    vec![0f32; t * t],
                    vec![0f32; t * d],
                    vec![0f32; t * d],
                    vec![0f32; t * d],
                )
            },
            |(q, k, v, p, dp, dv, dq, dk), bh| {
                let (bi, hi) = (bh / h, bh % h);
                self.prepare(qkv, bi, hi, t, c, d, q, k, v);
                mm(
                    t,
                    t,
                    d,
                    p.as_mut_ptr(),
                    t,
                    q.as_ptr(),
                    d,
                    1,
                    k.as_ptr(),
                    1,
                    d,
                );
                simd::softmax_rows(p, t);
                let dout = dy[bi * t * c + hi * d..].as_ptr();
                // dV = P^T dO; dP = dO V^T.
                mm(t, d, t, dv.as_mut_ptr(), d, p.as_ptr(), 1, t, dout, c, 1);
                mm(t, t, d, dp.as_mut_ptr(), t, dout, c, 1, v.as_ptr(), 1, d);
                // dS = P * (dP - rowsum(dP * P)), in place in dp.
                for (dpr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let dot: f32 = dpr.iter().zip(pr.iter()).map(|(a, b)| a * b).sum();
                    dpr.iter_mut()
                        .zip(pr.iter())
                        .for_each(|(g, &pv)| *g = pv * (*g - dot));
                }
                // dQs = dS K; dK' = dS^T Qs.
                mm(
                    t,
                    d,
                    t,
                    dq.as_mut_ptr(),
                    d,
                    dp.as_ptr(),
                    t,
                    1,
                    k.as_ptr(),
                    d,
                    1,
                );
                mm(
                    t,
                    d,
                    t,
                    dk.as_mut_ptr(),
                    d,
                    dp.as_ptr(),
                    1,
                    t,
                    q.as_ptr(),
                    d,
                    1,
                );
                let whole = dst; // the whole wrapper (not its field) is moved into the closure
                // SAFETY: every slice made here is d elements of this (image, head)'s own q, k or
                // v columns; slices of different tasks never overlap.
                let seg = |ti: usize, part: usize| unsafe {
                    std::slice::from_raw_parts_mut(
                        whole.0.add(bi * t * c3 + ti * c3 + part * c + hi * d),
                        d,
                    )
                };
                for ti in 0..t {
                    let (gq, gk) = (&dq[ti * d..(ti + 1) * d], &dk[ti * d..(ti + 1) * d]);
                    if ti == 0 {
                        seg(ti, 0)
                            .iter_mut()
                            .zip(gq)
                            .for_each(|(o, &g)| *o = g * scale);
                        seg(ti, 1).copy_from_slice(gk);
                    } else {
                        let cos = &self.rope.cos[(ti - 1) * d..ti * d];
                        let sin = &self.rope.sin[(ti - 1) * d..ti * d];
                        simd::rope_back(gq, cos, sin, scale, seg(ti, 0));
                        simd::rope_back(gk, cos, sin, 1.0, seg(ti, 1));
                    }
                    seg(ti, 2).copy_from_slice(&dv[ti * d..(ti + 1) * d]);
                }
            },
        );
        dqkv
    }
}

/// Fused multi-head attention with RoPE over `qkv` `[B, T, 3C]`, differentiable (the backward
/// recomputes the probabilities per image and head); returns `[B, T, C]`.
pub fn attention_train(
    qkv: &Tensor,
    heads: usize,
    rope: &Arc<super::rope::RopeTables>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention {
        heads,
        rope: rope.clone(),
    })
}

/// Fused multi-head attention with RoPE over `qkv` `[B, T, 3C]`; returns `[B, T, C]`.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    rope: &Arc<super::rope::RopeTables>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&Attention {
        heads,
        rope: rope.clone(),
    })
}

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "evax-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "swiglu")?;
        let dims = l.shape().dims();
        let w = *dims.last().unwrap_or(&0);
        if !w.is_multiple_of(2) {
            candle_core::bail!("swiglu: odd width {w}");
        }
        let h = w / 2;
        let mut out = vec![0f32; x.len() / 2];
        let rows_per_task = (4096 / h).max(1);
        out.par_chunks_mut(rows_per_task * h)
            .zip(x.par_chunks(rows_per_task * w))
            .for_each(|(o, x)| simd::swiglu_rows(x, o, h));
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = h;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `silu(x1) * x2` where the last axis of `x` is `[x1 | x2]`.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SwiGlu)
}

/// Borrow the f32 data of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(contiguous_f32(s, layout, "linear")?),
        _ => candle_core::bail!("fused kernels run on the CPU only"),
    }
}

/// `y = x Wt (+ b) (+ residual)` (`Wt` = `W^T`, `[K, N]` contiguous) with the bias and residual folded into the GEMM's
/// accumulator, so no separate elementwise pass or temporary is needed.
struct FusedLinear<'a> {
    w: &'a [f32],
    out: usize,
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
}

impl CustomOp1 for FusedLinear<'_> {
    fn name(&self) -> &'static str {
        "evax-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "linear")?;
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let n = self.out;
        if k == 0 || self.w.len() != n * k {
            candle_core::bail!(
                "linear: input width {k} does not fit a weight of {} values",
                self.w.len()
            );
        }
        let m = x.len() / k;
        if self.residual.is_some_and(|r| r.len() != m * n)
            || self.bias.is_some_and(|b| b.len() != n)
        {
            candle_core::bail!("linear: residual or bias does not match the {m}x{n} output");
        }
        // The accumulator starts as residual + bias, written once, in parallel.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let rows = (65536 / n).max(1);
        let zeros = vec![0f32; n];
        let b = self.bias.unwrap_or(&zeros);
        let init = &mut y.spare_capacity_mut()[..m * n];
        match self.residual {
            Some(r) => init
                .par_chunks_mut(rows * n)
                .zip(r.par_chunks(rows * n))
                .for_each(|(y, r)| {
                    for (yr, rr) in y.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                        for ((d, &r), &b) in yr.iter_mut().zip(rr).zip(b) {
                            d.write(r + b);
                        }
                    }
                }),
            None => init.par_chunks_mut(rows * n).for_each(|y| {
                for yr in y.chunks_exact_mut(n) {
                    for (d, &b) in yr.iter_mut().zip(b) {
                        d.write(b);
                    }
                }
            }),
        }
        // SAFETY: all m * n elements were written above.
        unsafe { y.set_len(m * n) };
        let accumulate = true;
        // SAFETY: x is m x k (row stride k), w is k x n (row stride n), y is m x n.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                x.as_ptr(),
                1,
                k as isize,
                self.w.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

/// `x Wt + b (+ residual)` for `x` `[..., K]`, `wt` `[K, N]`, `b` `[N]`, residual `[..., N]`.
pub fn linear(
    x: &Tensor,
    wt: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    with_f32(wt, |w_data| {
        let run = |bias: Option<&[f32]>| -> Result<Tensor> {
            match &residual {
                Some(r) => with_f32(r, |r| {
                    x.apply_op1_no_bwd(&FusedLinear {
                        w: w_data,
                        out: wt.dim(1)?,
                        bias,
                        residual: Some(r),
                    })
                }),
                None => x.apply_op1_no_bwd(&FusedLinear {
                    w: w_data,
                    out: wt.dim(1)?,
                    bias,
                    residual: None,
                }),
            }
        };
        match b {
            Some(b) => with_f32(b, |b| run(Some(b))),
            None => run(None),
        }
    })
}

/// Rows of a contiguous tensor per parallel task in the differentiable kernels (fixed, so that
/// parameter-gradient sums are added in the same order on every run).
const ROWS_PER_TASK: usize = 64;

/// Borrow a tensor's f32 values (copying only when it is not contiguous).
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.is_contiguous() {
        with_f32(t, f)
    } else {
        with_f32(&t.contiguous()?, f)
    }
}

/// LayerNorm over the last axis with weight and bias, forward and backward fused.
struct LayerNormOp {
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "evax-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm")?;
        let w = contiguous_f32(s2, l2, "layer norm weight")?;
        let b = contiguous_f32(s3, l3, "layer norm bias")?;
        let c = w.len();
        if c == 0 || x.len() % c != 0 || b.len() != c {
            candle_core::bail!("layer norm: width {c} does not divide the input");
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(ROWS_PER_TASK * c)
            .zip(x.par_chunks(ROWS_PER_TASK * c))
            .for_each(|(y, x)| {
                for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    let mean = xr.iter().sum::<f32>() / c as f32;
                    let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    for i in 0..c {
                        yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        read(x, |xv| {
            read(w, |wv| {
                read(dy, |dyv| {
                    let c = wv.len();
                    let mut dx = vec![0f32; xv.len()];
                    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(ROWS_PER_TASK * c)
                        .zip(xv.par_chunks(ROWS_PER_TASK * c))
                        .zip(dyv.par_chunks(ROWS_PER_TASK * c))
                        .map(|((dx, x), dy)| {
                            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                            let mut xhat = vec![0f32; c];
                            for ((dxr, xr), dyr) in dx
                                .chunks_exact_mut(c)
                                .zip(x.chunks_exact(c))
                                .zip(dy.chunks_exact(c))
                            {
                                let mean = xr.iter().sum::<f32>() / c as f32;
                                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()
                                    / c as f32;
                                let rstd = 1.0 / (var + self.eps).sqrt();
                                let (mut m1, mut m2) = (0f32, 0f32);
                                for i in 0..c {
                                    xhat[i] = (xr[i] - mean) * rstd;
                                    let g = dyr[i] * wv[i];
                                    m1 += g;
                                    m2 += g * xhat[i];
                                    dw[i] += dyr[i] * xhat[i];
                                    db[i] += dyr[i];
                                }
                                let (m1, m2) = (m1 / c as f32, m2 / c as f32);
                                for i in 0..c {
                                    dxr[i] = rstd * (dyr[i] * wv[i] - m1 - xhat[i] * m2);
                                }
                            }
                            (dw, db)
                        })
                        .collect();
                    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                    for (pw, pb) in &partials {
                        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
                        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
                    }
                    Ok((
                        Some(Tensor::from_vec(dx, x.shape(), x.device())?),
                        Some(Tensor::from_vec(dw, w.shape(), w.device())?),
                        Some(Tensor::from_vec(db, w.shape(), w.device())?),
                    ))
                })
            })
        })
    }
}

/// Differentiable LayerNorm (fused forward and backward).
pub fn layer_norm_train(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(w, b, LayerNormOp { eps })
}

/// `silu(a) * b` over `[a | b]`, forward and backward fused.
struct SwiGluOp;

impl CustomOp1 for SwiGluOp {
    fn name(&self) -> &'static str {
        "evax-swiglu-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        SwiGlu.cpu_fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        read(x, |xv| {
            read(dy, |dyv| {
                let w = *x.dims().last().unwrap_or(&2);
                let h = w / 2;
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(ROWS_PER_TASK * w)
                    .zip(xv.par_chunks(ROWS_PER_TASK * w))
                    .zip(dyv.par_chunks(ROWS_PER_TASK * h))
                    .for_each(|((dx, x), dy)| {
                        for ((dxr, xr), dyr) in dx
                            .chunks_exact_mut(w)
                            .zip(x.chunks_exact(w))
                            .zip(dy.chunks_exact(h))
                        {
                            let (da, db) = dxr.split_at_mut(h);
                            let (a, b) = xr.split_at(h);
                            for i in 0..h {
                                let s = 1.0 / (1.0 + exp_f32(-a[i]));
                                let silu = a[i] * s;
                                db[i] = dyr[i] * silu;
                                da[i] = dyr[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                            }
                        }
                    });
                Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
            })
        })
    }
}

/// Differentiable SwiGLU over a packed `[x1 | x2]` activation.
pub fn swiglu_train(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SwiGluOp)
}

/// `y = x W^T + b` with a backward, reading `W` `[N, K]` in place (no transposed copy).
struct LinearOp;

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "evax-linear-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "linear input")?;
        let w = contiguous_f32(s2, l2, "linear weight")?;
        let b = contiguous_f32(s3, l3, "linear bias")?;
        let (n, k) = l2.shape().dims2()?;
        if b.len() != n || k == 0 || x.len() % k != 0 {
            candle_core::bail!(
                "linear: shapes do not fit ({:?} x {:?})",
                l1.shape(),
                l2.shape()
            );
        }
        let m = x.len() / k;
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        y.spare_capacity_mut()[..m * n]
            .par_chunks_mut(ROWS_PER_TASK * n)
            .for_each(|c| {
                c.chunks_exact_mut(n).for_each(|r| {
                    r.iter_mut().zip(b).for_each(|(d, &v)| {
                        d.write(v);
                    })
                })
            });
        // SAFETY: every element was written just above.
        unsafe { y.set_len(m * n) };
        // SAFETY: x is m x k, W^T is read from W (n x k) with swapped strides, y is m x n.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        let mut shape = l1.shape().dims().to_vec();
        *shape.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        read(x, |xv| {
            read(w, |wv| {
                read(dy, |g| {
                    let m = xv.len() / k;
                    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
                    // The GEMMs (read_dst = false) write every element of both outputs.
                    let mut dx: Vec<f32> = Vec::with_capacity(m * k);
                    let mut dw: Vec<f32> = Vec::with_capacity(n * k);
                    // SAFETY: dx (m x k) = dy (m x n) W (n x k); dW (n x k) = dy^T (n x m) x (m x k);
                    // the lengths are set once the GEMMs have written every element.
                    unsafe {
                        gemm::gemm(
                            m,
                            k,
                            n,
                            dx.as_mut_ptr(),
                            1,
                            k as isize,
                            false,
                            g.as_ptr(),
                            1,
                            n as isize,
                            wv.as_ptr(),
                            1,
                            k as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            par,
                        );
                        gemm::gemm(
                            n,
                            k,
                            m,
                            dw.as_mut_ptr(),
                            1,
                            k as isize,
                            false,
                            g.as_ptr(),
                            n as isize,
                            1,
                            xv.as_ptr(),
                            1,
                            k as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            par,
                        );
                        dx.set_len(m * k);
                        dw.set_len(n * k);
                    }
                    // Column sums in a fixed order (deterministic).
                    let partials: Vec<Vec<f32>> = g
                        .par_chunks(ROWS_PER_TASK * n)
                        .map(|c| {
                            let mut s = vec![0f32; n];
                            c.chunks_exact(n)
                                .for_each(|r| s.iter_mut().zip(r).for_each(|(a, v)| *a += v));
                            s
                        })
                        .collect();
                    let mut db = vec![0f32; n];
                    partials
                        .iter()
                        .for_each(|p| db.iter_mut().zip(p).for_each(|(a, v)| *a += v));
                    Ok((
                        Some(Tensor::from_vec(dx, x.shape(), x.device())?),
                        Some(Tensor::from_vec(dw, w.shape(), w.device())?),
                        Some(Tensor::from_vec(db, b.shape(), b.device())?),
                    ))
                })
            })
        })
    }
}

/// Differentiable `x W^T + b` for `x` `[..., K]`, `W` `[N, K]`, `b` `[N]`.
pub fn linear_train(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8000..=800 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut x: Vec<f32> = (0..30).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        simd::softmax_rows(&mut x, 10);
        for r in x.chunks(10) {
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
