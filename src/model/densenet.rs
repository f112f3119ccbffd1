//! DenseNet-121 as torchvision builds it, the seed's second CNN baseline: dense blocks of
//! BN-ReLU-conv1x1-BN-ReLU-conv3x3 layers whose outputs are concatenated, transitions
//! (BN-ReLU-conv1x1-avgpool), `norm5`, ReLU, global average pooling and `classifier`. Block
//! counts, growth and widths are read off the weights; torchvision's release files with the old
//! names (`norm.1`, `conv.2`) load too. Grad-CAM targets the last dense layer's `norm1`.

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

/// The checkpoint's keys in torchvision's current DenseNet names (from any layout
/// [`layouts::cnn_keys`] knows, old `norm.1` / `conv.2` names included), if it holds a DenseNet.
pub fn find_backbone(tensors: &BTreeMap<String, Param>) -> Option<CnnKeys> {
    layouts::cnn_keys(tensors).filter(|k| layouts::is_densenet(&k.sd))
}

fn not_a_densenet() -> ModelError {
    ModelError::Weights("not a DenseNet: no features.conv0 / norm0 keys".into())
}

/// The structure of a torchvision DenseNet, read off the weights.
#[derive(Debug, Clone)]
pub(crate) struct DenseLayout {
    /// Per dense block, the input width of each layer (its `norm1`'s channels).
    blocks: Vec<Vec<usize>>,
    /// The input width of each transition (after every block but the last).
    transitions: Vec<usize>,
    /// The width of `norm5`.
    features: usize,
}

impl DenseLayout {
    fn from_keys(sd: &BTreeMap<String, Param>) -> Result<Self> {
        let nblocks = (1..)
            .take_while(|b| {
                sd.contains_key(&format!("features.denseblock{b}.denselayer1.conv1.weight"))
            })
            .count();
        if nblocks == 0 {
            return Err(ModelError::Weights("no features.denseblockN keys".into()));
        }
        let mut channels = out_channels(sd, "features.conv0");
        let (mut blocks, mut transitions) = (Vec::new(), Vec::new());
        for b in 1..=nblocks {
            let nlayers = (1..)
                .take_while(|l| {
                    sd.contains_key(&format!(
                        "features.denseblock{b}.denselayer{l}.conv1.weight"
                    ))
                })
                .count();
            let mut widths = Vec::with_capacity(nlayers);
            for l in 1..=nlayers {
                widths.push(channels);
                channels +=
                    out_channels(sd, &format!("features.denseblock{b}.denselayer{l}.conv2"));
            }
            blocks.push(widths);
            if b < nblocks {
                transitions.push(channels);
                channels = out_channels(sd, &format!("features.transition{b}.conv"));
            }
        }
        Ok(DenseLayout {
            blocks,
            transitions,
            features: channels,
        })
    }

    /// The new features of dense layer `l` of block `b` (1-based) from ReLU(`norm1`'s output).
    fn new_features(
        &self,
        ops: &dyn Ops,
        b: usize,
        l: usize,
        h: &Tensor,
    ) -> candle_core::Result<Tensor> {
        new_features(ops, &layer_prefix(b, l), h)
    }

    /// The input of the last dense layer, or (`whole`) the last block's output.
    fn run(&self, ops: &dyn Ops, x: &Tensor, whole: bool) -> candle_core::Result<Tensor> {
        let mut h = ops.stem(x, "features.conv0", "features.norm0")?;
        let nblocks = self.blocks.len();
        for (bi, widths) in self.blocks.iter().enumerate() {
            let (b, last_block) = (bi + 1, bi + 1 == nblocks);
            let layers = if last_block && !whole {
                widths.len().saturating_sub(1)
            } else {
                widths.len()
            };
            let prefixes: Vec<String> = (1..=layers).map(|l| layer_prefix(b, l)).collect();
            h = ops.dense_layers(&h, &prefixes)?;
            if !last_block {
                let p = format!("features.transition{b}");
                h = ops
                    .bn_relu_conv(&h, &format!("{p}.norm"), &format!("{p}.conv"))?
                    .avg_pool2d(2)?;
            }
        }
        Ok(h)
    }

    /// `norm5`, ReLU, global average pooling: `[B, C]`.
    fn pool(&self, ops: &dyn Ops, features: &Tensor) -> candle_core::Result<Tensor> {
        ops.bn_relu(features, "features.norm5")?
            .mean(D::Minus1)?
            .mean(D::Minus1)
    }

    fn last(&self) -> (usize, usize) {
        (self.blocks.len(), self.blocks.last().map_or(0, |l| l.len()))
    }
}

impl CnnLayout for DenseLayout {
    fn name(&self) -> String {
        "DenseNet-121".into()
    }

    fn units(&self) -> Vec<Unit> {
        let mut units = vec![Unit::ConvBn {
            conv: "features.conv0".into(),
            bn: "features.norm0".into(),
        }];
        for (bi, widths) in self.blocks.iter().enumerate() {
            for (li, &channels) in widths.iter().enumerate() {
                let p = format!("features.denseblock{}.denselayer{}", bi + 1, li + 1);
                units.push(Unit::Bn {
                    bn: format!("{p}.norm1"),
                    channels,
                });
                units.push(Unit::ConvBn {
                    conv: format!("{p}.conv1"),
                    bn: format!("{p}.norm2"),
                });
                units.push(Unit::Conv(format!("{p}.conv2")));
            }
            if let Some(&channels) = self.transitions.get(bi) {
                let p = format!("features.transition{}", bi + 1);
                units.push(Unit::Bn {
                    bn: format!("{p}.norm"),
                    channels,
                });
                units.push(Unit::Conv(format!("{p}.conv")));
            }
        }
        units.push(Unit::Bn {
            bn: "features.norm5".into(),
            channels: self.features,
        });
        units
    }

    fn pooled(&self, ops: &dyn Ops, x: &Tensor) -> candle_core::Result<Tensor> {
        self.pool(ops, &self.run(ops, x, true)?)
    }

    fn features(&self) -> usize {
        self.features
    }

    fn head_key(&self) -> &'static str {
        "classifier"
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
            DenseNet::from_state_dict(sd, Origin::default(), &opts)?.0,
        ))
    }
}

/// The key prefix of dense layer `l` of block `b` (both 1-based).
fn layer_prefix(b: usize, l: usize) -> String {
    format!("features.denseblock{b}.denselayer{l}")
}

/// A dense layer's new features from ReLU(`norm1`'s output): `conv1`, `norm2`, ReLU, `conv2`.
fn new_features<O: Ops + ?Sized>(ops: &O, p: &str, h: &Tensor) -> candle_core::Result<Tensor> {
    let h = ops.conv_bn(h, &format!("{p}.conv1"), &format!("{p}.norm2"), 1, true)?;
    ops.conv(&h, &format!("{p}.conv2"), 1)
}

/// Dense layers one operation at a time: each layer's input, `norm1` + ReLU, its new
/// features, and the two concatenated.
pub(crate) fn layers_stepwise<O: Ops + ?Sized>(
    ops: &O,
    x: &Tensor,
    prefixes: &[String],
) -> candle_core::Result<Tensor> {
    prefixes.iter().try_fold(x.clone(), |x, p| {
        let h = ops.bn_relu(&x, &format!("{p}.norm1"))?;
        let new = new_features(ops, p, &h)?;
        Tensor::cat(&[&x, &new], 1)
    })
}

/// A DenseNet ready for inference.
pub struct DenseNet {
    layout: DenseLayout,
    ops: Folded,
    classifier: Option<(Tensor, Tensor)>,
    device: Device,
}

impl DenseNet {
    /// Build a DenseNet from a checkpoint whose keys [`find_backbone`] recognises.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let keys = find_backbone(&ck.tensors).ok_or_else(not_a_densenet)?;
        Self::from_state_dict(&keys.sd, Origin::of(&keys), opts)
    }

    /// Build a DenseNet from a state dict with torchvision's current names.
    pub(crate) fn from_state_dict(
        sd: &BTreeMap<String, Param>,
        origin: Origin,
        opts: &LoadOptions,
    ) -> Result<(Self, LoadReport)> {
        let layout = DenseLayout::from_keys(sd)?;
        let mut w = Weights::new(sd, &opts.device);
        let ops = w.folded(&layout.units(), opts.kernels)?;
        let classifier = w.head("classifier", layout.features)?;
        let report = w.finish("DenseNet", origin)?;
        let model = DenseNet {
            layout,
            ops,
            classifier,
            device: opts.device.clone(),
        };
        Ok((model, report))
    }

    /// A trainable DenseNet from a checkpoint, for `classes` classes.
    pub fn trainable(
        ck: &Checkpoint,
        classes: usize,
        seed: u64,
        device: &Device,
        kernels: Kernels,
    ) -> Result<CnnTrainable> {
        let keys = find_backbone(&ck.tensors).ok_or_else(not_a_densenet)?;
        let layout = DenseLayout::from_keys(&keys.sd)?;
        CnnTrainable::new(Box::new(layout), &keys.sd, classes, seed, device, kernels)
    }

    fn input(&self, x: &Tensor) -> Result<Tensor> {
        cnn::check_input(x)?;
        Ok(x.to_device(&self.device)?)
    }

    fn classifier(&self) -> Result<&(Tensor, Tensor)> {
        self.classifier
            .as_ref()
            .ok_or_else(|| ModelError::Input("these DenseNet weights have no classifier".into()))
    }

    fn head(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(cnn::linear(pooled, self.classifier()?)?)
    }
}

impl Backbone for DenseNet {
    fn name(&self) -> String {
        "DenseNet-121".into()
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

    /// `features`: the output of `norm5` (before the ReLU).
    fn layer_names(&self) -> Vec<String> {
        vec!["features".into()]
    }

    fn forward_intermediates(&self, x: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        if let Some(&bad) = indices.iter().find(|&&i| i > 0) {
            return Err(ModelError::Input(format!(
                "layer index {bad} out of range (the model has 1 layer)"
            )));
        }
        let h = self.layout.run(&self.ops, &self.input(x)?, true)?;
        let f = self.ops.bn(&h, "features.norm5")?;
        Ok(indices.iter().map(|_| f.clone()).collect())
    }

    /// `pooled`: ReLU and global average of `norm5`'s output; no tokens.
    fn embed(&self, x: &Tensor) -> Result<Representation> {
        Ok(Representation {
            pooled: super::in_batch_slices(&self.input(x)?, |x| self.layout.pooled(&self.ops, x))?,
            tokens: None,
        })
    }
}

impl Classifier for DenseNet {
    fn num_classes(&self) -> Option<usize> {
        self.classifier
            .as_ref()
            .and_then(|(w, _)| w.dims().first().copied())
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.classifier()?;
        let pooled = self.embed(x)?.pooled;
        self.head(&pooled)
    }
}

impl CamSource for DenseNet {
    /// The last dense layer's `norm1`, the original's target.
    fn default_cam_layer(&self) -> String {
        "last".into()
    }

    fn check_cam_layer(&self, layer: &str) -> Result<()> {
        match layer {
            "last" => Ok(()),
            _ => Err(ModelError::Input(format!(
                "layer '{layer}': DenseNet Grad-CAM explains `last` (the last dense layer's norm1)"
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
        self.classifier()?;
        let h = self.layout.run(&self.ops, &self.input(x)?, false)?;
        let (b, l) = self.layout.last();
        let norm1 = format!("features.denseblock{b}.denselayer{l}.norm1");
        let y = self.ops.bn(&h, &norm1)?;
        let (gh, gw) = (y.dim(2)?, y.dim(3)?);
        let to_grid = |t: &Tensor| t.flatten_from(2)?.transpose(1, 2)?.contiguous();
        let leaf = Var::from_tensor(&y)?;
        let new = self
            .layout
            .new_features(&self.ops, b, l, &leaf.as_tensor().relu()?)?;
        let features = Tensor::cat(&[&h, &new], 1)?;
        let logits = self.head(&self.layout.pool(&self.ops, &features)?)?;
        // As for the ResNet: torchvision applies the ReLU after norm1 in place, so the tensor
        // pytorch-grad-cam keeps is ReLU(norm1(x)), while the gradients are norm1's output's.
        let mut batch = gradient_rounds(&logits, &leaf, &to_grid, (gh, gw), choose)?;
        let activations = to_grid(&y.relu()?)?;
        for r in &mut batch.rounds {
            r.activations = activations.clone();
        }
        Ok(batch)
    }
}
