//! DenseNet-121 as torchvision builds it, the seed's second CNN baseline: dense blocks of
//! BN-ReLU-conv1x1-BN-ReLU-conv3x3 layers whose outputs are concatenated, transitions
//! (BN-ReLU-conv1x1-avgpool), `norm5`, ReLU, global average pooling and `classifier`. Block
//! counts, growth and widths are read off the weights; torchvision's release files with the old
//! names (`norm.1`, `conv.2`) load too. Grad-CAM targets the last dense layer's `norm1`.

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

/// Prefixes a DenseNet is found under.
const PREFIXES: [&str; 4] = ["", "module.", "model.", "backbone."];

/// torchvision's old layer names and the current ones.
const OLD_NAMES: [(&str, &str); 4] = [
    (".norm.1.", ".norm1."),
    (".conv.1.", ".conv1."),
    (".norm.2.", ".norm2."),
    (".conv.2.", ".conv2."),
];

/// The prefix of a torchvision DenseNet's keys, if the state dict holds one.
pub fn find_backbone(tensors: &BTreeMap<String, Param>) -> Option<&'static str> {
    PREFIXES.into_iter().find(|p| {
        tensors.contains_key(&format!("{p}features.conv0.weight"))
            && tensors.contains_key(&format!("{p}features.norm0.running_mean"))
    })
}

/// One dense layer: its new features from the concatenation of everything before it.
#[derive(Debug, Clone)]
struct DenseLayer {
    norm1: Bn,
    conv1: Conv,
    norm2: Bn,
    conv2: Conv,
}

impl DenseLayer {
    /// The new features from `norm1`'s output (so that it can be the Grad-CAM leaf).
    fn new_features(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&y.relu()?)?;
        self.conv2.forward(&self.norm2.forward(&h)?.relu()?)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let new = self.new_features(&self.norm1.forward(x)?)?;
        Tensor::cat(&[x, &new], 1)
    }
}

/// A dense block's layers and the transition after it (norm, conv; none after the last).
type DenseBlock = (Vec<DenseLayer>, Option<(Bn, Conv)>);

/// A DenseNet ready for inference.
pub struct DenseNet {
    stem: Conv,
    stem_bn: Bn,
    /// Dense blocks, each followed by a transition (norm, conv) except the last.
    blocks: Vec<DenseBlock>,
    norm5: Bn,
    classifier: Option<(Tensor, Tensor)>,
    device: Device,
}

impl DenseNet {
    /// Build a DenseNet from a checkpoint whose keys [`find_backbone`] recognises.
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, LoadReport)> {
        let prefix = find_backbone(&ck.tensors).ok_or_else(|| {
            ModelError::Weights("not a DenseNet: no features.conv0 / norm0 keys".into())
        })?;
        let (sd, outside) = strip_prefix(&ck.tensors, prefix, &OLD_NAMES);
        let mut w = Weights {
            sd: &sd,
            device: &opts.device,
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let stem = Conv {
            padding: 3,
            ..w.conv("features.conv0", 2)?
        };
        let stem_bn = w.bn("features.norm0", out_channels(&sd, "features.conv0"))?;
        let count = |prefix: &str, item: &str| {
            sd.keys()
                .filter_map(|k| {
                    k.strip_prefix(prefix)?
                        .strip_prefix(item)?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .unwrap_or(0)
        };
        let nblocks = count("features.", "denseblock");
        if nblocks == 0 {
            return Err(ModelError::Weights("no features.denseblockN keys".into()));
        }
        let mut blocks = Vec::with_capacity(nblocks);
        let mut channels = out_channels(&sd, "features.conv0");
        for b in 1..=nblocks {
            let nlayers = count(&format!("features.denseblock{b}."), "denselayer");
            let mut layers = Vec::with_capacity(nlayers);
            for l in 1..=nlayers {
                let p = format!("features.denseblock{b}.denselayer{l}");
                let norm1 = w.bn(&format!("{p}.norm1"), channels)?;
                let conv1 = w.conv(&format!("{p}.conv1"), 1)?;
                let norm2 = w.bn(
                    &format!("{p}.norm2"),
                    out_channels(&sd, &format!("{p}.conv1")),
                )?;
                let conv2 = w.conv(&format!("{p}.conv2"), 1)?;
                channels += out_channels(&sd, &format!("{p}.conv2"));
                layers.push(DenseLayer {
                    norm1,
                    conv1,
                    norm2,
                    conv2,
                });
            }
            let transition = if b < nblocks {
                let p = format!("features.transition{b}");
                let norm = w.bn(&format!("{p}.norm"), channels)?;
                let conv = w.conv(&format!("{p}.conv"), 1)?;
                channels = out_channels(&sd, &format!("{p}.conv"));
                Some((norm, conv))
            } else {
                None
            };
            blocks.push((layers, transition));
        }
        let norm5 = w.bn("features.norm5", channels)?;
        let classifier = w.head("classifier", channels)?;
        let report = w.finish("DenseNet", prefix, outside)?;
        let model = DenseNet {
            stem,
            stem_bn,
            blocks,
            norm5,
            classifier,
            device: opts.device.clone(),
        };
        Ok((model, report))
    }

    /// The input of the last dense layer.
    fn to_last_layer(&self, x: &Tensor) -> Result<Tensor> {
        cnn::check_input(x)?;
        let mut h = cnn::stem(&self.stem, &self.stem_bn, &x.to_device(&self.device)?)?;
        for (layers, transition) in &self.blocks {
            let last_block = transition.is_none();
            for (i, l) in layers.iter().enumerate() {
                if last_block && i + 1 == layers.len() {
                    return Ok(h);
                }
                h = l.forward(&h)?;
            }
            if let Some((norm, conv)) = transition {
                h = conv.forward(&norm.forward(&h)?.relu()?)?.avg_pool2d(2)?;
            }
        }
        Err(ModelError::Weights(
            "the last dense block has no layers".into(),
        ))
    }

    fn last_layer(&self) -> &DenseLayer {
        self.blocks
            .last()
            .and_then(|(layers, _)| layers.last())
            .expect("checked when loading")
    }

    /// norm5, ReLU, global average pooling: `[B, C]`.
    fn pool(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.norm5
            .forward(features)?
            .relu()?
            .mean(D::Minus1)?
            .mean(D::Minus1)
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
        let h = self.last_layer().forward(&self.to_last_layer(x)?)?;
        let f = self.norm5.forward(&h)?;
        Ok(indices.iter().map(|_| f.clone()).collect())
    }

    /// `pooled`: ReLU and global average of `norm5`'s output; no tokens.
    fn embed(&self, x: &Tensor) -> Result<Representation> {
        let h = self.last_layer().forward(&self.to_last_layer(x)?)?;
        Ok(Representation {
            pooled: self.pool(&h)?,
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
        let h = self.to_last_layer(x)?;
        let last = self.last_layer();
        let y = last.norm1.forward(&h)?;
        let (gh, gw) = (y.dim(2)?, y.dim(3)?);
        let to_grid = |t: &Tensor| t.flatten_from(2)?.transpose(1, 2)?.contiguous();
        let leaf = Var::from_tensor(&y)?;
        let new = last.new_features(leaf.as_tensor())?;
        let features = Tensor::cat(&[&h, &new], 1)?;
        let logits = self.head(&self.pool(&features)?)?;
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
