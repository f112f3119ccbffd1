//! ResNet-50 as torchvision builds it (Bottleneck blocks, stride on the 3x3 convolution,
//! BatchNorm in evaluation mode), the seed's CNN baseline: global average pooling of `layer4`
//! and `fc`. Block counts and widths are read off the weights. Grad-CAM targets
//! `layer4[-1].bn3`, as the original does.
//!
//! The structure is written once ([`ResNetLayout`] over [`Ops`]): inference runs it with
//! BatchNorm folded into the convolutions, fine-tuning with BatchNorm in training mode.

use std::collections::BTreeMap;

use candle_core::{D, Device, Tensor, Var};

use super::cnn::{self, CnnLayout, CnnTrainable, Folded, Ops, Origin, Unit, Weights, out_channels};
use super::layouts::{self, CnnKeys};
use super::{Backbone, Classifier, LoadOptions, LoadReport, ModelError, Representation};
use crate::checkpoint::{Checkpoint, Param};
use crate::explain::{CamBatch, CamSource, gradient_rounds};
use crate::kernels::Kernels;
use crate::preprocess::Normalization;

type Result<T> = std::result::Result<T, ModelError>;

/// The checkpoint's keys in torchvision's ResNet layout (from any layout
/// [`layouts::cnn_keys`] knows), if it holds a ResNet.
pub fn find_backbone(tensors: &BTreeMap<String, Param>) -> Option<CnnKeys> {
    layouts::cnn_keys(tensors).filter(|k| layouts::is_resnet(&k.sd))
}

fn not_a_resnet() -> ModelError {
    ModelError::Weights("not a ResNet: no conv1 / bn1 / layer1 keys".into())
}

/// The structure of a torchvision ResNet with Bottleneck blocks, read off the weights.
#[derive(Debug, Clone)]
pub(crate) struct ResNetLayout {
    /// Per stage, whether each block has a `downsample` branch.
    stages: Vec<Vec<bool>>,
    /// Width of `layer4`'s output.
    features: usize,
}

impl ResNetLayout {
    fn from_keys(sd: &BTreeMap<String, Param>) -> Result<Self> {
        let mut stages: Vec<Vec<bool>> = Vec::new();
        for s in 1..=4 {
            let blocks = cnn::count_indexed(sd, &format!("layer{s}."));
            if blocks == 0 {
                return Err(ModelError::Weights(format!(
                    "no layer{s}.N keys: not a ResNet-50"
                )));
            }
            stages.push(
                (0..blocks)
                    .map(|i| sd.contains_key(&format!("layer{s}.{i}.downsample.0.weight")))
                    .collect(),
            );
        }
        let features = out_channels(sd, &format!("layer4.{}.conv3", stages[3].len() - 1));
        Ok(ResNetLayout { stages, features })
    }

    /// `bn3`'s output of block `i` of stage `s` (1-based, as named) and its shortcut.
    fn branches(
        &self,
        ops: &dyn Ops,
        s: usize,
        i: usize,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let p = format!("layer{s}.{i}");
        let stride = if s > 1 && i == 0 { 2 } else { 1 };
        let h = ops.conv_bn(x, &format!("{p}.conv1"), &format!("{p}.bn1"), 1, true)?;
        let h = ops.conv_bn(&h, &format!("{p}.conv2"), &format!("{p}.bn2"), stride, true)?;
        let y = ops.conv_bn(&h, &format!("{p}.conv3"), &format!("{p}.bn3"), 1, false)?;
        let shortcut = if self.stages[s - 1][i] {
            ops.conv_bn(
                x,
                &format!("{p}.downsample.0"),
                &format!("{p}.downsample.1"),
                stride,
                false,
            )?
        } else {
            x.clone()
        };
        Ok((y, shortcut))
    }

    fn block(&self, ops: &dyn Ops, s: usize, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let stride = if s > 1 && i == 0 { 2 } else { 1 };
        let down = self.stages[s - 1][i];
        if let Some(y) = ops.bottleneck(x, &format!("layer{s}.{i}"), stride, down)? {
            return Ok(y);
        }
        let (y, shortcut) = self.branches(ops, s, i, x)?;
        crate::kernels::add_relu(ops.kernels(), &y, &shortcut)
    }

    /// The outputs of the stem and stages up to `layers` (0 = stem only).
    fn run(&self, ops: &dyn Ops, x: &Tensor, layers: usize) -> candle_core::Result<Vec<Tensor>> {
        let mut outs = vec![ops.stem(x, "conv1", "bn1")?];
        for (s, stage) in self.stages.iter().enumerate().take(layers) {
            let mut h = outs.last().expect("stem").clone();
            for i in 0..stage.len() {
                h = self.block(ops, s + 1, i, &h)?;
            }
            outs.push(h);
        }
        Ok(outs)
    }

    /// The input of the last block.
    fn to_last_block(&self, ops: &dyn Ops, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.run(ops, x, 3)?.pop().expect("stem and stages");
        for i in 0..self.stages[3].len() - 1 {
            h = self.block(ops, 4, i, &h)?;
        }
        Ok(h)
    }
}

impl CnnLayout for ResNetLayout {
    fn name(&self) -> String {
        "ResNet-50".into()
    }

    fn units(&self) -> Vec<Unit> {
        let pair = |conv: String, bn: String| Unit::ConvBn { conv, bn };
        let mut units = vec![pair("conv1".into(), "bn1".into())];
        for (s, stage) in self.stages.iter().enumerate() {
            for (i, &down) in stage.iter().enumerate() {
                let p = format!("layer{}.{i}", s + 1);
                for j in 1..=3 {
                    units.push(pair(format!("{p}.conv{j}"), format!("{p}.bn{j}")));
                }
                if down {
                    units.push(pair(
                        format!("{p}.downsample.0"),
                        format!("{p}.downsample.1"),
                    ));
                }
            }
        }
        units
    }

    /// Global average of `layer4`.
    fn pooled(&self, ops: &dyn Ops, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.run(ops, x, 4)?.pop().expect("stages");
        h.mean(D::Minus1)?.mean(D::Minus1)
    }

    fn features(&self) -> usize {
        self.features
    }

    fn head_key(&self) -> &'static str {
        "fc"
    }

    fn classifier(
        &self,
        sd: &BTreeMap<String, Param>,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Box<dyn Classifier>> {
        let opts = LoadOptions {
            device: device.clone(),
            kernels,
            ..Default::default()
        };
        Ok(Box::new(
            ResNet::from_state_dict(sd, Origin::default(), &opts)?.0,
        ))
    }
}

/// A ResNet ready for inference.
pub struct ResNet {
    layout: ResNetLayout,
    ops: Folded,
    fc: Option<(Tensor, Tensor)>,
    device: Device,
}

impl ResNet {
    /// Build a ResNet from a checkpoint whose keys [`find_backbone`] recognises.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let keys = find_backbone(&ck.tensors).ok_or_else(not_a_resnet)?;
        if keys.lacks_layer4 {
            return Err(ModelError::Weights(format!(
                "{} weights: the ResNet-50 stops at layer3; `evax finetune` initialises layer4 \
                 fresh, as the original does, but inference needs fine-tuned weights",
                keys.layout
            )));
        }
        Self::from_state_dict(&keys.sd, Origin::of(&keys), opts)
    }

    /// Build a ResNet from a state dict with torchvision's names (`origin`: where the keys
    /// came from, for the report).
    pub(crate) fn from_state_dict(
        sd: &BTreeMap<String, Param>,
        origin: Origin,
        opts: &LoadOptions,
    ) -> Result<(Self, LoadReport)> {
        let layout = ResNetLayout::from_keys(sd)?;
        let mut w = Weights::new(sd, &opts.device);
        let ops = w.folded(&layout.units(), opts.kernels)?;
        let fc = w.head("fc", layout.features)?;
        let report = w.finish("ResNet", origin)?;
        let model = ResNet {
            layout,
            ops,
            fc,
            device: opts.device.clone(),
        };
        Ok((model, report))
    }

    /// A trainable ResNet from a checkpoint, for `classes` classes.
    pub fn trainable(
        ck: &Checkpoint,
        classes: usize,
        seed: u64,
        device: &Device,
        kernels: Kernels,
    ) -> Result<CnnTrainable> {
        let keys = find_backbone(&ck.tensors).ok_or_else(not_a_resnet)?;
        let mut sd = keys.sd.clone();
        let mut notes = Vec::new();
        if keys.lacks_layer4 {
            let cin = out_channels(
                &sd,
                &format!(
                    "layer3.{}.conv3",
                    cnn::count_indexed(&sd, "layer3.").max(1) - 1
                ),
            );
            super::random::resnet_stage(&mut sd, 4, 3, 512, cin, seed);
            notes.push(format!(
                "{} weights stop at layer3: layer4 initialised fresh (torchvision's initialisation)",
                keys.layout
            ));
        }
        let layout = ResNetLayout::from_keys(&sd)?;
        let mut t = CnnTrainable::new(Box::new(layout), &sd, classes, seed, device, kernels)?;
        t.notes.splice(0..0, notes);
        t.notes.extend(
            keys.dropped
                .iter()
                .map(|k| format!("dropped {k} (as the original does)")),
        );
        Ok(t)
    }

    fn input(&self, x: &Tensor) -> Result<Tensor> {
        cnn::check_input(x)?;
        Ok(x.to_device(&self.device)?)
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
        let deepest = indices.iter().copied().max().unwrap_or(0);
        let outs = self.layout.run(&self.ops, &self.input(x)?, deepest)?;
        Ok(indices.iter().map(|&i| outs[i].clone()).collect())
    }

    /// `pooled`: the global average of `layer4` `[B, 2048]`; no tokens.
    fn embed(&self, x: &Tensor) -> Result<Representation> {
        Ok(Representation {
            pooled: super::in_batch_slices(&self.input(x)?, |x| self.layout.pooled(&self.ops, x))?,
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
        let h = self.layout.to_last_block(&self.ops, &self.input(x)?)?;
        let last = self.layout.stages[3].len() - 1;
        let (y, shortcut) = self.layout.branches(&self.ops, 4, last, &h)?;
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
