//! The compute kernels of the models, in three layers:
//!
//! - [`cpu`]: the fused CPU fast paths on plain slices (no candle types);
//! - [`candle_ops`]: candle custom ops that adapt those to CPU tensors, with a backward;
//! - [`reference`]: the same operations from candle's own primitives, on any device.
//!
//! The functions here pick one by [`Kernels`] and the tensor's device and type: the fused
//! kernels for f32 tensors on the CPU, the reference path everywhere else (and on request, so
//! the two can be checked against each other).

pub mod candle_ops;
pub mod cpu;
pub mod dispatch;
pub mod reference;

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::model::rope::RopeTables;

/// Which implementation of the fused operations a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels where they apply (f32 on the CPU), the reference path elsewhere.
    #[default]
    Fused,
    /// Always the reference path built from candle primitives.
    Reference,
}

impl Kernels {
    /// Whether the fused CPU kernels handle `x`.
    pub fn fused_for(self, x: &Tensor) -> bool {
        self == Kernels::Fused && x.device().is_cpu() && x.dtype() == DType::F32
    }
}

/// LayerNorm over the last axis. Inference (`grad` false) on the fused path uses candle's own
/// fused LayerNorm (CPU and GPU, no backward); training uses ours (CPU, with a backward).
pub fn layer_norm(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    grad: bool,
) -> Result<Tensor> {
    match (k, grad) {
        (Kernels::Fused, false) => candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps),
        (Kernels::Fused, true) if k.fused_for(x) => candle_ops::layer_norm(x, w, b, eps),
        _ => reference::layer_norm(x, w, b, eps),
    }
}

/// Multi-head attention with RoPE over `qkv` `[B, T, 3C]`; returns `[B, T, C]`.
pub fn attention(
    k: Kernels,
    qkv: &Tensor,
    heads: usize,
    rope: &Arc<RopeTables>,
    grad: bool,
) -> Result<Tensor> {
    if k.fused_for(qkv) {
        candle_ops::attention(qkv, heads, rope, grad)
    } else {
        reference::attention(qkv, heads, rope)
    }
}

/// `silu(x1) * x2` over a packed `[x1 | x2]` activation.
pub fn swiglu(k: Kernels, x: &Tensor, grad: bool) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::swiglu(x, grad)
    } else {
        reference::swiglu(x)
    }
}

/// Inference `x Wt + b (+ residual)` with `Wt` = `W^T` `[K, N]`.
pub fn linear(
    k: Kernels,
    x: &Tensor,
    wt: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if k.fused_for(x) && wt.is_contiguous() {
        candle_ops::linear(x, wt, b, residual)
    } else {
        reference::linear(x, wt, b, residual)
    }
}

/// Differentiable `x W^T + b` with `W` `[N, K]` as stored.
pub fn linear_train(k: Kernels, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::linear_train(x, w, b)
    } else {
        reference::linear(x, &w.t()?, Some(b), None)
    }
}
