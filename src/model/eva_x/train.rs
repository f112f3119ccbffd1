//! EVA-X as a [`Trainable`](crate::model::Trainable): one variable per parameter, the
//! differentiable forward with drop path, the original's layer-wise lr-decay groups, head
//! re-initialisation and timm's initialisation for training from scratch.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{
    Block, EvaX, EvaXConfig, Kind, LayerNorm, Linear, LoadOptions, ModelError, TensorSource,
    infer_config,
};
use crate::checkpoint::{Param, StorageDtype};
use crate::compute::Precision;
use crate::kernels::Kernels;
use crate::model::adapt::EvaStateDict;
use crate::model::grad::{self, RopeTensors};
use crate::model::rope::RopeTables;
use crate::model::{Classifier, Trainable, training};
use crate::preprocess::Normalization;
use crate::rng::Rng;

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
            .to_dtype(self.precision.dtype())?;
        let tokens = crate::model::patch_tokens(x, &pw, self.var("patch_embed.proj.bias"), p)?;
        let cls = self.var("cls_token").broadcast_as((b, 1, c))?;
        let pos = self.pos_embed((gh, gw))?;
        let mut hs = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&pos)?;
        let rope: RopeTensors = match &self.stored_rope {
            Some((grid, tables)) if *grid == (gh, gw) => tables.clone(),
            _ => std::sync::Arc::new(RopeTables::new((gh, gw), cfg.rope_grid, 64)),
        };
        let mut src = VarSource(&self.vars, self.precision.dtype());
        let masks = training::drop_path_schedule(rng, drop_path, cfg.depth, b, &self.device)?;
        for (i, masks) in masks.iter().enumerate() {
            let block = Block::load(&mut src, i, cfg)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
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

    /// `pos_embed` for a grid (resampled differentiably when it differs).
    fn pos_embed(&self, grid: (usize, usize)) -> Result<Tensor> {
        training::resample_pos_embed(self.var("pos_embed"), self.config.train_grid, grid)
    }
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
