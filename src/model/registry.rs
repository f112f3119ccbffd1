//! Recognising a checkpoint's model family and building it behind the common interface.

use std::path::Path;

use candle_core::Device;

use super::{
    Classifier, EvaX, EvaXConfig, EvaXTrainable, LoadOptions, LoadReport, ModelError, Trainable,
    adapt,
};
use crate::checkpoint::Checkpoint;
use crate::error::{Result, ResultExt};
use crate::kernels::Kernels;

/// The model families evax can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// EVA-X Ti / S / B (and EVA-02-style ViTs in the same layout).
    EvaX,
    /// Plain ViTs in timm's layout (the seed's ViT-S/16 baselines).
    Vit,
    /// torchvision ResNet-50 (the seed's CNN baselines).
    ResNet,
    /// torchvision DenseNet-121 (the seed's CNN baselines).
    DenseNet,
}

impl Family {
    /// The family's name as `evax info` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Family::EvaX => "EVA-X",
            Family::Vit => "ViT",
            Family::ResNet => "ResNet",
            Family::DenseNet => "DenseNet",
        }
    }
}

impl Family {
    /// The family a recipe's `model` names: an EVA-X size (`ti`, `s`, `b`) or a baseline
    /// (`r50`, `dn121`, `vit-s`).
    pub fn of_model(name: &str) -> Option<Family> {
        match name {
            "ti" | "s" | "b" => Some(Family::EvaX),
            _ => match super::random::Baseline::from_name(name)? {
                super::random::Baseline::ResNet50 => Some(Family::ResNet),
                super::random::Baseline::DenseNet121 => Some(Family::DenseNet),
                super::random::Baseline::VitS => Some(Family::Vit),
            },
        }
    }
}

/// The family of a checkpoint's weights, or an error saying why none fits.
pub fn recognise(ck: &Checkpoint) -> Result<Family, ModelError> {
    // A plain ViT's `mlp.fc1` would also pass as EVA-X's packed SwiGLU: look for it first.
    if super::vit::find_backbone(&ck.tensors).is_some() {
        return Ok(Family::Vit);
    }
    // One rewrite of the keys serves both CNN families (it copies the state dict).
    if let Some(keys) = super::layouts::cnn_keys(&ck.tensors) {
        return Ok(if super::layouts::is_resnet(&keys.sd) {
            Family::ResNet
        } else {
            Family::DenseNet
        });
    }
    let unknown = |e: ModelError| {
        ModelError::Weights(format!(
            "not weights of a model family evax knows (EVA-X, ViT, ResNet, DenseNet): {e}"
        ))
    };
    let sd = adapt::to_eva_layout(&ck.tensors).map_err(unknown)?;
    super::eva_x::infer_config(&sd.tensors, &LoadOptions::default()).map_err(unknown)?;
    Ok(Family::EvaX)
}

/// Build the classifier a checkpoint describes (any supported format, layout and family).
pub fn load(
    ck: &Checkpoint,
    opts: &LoadOptions,
) -> Result<(Box<dyn Classifier>, LoadReport), ModelError> {
    let family = recognise(ck)?;
    // ViT also computes in bf16 products on the CPU.
    let vit_cpu_bf16 = family == Family::Vit
        && opts.precision == crate::compute::Precision::Bf16
        && opts.device.is_cpu();
    if family != Family::EvaX && opts.precision != crate::compute::Precision::F32 && !vit_cpu_bf16 {
        return Err(ModelError::Input(format!(
            "--precision {} is implemented for EVA-X models (and ViT in bf16 on the CPU) only; \
             this is a {family:?} checkpoint",
            opts.precision.name()
        )));
    }
    match family {
        Family::EvaX => {
            let (m, report) = EvaX::from_checkpoint(ck, opts)?;
            Ok((Box::new(m), report))
        }
        Family::Vit => {
            let (m, report) = super::vit::Vit::from_checkpoint(ck, opts)?;
            Ok((Box::new(m), report))
        }
        Family::ResNet => {
            let (m, report) = super::resnet::ResNet::from_checkpoint(ck, opts)?;
            Ok((Box::new(m), report))
        }
        Family::DenseNet => {
            let (m, report) = super::densenet::DenseNet::from_checkpoint(ck, opts)?;
            Ok((Box::new(m), report))
        }
    }
}

/// Read a checkpoint file (`state_key`: the entry holding the state dict, if not the usual
/// ones) and build its classifier; errors name the file.
pub fn load_file(
    path: &Path,
    state_key: Option<&str>,
    opts: &LoadOptions,
) -> Result<(Box<dyn Classifier>, LoadReport)> {
    let ck = Checkpoint::load_with(path, state_key)?;
    load(&ck, opts).context(path.display())
}

/// A checkpoint's weights ready to fine-tune for `classes` classes (a head of another size is
/// re-initialised from `seed`), on `device`.
pub fn load_trainable(
    ck: &Checkpoint,
    classes: usize,
    seed: u64,
    device: &Device,
    kernels: Kernels,
) -> Result<Box<dyn Trainable>, ModelError> {
    match recognise(ck)? {
        Family::Vit => Ok(Box::new(super::vit::VitTrainable::from_checkpoint(
            ck, classes, seed, device, kernels,
        )?)),
        Family::ResNet => Ok(Box::new(super::resnet::ResNet::trainable(
            ck, classes, seed, device, kernels,
        )?)),
        Family::DenseNet => Ok(Box::new(super::densenet::DenseNet::trainable(
            ck, classes, seed, device, kernels,
        )?)),
        Family::EvaX => {
            let sd = adapt::to_eva_layout(&ck.tensors)?;
            Ok(Box::new(EvaXTrainable::from_state_dict_on(
                &sd, classes, seed, device, kernels,
            )?))
        }
    }
}

/// A fresh initialisation of a named configuration for square inputs of `input` pixels and
/// `classes` classes: an EVA-X size (`ti`, `s`, `b`; timm's initialisation) or a baseline
/// (`r50`, `dn121`, `vit-s`; seeded He-scaled weights).
pub fn init_trainable(
    name: &str,
    input: usize,
    classes: usize,
    seed: u64,
    device: &Device,
    kernels: Kernels,
) -> Result<Box<dyn Trainable>, ModelError> {
    if let Some(b) = super::random::Baseline::from_name(name) {
        return load_trainable(&b.random_checkpoint(seed), classes, seed, device, kernels);
    }
    let mut cfg = EvaXConfig::preset(name).ok_or_else(|| {
        ModelError::Input(format!(
            "unknown model '{name}' (ti, s, b, r50, dn121, vit-s)"
        ))
    })?;
    if input == 0 || !input.is_multiple_of(cfg.patch_size) {
        return Err(ModelError::Input(format!(
            "input size {input} is not a positive multiple of {}",
            cfg.patch_size
        )));
    }
    cfg.train_grid = (input / cfg.patch_size, input / cfg.patch_size);
    cfg.num_classes = Some(classes);
    let sd = super::eva_x::train::init_state_dict(&cfg, seed);
    Ok(Box::new(EvaXTrainable::from_state_dict_on(
        &sd, classes, seed, device, kernels,
    )?))
}
