//! What the CNN families share: BatchNorm in evaluation mode folded to a per-channel scale and
//! shift, convolutions, and a weight collector that records every missing or misshapen key.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};

use super::{LoadReport, ModelError};
use crate::checkpoint::Param;

type Result<T> = std::result::Result<T, ModelError>;

/// BatchNorm epsilon of torchvision's CNNs.
const BN_EPS: f64 = 1e-5;

/// A BatchNorm in evaluation mode, as a per-channel scale and shift.
#[derive(Debug, Clone)]
pub(crate) struct Bn {
    pub(crate) scale: Tensor,
    pub(crate) shift: Tensor,
}

impl Bn {
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Conv {
    pub(crate) weight: Tensor,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Conv {
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }
}

/// Collects weights by key, recording every problem.
pub(crate) struct Weights<'a> {
    pub(crate) sd: &'a BTreeMap<String, Param>,
    pub(crate) device: &'a Device,
    pub(crate) used: BTreeSet<String>,
    pub(crate) problems: Vec<String>,
}

impl Weights<'_> {
    pub(crate) fn get(&mut self, key: &str) -> Option<&Param> {
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

    /// A convolution's weight `[out, in, k, k]` (padding k / 2); a missing or misshapen one is
    /// recorded and replaced, so that every problem is reported at once.
    pub(crate) fn conv(&mut self, key: &str, stride: usize) -> Result<Conv> {
        let placeholder = |device: &Device| -> Result<Conv> {
            Ok(Conv {
                weight: Tensor::zeros((1, 1, 1, 1), candle_core::DType::F32, device)?,
                stride,
                padding: 0,
            })
        };
        let Some(p) = self.get(&format!("{key}.weight")).cloned() else {
            return placeholder(self.device);
        };
        match p.shape[..] {
            [o, i, kh, kw] if kh == kw && o > 0 && i > 0 && kh > 0 => Ok(Conv {
                weight: p.to_tensor(self.device)?,
                stride,
                padding: kh / 2,
            }),
            _ => {
                self.problems.push(format!(
                    "{key}.weight has shape {:?}, expected [out, in, k, k]",
                    p.shape
                ));
                placeholder(self.device)
            }
        }
    }

    pub(crate) fn bn(&mut self, key: &str, channels: usize) -> Result<Bn> {
        let mut part = |name: &str| -> Result<Vec<f32>> {
            match self.get(&format!("{key}.{name}")) {
                Some(p) if p.shape == [channels] => Ok(p.data.clone()),
                Some(p) => {
                    let msg = format!(
                        "{key}.{name} has shape {:?}, expected [{channels}]",
                        p.shape
                    );
                    self.problems.push(msg);
                    Ok(vec![0.0; channels])
                }
                None => Ok(vec![0.0; channels]),
            }
        };
        let (w, b, m, v) = (
            part("weight")?,
            part("bias")?,
            part("running_mean")?,
            part("running_var")?,
        );
        self.used.insert(format!("{key}.num_batches_tracked"));
        let scale: Vec<f32> = w
            .iter()
            .zip(&v)
            .map(|(w, v)| (*w as f64 / (*v as f64 + BN_EPS).sqrt()) as f32)
            .collect();
        let shift: Vec<f32> = b
            .iter()
            .zip(&m)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok(Bn {
            scale: Tensor::from_vec(scale, (1, channels, 1, 1), self.device)?,
            shift: Tensor::from_vec(shift, (1, channels, 1, 1), self.device)?,
        })
    }
}

/// Output channels of a convolution weight (0 when it is missing).
pub(crate) fn out_channels(sd: &BTreeMap<String, Param>, key: &str) -> usize {
    sd.get(&format!("{key}.weight"))
        .and_then(|p| p.shape.first().copied())
        .unwrap_or(0)
}

impl Weights<'_> {
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
    pub(crate) fn finish(
        self,
        family: &str,
        prefix: &str,
        outside: Vec<String>,
    ) -> Result<LoadReport> {
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
            .map(|k| format!("{prefix}{k}"))
            .collect();
        unused.extend(outside);
        Ok(LoadReport {
            unused,
            prefix: prefix.to_string(),
            from_timm: false,
            parameters,
        })
    }
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

/// The torchvision stem: conv, BN, ReLU, 3x3 max pool with stride 2 and padding 1 (zero
/// padding is exact after the ReLU).
pub(crate) fn stem(conv: &Conv, bn: &Bn, x: &Tensor) -> candle_core::Result<Tensor> {
    bn.forward(&conv.forward(x)?)?
        .relu()?
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .max_pool2d_with_stride(3, 2)
}

/// `x W^T + b` for pooled features `[B, C]`.
pub(crate) fn linear(x: &Tensor, (w, b): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}
