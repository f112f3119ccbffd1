//! EVA-X as a [`Trainable`](crate::model::Trainable): one variable per parameter, the
//! differentiable forward with drop path, the original's layer-wise lr-decay groups, head
//! re-initialisation and timm's initialisation for training from scratch.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{
    Block, EvaX, EvaXConfig, Kind, LN_EPS, LayerNorm, Linear, LoadOptions, ModelError,
    TensorSource, infer_config,
};
use crate::checkpoint::{Param, StorageDtype};
use crate::compute::Precision;
use crate::kernels::Kernels;
use crate::kernels::block_train::{BlockParts, Mlp};
use crate::kernels::candle_ops::{BlockGradSink, TrainingBlock, transformer_block_train};
use crate::model::adapt::EvaStateDict;
use crate::model::grad::{self, RopeTensors};
use crate::model::rope::RopeTables;
use crate::model::{Classifier, Trainable, training};
use crate::preprocess::Normalization;
use crate::rng::Rng;
use crate::train::optim::{Grads, grads_by_name};

/// Keys of a MIM checkpoint that fine-tuning does not use.
const MIM_ONLY: [&str; 4] = ["mask_token", "lm_head.weight", "lm_head.bias", "norm."];

/// The trainable model: one variable per parameter, by models_eva key.
pub struct EvaXTrainable {
    /// The architecture (with the class count being trained).
    pub config: EvaXConfig,
    /// Parameters.
    pub vars: BTreeMap<String, Var>,
    /// Where the parameters live and the model computes.
    pub device: Device,
    /// Fused kernels or the reference path.
    pub kernels: Kernels,
    /// RoPE tables to use instead of computing them, for inputs of their grid (see
    /// [`EvaX::use_rope_tables`]).
    pub stored_rope: Option<((usize, usize), RopeTensors)>,
    /// The arithmetic of the forward's matrix products: the variables stay f32 (master
    /// weights) and are cast on the way in, as PyTorch's autocast does.
    pub precision: Precision,
    /// Gradients of the blocks trained as single ops (see [`EvaXTrainable::block_grads`]).
    block_grads: BlockGradSink,
}

struct VarSource<'a>(&'a BTreeMap<String, Var>, DType);

impl TensorSource for VarSource<'_> {
    fn tensor(&mut self, key: &str, shape: &[usize]) -> Tensor {
        let v = self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("trainable model lacks {key}"));
        assert_eq!(v.dims(), shape, "{key}");
        v.as_tensor().clone()
    }

    fn compute_dtype(&self) -> DType {
        self.1
    }

    fn make_linear(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        let dt = self.1;
        Linear::new_view(
            weight.to_dtype(dt)?,
            bias.map(|b| b.to_dtype(dt)).transpose()?,
        )
    }
}

impl EvaXTrainable {
    /// From a models_eva state dict: MIM-only keys dropped, `fc_norm` initialised to (1, 0) when
    /// absent, the head kept if it has `num_classes` rows, else re-initialised (truncated normal,
    /// std 2e-5; bias 0) from `seed`.
    pub fn from_state_dict(
        sd: &EvaStateDict,
        num_classes: usize,
        seed: u64,
    ) -> std::result::Result<Self, ModelError> {
        Self::from_state_dict_on(sd, num_classes, seed, &Device::Cpu, Kernels::Fused)
    }

    /// [`EvaXTrainable::from_state_dict`] with the parameters on `device`, computing with `kernels`.
    pub fn from_state_dict_on(
        sd: &EvaStateDict,
        num_classes: usize,
        seed: u64,
        device: &Device,
        kernels: Kernels,
    ) -> std::result::Result<Self, ModelError> {
        let mut tensors: BTreeMap<String, Param> = sd
            .tensors
            .iter()
            .filter(|(k, _)| !MIM_ONLY.iter().any(|m| k.starts_with(m)) && !k.contains("rope."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let probe = infer_config(&tensors, &LoadOptions::default())?;
        let c = probe.dim;
        let f32param = |shape: Vec<usize>, data: Vec<f32>| Param {
            dtype: StorageDtype::F32,
            shape,
            data,
        };
        if !tensors.contains_key("fc_norm.weight") {
            tensors.insert("fc_norm.weight".into(), f32param(vec![c], vec![1.0; c]));
            tensors.insert("fc_norm.bias".into(), f32param(vec![c], vec![0.0; c]));
        }
        if tensors
            .get("head.weight")
            .and_then(|w| w.shape.first().copied())
            != Some(num_classes)
        {
            let mut rng = Rng::new(seed ^ 0x4845_4144);
            let w = (0..num_classes * c)
                .map(|_| training::trunc_normal(&mut rng, 2e-5))
                .collect();
            tensors.insert("head.weight".into(), f32param(vec![num_classes, c], w));
            tensors.insert(
                "head.bias".into(),
                f32param(vec![num_classes], vec![0.0; num_classes]),
            );
        }
        // Every tensor the model reads must exist with its shape: build the inference model
        // once, which reports all problems together, rather than fail mid-training.
        let check = EvaStateDict {
            tensors: tensors.clone(),
            prefix: String::new(),
            from_timm: false,
            outside: Vec::new(),
        };
        EvaX::from_eva_state_dict(&check, &LoadOptions::default())?;
        let mut config = infer_config(&tensors, &LoadOptions::default())?;
        config.rope_grid = sd_rope_grid(sd);
        config.kind = Kind::FineTuned;
        let vars = tensors
            .iter()
            .map(|(k, p)| Ok((k.clone(), Var::from_tensor(&p.to_tensor(device)?)?)))
            .collect::<Result<_>>()?;
        Ok(EvaXTrainable {
            config,
            vars,
            device: device.clone(),
            kernels,
            stored_rope: None,
            precision: Precision::F32,
            block_grads: BlockGradSink::default(),
        })
    }

    /// Trainable parameters (names sorted).
    pub fn names(&self) -> Vec<String> {
        self.vars.keys().cloned().collect()
    }

    /// Current values as a state dict (f32).
    pub fn state_dict(&self) -> Result<BTreeMap<String, Param>> {
        training::state_dict(&self.vars)
    }

    /// An inference model with the current weights (for evaluation during training).
    pub fn to_inference(&self) -> std::result::Result<EvaX, ModelError> {
        let sd = EvaStateDict {
            tensors: self.state_dict()?,
            prefix: String::new(),
            from_timm: false,
            outside: Vec::new(),
        };
        let opts = LoadOptions {
            rope_grid: Some(self.config.rope_grid),
            device: self.device.clone(),
            kernels: self.kernels,
            precision: self.precision,
        };
        Ok(EvaX::from_eva_state_dict(&sd, &opts)?.0)
    }

    /// Whether the blocks' dense layers compute in bf16 products on this CPU (`--precision
    /// bf16` with AVX512-BF16 and the fused kernels): the tensors then stay f32.
    fn cpu_bf16_products(&self) -> bool {
        self.precision == Precision::Bf16
            && self.device.is_cpu()
            && self.kernels == Kernels::Fused
            && crate::kernels::bf16::native()
    }

    /// The type the forward casts the parameters to: the precision's, f32 where the CPU's
    /// bf16 products take bf16 inside the kernels.
    fn tensor_dtype(&self) -> DType {
        if self.cpu_bf16_products() {
            DType::F32
        } else {
            self.precision.dtype()
        }
    }

    fn var(&self, k: &str) -> &Tensor {
        self.vars[k].as_tensor()
    }

    /// Logits `[B, K]` of a batch `[B, 3, H, W]`, recording the graph. In training, drop path
    /// rises linearly from 0 to `drop_path` over the blocks, drawn from `rng`.
    pub fn forward(&self, x: &Tensor, drop_path: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
        let hs = self.forward_tokens(x, drop_path, rng)?;
        let fc_norm = LayerNorm {
            weight: self.var("fc_norm.weight").clone(),
            bias: self.var("fc_norm.bias").clone(),
        };
        let head = Linear::new(
            self.var("head.weight").clone(),
            Some(self.var("head.bias").clone()),
        )?;
        grad::head_logits(&hs, &fc_norm, &head, self.kernels)
    }

    /// Token states `[B, 1 + gh * gw, C]` after the last block, recording the graph (drop path
    /// as in [`EvaXTrainable::forward`]).
    pub fn forward_tokens(
        &self,
        x: &Tensor,
        drop_path: f64,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let x = &x.to_device(&self.device)?;
        let (b, _, h, w) = x.dims4()?;
        let p = cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let c = cfg.dim;
        let pw = self
            .var("patch_embed.proj.weight")
            .reshape((c, 3 * p * p))?
            .to_dtype(self.tensor_dtype())?;
        let tokens = crate::model::patch_tokens(x, &pw, self.var("patch_embed.proj.bias"), p)?;
        let cls = self.var("cls_token").broadcast_as((b, 1, c))?;
        let pos = self.pos_embed((gh, gw))?;
        let mut hs = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&pos)?;
        let rope: RopeTensors = match &self.stored_rope {
            Some((grid, tables)) if *grid == (gh, gw) => tables.clone(),
            _ => std::sync::Arc::new(RopeTables::new((gh, gw), cfg.rope_grid, 64)),
        };
        let mut src = VarSource(&self.vars, self.tensor_dtype());
        let masks = training::drop_path_schedule(rng, drop_path, cfg.depth, b, &self.device)?;
        // Whole blocks as single ops where the fused kernels run in f32, their dense layers in
        // bf16 products with `--precision bf16` (their parameter gradients come back through
        // `block_grads`), else step by step.
        let bf16 = self.cpu_bf16_products();
        let whole = self.kernels.fused_for(&hs) && (self.precision == Precision::F32 || bf16);
        self.block_grads.take();
        for (i, masks) in masks.iter().enumerate() {
            let block = Block::load(&mut src, i, cfg)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            if let Some(weights) = whole.then(|| training_parts(&block)).transpose()?.flatten() {
                let drop = masks
                    .as_ref()
                    .map(|(a, m)| -> Result<_> {
                        Ok((a.flatten_all()?.to_vec1()?, m.flatten_all()?.to_vec1()?))
                    })
                    .transpose()?;
                let op = TrainingBlock {
                    index: i,
                    weights,
                    heads: cfg.heads,
                    mlp: Mlp::SwiGlu,
                    eps: LN_EPS,
                    rope: rope.clone(),
                    drop,
                    bf16,
                };
                hs = transformer_block_train(&hs, op, &self.block_grads)?;
                continue;
            }
            hs = grad::block_with_drop_path(
                &block,
                &hs,
                &rope,
                masks.as_ref().map(|(a, m)| (a, m)),
                self.kernels,
            )?;
        }
        Ok(hs)
    }

    /// Adds to `grads` the parameter gradients that the blocks trained as single ops left
    /// since the last forward, under the variables' names with `prefix` before them: the
    /// packed q/k/v and SwiGLU weights go back to the parameters they were packed from.
    pub fn block_grads(&self, grads: &mut Grads, prefix: &str) -> Result<()> {
        let (c, hidden) = (self.config.dim, self.config.mlp_hidden);
        for (i, parts) in self.block_grads.take() {
            let mut put = |key: String, v: Vec<f32>| -> Result<()> {
                let var = self.vars.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("no parameter {key} for a block gradient"))
                })?;
                let t = Tensor::from_vec(v, var.shape(), &self.device)?;
                grads.insert(format!("{prefix}{key}"), t);
                Ok(())
            };
            let p = format!("blocks.{i}");
            put(format!("{p}.norm1.weight"), parts.norm1.0)?;
            put(format!("{p}.norm1.bias"), parts.norm1.1)?;
            let (qkv_w, qkv_b) = parts.qkv;
            if self.config.fused_qkv {
                put(format!("{p}.attn.qkv.weight"), qkv_w)?;
            } else {
                for (j, part) in ["q", "k", "v"].iter().enumerate() {
                    put(
                        format!("{p}.attn.{part}_proj.weight"),
                        qkv_w[j * c * c..(j + 1) * c * c].to_vec(),
                    )?;
                }
            }
            // The k part of the bias is a constant zero.
            put(format!("{p}.attn.q_bias"), qkv_b[..c].to_vec())?;
            put(format!("{p}.attn.v_bias"), qkv_b[2 * c..].to_vec())?;
            put(format!("{p}.attn.proj.weight"), parts.proj.0)?;
            put(format!("{p}.attn.proj.bias"), parts.proj.1)?;
            put(format!("{p}.norm2.weight"), parts.norm2.0)?;
            put(format!("{p}.norm2.bias"), parts.norm2.1)?;
            let (fc1_w, fc1_b) = parts.fc1;
            match parts.sub_ln {
                Some((g, b)) => {
                    for (j, part) in ["w1", "w2"].iter().enumerate() {
                        let rows = j * hidden..(j + 1) * hidden;
                        put(
                            format!("{p}.mlp.{part}.weight"),
                            fc1_w[rows.start * c..rows.end * c].to_vec(),
                        )?;
                        put(format!("{p}.mlp.{part}.bias"), fc1_b[rows].to_vec())?;
                    }
                    put(format!("{p}.mlp.ffn_ln.weight"), g)?;
                    put(format!("{p}.mlp.ffn_ln.bias"), b)?;
                }
                None => {
                    put(format!("{p}.mlp.w12.weight"), fc1_w)?;
                    put(format!("{p}.mlp.w12.bias"), fc1_b)?;
                }
            }
            put(format!("{p}.mlp.w3.weight"), parts.fc2.0)?;
            put(format!("{p}.mlp.w3.bias"), parts.fc2.1)?;
        }
        Ok(())
    }

    /// `pos_embed` for a grid (resampled differentiably when it differs).
    fn pos_embed(&self, grid: (usize, usize)) -> Result<Tensor> {
        training::resample_pos_embed(self.var("pos_embed"), self.config.train_grid, grid)
    }
}

/// A block's parameters for the single-op training block (`None` if a layer has no bias).
fn training_parts(block: &Block) -> Result<Option<BlockParts<Tensor>>> {
    let lin = |l: &Linear| -> Result<Option<(Tensor, Tensor)>> {
        l.bias
            .as_ref()
            .map(|b| Ok((l.weight()?.contiguous()?, b.contiguous()?)))
            .transpose()
    };
    let norm = |n: &LayerNorm| (n.weight.clone(), n.bias.clone());
    let (Some(qkv), Some(proj), Some(fc1), Some(fc2)) = (
        lin(&block.qkv)?,
        lin(&block.proj)?,
        lin(&block.w12)?,
        lin(&block.w3)?,
    ) else {
        return Ok(None);
    };
    Ok(Some(BlockParts {
        norm1: norm(&block.norm1),
        qkv,
        proj,
        norm2: norm(&block.norm2),
        fc1,
        sub_ln: block.ffn_ln.as_ref().map(norm),
        fc2,
    }))
}

fn sd_rope_grid(sd: &EvaStateDict) -> f64 {
    infer_config(&sd.tensors, &LoadOptions::default())
        .map(|c| c.rope_grid)
        .unwrap_or(super::DEFAULT_ROPE_GRID)
}

/// Fresh weights for training from scratch, initialised as timm does for ViTs: linear and
/// patch weights, `pos_embed` and `cls_token` truncated normal (std 0.02), biases 0, norms (1, 0).
pub fn init_state_dict(config: &EvaXConfig, seed: u64) -> EvaStateDict {
    let mut sd = super::random_state_dict(config, seed);
    let mut rng = Rng::new(seed ^ 0x494e_4954);
    for (k, p) in sd.tensors.iter_mut() {
        let is_norm = k.contains("norm") || k.contains("ffn_ln");
        if is_norm && k.ends_with(".weight") {
            p.data.iter_mut().for_each(|v| *v = 1.0);
        } else if p.shape.len() == 1 {
            p.data.iter_mut().for_each(|v| *v = 0.0);
        } else {
            p.data
                .iter_mut()
                .for_each(|v| *v = training::trunc_normal(&mut rng, 0.02));
        }
    }
    sd
}

impl Trainable for EvaXTrainable {
    fn name(&self) -> String {
        self.config.variant()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn normalization(&self) -> Normalization {
        Normalization::EVAX
    }

    fn input_multiple(&self) -> usize {
        self.config.patch_size
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        self.precision = precision;
        Ok(())
    }

    fn forward_train(&self, x: &Tensor, drop_path: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
        self.forward(x, drop_path, rng)
    }

    fn grads(&self, store: &candle_core::backprop::GradStore) -> Result<Grads> {
        let mut grads = grads_by_name(&self.vars, store);
        self.block_grads(&mut grads, "")?;
        Ok(grads)
    }

    fn param_group(&self, name: &str, layer_decay: f64, weight_decay: f64) -> (f64, f64) {
        let ndim = self.vars.get(name).map_or(1, |v| v.dims().len());
        training::param_group(name, ndim, self.config.depth, layer_decay, weight_decay)
    }

    fn to_inference(&self) -> std::result::Result<Box<dyn Classifier>, ModelError> {
        Ok(Box::new(EvaXTrainable::to_inference(self)?))
    }

    fn checkpoint_metadata(&self) -> Vec<(String, String)> {
        vec![(
            "evax.rope_grid".to_string(),
            self.config.rope_grid.to_string(),
        )]
    }
}
