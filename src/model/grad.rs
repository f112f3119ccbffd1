//! The EVA-X forward pass built only from operations that have a backward pass.
//!
//! The inference path uses fused kernels without gradients (and candle's own fused LayerNorm,
//! softmax and RoPE have none either). Here the model is built from candle's differentiable
//! primitives and our fused kernels that have a backward (attention with RoPE, LayerNorm, SwiGLU; see
//! [`super::ops`]), so gradients flow to activations (Grad-CAM) and parameters (training).

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::eva_x::{Block, LN_EPS, LayerNorm, Linear};
use super::rope::RopeTables;

/// RoPE tables of the input grid (shared with the fused attention kernel).
pub type RopeTensors = Arc<RopeTables>;

/// LayerNorm over the last axis (fused kernel with a backward).
pub fn layer_norm(x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
    super::ops::layer_norm_train(x, &ln.weight, &ln.bias, LN_EPS)
}

/// `x W^T + b` over the last axis.
pub fn linear(x: &Tensor, lin: &Linear) -> Result<Tensor> {
    match &lin.bias {
        Some(b) => super::ops::linear_train(x, &lin.weight()?, b),
        None => {
            let dims = x.dims().to_vec();
            let k = *dims.last().unwrap_or(&0);
            let w = lin.weight()?;
            let y = x.reshape(((), k))?.matmul(&w.t()?)?;
            let mut shape = dims;
            *shape.last_mut().unwrap() = w.dim(0)?;
            y.reshape(shape)
        }
    }
}

/// Attention of a block on `y` (its `norm1` output), `[B, T, C]`.
pub fn attention(block: &Block, y: &Tensor, rope: &RopeTensors) -> Result<Tensor> {
    let qkv = linear(y, &block.qkv)?;
    let out = super::ops::attention_train(&qkv, block.heads(), rope)?;
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
