//! The reference path: every fused operation rebuilt from candle's own primitives, so it runs
//! on any candle device and every step has candle's backward. Slower than the fused CPU
//! kernels; the arithmetic is the original's (LayerNorm with biased variance, scaled softmax
//! attention with interleaved 2-D RoPE on the patch tokens, SwiGLU).

use std::sync::Arc;

use candle_core::{D, DType, Result, Tensor};

use crate::model::rope::RopeTables;

/// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps as f64)?.sqrt()?)?;
    xhat.broadcast_mul(w)?.broadcast_add(b)
}

/// [`super::patch_rows`] as candle's permutation (differentiable).
pub fn patch_rows(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, ch, h, w) = x.dims4()?;
    if p == 0 || h % p != 0 || w % p != 0 {
        candle_core::bail!("patches: images {h} x {w} are not whole {p} x {p} patches");
    }
    let (gh, gw) = (h / p, w / p);
    x.reshape((b, ch, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b * gh * gw, ch * p * p))
}

/// Softmax over the last axis (the maximum is subtracted as a constant).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotate interleaved pairs of `x` `[..., N, d]` by the angles in `cos` / `sin` `[N, d]`:
/// `(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    let mut pairs = dims.clone();
    *pairs.last_mut().expect("non-scalar") = d / 2;
    pairs.push(2);
    let xp = x.reshape(pairs)?;
    let last = xp.rank() - 1;
    let x0 = xp.narrow(last, 0, 1)?;
    let x1 = xp.narrow(last, 1, 1)?;
    let rotated = Tensor::cat(&[&x1.neg()?, &x0], last)?.reshape(dims)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Multi-head attention with RoPE over `qkv` `[B, T, 3C]` (biases added): token 0 is the class
/// token, tokens 1.. get RoPE (none when the tables are empty); returns `[B, T, C]`. With
/// `fused`, candle's own softmax and interleaved RoPE kernels (no backward; the inference path
/// on devices without our fused kernels); otherwise composed primitives, the softmax in f32.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    tables: &Arc<RopeTables>,
    fused: bool,
) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    if heads == 0 || c3 != 3 * c || !c.is_multiple_of(heads) {
        candle_core::bail!("attention: qkv width {c3} does not fit {heads} heads");
    }
    let d = c / heads;
    let no_rope = tables.cos.is_empty();
    if !no_rope && (tables.dim != d || tables.cos.len() != (t - 1) * d) {
        candle_core::bail!(
            "attention: RoPE tables are for {} tokens of width {}, input has {} of {d}",
            tables.cos.len() / tables.dim.max(1),
            tables.dim,
            t - 1
        );
    }
    // [B, T, 3, H, d] -> three [B, H, T, d]
    let parts = qkv.reshape((b, t, 3, heads, d))?.permute((2, 0, 3, 1, 4))?;
    let take = |i: usize| parts.get(i)?.contiguous();
    let (q, k, v) = (take(0)?, take(1)?, take(2)?);
    let scale = 1.0 / (d as f64).sqrt();
    if fused {
        // candle's kernels, fewest steps: RoPE over every token (the class token's rotation is
        // the identity) with the query's scale folded into its tables.
        let (dev, dt) = (qkv.device(), qkv.dtype());
        let (q, k) = if no_rope {
            ((q * scale)?, k)
        } else {
            let (qc, qs) = tables.kernel_tensors(dev, dt, scale)?;
            let (kc, ks) = tables.kernel_tensors(dev, dt, 1.0)?;
            let rope = candle_nn::rotary_emb::rope_i;
            (rope(&q, &qc, &qs)?, rope(&k, &kc, &ks)?)
        };
        let p = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        return p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c));
    }
    let rot = if no_rope {
        None
    } else {
        Some(tables.tensors(qkv.device(), qkv.dtype())?)
    };
    let roped = |x: &Tensor| -> Result<Tensor> {
        let Some((cos, sin)) = &rot else {
            return Ok(x.clone());
        };
        let cls = x.narrow(2, 0, 1)?;
        let patches = rope(&x.narrow(2, 1, t - 1)?.contiguous()?, cos, sin)?;
        Tensor::cat(&[&cls, &patches], 2)
    };
    let q = (roped(&q)? * scale)?;
    let k = roped(&k)?;
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let p = softmax_last(&scores.to_dtype(DType::F32)?)?.to_dtype(qkv.dtype())?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// `silu(x1) * x2` where the last axis of `x` is `[x1 | x2]`.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(D::Minus1)?;
    if w == 0 || !w.is_multiple_of(2) {
        candle_core::bail!("swiglu: width {w} is not 2h");
    }
    let a = x.narrow(D::Minus1, 0, w / 2)?;
    let b = x.narrow(D::Minus1, w / 2, w / 2)?;
    a.silu()? * b
}

/// `x W^T + b (+ residual)` for `x` `[..., K]`, `W` `[N, K]` given as `W^T` `[K, N]`.
pub fn linear(
    x: &Tensor,
    wt: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let n = wt.dim(1)?;
    // Reduced precision: the product in the weights' type, a residual kept in its own.
    let x = x.to_dtype(wt.dtype())?;
    let mut y = x.reshape(((), k))?.matmul(wt)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let mut shape = dims;
    *shape.last_mut().expect("non-scalar") = n;
    let y = y.reshape(shape)?;
    match residual {
        Some(r) => r + y.to_dtype(r.dtype())?,
        None => Ok(y),
    }
}

/// Convolution (NCHW) with an optional bias `[Cout]`, then ReLU if asked.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    relu: bool,
) -> Result<Tensor> {
    let mut y = x.conv2d(w, pad, stride, 1, 1)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
    }
    if relu { y.relu() } else { Ok(y) }
}

/// BatchNorm in training mode over `[B, C, H, W]` (then ReLU if asked): output, batch mean
/// and biased variance.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let per_channel = |t: &Tensor| t.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3);
    let mean = per_channel(x)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = per_channel(&centred.sqr()?)?;
    let y = centred
        .broadcast_div(&(&var + eps as f64)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, (), 1, 1))?)?
        .broadcast_add(&beta.reshape((1, (), 1, 1))?)?;
    let y = if relu { y.relu()? } else { y };
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

/// Max pooling with a square window, padding with minus infinity: the maximum of the
/// window's `k * k` strided views (ties share the gradient, unlike the fused kernel).
pub fn max_pool(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if stride == 0 || k == 0 || h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!("max pool: a {k}x{k} window does not fit {h}x{w}");
    }
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    // Pad so that every view spans whole strides: rows ky .. ky + ho * stride.
    let (hp, wp) = (k + ho * stride, k + wo * stride);
    let fill = |rows: usize, cols: usize| {
        Tensor::full(f32::NEG_INFINITY, (b, c, rows, cols), x.device())?.to_dtype(x.dtype())
    };
    let x = Tensor::cat(&[&fill(h, pad)?, x, &fill(h, wp - w - pad)?], 3)?;
    let x = Tensor::cat(&[&fill(pad, wp)?, &x, &fill(hp - h - pad, wp)?], 2)?;
    let mut out: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let v = x
                .narrow(2, ky, ho * stride)?
                .reshape((b, c, ho, stride, wp))?
                .narrow(3, 0, 1)?
                .squeeze(3)?
                .narrow(3, kx, wo * stride)?
                .reshape((b, c, ho, wo, stride))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                Some(o) => o.maximum(&v)?,
                None => v,
            });
        }
    }
    Ok(out.expect("k > 0"))
}

/// `x * scale + shift` per channel of `[B, C, H, W]` (`scale`, `shift` `[C]`), then ReLU if
/// asked.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    let y = x
        .broadcast_mul(&scale.reshape((1, (), 1, 1))?)?
        .broadcast_add(&shift.reshape((1, (), 1, 1))?)?;
    if relu { y.relu() } else { Ok(y) }
}

/// GELU, the erf form.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// A 2 x 2, stride-2 transposed convolution of `[B, C, H, W]` to `[B, out, 2H, 2W]` (weight
/// `[C, out, 2, 2]`, bias `[out]`): each input pixel writes its own 2x2 block, one matrix
/// product.
pub fn upsample2x(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let out = w.dim(1)?;
    let rows = x.permute((0, 2, 3, 1))?.reshape((b * h * wd, c))?;
    let y = rows.matmul(&w.reshape((c, out * 4))?)?;
    y.reshape((b, h, wd, out, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, out, 2 * h, 2 * wd))?
        .broadcast_add(&bias.reshape((1, out, 1, 1))?)
}
