//! The EVA-X forward pass built only from operations that have a backward pass.
//!
//! The inference path uses kernels without gradients (and candle's own fused LayerNorm, softmax
//! and RoPE have none either). Here the model is built from candle's differentiable primitives
//! and the fused kernels that have a backward (attention with RoPE, LayerNorm, SwiGLU, linear;
//! see [`crate::kernels`]), so gradients flow to activations (Grad-CAM) and parameters
//! (training). Every function takes the [`Kernels`] choice: the fused CPU kernels, or the
//! reference path on any device.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::eva_x::{Block, LN_EPS, LayerNorm, Linear};
use super::rope::RopeTables;
use crate::kernels::{self, Kernels};

/// RoPE tables of the input grid (shared with the fused attention kernel).
pub type RopeTensors = Arc<RopeTables>;

/// LayerNorm over the last axis.
pub fn layer_norm(x: &Tensor, ln: &LayerNorm, k: Kernels) -> Result<Tensor> {
    kernels::layer_norm(k, x, &ln.weight, &ln.bias, LN_EPS, true)
}

/// `x W^T + b` over the last axis.
pub fn linear(x: &Tensor, lin: &Linear, k: Kernels) -> Result<Tensor> {
    match &lin.bias {
        Some(b) => kernels::linear_train(k, x, &lin.weight()?, b),
        None => {
            let dims = x.dims().to_vec();
            let kdim = *dims.last().unwrap_or(&0);
            let w = lin.weight()?;
            let y = x
                .to_dtype(w.dtype())?
                .reshape(((), kdim))?
                .matmul(&w.t()?)?;
            let mut shape = dims;
            *shape.last_mut().expect("non-scalar") = w.dim(0)?;
            y.reshape(shape)
        }
    }
}

/// Attention of a block on `y` (its `norm1` output), `[B, T, C]`.
pub fn attention(block: &Block, y: &Tensor, rope: &RopeTensors, k: Kernels) -> Result<Tensor> {
    let qkv = linear(y, &block.qkv, k)?;
    let out = kernels::attention(k, &qkv, block.heads(), rope, true)?;
    linear(&out, &block.proj, k)
}

/// SwiGLU MLP of a block on `y` (its `norm2` output).
pub fn mlp(block: &Block, y: &Tensor, k: Kernels) -> Result<Tensor> {
    let mut h = kernels::swiglu(k, &linear(y, &block.w12, k)?, true)?;
    if let Some(ln) = &block.ffn_ln {
        h = layer_norm(&h, ln, k)?;
    }
    linear(&h, &block.w3, k)
}

/// A block's output from its input `x` and `y = norm1(x)` given separately, so that `y` can be
/// a leaf whose gradient is wanted (the Grad-CAM layer).
pub fn block_from_norm1(
    block: &Block,
    x: &Tensor,
    y: &Tensor,
    rope: &RopeTensors,
    k: Kernels,
) -> Result<Tensor> {
    residuals(block, x, y, rope, None, k)
}

/// Per-image scales `[B, 1, 1]` of the attention and MLP branches (drop path: 0 or 1 / keep).
pub type DropPath<'a> = Option<(&'a Tensor, &'a Tensor)>;

fn residuals(
    block: &Block,
    x: &Tensor,
    y: &Tensor,
    rope: &RopeTensors,
    drop: DropPath,
    k: Kernels,
) -> Result<Tensor> {
    // Branches computed in reduced precision join the residual stream in its own type.
    let mut a = attention(block, y, rope, k)?.to_dtype(x.dtype())?;
    if let Some((s, _)) = drop {
        a = a.broadcast_mul(s)?;
    }
    let x = (x + a)?;
    let mut m = mlp(block, &layer_norm(&x, &block.norm2, k)?, k)?.to_dtype(x.dtype())?;
    if let Some((_, s)) = drop {
        m = m.broadcast_mul(s)?;
    }
    x + m
}

/// A whole block, differentiably.
pub fn block(block: &Block, x: &Tensor, rope: &RopeTensors, k: Kernels) -> Result<Tensor> {
    block_with_drop_path(block, x, rope, None, k)
}

/// A whole block with drop path on its two residual branches.
pub fn block_with_drop_path(
    block: &Block,
    x: &Tensor,
    rope: &RopeTensors,
    drop: DropPath,
    k: Kernels,
) -> Result<Tensor> {
    let y = layer_norm(x, &block.norm1, k)?;
    residuals(block, x, &y, rope, drop, k)
}

/// Class logits `[B, K]` from token states `[B, T, C]`: mean of the patch tokens, `fc_norm`,
/// `head`.
pub fn head_logits(
    features: &Tensor,
    fc_norm: &LayerNorm,
    head: &Linear,
    k: Kernels,
) -> Result<Tensor> {
    let t = features.dim(1)?;
    let pooled = features.narrow(1, 1, t - 1)?.mean(1)?;
    linear(&layer_norm(&pooled, fc_norm, k)?, head, k)?.to_dtype(candle_core::DType::F32)
}
