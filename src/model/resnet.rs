//! ResNet-50 as torchvision builds it (Bottleneck blocks, stride on the 3x3 convolution,
//! BatchNorm in evaluation mode), the seed's CNN baseline: global average pooling of `layer4`
//! and `fc`. Block counts and widths are read off the weights. Grad-CAM targets
//! `layer4[-1].bn3`, as the original does.
//!
//! Convolutions use candle's `conv2d` (any device, with a backward); the fast CPU path the
//! baselines issue asks for is still to come.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{D, Device, Tensor, Var};

use super::cnn::{self, Bn, Conv, Weights, out_channels};
use super::{
    Backbone, Classifier, LoadOptions, LoadReport, ModelError, Representation, strip_prefix,
};
use crate::checkpoint::{Checkpoint, Param};
use crate::explain::{CamBatch, CamSource, gradient_rounds};
use crate::preprocess::Normalization;

type Result<T> = std::result::Result<T, ModelError>;

/// Prefixes a ResNet is found under (torch wrappers, segmentation-model encoders).
const PREFIXES: [&str; 5] = ["", "module.", "model.", "backbone.", "model.encoder."];

/// The prefix of a torchvision ResNet's keys, if the state dict holds one.
pub fn find_backbone(tensors: &BTreeMap<String, Param>) -> Option<&'static str> {
    PREFIXES.into_iter().find(|p| {
        tensors.contains_key(&format!("{p}conv1.weight"))
            && tensors.contains_key(&format!("{p}bn1.running_mean"))
            && tensors.contains_key(&format!("{p}layer1.0.conv3.weight"))
    })
}

/// conv1 1x1 - bn - relu - conv2 3x3 (stride) - bn - relu - conv3 1x1 - bn3, plus the
/// (downsampled) input, relu.
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: Conv,
    bn1: Bn,
    conv2: Conv,
    bn2: Bn,
    conv3: Conv,
    bn3: Bn,
    downsample: Option<(Conv, Bn)>,
}

impl Bottleneck {
    /// `bn3`'s output (the Grad-CAM target of the last block) and the shortcut.
    fn branches(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.bn1.forward(&self.conv1.forward(x)?)?.relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?)?.relu()?;
        let y = self.bn3.forward(&self.conv3.forward(&h)?)?;
        let shortcut = match &self.downsample {
            Some((c, b)) => b.forward(&c.forward(x)?)?,
            None => x.clone(),
        };
        Ok((y, shortcut))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (y, s) = self.branches(x)?;
        (y + s)?.relu()
    }
}

/// A ResNet ready for inference.
pub struct ResNet {
    stem: Conv,
    stem_bn: Bn,
    stages: Vec<Vec<Bottleneck>>,
    fc: Option<(Tensor, Tensor)>,
    features: usize,
    device: Device,
}

impl ResNet {
    /// Build a ResNet from a checkpoint whose keys [`find_backbone`] recognises.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let prefix = find_backbone(&ck.tensors).ok_or_else(|| {
            ModelError::Weights("not a ResNet: no conv1 / bn1 / layer1 keys".into())
        })?;
        let (sd, outside) = strip_prefix(&ck.tensors, prefix, &[]);
        let mut w = Weights {
            sd: &sd,
            device: &opts.device,
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let stem = w.conv("conv1", 2)?;
        let stem = Conv { padding: 3, ..stem };
        let stem_bn = w.bn("bn1", out_channels(&sd, "conv1"))?;
        let mut stages = Vec::new();
        for s in 1..=4 {
            let blocks = sd
                .keys()
                .filter_map(|k| {
                    k.strip_prefix(&format!("layer{s}."))?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .map_or(0, |m| m + 1);
            if blocks == 0 {
                return Err(ModelError::Weights(format!(
                    "no layer{s}.N keys: not a ResNet-50"
                )));
            }
            let mut stage = Vec::with_capacity(blocks);
            for i in 0..blocks {
                let p = format!("layer{s}.{i}");
                let stride = if s > 1 && i == 0 { 2 } else { 1 };
                let conv1 = w.conv(&format!("{p}.conv1"), 1)?;
                let bn1 = w.bn(
                    &format!("{p}.bn1"),
                    out_channels(&sd, &format!("{p}.conv1")),
                )?;
                let conv2 = w.conv(&format!("{p}.conv2"), stride)?;
                let bn2 = w.bn(
                    &format!("{p}.bn2"),
                    out_channels(&sd, &format!("{p}.conv2")),
                )?;
                let conv3 = w.conv(&format!("{p}.conv3"), 1)?;
                let bn3 = w.bn(
                    &format!("{p}.bn3"),
                    out_channels(&sd, &format!("{p}.conv3")),
                )?;
                let downsample = if sd.contains_key(&format!("{p}.downsample.0.weight")) {
                    let c = w.conv(&format!("{p}.downsample.0"), stride)?;
                    let b = w.bn(
                        &format!("{p}.downsample.1"),
                        out_channels(&sd, &format!("{p}.downsample.0")),
                    )?;
                    Some((c, b))
                } else {
                    None
                };
                stage.push(Bottleneck {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    conv3,
                    bn3,
                    downsample,
                });
            }
            stages.push(stage);
        }
        let features = out_channels(&sd, &format!("layer4.{}.conv3", stages[3].len() - 1));
        let fc = w.head("fc", features)?;
        let report = w.finish("ResNet", prefix, outside)?;
        let model = ResNet {
            stem,
            stem_bn,
            stages,
            fc,
            features,
            device: opts.device.clone(),
        };
        Ok((model, report))
    }

    /// The input of the last block and that block.
    fn to_last_block(&self, x: &Tensor) -> Result<(Tensor, &Bottleneck)> {
        cnn::check_input(x)?;
        let mut h = cnn::stem(&self.stem, &self.stem_bn, &x.to_device(&self.device)?)?;
        let n = self.stages.len();
        for (s, stage) in self.stages.iter().enumerate() {
            for (i, b) in stage.iter().enumerate() {
                if s == n - 1 && i == stage.len() - 1 {
                    return Ok((h, b));
                }
                h = b.forward(&h)?;
            }
        }
        unreachable!("four non-empty stages")
    }

    fn fc(&self) -> Result<&(Tensor, Tensor)> {
        self.fc
            .as_ref()
            .ok_or_else(|| ModelError::Input("these ResNet weights have no fc head".into()))
    }

    fn head(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(cnn::linear(pooled, self.fc()?)?)
    }
}

impl Backbone for ResNet {
    fn name(&self) -> String {
        "ResNet-50".into()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn input_multiple(&self) -> usize {
        32
    }

    fn default_input_size(&self) -> (usize, usize) {
        (224, 224)
    }

    /// The others' 0.5056 / 0.252, as the original normalises every non-EVA model.
    fn normalization(&self) -> Normalization {
        Normalization::OTHERS
    }

    fn layer_names(&self) -> Vec<String> {
        ["stem", "layer1", "layer2", "layer3", "layer4"]
            .map(String::from)
            .to_vec()
    }

    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        if let Some(&bad) = indices.iter().find(|&&i| i > 4) {
            return Err(ModelError::Input(format!(
                "layer index {bad} out of range (the model has 5 layers)"
            )));
        }
        cnn::check_input(x)?;
        let deepest = indices.iter().copied().max().unwrap_or(0);
        let mut h = cnn::stem(&self.stem, &self.stem_bn, &x.to_device(&self.device)?)?;
        let mut outs: Vec<Option<Tensor>> = vec![None; 5];
        for (layer, out) in outs.iter_mut().enumerate().take(deepest + 1) {
            if layer > 0 {
                for b in &self.stages[layer - 1] {
                    h = b.forward(&h)?;
                }
            }
            if indices.contains(&layer) {
                *out = Some(h.clone());
            }
        }
        Ok(indices
            .iter()
            .map(|&i| outs[i].clone().expect("computed above"))
            .collect())
    }

    /// `pooled`: the global average of `layer4` `[B, 2048]`; no tokens.
    fn embed(&self, x: &Tensor) -> Result<Representation> {
        let (h, last) = self.to_last_block(x)?;
        let h = last.forward(&h)?;
        debug_assert_eq!(h.dim(1)?, self.features);
        Ok(Representation {
            pooled: h.mean(D::Minus1)?.mean(D::Minus1)?,
            tokens: None,
        })
    }
}

impl Classifier for ResNet {
    fn num_classes(&self) -> Option<usize> {
        self.fc
            .as_ref()
            .and_then(|(w, _)| w.dims().first().copied())
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.fc()?;
        let pooled = self.embed(x)?.pooled;
        self.head(&pooled)
    }
}

impl CamSource for ResNet {
    /// `layer4[-1].bn3`, the original's target.
    fn default_cam_layer(&self) -> String {
        "last".into()
    }

    fn check_cam_layer(&self, layer: &str) -> Result<()> {
        match layer {
            "last" | "layer4.-1.bn3" => Ok(()),
            _ => Err(ModelError::Input(format!(
                "layer '{layer}': ResNet Grad-CAM explains `last` (layer4[-1].bn3)"
            ))),
        }
    }

    fn activation_grads(
        &self,
        x: &Tensor,
        layer: &str,
        choose: &dyn Fn(usize, &[f32]) -> Vec<usize>,
    ) -> Result<CamBatch> {
        self.check_cam_layer(layer)?;
        self.fc()?;
        let (h, last) = self.to_last_block(x)?;
        let (y, shortcut) = last.branches(&h)?;
        let (gh, gw) = (y.dim(2)?, y.dim(3)?);
        // [B, C, h, w] -> [B, h * w, C]
        let to_grid = |t: &Tensor| t.flatten_from(2)?.transpose(1, 2)?.contiguous();
        let leaf = Var::from_tensor(&y)?;
        let out = (leaf.as_tensor() + &shortcut)?.relu()?;
        let logits = self.head(&out.mean(D::Minus1)?.mean(D::Minus1)?)?;
        // pytorch-grad-cam keeps the tensor bn3's forward hook saw; torchvision then adds the
        // shortcut and applies the ReLU to that very tensor in place, so the activations the
        // original weights are the block's output, while the gradients are those of bn3's
        // output. Reproduced as such.
        let mut batch = gradient_rounds(&logits, &leaf, &to_grid, (gh, gw), choose)?;
        let activations = to_grid(&out)?;
        for r in &mut batch.rounds {
            r.activations = activations.clone();
        }
        Ok(batch)
    }
}
