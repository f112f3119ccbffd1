//! The segmentation model being trained: the EVA-X backbone's variables (as
//! [`EvaXTrainable`]) and the pyramid's and head's (BatchNorm in training mode, as
//! [`BatchStats`]), run through the same structure as inference ([`super::upernet`]).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};

use super::upernet::{
    PYRAMID_BN, UPSAMPLES, decode, head_shape, is_backbone_key, pyramid, stored_rope, token_map,
    units,
};
use crate::checkpoint::Param;
use crate::kernels::Kernels;
use crate::model::cnn::{BatchStats, Ops, Unit};
use crate::model::interp::{bilinear_matrix, resample};
use crate::model::{EvaXTrainable, ModelError, adapt};
use crate::rng::Rng;

type Result<T> = std::result::Result<T, ModelError>;

/// UperNet on EVA-X with every parameter a variable, named by its mmsegmentation key.
pub struct SegTrainable {
    backbone: EvaXTrainable,
    /// What the backbone's names carry before them here (`backbone.`).
    backbone_prefix: String,
    ops: BatchStats,
    laterals: usize,
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl SegTrainable {
    /// From an mmsegmentation state dict (`backbone.*`, `decode_head.*`).
    pub fn from_state_dict(
        tensors: &BTreeMap<String, Param>,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let (laterals, _, _) = head_shape(tensors)?;
        // Everything must load as an inference model first: all problems reported at once.
        let opts = crate::model::LoadOptions {
            device: device.clone(),
            kernels,
            ..Default::default()
        };
        super::UperNet::from_state_dict(tensors, &opts)?;
        let backbone_sd: BTreeMap<String, Param> = tensors
            .iter()
            .filter(|(k, _)| is_backbone_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let eva = adapt::to_eva_layout(&backbone_sd)?;
        let mut backbone = EvaXTrainable::from_state_dict_on(&eva, 1, 0, device, kernels)?;
        // No classification head: the pyramid takes the last block's tokens.
        backbone
            .vars
            .retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
        let grid = backbone.config.train_grid;
        if let Some(tables) = stored_rope(&eva.tensors, grid) {
            backbone.stored_rope = Some((grid, std::sync::Arc::new(tables)));
        }
        let mut units = units(laterals);
        let channels = tensors
            .get(&format!("{}.weight", UPSAMPLES[0]))
            .map_or(0, |p| p.shape[1]);
        units.push(Unit::Bn {
            bn: PYRAMID_BN.into(),
            channels,
        });
        let mut ops = BatchStats::new(tensors, &units, device, kernels)?;
        for key in UPSAMPLES {
            ops.add_var(tensors, &format!("{key}.weight"), device)?;
            ops.add_var(tensors, &format!("{key}.bias"), device)?;
        }
        let backbone_prefix = prefix_of(&eva.prefix);
        let mut vars: BTreeMap<String, Var> = backbone
            .vars
            .iter()
            .map(|(k, v)| (format!("{backbone_prefix}{k}"), v.clone()))
            .collect();
        vars.extend(ops.vars().iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(SegTrainable {
            backbone,
            backbone_prefix,
            ops,
            laterals,
            vars,
            device: device.clone(),
        })
    }

    /// The current weights as an mmsegmentation state dict (parameters, running statistics,
    /// and the RoPE tables the backbone computes with).
    pub fn state_dict(&self) -> Result<BTreeMap<String, Param>> {
        let mut sd = crate::model::training::state_dict(&self.vars)?;
        sd.extend(crate::model::training::state_dict(
            self.ops.running_stats(),
        )?);
        if let Some((_, t)) = &self.backbone.stored_rope {
            let shape = vec![t.cos.len() / t.dim, t.dim];
            for (name, data) in [("cos", &t.cos), ("sin", &t.sin)] {
                sd.insert(
                    format!("backbone.rope.freqs_{name}"),
                    Param {
                        dtype: crate::checkpoint::StorageDtype::F32,
                        shape: shape.clone(),
                        data: data.clone(),
                    },
                );
            }
        }
        Ok(sd)
    }

    /// An inference model with the current weights.
    pub fn to_upernet(&self) -> Result<super::UperNet> {
        let opts = crate::model::LoadOptions {
            device: self.device.clone(),
            kernels: self.backbone.kernels,
            ..Default::default()
        };
        Ok(super::UperNet::from_state_dict(&self.state_dict()?, &opts)?.0)
    }

    /// Logits at the input's size `[B, classes, H, W]`, recording the graph; drop path in the
    /// backbone drawn from `rng`. (The head's dropout before the classifier is not applied.)
    pub fn forward_seg(
        &self,
        x: &Tensor,
        drop_path: f64,
        rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.backbone.config.patch_size;
        let tokens = self.backbone.forward_tokens(x, drop_path, rng)?;
        let map = token_map(&tokens, (h / p, w / p))?;
        let upsample = |k: &str| -> candle_core::Result<(Tensor, Tensor)> {
            let get = |name: String| {
                self.vars
                    .get(&name)
                    .map(|v| v.as_tensor().clone())
                    .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
            };
            Ok((get(format!("{k}.weight"))?, get(format!("{k}.bias"))?))
        };
        let levels = pyramid(&self.ops as &dyn Ops, &upsample, &map)?;
        let low = decode(&self.ops, self.laterals, &levels)?;
        resample(&low, (h, w), bilinear_matrix)
    }
}

/// The prefix the backbone's keys carry in the checkpoint (`backbone.`).
fn prefix_of(found: &str) -> String {
    if found.is_empty() {
        "backbone.".into()
    } else {
        found.to_string()
    }
}

impl crate::model::Trainable for SegTrainable {
    fn name(&self) -> String {
        format!("{} + UperNet", self.backbone.config.variant())
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn normalization(&self) -> crate::preprocess::Normalization {
        crate::preprocess::Normalization::EVAX
    }

    fn input_multiple(&self) -> usize {
        32
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn buffers(&self) -> BTreeMap<String, Var> {
        self.ops.running_stats().clone()
    }

    fn grads(
        &self,
        store: &candle_core::backprop::GradStore,
    ) -> candle_core::Result<crate::train::optim::Grads> {
        let mut grads = crate::train::optim::grads_by_name(&self.vars, store);
        self.backbone
            .block_grads(&mut grads, &self.backbone_prefix)?;
        Ok(grads)
    }

    fn set_training(&mut self, training: bool) {
        self.ops.set_training(training);
    }

    fn precision(&self) -> crate::compute::Precision {
        crate::model::Trainable::precision(&self.backbone)
    }

    /// f32, or bf16 on the CPU: the backbone's transformer blocks then compute their products
    /// in bf16 (as `finetune`'s), the pyramid and the head in f32.
    fn set_precision(
        &mut self,
        precision: crate::compute::Precision,
    ) -> std::result::Result<(), ModelError> {
        crate::model::f32_or_cpu_bf16(
            precision,
            &self.device,
            "for segmentation training: f32, or bf16 on the CPU for the backbone's products \
             (reduced precision on a GPU is for seg predict and seg eval)",
        )?;
        self.backbone.set_precision(precision)
    }

    /// Logits at the input's size `[B, classes, H, W]` (see [`SegTrainable::forward_seg`]).
    fn forward_train(
        &self,
        x: &Tensor,
        drop_path: f64,
        rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        self.forward_seg(x, drop_path, rng)
    }

    /// mmsegmentation's layer decay for EVA (embeddings 0, block i at i + 1, the pyramid and head
    /// last) and its weight-decay rule: none on 1-D parameters and biases only (its check of
    /// `pos_embed` / `cls_token` compares unprefixed names, so those two are decayed).
    fn param_group(&self, name: &str, layer_decay: f64, weight_decay: f64) -> (f64, f64) {
        let depth = self.backbone.config.depth;
        let id = match name.strip_prefix("backbone.") {
            Some(rest) if !rest.starts_with("fpn") => crate::model::training::layer_id(rest, depth),
            _ => depth + 1,
        };
        let ndim = self.vars.get(name).map_or(1, |v| v.dims().len());
        let decay = if ndim <= 1 || name.ends_with(".bias") {
            0.0
        } else {
            weight_decay
        };
        (layer_decay.powi((depth + 1 - id) as i32), decay)
    }

    fn to_inference(&self) -> Result<Box<dyn crate::model::Classifier>> {
        Err(ModelError::Input(
            "a segmentation model is not a classifier (SegTrainable::to_upernet)".into(),
        ))
    }

    fn checkpoint_metadata(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}
