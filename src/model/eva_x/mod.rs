//! The EVA-X Vision Transformer (Ti / S / B, patch 16), configured from its checkpoint.
//!
//! Forward (REFERENCE.md 1): patch embedding, class token and `pos_embed`, pre-norm blocks with
//! RoPE attention and SwiGLU MLP, then either the MIM `norm` or mean pooling + `fc_norm` + `head`.
//! Weights are plain f32 tensors (no autograd graph) for inference.

pub mod cam;
pub mod train;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::adapt::{self, EvaStateDict};
use super::rope::{self, RopeTables};
use super::{Backbone, Classifier, Representation};
use crate::checkpoint::{Checkpoint, Param};
use crate::compute::Precision;
use crate::kernels::{self, Kernels};
use crate::preprocess::Normalization;

/// LayerNorm epsilon used throughout EVA-X.
pub const LN_EPS: f32 = 1e-6;
/// RoPE reference grid of the MIM pre-training (and Ti/S fine-tuning).
pub const DEFAULT_ROPE_GRID: f64 = 14.0;

/// Errors building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The weights do not describe a usable EVA-X model.
    #[error("{0}")]
    Weights(String),
    /// The input does not fit the model.
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ModelError>;

/// What a checkpoint was trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Masked-image-modelling pre-training: final `norm`, `lm_head`.
    Mim,
    /// Fine-tuned classifier: `fc_norm`, `head`.
    FineTuned,
    /// Bare backbone (neither head).
    Backbone,
}

/// The architecture, as read off the weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvaXConfig {
    /// Token width.
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads (head_dim 64).
    pub heads: usize,
    /// SwiGLU hidden width.
    pub mlp_hidden: usize,
    /// Patch size of the stored kernel.
    pub patch_size: usize,
    /// `qkv` fused (Ti/S) rather than separate q/k/v projections (B).
    pub fused_qkv: bool,
    /// SwiGLU with a LayerNorm on the hidden activation (B).
    pub sub_ln: bool,
    /// Grid the `pos_embed` was trained for (rows, columns).
    pub train_grid: (usize, usize),
    /// RoPE reference grid r.
    pub rope_grid: f64,
    /// Where r came from: `"tables"`, `"default"` or `"override"`.
    pub rope_grid_source: &'static str,
    /// What the checkpoint is.
    pub kind: Kind,
    /// Classes of the head, if any.
    pub num_classes: Option<usize>,
}

impl EvaXConfig {
    /// Conventional name of the size (`EVA-X-Ti`, `EVA-X-S`, `EVA-X-B`) or a description.
    pub fn variant(&self) -> String {
        match self.dim {
            192 => "EVA-X-Ti".into(),
            384 => "EVA-X-S".into(),
            768 => "EVA-X-B".into(),
            d => format!("EVA-X (dim {d})"),
        }
    }

    /// The preset configurations of the three released sizes (random-weight benchmarks).
    pub fn preset(name: &str) -> Option<Self> {
        let (dim, heads, fused_qkv, sub_ln) = match name {
            "ti" | "tiny" => (192, 3, true, false),
            "s" | "small" => (384, 6, true, false),
            "b" | "base" => (768, 12, false, true),
            _ => return None,
        };
        Some(EvaXConfig {
            dim,
            depth: 12,
            heads,
            mlp_hidden: dim * 4 * 2 / 3,
            patch_size: 16,
            fused_qkv,
            sub_ln,
            train_grid: (14, 14),
            rope_grid: DEFAULT_ROPE_GRID,
            rope_grid_source: "default",
            kind: Kind::FineTuned,
            num_classes: Some(14),
        })
    }
}

/// Options for building a model from weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Force the RoPE reference grid r (default: from stored tables, else 14).
    pub rope_grid: Option<f64>,
    /// Where the weights live and the model computes.
    pub device: Device,
    /// Fused kernels or the reference path.
    pub kernels: Kernels,
    /// The arithmetic of matrix products and attention (norms, residuals and outputs stay f32).
    pub precision: Precision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            rope_grid: None,
            device: Device::Cpu,
            kernels: Kernels::Fused,
            precision: Precision::F32,
        }
    }
}

impl LoadOptions {
    /// Default options with the RoPE reference grid forced (or not).
    pub fn with_rope_grid(rope_grid: Option<f64>) -> Self {
        LoadOptions {
            rope_grid,
            ..Default::default()
        }
    }
}

/// What loading used and left.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    /// Keys present but not used by the model (including those outside the backbone).
    pub unused: Vec<String>,
    /// Prefix the backbone was found under.
    pub prefix: String,
    /// Whether timm key names were translated.
    pub from_timm: bool,
    /// Parameters of the model (excluding RoPE buffers).
    pub parameters: usize,
    /// The checkpoint layout recognised, where it is not the family's own.
    pub layout: Option<String>,
    /// Backbone keys dropped as the original drops them.
    pub dropped: Vec<String>,
}

/// Collects weights by key, recording what was used and what was missing.
struct WeightSource<'a> {
    sd: &'a BTreeMap<String, Param>,
    device: &'a Device,
    dtype: DType,
    /// bf16 on the CPU: f32 tensors, the blocks' dense layers in bf16 products.
    bf16_cpu: bool,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

/// Where a model's tensors come from, by models_eva key: a checkpoint (inference) or the
/// trainable variables (training).
pub trait TensorSource {
    /// The tensor `key` of shape `shape` (a missing or misshapen one is recorded by the source
    /// and replaced by zeros, so that every problem is reported at once).
    fn tensor(&mut self, key: &str, shape: &[usize]) -> Tensor;

    /// The type matrix products compute in (f32 unless a reduced precision was asked for).
    fn compute_dtype(&self) -> DType {
        DType::F32
    }

    /// A LayerNorm's weight and bias under `prefix`.
    fn layer_norm(&mut self, prefix: &str, dim: usize) -> LayerNorm {
        LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim]),
            bias: self.tensor(&format!("{prefix}.bias"), &[dim]),
        }
    }

    /// A Linear layer from its tensors (inference: with the transposed copy the fused kernels
    /// read).
    /// Whether the blocks' dense layers compute in bf16 on the CPU (their weights f32).
    fn bf16_products(&self) -> bool {
        false
    }

    /// A dense layer from its weight `[out, in]` and bias, in the compute type.
    fn make_linear(&self, weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Linear> {
        let dt = self.compute_dtype();
        let l = Linear::new(
            weight.to_dtype(dt)?,
            bias.map(|b| b.to_dtype(dt)).transpose()?,
        )?;
        if self.bf16_products() {
            l.with_bf16_products()
        } else {
            l.with_prepacked_products()
        }
    }

    /// A Linear layer's weight and bias under `prefix`.
    fn linear(&mut self, prefix: &str, out: usize, inp: usize) -> Linear {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out, inp]);
        let bias = self.tensor(&format!("{prefix}.bias"), &[out]);
        self.make_linear(weight, Some(bias)).expect("linear layer")
    }
}

impl WeightSource<'_> {
    fn param(&mut self, key: &str, shape: &[usize]) -> Option<&Param> {
        match self.sd.get(key) {
            None => {
                self.problems.push(format!("missing {key}"));
                None
            }
            Some(p) if p.shape != shape => {
                self.problems
                    .push(format!("{key} has shape {:?}, expected {shape:?}", p.shape));
                None
            }
            Some(p) => {
                self.used.insert(key.to_owned());
                Some(p)
            }
        }
    }
    fn optional(&mut self, key: &str, shape: &[usize]) -> Option<Tensor> {
        if self.sd.contains_key(key) {
            Some(self.tensor(key, shape))
        } else {
            None
        }
    }
}

impl TensorSource for WeightSource<'_> {
    fn tensor(&mut self, key: &str, shape: &[usize]) -> Tensor {
        let device = self.device;
        match self.param(key, shape) {
            Some(p) => Tensor::from_slice(&p.data, shape, device).expect("shape checked"),
            None => Tensor::zeros(shape, candle_core::DType::F32, device).expect("alloc"),
        }
    }

    fn compute_dtype(&self) -> DType {
        self.dtype
    }

    fn bf16_products(&self) -> bool {
        self.bf16_cpu
    }
}

/// LayerNorm over the last axis (eps 1e-6).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
}

impl LayerNorm {
    /// The normalised `x` (inference).
    pub fn forward(&self, x: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
        kernels::layer_norm(k, x, &self.weight, &self.bias, LN_EPS, false)
    }
}

/// A dense layer `y = x W^T + b` over the last axis.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W^T` stored contiguously `[in, out]`: the layout the GEMM reads without repacking;
    /// `None` where the f32 panels hold the weight instead (see [`Linear::weight_t`]).
    weight_t: Option<Tensor>,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// The weight packed once for the CPU's fast inference products: bf16 (`--precision
    /// bf16`) or f32 panels on AVX-512.
    prepared: Option<Arc<kernels::PreparedWeight>>,
}

impl Linear {
    /// `x W^T + b` (inference).
    pub fn forward(&self, x: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
        match self.prepared_for(x, k) {
            Some(w) => kernels::candle_ops::linear_prepared(x, w, self.bias.as_ref(), None),
            None => kernels::linear(k, x, &self.weight_t()?, self.bias.as_ref(), None),
        }
    }

    /// The prepared weight, where it computes `x`: bf16 products always (asked for by the
    /// model's precision), f32 panels with the fused kernels on CPU f32 input.
    fn prepared_for(&self, x: &Tensor, k: Kernels) -> Option<&kernels::PreparedWeight> {
        match self.prepared.as_deref() {
            Some(w @ kernels::PreparedWeight::Bf16(_)) => Some(w),
            Some(w @ kernels::PreparedWeight::F32(_)) if k.fused_for(x) => Some(w),
            _ => None,
        }
    }

    /// Attention's `[q | k | v]` with q and k rotated by `rope` and q scaled, where this
    /// layer's f32 panels compute `x` (see [`kernels::candle_ops::linear_qkv_roped`]).
    fn forward_qkv_roped(
        &self,
        x: &Tensor,
        k: Kernels,
        heads: usize,
        rope: &RopeTables,
    ) -> candle_core::Result<Option<Tensor>> {
        match self.prepared_for(x, k) {
            Some(w) => kernels::candle_ops::linear_qkv_roped(x, w, self.bias.as_ref(), heads, rope),
            None => Ok(None),
        }
    }

    /// Whether this layer computes in bf16 products on the CPU.
    fn bf16_products(&self) -> bool {
        matches!(
            self.prepared.as_deref(),
            Some(kernels::PreparedWeight::Bf16(_))
        )
    }

    /// `silu(y1) * y2` for `[y1 | y2] = x W^T + b` (inference; fused with the product where
    /// the weight is prepared).
    pub fn forward_swiglu(&self, x: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
        match self.prepared_for(x, k) {
            Some(w) => kernels::candle_ops::linear_prepared_swiglu(x, w, self.bias.as_ref()),
            None => kernels::swiglu(k, &self.forward(x, k)?, false),
        }
    }

    /// This layer computing its products in bf16 on the CPU (the weight rounded and packed
    /// once; see [`kernels::bf16`]).
    pub fn with_bf16_products(mut self) -> candle_core::Result<Self> {
        // The f32 weight stays for the paths that do not read bf16 panels.
        let w = self.weight_t()?;
        let (k, n) = w.dims2()?;
        self.weight_t = Some(w);
        let wt = self.weight_t_values()?;
        let w = kernels::bf16::Bf16Weight::new(&wt, k, n);
        self.prepared = Some(Arc::new(kernels::PreparedWeight::Bf16(w)));
        Ok(self)
    }

    /// This layer computing its f32 products on panels packed once, where the CPU has AVX-512
    /// and the weight is f32 on the CPU (see [`kernels::prepacked`]); unchanged elsewhere. The
    /// panels then hold the only copy of the weight.
    pub fn with_prepacked_products(mut self) -> candle_core::Result<Self> {
        let w = self.weight_t()?;
        if !(kernels::prepacked::available() && w.device().is_cpu() && w.dtype() == DType::F32) {
            return Ok(self);
        }
        let (k, n) = w.dims2()?;
        let packed = kernels::prepacked::PackedWeight::new(&self.weight_t_values()?, k, n);
        self.prepared = Some(Arc::new(kernels::PreparedWeight::F32(packed)));
        self.weight_t = None;
        Ok(self)
    }

    /// `W^T`'s values as f32, row-major `[in, out]`.
    fn weight_t_values(&self) -> candle_core::Result<Vec<f32>> {
        self.weight_t()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// A layer for the differentiable path only: `W^T` kept as a view of `weight` (no copy; the
    /// fused inference kernels need [`Linear::new`]).
    pub fn new_view(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Linear {
            weight_t: Some(weight.t()?),
            bias,
            prepared: None,
        })
    }

    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let weight_t = weight.t()?.contiguous()?;
        Ok(Linear {
            weight_t: Some(weight_t),
            bias,
            prepared: None,
        })
    }

    /// The weight `[out, in]` (a transposed view).
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        self.weight_t()?.t()
    }

    /// The transposed weight `[in, out]`, contiguous (unpacked from the f32 panels where they
    /// hold the weight: for the paths that do not read panels, Grad-CAM's and the reference
    /// kernels').
    pub fn weight_t(&self) -> candle_core::Result<Tensor> {
        match (&self.weight_t, self.prepared.as_deref()) {
            (Some(w), _) => Ok(w.clone()),
            (None, Some(kernels::PreparedWeight::F32(p))) => {
                Tensor::from_vec(p.unpack(), (p.k(), p.n()), &candle_core::Device::Cpu)
            }
            (None, _) => Err(candle_core::Error::Msg(
                "linear layer: neither W^T nor f32 panels".into(),
            )),
        }
    }

    /// `residual + x W^T + b`, fused.
    pub fn forward_add(
        &self,
        x: &Tensor,
        residual: &Tensor,
        k: Kernels,
    ) -> candle_core::Result<Tensor> {
        match self.prepared_for(x, k) {
            Some(w) => {
                kernels::candle_ops::linear_prepared(x, w, self.bias.as_ref(), Some(residual))
            }
            None => kernels::linear(k, x, &self.weight_t()?, self.bias.as_ref(), Some(residual)),
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Pre-attention norm (`norm1`, the Grad-CAM target layer of the last block).
    pub norm1: LayerNorm,
    /// Fused q/k/v projection; the k part of the bias is zero.
    pub qkv: Linear,
    /// Attention output projection.
    pub proj: Linear,
    /// Pre-MLP norm.
    pub norm2: LayerNorm,
    /// Packed SwiGLU input projection `[x1 | x2]`.
    pub w12: Linear,
    /// Sub-LN on the hidden activation (B only).
    pub ffn_ln: Option<LayerNorm>,
    /// SwiGLU output projection.
    pub w3: Linear,
    heads: usize,
}

impl Block {
    /// Build block `i` of a model with configuration `cfg` from a tensor source.
    pub fn load<S: TensorSource>(ws: &mut S, i: usize, cfg: &EvaXConfig) -> Result<Self> {
        let (c, hdn) = (cfg.dim, cfg.mlp_hidden);
        let p = format!("blocks.{i}");
        let norm1 = ws.layer_norm(&format!("{p}.norm1"), c);
        let q_bias = ws.tensor(&format!("{p}.attn.q_bias"), &[c]);
        let v_bias = ws.tensor(&format!("{p}.attn.v_bias"), &[c]);
        let k_bias = q_bias.zeros_like()?;
        let qkv_w = if cfg.fused_qkv {
            ws.tensor(&format!("{p}.attn.qkv.weight"), &[3 * c, c])
        } else {
            let q = ws.tensor(&format!("{p}.attn.q_proj.weight"), &[c, c]);
            let k = ws.tensor(&format!("{p}.attn.k_proj.weight"), &[c, c]);
            let v = ws.tensor(&format!("{p}.attn.v_proj.weight"), &[c, c]);
            Tensor::cat(&[q, k, v], 0)?
        };
        let qkv = ws.make_linear(qkv_w, Some(Tensor::cat(&[q_bias, k_bias, v_bias], 0)?))?;
        let proj = ws.linear(&format!("{p}.attn.proj"), c, c);
        let norm2 = ws.layer_norm(&format!("{p}.norm2"), c);
        let (w12, ffn_ln) = if cfg.sub_ln {
            // w1 and w2 as one layer (their tensors joined; no layer made of each alone).
            let part = |ws: &mut S, name: &str| {
                (
                    ws.tensor(&format!("{p}.mlp.{name}.weight"), &[hdn, c]),
                    ws.tensor(&format!("{p}.mlp.{name}.bias"), &[hdn]),
                )
            };
            let ((w1, b1), (w2, b2)) = (part(ws, "w1"), part(ws, "w2"));
            let w12 =
                ws.make_linear(Tensor::cat(&[w1, w2], 0)?, Some(Tensor::cat(&[b1, b2], 0)?))?;
            (w12, Some(ws.layer_norm(&format!("{p}.mlp.ffn_ln"), hdn)))
        } else {
            (ws.linear(&format!("{p}.mlp.w12"), 2 * hdn, c), None)
        };
        let w3 = ws.linear(&format!("{p}.mlp.w3"), c, hdn);
        Ok(Block {
            norm1,
            qkv,
            proj,
            norm2,
            w12,
            ffn_ln,
            w3,
            heads: cfg.heads,
        })
    }

    /// Attention heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// `x + attn(norm1(x))`, then `+ mlp(norm2(x))`.
    pub fn forward(&self, x: &Tensor, rope: &Arc<RopeTables>, k: Kernels) -> Result<Tensor> {
        let y = self.norm1.forward(x, k)?;
        let a = match self.qkv.forward_qkv_roped(&y, k, self.heads, rope)? {
            // On f32 panels, RoPE and q's scale are applied as the qkv product is made.
            Some(qkv) => kernels::candle_ops::attention_roped(&qkv, self.heads, rope)?,
            None => {
                let qkv = self.qkv.forward(&y, k)?;
                // With bf16 products on the CPU, attention's products are bf16 too where AMX
                // runs them.
                let bf16 = match self.qkv.bf16_products() {
                    true => kernels::candle_ops::attention_bf16(&qkv, self.heads, rope)?,
                    false => None,
                };
                match bf16 {
                    Some(a) => a,
                    None => kernels::attention(k, &qkv, self.heads, rope, false)?,
                }
            }
        };
        let x = self.proj.forward_add(&a, x, k)?;
        let y = self.norm2.forward(&x, k)?;
        let mut h = self.w12.forward_swiglu(&y, k)?;
        if let Some(ln) = &self.ffn_ln {
            h = ln.forward(&h, k)?;
        }
        Ok(self.w3.forward_add(&h, &x, k)?)
    }
}

/// Positional state for one input grid: resampled `pos_embed` and RoPE tables.
struct GridState {
    pos_embed: Tensor,
    rope: Arc<RopeTables>,
}

/// An EVA-X model ready for inference.
pub struct EvaX {
    /// The architecture.
    pub config: EvaXConfig,
    /// Patch embedding as a dense layer over flattened `3 x p x p` patches.
    patch: Linear,
    cls_token: Tensor,
    pos_embed: Param,
    /// The transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm of MIM checkpoints (applied to tokens and the pooled mean).
    pub norm: Option<LayerNorm>,
    /// Norm of the mean patch token in fine-tuned checkpoints.
    pub fc_norm: Option<LayerNorm>,
    /// Classification head.
    pub head: Option<Linear>,
    /// Where the weights live and the model computes.
    pub device: Device,
    /// Fused kernels or the reference path.
    pub kernels: Kernels,
    grids: Mutex<HashMap<(usize, usize), Arc<GridState>>>,
}

/// Read the architecture off a models_eva-layout state dict.
pub fn infer_config(sd: &BTreeMap<String, Param>, opts: &LoadOptions) -> Result<EvaXConfig> {
    let bad = |m: String| ModelError::Weights(m);
    let super::TokenGeometry {
        dim,
        patch_size: p,
        depth,
        grid: g,
        num_classes,
    } = super::token_geometry(sd, "an EVA-X")?;
    let fused_qkv = sd.keys().any(|k| k.ends_with(".attn.qkv.weight"));
    let sub_ln = sd.keys().any(|k| k.contains(".mlp.ffn_ln."));
    let rows = |w: &Param| w.shape.first().copied().unwrap_or(0);
    let mlp_hidden = if let Some(w) = sd.get("blocks.0.mlp.w12.weight") {
        rows(w) / 2
    } else if let Some(w) = sd.get("blocks.0.mlp.w1.weight") {
        rows(w)
    } else {
        return Err(bad(
            "missing blocks.0.mlp.w12.weight (or w1): unknown MLP".into()
        ));
    };
    if mlp_hidden == 0 {
        return Err(bad("the MLP of blocks.0 has zero width".into()));
    }
    let kind = if num_classes.is_some() || sd.contains_key("fc_norm.weight") {
        Kind::FineTuned
    } else if sd.contains_key("norm.weight") || sd.contains_key("lm_head.weight") {
        Kind::Mim
    } else {
        Kind::Backbone
    };
    let head_dim = 64;
    let stored = match (sd.get("rope.freqs_cos"), sd.get("rope.freqs_sin")) {
        (Some(c), Some(s)) if c.shape.len() == 2 && c.shape[1] == head_dim => {
            // Tables built for another grid n hold r too: angle(token 1) = r / n.
            rope::infer_reference_grid(&c.data, &s.data, c.shape[0], head_dim)
        }
        _ => None,
    };
    let (rope_grid, rope_grid_source) = match (opts.rope_grid, stored) {
        (Some(r), _) => (r, "override"),
        (None, Some(r)) => (r, "tables"),
        (None, None) => (DEFAULT_ROPE_GRID, "default"),
    };
    Ok(EvaXConfig {
        dim,
        depth,
        heads: dim / head_dim,
        mlp_hidden,
        patch_size: p,
        fused_qkv,
        sub_ln,
        train_grid: (g, g),
        rope_grid,
        rope_grid_source,
        kind,
        num_classes,
    })
}

/// Keys that carry no learned parameters of the inference model (recomputed or training-only).
fn is_ignorable(key: &str) -> bool {
    key.ends_with("rope.freqs_cos") || key.ends_with("rope.freqs_sin")
}

impl EvaX {
    /// Build a model from a checkpoint (any supported format and layout).
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let sd = adapt::to_eva_layout(&ck.tensors)?;
        Self::from_eva_state_dict(&sd, opts)
    }

    /// Build a model from a state dict already in the models_eva layout.
    pub fn from_eva_state_dict(
        sd: &EvaStateDict,
        opts: &LoadOptions,
    ) -> Result<(Self, LoadReport)> {
        let config = infer_config(&sd.tensors, opts)?;
        let (c, p) = (config.dim, config.patch_size);
        // On the CPU bf16 means bf16 products in the dense layers ([`kernels::bf16`]); the rest
        // stays f32 as on the f32 path.
        let bf16_cpu = opts.precision == Precision::Bf16 && opts.device.is_cpu();
        let mut ws = WeightSource {
            sd: &sd.tensors,
            device: &opts.device,
            dtype: if bf16_cpu {
                DType::F32
            } else {
                opts.precision.dtype()
            },
            bf16_cpu,
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let patch_weight = ws
            .tensor("patch_embed.proj.weight", &[c, 3, p, p])
            .reshape((c, 3 * p * p))?
            .to_dtype(ws.dtype)?;
        let patch_bias = ws.tensor("patch_embed.proj.bias", &[c]);
        let cls_token = ws.tensor("cls_token", &[1, 1, c]);
        let n = 1 + config.train_grid.0 * config.train_grid.1;
        let pos_embed = ws.param("pos_embed", &[1, n, c]).cloned();
        let blocks = (0..config.depth)
            .map(|i| Block::load(&mut ws, i, &config))
            .collect::<Result<Vec<_>>>()?;
        let norm = if ws.sd.contains_key("norm.weight") {
            Some(ws.layer_norm("norm", c))
        } else {
            None
        };
        let fc_norm = if ws.sd.contains_key("fc_norm.weight") {
            Some(ws.layer_norm("fc_norm", c))
        } else {
            None
        };
        let head = match config.num_classes {
            Some(k) => {
                let weight = ws.tensor("head.weight", &[k, c]);
                Some(Linear::new(weight, ws.optional("head.bias", &[k]))?)
            }
            None => None,
        };
        if !ws.problems.is_empty() {
            let shown: Vec<&str> = ws.problems.iter().take(12).map(|s| s.as_str()).collect();
            let more = ws.problems.len().saturating_sub(shown.len());
            return Err(ModelError::Weights(format!(
                "weights incomplete for {} depth {}: {}{}",
                config.variant(),
                config.depth,
                shown.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        let parameters = ws.used.iter().map(|k| sd.tensors[k].numel()).sum();
        let mut unused: Vec<String> = sd
            .tensors
            .keys()
            .filter(|k| !ws.used.contains(*k) && !is_ignorable(k))
            .map(|k| format!("{}{k}", sd.prefix))
            .collect();
        unused.extend(sd.outside.iter().cloned());
        let model = EvaX {
            config,
            patch: Linear::new(patch_weight, Some(patch_bias))?,
            cls_token,
            pos_embed: pos_embed.expect("checked above"),
            blocks,
            norm,
            fc_norm,
            head,
            device: opts.device.clone(),
            kernels: opts.kernels,
            grids: Mutex::new(HashMap::new()),
        };
        let report = LoadReport {
            unused,
            prefix: sd.prefix.clone(),
            from_timm: sd.from_timm,
            parameters,
            ..Default::default()
        };
        Ok((model, report))
    }

    /// A model with random weights of a preset configuration (for benchmarks).
    pub fn random(config: EvaXConfig, seed: u64) -> Result<Self> {
        let sd = random_state_dict(&config, seed);
        let opts = LoadOptions::with_rope_grid(Some(config.rope_grid));
        Ok(Self::from_eva_state_dict(&sd, &opts)?.0)
    }

    /// Learned parameters of the inference model (for reporting).
    pub fn pos_embed(&self) -> &Param {
        &self.pos_embed
    }

    fn grid_state(&self, grid: (usize, usize)) -> Result<Arc<GridState>> {
        let mut cache = self.grids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&grid) {
            return Ok(s.clone());
        }
        let pos = adapt::resample_pos_embed(&self.pos_embed, grid)?;
        let state = Arc::new(GridState {
            pos_embed: pos.to_tensor(&self.device)?,
            rope: Arc::new(RopeTables::new(grid, self.config.rope_grid, 64)),
        });
        cache.insert(grid, state.clone());
        Ok(state)
    }

    /// Compute with `tables` (`[gh * gw, 64]`) as the RoPE tables of inputs of `grid` patches
    /// instead of computing them in fp32: what mmsegmentation does when it loads a
    /// checkpoint's `rope.freqs_cos` / `freqs_sin` buffers (fp16-rounded ones included).
    pub fn use_rope_tables(&self, grid: (usize, usize), tables: RopeTables) -> Result<()> {
        let n = grid.0 * grid.1 * 64;
        if tables.cos.len() != n || tables.sin.len() != n || tables.dim != 64 {
            return Err(ModelError::Weights(format!(
                "RoPE tables of {} values for a {}x{} grid; expected {n}",
                tables.cos.len(),
                grid.0,
                grid.1
            )));
        }
        let pos = adapt::resample_pos_embed(&self.pos_embed, grid)?;
        let state = Arc::new(GridState {
            pos_embed: pos.to_tensor(&self.device)?,
            rope: Arc::new(tables),
        });
        let mut cache = self.grids.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(grid, state);
        Ok(())
    }

    /// RoPE tables for an input of `grid` patches (computed once per grid).
    pub fn rope_for(&self, grid: (usize, usize)) -> Result<Arc<RopeTables>> {
        Ok(self.grid_state(grid)?.rope.clone())
    }

    /// The patch grid of an input batch `[B, 3, H, W]`.
    pub fn grid_of(&self, x: &Tensor) -> Result<(usize, usize)> {
        Ok(self.check_input(x)?.1)
    }

    /// The `pos_embed` used for an input of `grid` patches (resampled when it differs from the
    /// training grid), `[1, 1 + gh*gw, C]`.
    pub fn pos_embed_for(&self, grid: (usize, usize)) -> Result<Tensor> {
        Ok(self.grid_state(grid)?.pos_embed.clone())
    }

    fn check_input(&self, x: &Tensor) -> Result<(usize, (usize, usize))> {
        let p = self.config.patch_size;
        let dims = x.dims();
        match dims {
            [b, 3, h, w] if h % p == 0 && w % p == 0 && *h > 0 && *w > 0 => {
                Ok((*b, (h / p, w / p)))
            }
            _ => Err(ModelError::Input(format!(
                "input has shape {dims:?}; expected [B, 3, H, W] with H and W multiples of {p}"
            ))),
        }
    }

    /// Patch embedding, class token and position embedding: `[B, 1 + gh*gw, C]`.
    pub fn embed_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, (gh, gw)) = self.check_input(x)?;
        let x = x.to_device(&self.device)?;
        let c = self.config.dim;
        let p = self.config.patch_size;
        let bias = self.patch.bias.as_ref().expect("patch bias");
        let tokens =
            if self.kernels.fused_for(&x) && self.kernels.fused_for(&self.patch.weight_t()?) {
                // The fused product with its bias epilogue over the patches as rows.
                let rows = kernels::patch_rows(&x, p)?;
                self.patch
                    .forward(&rows, self.kernels)?
                    .reshape((b, gh * gw, c))?
            } else {
                super::patch_tokens(&x, &self.patch.weight()?, bias, p)?
            };
        let cls = self.cls_token.broadcast_as((b, 1, c))?;
        let state = self.grid_state((gh, gw))?;
        Ok(Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&state.pos_embed)?)
    }

    /// Token states after the first `n` blocks (`n <= depth`), before any final norm.
    pub fn forward_blocks(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (_, grid) = self.check_input(x)?;
        let rope = self.grid_state(grid)?.rope.clone();
        super::in_batch_slices(x, |x| {
            let mut h = self.embed_tokens(x)?;
            for block in self.blocks.iter().take(n) {
                h = block.forward(&h, &rope, self.kernels)?;
            }
            Ok(h)
        })
    }

    /// Token states after all blocks, `[B, T, C]`.
    pub fn forward_features(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_blocks(x, self.blocks.len())
    }

    /// The representation of the token states: `pooled` `[B, C]` (norm of the mean patch token:
    /// `norm` for MIM weights, `fc_norm` for fine-tuned ones) and `tokens` `[B, T, C]` (`norm` of
    /// every token for MIM weights, the block output otherwise).
    pub fn representation(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = features.dim(1)?;
        let mean = features.narrow(1, 1, t - 1)?.mean(1)?;
        let (pooled, tokens) = match (&self.fc_norm, &self.norm) {
            (Some(fc), _) => (fc.forward(&mean, self.kernels)?, features.clone()),
            (None, Some(n)) => (
                n.forward(&mean, self.kernels)?,
                n.forward(features, self.kernels)?,
            ),
            (None, None) => (mean, features.clone()),
        };
        Ok((pooled, tokens))
    }

    /// Class logits `[B, classes]` from pooled features; an error for a model without a head.
    pub fn head_logits(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.head {
            Some(h) => Ok(h.forward(pooled, self.kernels)?.to_dtype(DType::F32)?),
            None => Err(ModelError::Input(format!(
                "this {:?} checkpoint has no classification head",
                self.config.kind
            ))),
        }
    }

    /// Class logits for an image batch `[B, 3, H, W]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.forward_features(x)?;
        let (pooled, _) = self.representation(&f)?;
        self.head_logits(&pooled)
    }
}

impl Backbone for EvaX {
    fn name(&self) -> String {
        self.config.variant()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn input_multiple(&self) -> usize {
        self.config.patch_size
    }

    fn default_input_size(&self) -> (usize, usize) {
        let p = self.config.patch_size;
        let (gh, gw) = self.config.train_grid;
        (gh * p, gw * p)
    }

    fn normalization(&self) -> Normalization {
        Normalization::EVAX
    }

    /// `patch_embed` (tokens after the position embedding) and `blocks.0` .. `blocks.{depth-1}`.
    fn layer_names(&self) -> Vec<String> {
        super::token_layer_names(self.blocks.len())
    }

    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let (_, grid) = self.check_input(x)?;
        let rope = self.grid_state(grid)?.rope.clone();
        super::token_intermediates(
            self.blocks.len(),
            indices,
            grid,
            self.embed_tokens(x)?,
            |i, h| self.blocks[i].forward(h, &rope, self.kernels),
        )
    }

    fn embed(&self, x: &Tensor) -> Result<Representation> {
        let f = self.forward_features(x)?;
        let (pooled, tokens) = self.representation(&f)?;
        Ok(Representation {
            pooled,
            tokens: Some(tokens),
        })
    }
}

impl Classifier for EvaX {
    fn num_classes(&self) -> Option<usize> {
        self.config.num_classes
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        EvaX::logits(self, x)
    }
}

/// A state dict of random weights (small uniform values, unit norms) for a configuration: for
/// benchmarks and synthetic training.
pub fn random_state_dict(config: &EvaXConfig, seed: u64) -> EvaStateDict {
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut tensors = BTreeMap::new();
    let mut add = |k: String, shape: Vec<usize>, std: f32| {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * std
            })
            .collect();
        tensors.insert(
            k,
            Param {
                dtype: crate::checkpoint::StorageDtype::F32,
                shape,
                data,
            },
        );
    };
    let (c, h, p) = (config.dim, config.mlp_hidden, config.patch_size);
    let g = config.train_grid.0;
    add("patch_embed.proj.weight".into(), vec![c, 3, p, p], 0.02);
    add("patch_embed.proj.bias".into(), vec![c], 0.02);
    add("cls_token".into(), vec![1, 1, c], 0.02);
    add("pos_embed".into(), vec![1, 1 + g * g, c], 0.02);
    for i in 0..config.depth {
        let b = format!("blocks.{i}");
        for n in ["norm1", "norm2"] {
            add(format!("{b}.{n}.weight"), vec![c], 1.0);
            add(format!("{b}.{n}.bias"), vec![c], 0.02);
        }
        if config.fused_qkv {
            add(format!("{b}.attn.qkv.weight"), vec![3 * c, c], 0.05);
        } else {
            for n in ["q_proj", "k_proj", "v_proj"] {
                add(format!("{b}.attn.{n}.weight"), vec![c, c], 0.05);
            }
        }
        add(format!("{b}.attn.q_bias"), vec![c], 0.02);
        add(format!("{b}.attn.v_bias"), vec![c], 0.02);
        add(format!("{b}.attn.proj.weight"), vec![c, c], 0.05);
        add(format!("{b}.attn.proj.bias"), vec![c], 0.02);
        if config.sub_ln {
            for n in ["w1", "w2"] {
                add(format!("{b}.mlp.{n}.weight"), vec![h, c], 0.05);
                add(format!("{b}.mlp.{n}.bias"), vec![h], 0.02);
            }
            add(format!("{b}.mlp.ffn_ln.weight"), vec![h], 1.0);
            add(format!("{b}.mlp.ffn_ln.bias"), vec![h], 0.02);
        } else {
            add(format!("{b}.mlp.w12.weight"), vec![2 * h, c], 0.05);
            add(format!("{b}.mlp.w12.bias"), vec![2 * h], 0.02);
        }
        add(format!("{b}.mlp.w3.weight"), vec![c, h], 0.05);
        add(format!("{b}.mlp.w3.bias"), vec![c], 0.02);
    }
    add("fc_norm.weight".into(), vec![c], 1.0);
    add("fc_norm.bias".into(), vec![c], 0.02);
    let k = config.num_classes.unwrap_or(14);
    add("head.weight".into(), vec![k, c], 0.05);
    add("head.bias".into(), vec![k], 0.02);
    EvaStateDict {
        tensors,
        prefix: String::new(),
        from_timm: false,
        outside: Vec::new(),
    }
}
