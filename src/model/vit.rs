//! Plain Vision Transformers as the seed's `models_vit.py` builds them for its comparison
//! (ViT-S/16 from DeiT, MAE, Medical MAE or EVA-02 weights; timm `VisionTransformer` keys):
//! patch embedding, class token and a learned `pos_embed` (resampled bicubically for other
//! grids), pre-norm blocks with softmax attention and a GELU MLP, then global average pooling of
//! the patch tokens and `fc_norm` (the seed's default), and the `head`.
//!
//! Pre-training files have `norm` and no `fc_norm`: as the original does when it fine-tunes
//! them, `fc_norm` starts fresh (weight 1, bias 0) and `norm` is left unused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor, Var};

use super::eva_x::{LN_EPS, LayerNorm, Linear};
use super::rope::RopeTables;
use super::token_cam::{self, CamLayer, TokenStack};
use super::{
    Backbone, Classifier, LoadOptions, LoadReport, ModelError, Representation, Trainable, adapt,
    patch_tokens, strip_prefix, training,
};
use crate::checkpoint::{Checkpoint, Param};
use crate::explain::{CamBatch, CamSource};
use crate::kernels::block_train::{BlockParts, Mlp};
use crate::kernels::candle_ops::{BlockGradSink, TrainingBlock, transformer_block_train};
use crate::kernels::{self, Kernels};
use crate::preprocess::Normalization;
use crate::train::optim::{Grads, grads_by_name};

type Result<T> = std::result::Result<T, ModelError>;

/// Prefixes a ViT backbone is found under (torch wrappers, MAE / timm exports).
const PREFIXES: [&str; 5] = ["", "module.", "encoder.", "backbone.", "model."];

/// The architecture, as read off the weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VitConfig {
    /// Token width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads (head width 64).
    pub heads: usize,
    /// MLP hidden width.
    pub mlp_hidden: usize,
    /// Patch size.
    pub patch_size: usize,
    /// Grid the `pos_embed` was trained for.
    pub train_grid: (usize, usize),
    /// Classes of the head, if any.
    pub num_classes: Option<usize>,
}

impl VitConfig {
    /// Conventional name of the size.
    pub fn variant(&self) -> String {
        let size = match self.dim {
            192 => "Ti",
            384 => "S",
            768 => "B",
            1024 => "L",
            _ => return format!("ViT (dim {}, patch {})", self.dim, self.patch_size),
        };
        format!("ViT-{size}/{}", self.patch_size)
    }
}

/// The prefix and the ViT keys of a state dict, or why it is not a plain ViT.
pub fn find_backbone(tensors: &BTreeMap<String, Param>) -> Option<&'static str> {
    PREFIXES.into_iter().find(|p| {
        tensors.contains_key(&format!("{p}patch_embed.proj.weight"))
            && tensors.contains_key(&format!("{p}blocks.0.attn.qkv.bias"))
            && tensors.contains_key(&format!("{p}blocks.0.mlp.fc1.weight"))
    })
}

/// The ViT keys of a checkpoint with their prefix removed, the prefix, and the keys outside it.
fn backbone_state_dict(
    ck: &Checkpoint,
) -> Result<(&'static str, BTreeMap<String, Param>, Vec<String>)> {
    let prefix = find_backbone(&ck.tensors).ok_or_else(|| {
        ModelError::Weights("not a ViT: no patch_embed / qkv bias / fc1 keys".into())
    })?;
    let (sd, outside) = strip_prefix(&ck.tensors, prefix, &[]);
    Ok((prefix, sd, outside))
}

/// Read the architecture off ViT keys (prefix removed).
fn infer_config(sd: &BTreeMap<String, Param>) -> Result<VitConfig> {
    let bad = |m: String| ModelError::Weights(m);
    let super::TokenGeometry {
        dim,
        patch_size: p,
        depth,
        grid: g,
        num_classes,
    } = super::token_geometry(sd, "a ViT")?;
    let mlp_hidden = sd
        .get("blocks.0.mlp.fc1.weight")
        .and_then(|w| w.shape.first().copied())
        .unwrap_or(0);
    if mlp_hidden == 0 {
        return Err(bad("the MLP of blocks.0 has zero width".into()));
    }
    Ok(VitConfig {
        dim,
        depth,
        heads: dim / 64,
        mlp_hidden,
        patch_size: p,
        train_grid: (g, g),
        num_classes,
    })
}

/// One pre-norm block: softmax attention (fused q/k/v with biases) and a GELU MLP.
#[derive(Debug, Clone)]
pub struct VitBlock {
    /// Pre-attention norm (the Grad-CAM target of the last block).
    pub norm1: LayerNorm,
    /// q/k/v projection.
    pub qkv: Linear,
    /// Attention output projection.
    pub proj: Linear,
    /// Pre-MLP norm.
    pub norm2: LayerNorm,
    /// MLP input projection.
    pub fc1: Linear,
    /// MLP output projection.
    pub fc2: Linear,
    heads: usize,
}

impl VitBlock {
    /// `x + attn(norm1(x))`, then `+ mlp(norm2(x))` (`y`: `norm1(x)` when already computed);
    /// `grad`: through operations that have a backward; `drop`: per-image scales of the two
    /// residual branches (drop path).
    fn forward(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        k: Kernels,
        grad: bool,
        drop: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let none = Arc::new(RopeTables::none(64));
        let ln =
            |x: &Tensor, n: &LayerNorm| kernels::layer_norm(k, x, &n.weight, &n.bias, LN_EPS, grad);
        let lin = |x: &Tensor, l: &Linear| -> candle_core::Result<Tensor> {
            if grad {
                let b = l.bias.as_ref().expect("ViT layers have biases");
                kernels::linear_train(k, x, &l.weight()?, b)
            } else {
                l.forward(x, k)
            }
        };
        let y = match y {
            Some(y) => y.clone(),
            None => ln(x, &self.norm1)?,
        };
        let a = kernels::attention(k, &lin(&y, &self.qkv)?, self.heads, &none, grad)?;
        if !grad {
            // Inference: the residuals ride in the GEMMs' accumulators.
            let x = self.proj.forward_add(&a, x, k)?;
            let h = kernels::gelu(k, &lin(&ln(&x, &self.norm2)?, &self.fc1)?, false)?;
            return self.fc2.forward_add(&h, &x, k);
        }
        let mut a = lin(&a, &self.proj)?;
        if let Some((s, _)) = drop {
            a = a.broadcast_mul(s)?;
        }
        let x = (x + a)?;
        let h = kernels::gelu(k, &lin(&ln(&x, &self.norm2)?, &self.fc1)?, true)?;
        let mut m = lin(&h, &self.fc2)?;
        if let Some((_, s)) = drop {
            m = m.broadcast_mul(s)?;
        }
        &x + m
    }
}

/// A ViT ready for inference.
pub struct Vit {
    /// The architecture.
    pub config: VitConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Param,
    /// The blocks.
    pub blocks: Vec<VitBlock>,
    /// Norm of the mean patch token.
    pub fc_norm: LayerNorm,
    /// Classification head.
    pub head: Option<Linear>,
    device: Device,
    kernels: Kernels,
    grids: Mutex<HashMap<(usize, usize), Tensor>>,
}

/// Collects weights by key, recording every problem.
struct Weights<'a> {
    sd: &'a BTreeMap<String, Param>,
    device: &'a Device,
    /// bf16 on the CPU: the blocks' dense layers in bf16 products (tensors f32).
    bf16_cpu: bool,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl Weights<'_> {
    fn tensor(&mut self, key: &str, shape: &[usize]) -> Result<Tensor> {
        match self.sd.get(key) {
            Some(p) if p.shape == shape => {
                self.used.insert(key.to_string());
                Ok(Tensor::from_slice(&p.data, shape, self.device)?)
            }
            found => {
                self.problems.push(match found {
                    None => format!("missing {key}"),
                    Some(p) => format!("{key} has shape {:?}, expected {shape:?}", p.shape),
                });
                Ok(Tensor::zeros(shape, candle_core::DType::F32, self.device)?)
            }
        }
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        self.dense(prefix, out, inp, false)
    }

    /// A block's dense layer: as [`Self::linear`], or in bf16 products (`bf16_cpu`).
    fn block_linear(&mut self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let bf16 = self.bf16_cpu;
        self.dense(prefix, out, inp, bf16)
    }

    /// A dense layer, its weight packed once for f32 or for bf16 products.
    fn dense(&mut self, prefix: &str, out: usize, inp: usize, bf16: bool) -> Result<Linear> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let b = self.tensor(&format!("{prefix}.bias"), &[out])?;
        let l = Linear::new(w, Some(b))?;
        Ok(if bf16 {
            l.with_bf16_products()?
        } else {
            l.with_prepacked_products()?
        })
    }

    fn norm(&mut self, prefix: &str, dim: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[dim])?,
        })
    }
}

impl Vit {
    /// Build a ViT from a checkpoint whose keys [`find_backbone`] recognises.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let (prefix, sd, outside) = backbone_state_dict(ck)?;
        Self::from_state_dict(&sd, prefix, outside, opts)
    }

    fn from_state_dict(
        sd: &BTreeMap<String, Param>,
        prefix: &str,
        outside: Vec<String>,
        opts: &LoadOptions,
    ) -> Result<(Self, LoadReport)> {
        let config = infer_config(sd)?;
        let (c, p, hdn) = (config.dim, config.patch_size, config.mlp_hidden);
        let bf16_cpu = opts.precision == crate::compute::Precision::Bf16
            && opts.device.is_cpu()
            && opts.kernels == Kernels::Fused
            && kernels::bf16::native();
        let mut w = Weights {
            sd,
            device: &opts.device,
            bf16_cpu,
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let patch_weight = w
            .tensor("patch_embed.proj.weight", &[c, 3, p, p])?
            .reshape((c, 3 * p * p))?;
        let patch_bias = w.tensor("patch_embed.proj.bias", &[c])?;
        let cls_token = w.tensor("cls_token", &[1, 1, c])?;
        w.tensor(
            "pos_embed",
            &[1, 1 + config.train_grid.0 * config.train_grid.1, c],
        )?;
        let mut blocks = Vec::with_capacity(config.depth);
        for i in 0..config.depth {
            let b = format!("blocks.{i}");
            blocks.push(VitBlock {
                norm1: w.norm(&format!("{b}.norm1"), c)?,
                qkv: w.block_linear(&format!("{b}.attn.qkv"), 3 * c, c)?,
                proj: w.block_linear(&format!("{b}.attn.proj"), c, c)?,
                norm2: w.norm(&format!("{b}.norm2"), c)?,
                fc1: w.block_linear(&format!("{b}.mlp.fc1"), hdn, c)?,
                fc2: w.block_linear(&format!("{b}.mlp.fc2"), c, hdn)?,
                heads: config.heads,
            });
        }
        let fc_norm = if sd.contains_key("fc_norm.weight") {
            w.norm("fc_norm", c)?
        } else {
            // A pre-training file: fc_norm starts fresh, as the original fine-tunes it.
            LayerNorm {
                weight: Tensor::ones(c, candle_core::DType::F32, &opts.device)?,
                bias: Tensor::zeros(c, candle_core::DType::F32, &opts.device)?,
            }
        };
        let head = match config.num_classes {
            Some(k) => Some(w.linear("head", k, c)?),
            None => None,
        };
        if !w.problems.is_empty() {
            let shown: Vec<&str> = w.problems.iter().take(12).map(|s| s.as_str()).collect();
            return Err(ModelError::Weights(format!(
                "weights incomplete for {} depth {}: {}",
                config.variant(),
                config.depth,
                shown.join("; ")
            )));
        }
        let parameters = w.used.iter().map(|k| sd[k].numel()).sum();
        let mut unused: Vec<String> = sd
            .keys()
            .filter(|k| !w.used.contains(*k))
            .map(|k| format!("{prefix}{k}"))
            .collect();
        unused.extend(outside);
        let model = Vit {
            pos_embed: sd["pos_embed"].clone(),
            config,
            patch_weight,
            patch_bias,
            cls_token,
            blocks,
            fc_norm,
            head,
            device: opts.device.clone(),
            kernels: opts.kernels,
            grids: Mutex::new(HashMap::new()),
        };
        let report = LoadReport {
            unused,
            prefix: prefix.to_string(),
            from_timm: true,
            parameters,
            ..Default::default()
        };
        Ok((model, report))
    }

    fn check_input(&self, x: &Tensor) -> Result<(usize, usize)> {
        let p = self.config.patch_size;
        match x.dims() {
            [_, 3, h, w] if *h > 0 && *w > 0 && h % p == 0 && w % p == 0 => Ok((h / p, w / p)),
            dims => Err(ModelError::Input(format!(
                "input has shape {dims:?}; expected [B, 3, H, W] with H and W multiples of {p}"
            ))),
        }
    }

    /// The `pos_embed` for a grid (resampled bicubically when it differs from the training grid).
    fn pos_embed_for(&self, grid: (usize, usize)) -> Result<Tensor> {
        let mut cache = self.grids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&grid) {
            return Ok(t.clone());
        }
        let t = adapt::resample_pos_embed(&self.pos_embed, grid)?.to_tensor(&self.device)?;
        cache.insert(grid, t.clone());
        Ok(t)
    }

    /// Patch embedding, class token and position embedding: `[B, 1 + N, C]`.
    pub fn embed_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let grid = self.check_input(x)?;
        let x = x.to_device(&self.device)?;
        let tokens = patch_tokens(
            &x,
            &self.patch_weight,
            &self.patch_bias,
            self.config.patch_size,
        )?;
        let (b, _, c) = tokens.dims3()?;
        let cls = self.cls_token.broadcast_as((b, 1, c))?;
        Ok(Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed_for(grid)?)?)
    }

    /// Token states after the first `n` blocks.
    pub fn forward_blocks(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        super::in_batch_slices(x, |x| {
            let mut h = self.embed_tokens(x)?;
            for b in self.blocks.iter().take(n) {
                h = b.forward(&h, None, self.kernels, false, None)?;
            }
            Ok(h)
        })
    }

    /// `fc_norm` of the mean patch token, `[B, C]`.
    fn pool(&self, h: &Tensor, grad: bool) -> Result<Tensor> {
        let t = h.dim(1)?;
        let mean = h.narrow(1, 1, t - 1)?.mean(1)?;
        Ok(kernels::layer_norm(
            self.kernels,
            &mean,
            &self.fc_norm.weight,
            &self.fc_norm.bias,
            LN_EPS,
            grad,
        )?)
    }

    fn head(&self) -> Result<&Linear> {
        self.head.as_ref().ok_or_else(|| {
            ModelError::Input("these ViT weights have no classification head".into())
        })
    }
}

impl Backbone for Vit {
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
        (self.config.train_grid.0 * p, self.config.train_grid.1 * p)
    }

    /// The others' 0.5056 / 0.252, as the original normalises every non-EVA model.
    fn normalization(&self) -> Normalization {
        Normalization::OTHERS
    }

    fn layer_names(&self) -> Vec<String> {
        super::token_layer_names(self.blocks.len())
    }

    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let grid = self.check_input(x)?;
        super::token_intermediates(
            self.blocks.len(),
            indices,
            grid,
            self.embed_tokens(x)?,
            |i, h| Ok(self.blocks[i].forward(h, None, self.kernels, false, None)?),
        )
    }

    fn embed(&self, x: &Tensor) -> Result<Representation> {
        let h = self.forward_blocks(x, self.blocks.len())?;
        Ok(Representation {
            pooled: self.pool(&h, false)?,
            tokens: Some(h),
        })
    }
}

impl Classifier for Vit {
    fn num_classes(&self) -> Option<usize> {
        self.config.num_classes
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let head = self.head()?;
        let pooled = self.embed(x)?.pooled;
        Ok(head.forward(&pooled, self.kernels)?)
    }
}

impl TokenStack for Vit {
    fn depth(&self) -> usize {
        self.blocks.len()
    }

    fn grid(&self, x: &Tensor) -> Result<(usize, usize)> {
        self.check_input(x)
    }

    fn tokens_after(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        self.forward_blocks(x, n)
    }

    fn norm1(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        Ok(self.blocks[i].norm1.forward(x, self.kernels)?)
    }

    fn block_from_norm1(
        &self,
        i: usize,
        x: &Tensor,
        y: &Tensor,
        _: (usize, usize),
    ) -> Result<Tensor> {
        Ok(self.blocks[i].forward(x, Some(y), self.kernels, true, None)?)
    }

    fn block(&self, i: usize, x: &Tensor, _: (usize, usize)) -> Result<Tensor> {
        Ok(self.blocks[i].forward(x, None, self.kernels, true, None)?)
    }

    fn head_logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let head = self.head()?;
        let pooled = self.pool(tokens, true)?;
        let b = head.bias.as_ref().expect("ViT head has a bias");
        Ok(kernels::linear_train(
            self.kernels,
            &pooled,
            &head.weight()?,
            b,
        )?)
    }
}

impl CamSource for Vit {
    fn default_cam_layer(&self) -> String {
        "last".into()
    }

    fn check_cam_layer(&self, layer: &str) -> Result<()> {
        CamLayer::parse(layer, self.blocks.len()).map(|_| ())
    }

    fn activation_grads(
        &self,
        x: &Tensor,
        layer: &str,
        choose: &dyn Fn(usize, &[f32]) -> Vec<usize>,
    ) -> Result<CamBatch> {
        token_cam::activation_grads(self, x, layer, choose)
    }
}

/// A ViT being fine-tuned: one variable per parameter, by timm key.
pub struct VitTrainable {
    /// The architecture (with the class count being trained).
    pub config: VitConfig,
    /// Parameters.
    pub vars: BTreeMap<String, Var>,
    device: Device,
    kernels: Kernels,
    /// The arithmetic: f32, or bf16 products in the blocks on the CPU.
    precision: crate::compute::Precision,
    notes: Vec<String>,
    /// Gradients of the blocks trained as single ops.
    block_grads: BlockGradSink,
}

impl VitTrainable {
    /// From a checkpoint, as the original fine-tunes one: pre-training keys (`norm`, decoder,
    /// `mask_token`) dropped, `fc_norm` fresh (1, 0) when absent, the head kept if it has
    /// `num_classes` rows, else re-initialised (truncated normal, std 2e-5; bias 0) from `seed`.
    pub fn from_checkpoint(
        ck: &Checkpoint,
        num_classes: usize,
        seed: u64,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let (_, mut sd, _) = backbone_state_dict(ck)?;
        let probe = infer_config(&sd)?;
        let c = probe.dim;
        let f32param = |shape: Vec<usize>, data: Vec<f32>| Param {
            dtype: crate::checkpoint::StorageDtype::F32,
            shape,
            data,
        };
        let mut notes: Vec<String> = sd
            .keys()
            .filter(|k| k.starts_with("norm.") || k.starts_with("decoder") || *k == "mask_token")
            .take(1)
            .map(|_| "pre-training keys (norm, decoder_*, mask_token) dropped".to_string())
            .collect();
        sd.retain(|k, _| {
            k.starts_with("patch_embed.")
                || k.starts_with("blocks.")
                || k.starts_with("fc_norm.")
                || k.starts_with("head.")
                || k == "cls_token"
                || k == "pos_embed"
        });
        if !sd.contains_key("fc_norm.weight") {
            notes.push("no fc_norm: initialised fresh (weight 1, bias 0)".into());
            sd.insert("fc_norm.weight".into(), f32param(vec![c], vec![1.0; c]));
            sd.insert("fc_norm.bias".into(), f32param(vec![c], vec![0.0; c]));
        }
        let had = sd.get("head.weight").and_then(|w| w.shape.first().copied());
        if had != Some(num_classes) {
            notes.push(match had {
                Some(k) => {
                    format!("head has {k} classes: dropped, {num_classes} initialised fresh")
                }
                None => format!("no head: {num_classes} classes initialised fresh"),
            });
            let mut rng = crate::rng::Rng::new(seed ^ 0x4845_4144);
            let w = (0..num_classes * c)
                .map(|_| training::trunc_normal(&mut rng, 2e-5))
                .collect();
            sd.insert("head.weight".into(), f32param(vec![num_classes, c], w));
            sd.insert(
                "head.bias".into(),
                f32param(vec![num_classes], vec![0.0; num_classes]),
            );
        }
        // Every tensor the model reads must be there with its shape.
        let opts = LoadOptions {
            device: device.clone(),
            kernels,
            ..Default::default()
        };
        let (check, _) = Vit::from_state_dict(&sd, "", Vec::new(), &opts)?;
        let vars = sd
            .iter()
            .map(|(k, p)| Ok((k.clone(), Var::from_tensor(&p.to_tensor(device)?)?)))
            .collect::<Result<_>>()?;
        Ok(VitTrainable {
            config: check.config,
            vars,
            device: device.clone(),
            kernels,
            precision: crate::compute::Precision::F32,
            notes,
            block_grads: BlockGradSink::default(),
        })
    }

    fn var(&self, k: &str) -> &Tensor {
        self.vars[k].as_tensor()
    }

    fn linear(&self, prefix: &str) -> candle_core::Result<Linear> {
        Linear::new_view(
            self.var(&format!("{prefix}.weight")).clone(),
            Some(self.var(&format!("{prefix}.bias")).clone()),
        )
    }

    fn norm(&self, prefix: &str) -> LayerNorm {
        LayerNorm {
            weight: self.var(&format!("{prefix}.weight")).clone(),
            bias: self.var(&format!("{prefix}.bias")).clone(),
        }
    }

    /// The parameter names of block `i`, as [`BlockParts`].
    fn block_names(i: usize) -> BlockParts<String> {
        let pair = |p: &str| {
            (
                format!("blocks.{i}.{p}.weight"),
                format!("blocks.{i}.{p}.bias"),
            )
        };
        BlockParts {
            norm1: pair("norm1"),
            qkv: pair("attn.qkv"),
            proj: pair("attn.proj"),
            norm2: pair("norm2"),
            fc1: pair("mlp.fc1"),
            sub_ln: None,
            fc2: pair("mlp.fc2"),
        }
    }
}

impl Trainable for VitTrainable {
    fn name(&self) -> String {
        self.config.variant()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn normalization(&self) -> Normalization {
        Normalization::OTHERS
    }

    fn input_multiple(&self) -> usize {
        self.config.patch_size
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn precision(&self) -> crate::compute::Precision {
        self.precision
    }

    /// f32, or bf16 on the CPU: the blocks' dense layers and attention then compute in bf16
    /// products (as EVA-X's; f32 where the CPU lacks AVX512-BF16), the rest in f32.
    fn set_precision(
        &mut self,
        precision: crate::compute::Precision,
    ) -> std::result::Result<(), ModelError> {
        super::f32_or_cpu_bf16(precision, &self.device, "for ViT: f32, or bf16 on the CPU")?;
        self.precision = precision;
        Ok(())
    }

    fn forward_train(
        &self,
        x: &Tensor,
        drop_path: f64,
        rng: Option<&mut crate::rng::Rng>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let x = &x.to_device(&self.device)?;
        let (b, _, h, w) = x.dims4()?;
        let p = cfg.patch_size;
        let c = cfg.dim;
        let pw = self
            .var("patch_embed.proj.weight")
            .reshape((c, 3 * p * p))?;
        let tokens = patch_tokens(x, &pw, self.var("patch_embed.proj.bias"), p)?;
        let cls = self.var("cls_token").broadcast_as((b, 1, c))?;
        let pos =
            training::resample_pos_embed(self.var("pos_embed"), cfg.train_grid, (h / p, w / p))?;
        let mut hs = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&pos)?;
        let masks = training::drop_path_schedule(rng, drop_path, cfg.depth, b, &self.device)?;
        // Whole blocks as single ops where the fused kernels run (their parameter gradients
        // come back through `grads`), else step by step.
        let whole = self.kernels.fused_for(&hs);
        self.block_grads.take();
        for (i, masks) in masks.iter().enumerate() {
            if whole {
                let drop = masks
                    .as_ref()
                    .map(|(a, m)| -> candle_core::Result<_> {
                        Ok((a.flatten_all()?.to_vec1()?, m.flatten_all()?.to_vec1()?))
                    })
                    .transpose()?;
                let block = TrainingBlock {
                    index: i,
                    weights: Self::block_names(i).map(|k| self.var(k).clone()),
                    heads: cfg.heads,
                    mlp: Mlp::Gelu,
                    eps: LN_EPS,
                    rope: Arc::new(RopeTables::none(c / cfg.heads)),
                    drop,
                    bf16: self.precision == crate::compute::Precision::Bf16
                        && self.device.is_cpu()
                        && kernels::bf16::native(),
                };
                hs = transformer_block_train(&hs, block, &self.block_grads)?;
                continue;
            }
            let pre = format!("blocks.{i}");
            let block = VitBlock {
                norm1: self.norm(&format!("{pre}.norm1")),
                qkv: self.linear(&format!("{pre}.attn.qkv"))?,
                proj: self.linear(&format!("{pre}.attn.proj"))?,
                norm2: self.norm(&format!("{pre}.norm2")),
                fc1: self.linear(&format!("{pre}.mlp.fc1"))?,
                fc2: self.linear(&format!("{pre}.mlp.fc2"))?,
                heads: cfg.heads,
            };
            hs = block.forward(
                &hs,
                None,
                self.kernels,
                true,
                masks.as_ref().map(|(a, m)| (a, m)),
            )?;
        }
        let t = hs.dim(1)?;
        let mean = hs.narrow(1, 1, t - 1)?.mean(1)?;
        let fc = self.norm("fc_norm");
        let pooled = kernels::layer_norm(self.kernels, &mean, &fc.weight, &fc.bias, LN_EPS, true)?;
        kernels::linear_train(
            self.kernels,
            &pooled,
            self.var("head.weight"),
            self.var("head.bias"),
        )
    }

    fn grads(&self, store: &candle_core::backprop::GradStore) -> candle_core::Result<Grads> {
        let mut grads = grads_by_name(&self.vars, store);
        for (i, parts) in self.block_grads.take() {
            for (name, g) in Self::block_names(i)
                .into_list()
                .into_iter()
                .zip(parts.into_list())
            {
                let t = Tensor::from_vec(g, self.vars[&name].shape(), &self.device)?;
                grads.insert(name, t);
            }
        }
        Ok(grads)
    }

    fn param_group(&self, name: &str, layer_decay: f64, weight_decay: f64) -> (f64, f64) {
        let ndim = self.vars.get(name).map_or(1, |v| v.dims().len());
        training::param_group(name, ndim, self.config.depth, layer_decay, weight_decay)
    }

    fn to_inference(&self) -> Result<Box<dyn Classifier>> {
        let sd = training::state_dict(&self.vars)?;
        let opts = LoadOptions {
            device: self.device.clone(),
            kernels: self.kernels,
            ..Default::default()
        };
        Ok(Box::new(
            Vit::from_state_dict(&sd, "", Vec::new(), &opts)?.0,
        ))
    }

    fn checkpoint_metadata(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn init_notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}
