//! The EVA-X forward pass built only from candle operations that have a backward pass.
//!
//! The inference path uses fused kernels without gradients (and candle's own fused LayerNorm,
//! softmax and RoPE have none either). Here LayerNorm, softmax and RoPE are written from
//! primitives (RoPE's pair rotation as a product with a fixed matrix), so gradients flow to
//! activations (Grad-CAM) and, later, to parameters.

use candle_core::{Device, Result, Tensor};

use super::eva_x::{Block, LN_EPS, LayerNorm, Linear};
use super::rope::RopeTables;

/// RoPE tables as tensors, with the pair-rotation matrix.
#[derive(Debug, Clone)]
pub struct RopeTensors {
    cos: Tensor,
    sin: Tensor,
    rotate: Tensor,
}

impl RopeTensors {
    /// Tensors `[N, d]` for the tables, and the `[d, d]` matrix mapping `(u0, u1, ...)` to
    /// `(-u1, u0, ...)`.
    pub fn new(t: &RopeTables, device: &Device) -> Result<Self> {
        let d = t.dim;
        let n = t.cos.len() / d;
        let mut r = vec![0f32; d * d];
        for i in 0..d / 2 {
            r[(2 * i + 1) * d + 2 * i] = -1.0;
            r[(2 * i) * d + 2 * i + 1] = 1.0;
        }
        Ok(RopeTensors {
            cos: Tensor::from_slice(&t.cos, (n, d), device)?,
            sin: Tensor::from_slice(&t.sin, (n, d), device)?,
            rotate: Tensor::from_vec(r, (d, d), device)?,
        })
    }

    /// Rotate `x` `[B, H, N, d]` (patch tokens only).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let rotated = x.broadcast_matmul(&self.rotate)?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}

/// LayerNorm over the last axis (fused kernel with a backward).
pub fn layer_norm(x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
    super::ops::layer_norm_train(x, &ln.weight, &ln.bias, LN_EPS)
}

/// Softmax over the last axis (fused kernel with a backward).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    super::ops::softmax_train(x)
}

/// `x W^T + b` over the last axis.
pub fn linear(x: &Tensor, lin: &Linear) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let wt = lin.weight_t();
    let y = x.reshape(((), k))?.matmul(wt)?;
    let y = match &lin.bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut shape = dims;
    *shape.last_mut().unwrap() = wt.dim(1)?;
    y.reshape(shape)
}

fn rope_patch_tokens(x: &Tensor, rope: &RopeTensors) -> Result<Tensor> {
    let t = x.dim(2)?;
    let cls = x.narrow(2, 0, 1)?;
    let patches = rope.apply(&x.narrow(2, 1, t - 1)?)?;
    Tensor::cat(&[&cls, &patches], 2)
}

/// Attention of a block on `y` (its `norm1` output), `[B, T, C]`.
pub fn attention(block: &Block, y: &Tensor, rope: &RopeTensors) -> Result<Tensor> {
    let (b, t, c) = y.dims3()?;
    let h = block.heads();
    let d = c / h;
    let qkv = linear(y, &block.qkv)?
        .reshape((b, t, 3, h, d))?
        .permute((2, 0, 3, 1, 4))?;
    let q = rope_patch_tokens(&qkv.get(0)?.contiguous()?, rope)?;
    let k = rope_patch_tokens(&qkv.get(1)?.contiguous()?, rope)?;
    let v = qkv.get(2)?.contiguous()?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    let out = softmax_last(&scores)?.matmul(&v)?;
    let out = out.permute((0, 2, 1, 3))?.reshape((b, t, c))?;
    linear(&out, &block.proj)
}

/// SwiGLU MLP of a block on `y` (its `norm2` output).
pub fn mlp(block: &Block, y: &Tensor) -> Result<Tensor> {
    let mut h = super::ops::swiglu_train(&linear(y, &block.w12)?)?;
    if let Some(ln) = &block.ffn_ln {
        h = layer_norm(&h, ln)?;
    }
    linear(&h, &block.w3)
}

/// A block's output from its input `x` and `y = norm1(x)` given separately, so that `y` can be
/// a leaf whose gradient is wanted (the Grad-CAM layer).
pub fn block_from_norm1(
    block: &Block,
    x: &Tensor,
    y: &Tensor,
    rope: &RopeTensors,
) -> Result<Tensor> {
    residuals(block, x, y, rope, None)
}

/// Per-image scales `[B, 1, 1]` of the attention and MLP branches (drop path: 0 or 1 / keep).
pub type DropPath<'a> = Option<(&'a Tensor, &'a Tensor)>;

fn residuals(
    block: &Block,
    x: &Tensor,
    y: &Tensor,
    rope: &RopeTensors,
    drop: DropPath,
) -> Result<Tensor> {
    let mut a = attention(block, y, rope)?;
    if let Some((s, _)) = drop {
        a = a.broadcast_mul(s)?;
    }
    let x = (x + a)?;
    let mut m = mlp(block, &layer_norm(&x, &block.norm2)?)?;
    if let Some((_, s)) = drop {
        m = m.broadcast_mul(s)?;
    }
    x + m
}

/// A whole block, differentiably.
pub fn block(block: &Block, x: &Tensor, rope: &RopeTensors) -> Result<Tensor> {
    block_with_drop_path(block, x, rope, None)
}

/// A whole block with drop path on its two residual branches.
pub fn block_with_drop_path(
    block: &Block,
    x: &Tensor,
    rope: &RopeTensors,
    drop: DropPath,
) -> Result<Tensor> {
    let y = layer_norm(x, &block.norm1)?;
    residuals(block, x, &y, rope, drop)
}

/// Class logits `[B, K]` from token states `[B, T, C]`: mean of the patch tokens, `fc_norm`,
/// `head`.
pub fn head_logits(features: &Tensor, fc_norm: &LayerNorm, head: &Linear) -> Result<Tensor> {
    let t = features.dim(1)?;
    let pooled = features.narrow(1, 1, t - 1)?.mean(1)?;
    linear(&layer_norm(&pooled, fc_norm)?, head)
}
