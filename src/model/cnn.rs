//! What the CNN families share. Each family describes its structure once, in terms of the
//! per-layer operations of [`Ops`]; two implementations run it: [`Folded`] for inference
//! (BatchNorm folded into the convolution before it, ReLU fused) and [`BatchStats`] for
//! training (parameters as variables, BatchNorm on the batch's statistics with PyTorch's
//! running-statistics update). [`CnnTrainable`] fine-tunes any family that implements
//! [`CnnLayout`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{Device, Tensor, Var};

use super::{Classifier, LoadReport, ModelError, Trainable};
use crate::checkpoint::{Param, StorageDtype};
use crate::kernels::dense_train::DenseLayerParts;
use crate::kernels::residual_train::{Bottleneck, ConvBn};
use crate::kernels::{self, Kernels, candle_ops};
use crate::preprocess::Normalization;

type Result<T> = std::result::Result<T, ModelError>;

/// BatchNorm epsilon of torchvision's CNNs.
const BN_EPS: f64 = 1e-5;

/// PyTorch's default BatchNorm momentum for the running statistics.
const BN_MOMENTUM: f64 = 0.1;

/// One weighted unit of a CNN, by its state-dict names.
#[derive(Debug, Clone)]
pub(crate) enum Unit {
    /// A convolution whose output goes straight into a BatchNorm.
    ConvBn { conv: String, bn: String },
    /// A convolution alone.
    Conv(String),
    /// A BatchNorm alone over `channels` channels.
    Bn { bn: String, channels: usize },
}

/// The operations a CNN's structure is written in (padding is always `k / 2`).
pub(crate) trait Ops {
    /// Convolution `conv` then BatchNorm `bn`, then ReLU if asked.
    fn conv_bn(
        &self,
        x: &Tensor,
        conv: &str,
        bn: &str,
        stride: usize,
        relu: bool,
    ) -> candle_core::Result<Tensor>;

    /// Convolution `conv` alone.
    fn conv(&self, x: &Tensor, conv: &str, stride: usize) -> candle_core::Result<Tensor>;

    /// BatchNorm `bn` alone.
    fn bn(&self, x: &Tensor, bn: &str) -> candle_core::Result<Tensor>;

    /// BatchNorm `bn` then ReLU.
    fn bn_relu(&self, x: &Tensor, bn: &str) -> candle_core::Result<Tensor> {
        self.bn(x, bn)?.relu()
    }

    /// The kernels the operations run on.
    fn kernels(&self) -> Kernels;

    /// BatchNorm `bn`, ReLU, then the 1x1 convolution `conv` (a DenseNet transition's).
    fn bn_relu_conv(&self, x: &Tensor, bn: &str, conv: &str) -> candle_core::Result<Tensor> {
        self.conv(&self.bn_relu(x, bn)?, conv, 1)
    }

    /// A ResNet bottleneck block `prefix` (`conv1..3`, `bn1..3`, and `downsample.0/1` when
    /// `down`) as one operation, where these ops have one (`None`: build it step by step).
    fn bottleneck(
        &self,
        _x: &Tensor,
        _prefix: &str,
        _stride: usize,
        _down: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    /// DenseNet layers (the prefixes of their `norm1`, `conv1`, `norm2`, `conv2`) over `x`,
    /// each appending its new features to its input's channels.
    fn dense_layers(&self, x: &Tensor, prefixes: &[String]) -> candle_core::Result<Tensor> {
        super::densenet::layers_stepwise(self, x, prefixes)
    }

    /// torchvision's stem: `conv`, `bn`, ReLU, 3x3 max pool with stride 2 and padding 1.
    fn stem(&self, x: &Tensor, conv: &str, bn: &str) -> candle_core::Result<Tensor> {
        let h = self.conv_bn(x, conv, bn, 2, true)?;
        kernels::max_pool(self.kernels(), &h, 3, 2, 1)
    }
}

/// A CNN family's structure, read off the weights: its units, its forward to the pooled
/// pre-logits on any [`Ops`], and the name of its linear head.
pub(crate) trait CnnLayout: Send + Sync {
    /// The architecture's conventional name.
    fn name(&self) -> String;

    /// Every weighted unit, in order.
    fn units(&self) -> Vec<Unit>;

    /// Pooled features `[B, C]` of images `[B, 3, H, W]`.
    fn pooled(&self, ops: &dyn Ops, x: &Tensor) -> candle_core::Result<Tensor>;

    /// Width of the pooled features.
    fn features(&self) -> usize;

    /// The head's key (`fc`, `classifier`).
    fn head_key(&self) -> &'static str;

    /// An inference model of this family from a state dict.
    fn classifier(
        &self,
        sd: &BTreeMap<String, Param>,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Box<dyn Classifier>>;
}

/// A convolution ready for inference: weight `[out, in, k, k]`, the folded BatchNorm's shift
/// as its bias (if any).
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    pad: usize,
}

/// A BatchNorm in evaluation mode, as a per-channel scale and shift `[C]`.
#[derive(Debug, Clone)]
pub(crate) struct Bn {
    scale: Tensor,
    shift: Tensor,
}

/// Inference: convolutions with their BatchNorm folded in, the other BatchNorms as scale and
/// shift.
pub(crate) struct Folded {
    convs: HashMap<String, Conv>,
    bns: HashMap<String, Bn>,
    kernels: Kernels,
    /// The convolutions' weights (and biases) prepared for bf16 products, when asked for
    /// ([`Folded::with_bf16_products`]).
    bf16: HashMap<String, (kernels::bf16::Bf16Weight, Option<Vec<f32>>)>,
}

fn missing(what: &str, key: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("no {what} '{key}' in this model"))
}

impl Folded {
    /// Convolutions with their products in bf16 (summed in f32) on CPUs with AVX512-BF16, for
    /// the fused kernels; unchanged elsewhere.
    pub(crate) fn with_bf16_products(mut self) -> candle_core::Result<Self> {
        if self.kernels != Kernels::Fused || !kernels::bf16::native() {
            return Ok(self);
        }
        for (name, c) in &self.convs {
            if !c.weight.device().is_cpu() {
                return Ok(self);
            }
            let w = c.weight.flatten_all()?.to_vec1::<f32>()?;
            let bias = c.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            let (cout, _, kh, kw) = c.weight.dims4()?;
            let prepared = kernels::bf16::conv_weight(&w, cout, (kh, kw));
            self.bf16.insert(name.clone(), (prepared, bias));
        }
        Ok(self)
    }

    fn affine(&self, x: &Tensor, bn: &str, relu: bool) -> candle_core::Result<Tensor> {
        let b = self.bns.get(bn).ok_or_else(|| missing("BatchNorm", bn))?;
        kernels::channel_affine(self.kernels, x, &b.scale, &b.shift, relu)
    }
}

impl Ops for Folded {
    fn conv_bn(
        &self,
        x: &Tensor,
        conv: &str,
        _bn: &str,
        stride: usize,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        let c = self
            .convs
            .get(conv)
            .ok_or_else(|| missing("convolution", conv))?;
        if let Some((w, bias)) = self.bf16.get(conv) {
            let (_, _, kh, kw) = c.weight.dims4()?;
            return kernels::candle_ops::conv2d_bf16(
                x,
                w,
                bias.as_deref(),
                (kh, kw),
                (stride, c.pad),
                relu,
            );
        }
        kernels::conv2d(
            self.kernels,
            x,
            &c.weight,
            c.bias.as_ref(),
            stride,
            c.pad,
            relu,
        )
    }

    fn conv(&self, x: &Tensor, conv: &str, stride: usize) -> candle_core::Result<Tensor> {
        self.conv_bn(x, conv, "", stride, false)
    }

    fn bn(&self, x: &Tensor, bn: &str) -> candle_core::Result<Tensor> {
        self.affine(x, bn, false)
    }

    fn bn_relu(&self, x: &Tensor, bn: &str) -> candle_core::Result<Tensor> {
        self.affine(x, bn, true)
    }

    fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// On the fused CPU kernels, the BatchNorm + ReLU applied as the convolution reads its
    /// input (no pass of its own).
    fn bn_relu_conv(&self, x: &Tensor, bn: &str, conv: &str) -> candle_core::Result<Tensor> {
        let c = self
            .convs
            .get(conv)
            .ok_or_else(|| missing("convolution", conv))?;
        let fits = c.bias.is_none() && c.pad == 0 && c.weight.dims().ends_with(&[1, 1]);
        if !self.kernels.fused_for(x) || !fits {
            return self.conv(&self.bn_relu(x, bn)?, conv, 1);
        }
        let b = self.bns.get(bn).ok_or_else(|| missing("BatchNorm", bn))?;
        candle_ops::pre_activated_conv(x, (&b.scale, &b.shift), &c.weight)
    }

    /// On the fused CPU kernels, one buffer for all the layers' features, each `norm1` applied
    /// as `conv1` reads them.
    fn dense_layers(&self, x: &Tensor, prefixes: &[String]) -> candle_core::Result<Tensor> {
        if !self.kernels.fused_for(x) {
            return super::densenet::layers_stepwise(self, x, prefixes);
        }
        let conv = |key: String| {
            self.convs
                .get(&key)
                .ok_or_else(|| missing("convolution", &key))
        };
        let layers = prefixes
            .iter()
            .map(|p| {
                let norm1 = format!("{p}.norm1");
                let bn = self
                    .bns
                    .get(&norm1)
                    .ok_or_else(|| missing("BatchNorm", &norm1))?;
                let (c1, c2) = (conv(format!("{p}.conv1"))?, conv(format!("{p}.conv2"))?);
                let bias = c1.bias.clone().ok_or_else(|| missing("folded norm2", p))?;
                Ok(candle_ops::DenseLayerWeights {
                    norm1: (bn.scale.clone(), bn.shift.clone()),
                    conv1: (c1.weight.clone(), bias),
                    conv2: c2.weight.clone(),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        candle_ops::dense_layers(x, &layers)
    }
}

/// Collects weights by key, recording every problem so that all are reported at once.
pub(crate) struct Weights<'a> {
    sd: &'a BTreeMap<String, Param>,
    device: &'a Device,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl<'a> Weights<'a> {
    pub(crate) fn new(sd: &'a BTreeMap<String, Param>, device: &'a Device) -> Self {
        Weights {
            sd,
            device,
            used: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    fn get(&mut self, key: &str) -> Option<&'a Param> {
        match self.sd.get(key) {
            Some(p) => {
                self.used.insert(key.to_string());
                Some(p)
            }
            None => {
                self.problems.push(format!("missing {key}"));
                None
            }
        }
    }

    /// A convolution weight `[out, in, k, k]` (`None`, recorded, when missing or misshapen).
    fn conv_weight(&mut self, key: &str) -> Option<&'a Param> {
        let p = self.get(&format!("{key}.weight"))?;
        match p.shape[..] {
            [o, i, kh, kw] if kh == kw && o > 0 && i > 0 && kh > 0 => Some(p),
            _ => {
                self.problems.push(format!(
                    "{key}.weight has shape {:?}, expected [out, in, k, k]",
                    p.shape
                ));
                None
            }
        }
    }

    /// A BatchNorm's evaluation-mode scale and shift over `channels` channels.
    fn bn_affine(&mut self, key: &str, channels: usize) -> (Vec<f32>, Vec<f32>) {
        let mut part = |name: &str, default: f32| -> Vec<f32> {
            match self.get(&format!("{key}.{name}")) {
                Some(p) if p.shape == [channels] => p.data.clone(),
                Some(p) => {
                    let msg = format!(
                        "{key}.{name} has shape {:?}, expected [{channels}]",
                        p.shape
                    );
                    self.problems.push(msg);
                    vec![default; channels]
                }
                None => vec![default; channels],
            }
        };
        let (w, b, m, v) = (
            part("weight", 1.0),
            part("bias", 0.0),
            part("running_mean", 0.0),
            part("running_var", 1.0),
        );
        self.used.insert(format!("{key}.num_batches_tracked"));
        let scale: Vec<f32> = w
            .iter()
            .zip(&v)
            .map(|(w, v)| (*w as f64 / (*v as f64 + BN_EPS).sqrt()) as f32)
            .collect();
        let shift = b
            .iter()
            .zip(&m)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        (scale, shift)
    }

    /// The inference operations of `units`.
    pub(crate) fn folded(&mut self, units: &[Unit], kernels: Kernels) -> Result<Folded> {
        let mut convs = HashMap::new();
        let mut bns = HashMap::new();
        for u in units {
            match u {
                Unit::ConvBn { conv, .. } | Unit::Conv(conv) => {
                    let Some(p) = self.conv_weight(conv) else {
                        continue;
                    };
                    let (cout, k) = (p.shape[0], p.shape[2]);
                    let mut weight = p.data.clone();
                    let mut bias = None;
                    if let Unit::ConvBn { bn, .. } = u {
                        let (scale, shift) = self.bn_affine(bn, cout);
                        let per_out = weight.len() / cout;
                        for (row, s) in weight.chunks_exact_mut(per_out).zip(&scale) {
                            row.iter_mut().for_each(|v| *v *= s);
                        }
                        bias = Some(Tensor::from_vec(shift, cout, self.device)?);
                    } else if self.sd.contains_key(&format!("{conv}.bias")) {
                        // A bare convolution's own bias (a segmentation head's classifier).
                        bias = self
                            .get(&format!("{conv}.bias"))
                            .filter(|b| b.shape == [cout])
                            .map(|b| b.to_tensor(self.device))
                            .transpose()?;
                    }
                    let weight = Tensor::from_vec(weight, p.shape.as_slice(), self.device)?;
                    convs.insert(
                        conv.clone(),
                        Conv {
                            weight,
                            bias,
                            pad: k / 2,
                        },
                    );
                }
                Unit::Bn { bn, channels } => {
                    let (scale, shift) = self.bn_affine(bn, *channels);
                    let shape = *channels;
                    bns.insert(
                        bn.clone(),
                        Bn {
                            scale: Tensor::from_vec(scale, shape, self.device)?,
                            shift: Tensor::from_vec(shift, shape, self.device)?,
                        },
                    );
                }
            }
        }
        Ok(Folded {
            convs,
            bns,
            kernels,
            bf16: HashMap::new(),
        })
    }

    /// A linear head `{key}.weight` `[K, features]` and `{key}.bias` (none when both are absent;
    /// a misshapen one is recorded).
    pub(crate) fn head(&mut self, key: &str, features: usize) -> Result<Option<(Tensor, Tensor)>> {
        let (wk, bk) = (format!("{key}.weight"), format!("{key}.bias"));
        match (self.sd.get(&wk), self.sd.get(&bk)) {
            (Some(w), Some(b))
                if w.shape.len() == 2
                    && w.shape[1] == features
                    && w.shape[0] > 0
                    && b.shape == [w.shape[0]] =>
            {
                let head = (w.to_tensor(self.device)?, b.to_tensor(self.device)?);
                self.used.insert(wk);
                self.used.insert(bk);
                Ok(Some(head))
            }
            (None, None) => Ok(None),
            (w, _) => {
                self.problems.push(format!(
                    "{key} has shape {:?}, expected [K, {features}] with a bias",
                    w.map(|p| p.shape.clone())
                ));
                Ok(None)
            }
        }
    }

    /// The load report, or every problem recorded as one error naming the `family`.
    pub(crate) fn finish(self, family: &str, keys: Origin) -> Result<LoadReport> {
        if !self.problems.is_empty() {
            let shown: Vec<&str> = self.problems.iter().take(12).map(|s| s.as_str()).collect();
            return Err(ModelError::Weights(format!(
                "weights incomplete for a {family}: {}",
                shown.join("; ")
            )));
        }
        // Learned parameters only (running statistics are buffers).
        let parameters = self
            .used
            .iter()
            .filter(|k| k.ends_with(".weight") || k.ends_with(".bias"))
            .filter_map(|k| self.sd.get(k))
            .map(|p| p.numel())
            .sum();
        let mut unused: Vec<String> = self
            .sd
            .keys()
            .filter(|k| !self.used.contains(*k))
            .map(|k| format!("{}{k}", keys.prefix))
            .collect();
        unused.extend(keys.outside);
        Ok(LoadReport {
            unused,
            prefix: keys.prefix,
            from_timm: false,
            parameters,
            layout: keys.layout.map(String::from),
            dropped: keys.dropped,
        })
    }
}

/// Where a CNN state dict came from, for the load report.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    /// The layout recognised (none for a state dict of our own).
    pub layout: Option<&'static str>,
    /// The prefix stripped.
    pub prefix: String,
    /// Keys outside the backbone.
    pub outside: Vec<String>,
    /// Backbone keys dropped as the original drops them.
    pub dropped: Vec<String>,
}

impl Origin {
    /// The origin of keys rewritten by [`super::layouts::cnn_keys`].
    pub(crate) fn of(keys: &super::layouts::CnnKeys) -> Self {
        Origin {
            layout: Some(keys.layout),
            prefix: keys.prefix.clone(),
            outside: keys.outside.clone(),
            dropped: keys.dropped.clone(),
        }
    }
}

/// Output channels of a convolution weight (0 when it is missing).
pub(crate) fn out_channels(sd: &BTreeMap<String, Param>, key: &str) -> usize {
    sd.get(&format!("{key}.weight"))
        .and_then(|p| p.shape.first().copied())
        .unwrap_or(0)
}

/// The largest `N` + 1 over keys `{prefix}{N}.…` (0 when there are none).
pub(crate) fn count_indexed(sd: &BTreeMap<String, Param>, prefix: &str) -> usize {
    sd.keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// An error unless `x` is `[B, 3, H, W]` with H and W multiples of 32 (a CNN's total stride).
pub(crate) fn check_input(x: &Tensor) -> Result<()> {
    match x.dims() {
        [_, 3, h, w] if *h >= 32 && *w >= 32 && h % 32 == 0 && w % 32 == 0 => Ok(()),
        dims => Err(ModelError::Input(format!(
            "input has shape {dims:?}; expected [B, 3, H, W] with H and W multiples of 32"
        ))),
    }
}

/// `x W^T + b` for pooled features `[B, C]`.
pub(crate) fn linear(x: &Tensor, (w, b): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// Training: parameters as variables, BatchNorm on the batch's statistics, the running
/// statistics updated as PyTorch does (momentum 0.1, unbiased variance); or, with `training`
/// off (PyTorch's `model.eval()`), BatchNorm on the running statistics, which stay as they
/// are, gradients still reaching every parameter.
pub(crate) struct BatchStats {
    vars: BTreeMap<String, Var>,
    running: BTreeMap<String, Var>,
    kernels: Kernels,
    training: bool,
    /// Gradients of the parts trained as single ops (DenseNet's dense blocks).
    grad_sink: candle_ops::NamedGradSink,
}

impl BatchStats {
    /// Variables for the convolutions (with a bare convolution's bias when `sd` has one) and
    /// BatchNorms of `units`, the running statistics as buffers; training mode.
    pub(crate) fn new(
        sd: &BTreeMap<String, Param>,
        units: &[Unit],
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let mut ops = BatchStats {
            vars: BTreeMap::new(),
            running: BTreeMap::new(),
            kernels,
            training: true,
            grad_sink: Default::default(),
        };
        for u in units {
            match u {
                Unit::ConvBn { conv, bn } => {
                    ops.add_var(sd, &format!("{conv}.weight"), device)?;
                    ops.add_bn(sd, bn, device)?;
                }
                Unit::Conv(conv) => {
                    ops.add_var(sd, &format!("{conv}.weight"), device)?;
                    let bias = format!("{conv}.bias");
                    if sd.contains_key(&bias) {
                        ops.add_var(sd, &bias, device)?;
                    }
                }
                Unit::Bn { bn, .. } => ops.add_bn(sd, bn, device)?,
            }
        }
        Ok(ops)
    }

    /// `sd[key]` as a variable.
    pub(crate) fn add_var(
        &mut self,
        sd: &BTreeMap<String, Param>,
        key: &str,
        device: &Device,
    ) -> Result<()> {
        let p = sd
            .get(key)
            .ok_or_else(|| ModelError::Weights(format!("missing {key}")))?;
        self.vars
            .insert(key.to_string(), Var::from_tensor(&p.to_tensor(device)?)?);
        Ok(())
    }

    fn add_bn(&mut self, sd: &BTreeMap<String, Param>, bn: &str, device: &Device) -> Result<()> {
        self.add_var(sd, &format!("{bn}.weight"), device)?;
        self.add_var(sd, &format!("{bn}.bias"), device)?;
        for stat in ["running_mean", "running_var"] {
            let key = format!("{bn}.{stat}");
            let p = sd
                .get(&key)
                .ok_or_else(|| ModelError::Weights(format!("missing {key}")))?;
            self.running
                .insert(key, Var::from_tensor(&p.to_tensor(device)?)?);
        }
        Ok(())
    }

    /// The parameters by name.
    pub(crate) fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The running statistics by name.
    pub(crate) fn running_stats(&self) -> &BTreeMap<String, Var> {
        &self.running
    }

    /// PyTorch's `train()` / `eval()` for the BatchNorms.
    pub(crate) fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn var(&self, key: &str) -> candle_core::Result<&Tensor> {
        self.vars
            .get(key)
            .map(|v| v.as_tensor())
            .ok_or_else(|| missing("parameter", key))
    }
}

impl Ops for BatchStats {
    fn conv_bn(
        &self,
        x: &Tensor,
        conv: &str,
        bn: &str,
        stride: usize,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        self.norm(&self.conv(x, conv, stride)?, bn, relu)
    }

    fn conv(&self, x: &Tensor, conv: &str, stride: usize) -> candle_core::Result<Tensor> {
        let w = self.var(&format!("{conv}.weight"))?;
        let bias = self
            .vars
            .get(&format!("{conv}.bias"))
            .map(|v| v.as_tensor());
        let pad = w.dim(2)? / 2;
        kernels::conv2d(self.kernels, x, w, bias, stride, pad, false)
    }

    fn bn(&self, x: &Tensor, bn: &str) -> candle_core::Result<Tensor> {
        self.norm(x, bn, false)
    }

    fn bn_relu(&self, x: &Tensor, bn: &str) -> candle_core::Result<Tensor> {
        self.norm(x, bn, true)
    }

    fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// In training mode on the fused kernels, the whole block as one op (its parameter
    /// gradients come back through [`BatchStats::block_grads`]).
    fn bottleneck(
        &self,
        x: &Tensor,
        prefix: &str,
        stride: usize,
        down: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut units: Vec<(String, String)> = (1..=3)
            .map(|j| (format!("{prefix}.conv{j}"), format!("{prefix}.bn{j}")))
            .collect();
        if down {
            units.push((
                format!("{prefix}.downsample.0"),
                format!("{prefix}.downsample.1"),
            ));
        }
        let biased = units
            .iter()
            .any(|(c, _)| self.vars.contains_key(&format!("{c}.bias")));
        if !self.training || biased || !self.kernels.fused_for(x) {
            return Ok(None);
        }
        let unit = |(conv, bn): &(String, String)| -> candle_core::Result<_> {
            let names = ConvBn {
                conv: format!("{conv}.weight"),
                bn: (format!("{bn}.weight"), format!("{bn}.bias")),
                size: 0,
            };
            let w = self.var(&names.conv)?.clone();
            let parts = ConvBn {
                size: w.dim(3)?,
                conv: w,
                bn: (
                    self.var(&names.bn.0)?.clone(),
                    self.var(&names.bn.1)?.clone(),
                ),
            };
            Ok((parts, names))
        };
        let [u1, u2, u3] = [unit(&units[0])?, unit(&units[1])?, unit(&units[2])?];
        let d = units.get(3).map(unit).transpose()?;
        let (dp, dn) = match d {
            Some((p, n)) => (Some(p), Some(n)),
            None => (None, None),
        };
        let block = candle_ops::TrainingBottleneck {
            parts: Bottleneck {
                main: [u1.0, u2.0, u3.0],
                down: dp,
                stride,
            },
            names: Bottleneck {
                main: [u1.1, u2.1, u3.1],
                down: dn,
                stride,
            },
            eps: BN_EPS as f32,
        };
        let (y, stats) = candle_ops::bottleneck_train(x, block, &self.grad_sink)?;
        let ((b, _, h, w), (_, _, ho, wo)) = (x.dims4()?, y.dims4()?);
        let dev = x.device();
        for (i, ((_, bn), (mean, var))) in units.iter().zip(stats).enumerate() {
            let n = if i == 0 { b * h * w } else { b * ho * wo };
            let (mean, var) = (Tensor::new(mean, dev)?, Tensor::new(var, dev)?);
            self.update_running(bn, &mean, &var, n)?;
        }
        Ok(Some(y))
    }

    /// In training mode on the fused kernels, the whole block as one op (its parameter
    /// gradients come back through [`BatchStats::block_grads`]); else layer by layer.
    fn dense_layers(&self, x: &Tensor, prefixes: &[String]) -> candle_core::Result<Tensor> {
        let biased = prefixes.iter().any(|p| {
            self.vars.contains_key(&format!("{p}.conv1.bias"))
                || self.vars.contains_key(&format!("{p}.conv2.bias"))
        });
        if !self.training || biased || !self.kernels.fused_for(x) {
            return super::densenet::layers_stepwise(self, x, prefixes);
        }
        let names: Vec<DenseLayerParts<String>> = prefixes
            .iter()
            .map(|p| DenseLayerParts {
                norm1: (format!("{p}.norm1.weight"), format!("{p}.norm1.bias")),
                conv1: format!("{p}.conv1.weight"),
                norm2: (format!("{p}.norm2.weight"), format!("{p}.norm2.bias")),
                conv2: format!("{p}.conv2.weight"),
                conv2_size: 0,
            })
            .collect();
        let layers = names
            .iter()
            .map(|n| -> candle_core::Result<_> {
                let v = |k: &String| self.var(k).cloned();
                let conv2 = v(&n.conv2)?;
                Ok(DenseLayerParts {
                    norm1: (v(&n.norm1.0)?, v(&n.norm1.1)?),
                    conv1: v(&n.conv1)?,
                    norm2: (v(&n.norm2.0)?, v(&n.norm2.1)?),
                    conv2_size: conv2.dim(3)?,
                    conv2,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let block = candle_ops::TrainingDenseBlock {
            layers,
            names,
            eps: BN_EPS as f32,
        };
        let (y, stats) = candle_ops::dense_block_train(x, block, &self.grad_sink)?;
        let (b, _, h, w) = x.dims4()?;
        let dev = x.device();
        for (p, st) in prefixes.iter().zip(stats) {
            for (bn, (mean, var)) in [("norm1", st.norm1), ("norm2", st.norm2)] {
                let (mean, var) = (Tensor::new(mean, dev)?, Tensor::new(var, dev)?);
                self.update_running(&format!("{p}.{bn}"), &mean, &var, b * h * w)?;
            }
        }
        Ok(y)
    }
}

impl BatchStats {
    /// The running statistic `bn.name`.
    fn running(&self, bn: &str, name: &str) -> candle_core::Result<&Var> {
        let key = format!("{bn}.{name}");
        self.running
            .get(&key)
            .ok_or_else(|| missing("buffer", &key))
    }

    /// BatchNorm `bn` (then ReLU): on the batch's statistics, moving the running statistics,
    /// when training; on the running statistics otherwise.
    fn norm(&self, x: &Tensor, bn: &str, relu: bool) -> candle_core::Result<Tensor> {
        let gamma = self.var(&format!("{bn}.weight"))?;
        let beta = self.var(&format!("{bn}.bias"))?;
        if !self.training {
            let mean = self.running(bn, "running_mean")?.as_tensor().detach();
            let var = self.running(bn, "running_var")?.as_tensor().detach();
            let scale = gamma.mul(&(var + BN_EPS)?.sqrt()?.recip()?)?;
            let shift = (beta - mean.mul(&scale)?)?;
            return kernels::channel_affine(self.kernels, x, &scale, &shift, relu);
        }
        let (y, mean, var) =
            kernels::batch_norm_train(self.kernels, x, gamma, beta, BN_EPS as f32, relu)?;
        let (b, _, h, w) = x.dims4()?;
        self.update_running(bn, &mean, &var, b * h * w)?;
        Ok(y)
    }

    /// Moves `bn`'s running statistics towards a batch's mean and biased variance over `n`
    /// values per channel, as PyTorch does (the variance made unbiased).
    fn update_running(
        &self,
        bn: &str,
        mean: &Tensor,
        var: &Tensor,
        n: usize,
    ) -> candle_core::Result<()> {
        let n = n as f64;
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        for (name, batch, factor) in [("running_mean", mean, 1.0), ("running_var", var, unbiased)] {
            let run = self.running(bn, name)?;
            // On the device, detached: (1 - momentum) * running + momentum * factor * batch.
            let new = ((run.as_tensor() * (1.0 - BN_MOMENTUM))?
                + (batch.detach() * (BN_MOMENTUM * factor))?)?;
            run.set(&new)?;
        }
        Ok(())
    }

    /// Adds to `grads` the parameter gradients that the parts trained as single ops left
    /// since the last call.
    pub(crate) fn block_grads(
        &self,
        grads: &mut crate::train::optim::Grads,
    ) -> candle_core::Result<()> {
        for (name, g) in self.grad_sink.take() {
            let var = self
                .vars
                .get(&name)
                .ok_or_else(|| missing("parameter", &name))?;
            grads.insert(name, Tensor::from_vec(g, var.shape(), var.device())?);
        }
        Ok(())
    }
}

/// A CNN being fine-tuned: any family with a [`CnnLayout`], its head kept when it has the
/// classes asked for, otherwise re-initialised as `torch.nn.Linear` does.
pub struct CnnTrainable {
    layout: Box<dyn CnnLayout>,
    ops: BatchStats,
    device: Device,
    /// What was dropped or initialised fresh when adapting the weights.
    pub notes: Vec<String>,
}

impl CnnTrainable {
    /// The layout's weights from `sd` (prefix already stripped) ready to train for `classes`.
    pub(crate) fn new(
        layout: Box<dyn CnnLayout>,
        sd: &BTreeMap<String, Param>,
        classes: usize,
        seed: u64,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        if classes == 0 {
            return Err(ModelError::Input("zero classes to train".into()));
        }
        let mut sd = sd.clone();
        let head = layout.head_key();
        let (wk, bk) = (format!("{head}.weight"), format!("{head}.bias"));
        let features = layout.features();
        let mut notes = Vec::new();
        if sd.get(&wk).map(|p| p.shape.clone()) != Some(vec![classes, features]) {
            let had = sd.get(&wk).and_then(|p| p.shape.first().copied());
            notes.push(match had {
                Some(k) => {
                    format!("head {head} has {k} classes: dropped, {classes} initialised fresh")
                }
                None => format!("no head {head}: {classes} classes initialised fresh"),
            });
            // torch.nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
            let bound = 1.0 / (features as f64).sqrt();
            let mut rng = crate::rng::Rng::new(seed ^ 0x6865_6164);
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            };
            sd.insert(
                wk.clone(),
                f32_param(vec![classes, features], draw(classes * features)),
            );
            sd.insert(bk.clone(), f32_param(vec![classes], draw(classes)));
        }
        // Every tensor the model reads must be there with its shape: load it once to check.
        layout.classifier(&sd, device, kernels)?;
        let mut ops = BatchStats::new(&sd, &layout.units(), device, kernels)?;
        ops.add_var(&sd, &wk, device)?;
        ops.add_var(&sd, &bk, device)?;
        Ok(CnnTrainable {
            layout,
            ops,
            device: device.clone(),
            notes,
        })
    }
}

fn f32_param(shape: Vec<usize>, data: Vec<f32>) -> Param {
    Param {
        dtype: StorageDtype::F32,
        shape,
        data,
    }
}

impl Trainable for CnnTrainable {
    fn name(&self) -> String {
        self.layout.name()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn normalization(&self) -> Normalization {
        Normalization::OTHERS
    }

    fn input_multiple(&self) -> usize {
        32
    }

    fn vars(&self) -> &BTreeMap<String, Var> {
        &self.ops.vars
    }

    fn buffers(&self) -> BTreeMap<String, Var> {
        self.ops.running.clone()
    }

    fn set_training(&mut self, training: bool) {
        self.ops.training = training;
    }

    /// BatchNorm as [`Trainable::set_training`] left it; no stochastic depth.
    fn forward_train(
        &self,
        x: &Tensor,
        _drop_path: f64,
        _rng: Option<&mut crate::rng::Rng>,
    ) -> candle_core::Result<Tensor> {
        let x = x.to_device(&self.device)?;
        self.ops.grad_sink.take();
        let pooled = self.layout.pooled(&self.ops, &x)?;
        let head = self.layout.head_key();
        kernels::linear_train(
            self.ops.kernels,
            &pooled,
            self.ops.var(&format!("{head}.weight"))?,
            self.ops.var(&format!("{head}.bias"))?,
        )
    }

    fn grads(
        &self,
        store: &candle_core::backprop::GradStore,
    ) -> candle_core::Result<crate::train::optim::Grads> {
        let mut grads = crate::train::optim::grads_by_name(&self.ops.vars, store);
        self.ops.block_grads(&mut grads)?;
        Ok(grads)
    }

    /// No layer decay (as the original trains CNNs); no weight decay on 1-D parameters.
    fn param_group(&self, name: &str, _layer_decay: f64, weight_decay: f64) -> (f64, f64) {
        let ndim = self.ops.vars.get(name).map_or(1, |v| v.dims().len());
        if ndim <= 1 || name.ends_with(".bias") {
            (1.0, 0.0)
        } else {
            (1.0, weight_decay)
        }
    }

    fn to_inference(&self) -> Result<Box<dyn Classifier>> {
        let mut sd = super::training::state_dict(&self.ops.vars)?;
        sd.extend(super::training::state_dict(&self.ops.running)?);
        self.layout.classifier(&sd, &self.device, self.ops.kernels)
    }

    fn checkpoint_metadata(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn init_notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}
