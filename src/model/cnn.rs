//! What the CNN families share: BatchNorm in evaluation mode folded to a per-channel scale and
//! shift, convolutions, and a weight collector that records every missing or misshapen key.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};

use super::ModelError;
use crate::checkpoint::Param;

type Result<T> = std::result::Result<T, ModelError>;

/// BatchNorm epsilon of torchvision's CNNs.
const BN_EPS: f64 = 1e-5;

/// The keys under `prefix` with it removed (renamed by `renames`, `(old, new)` substrings),
/// and the keys outside it.
pub(crate) fn strip_prefix(
    tensors: &BTreeMap<String, Param>,
    prefix: &str,
    renames: &[(&str, &str)],
) -> (BTreeMap<String, Param>, Vec<String>) {
    let mut outside = Vec::new();
    let sd = tensors
        .iter()
        .filter_map(|(k, v)| match k.strip_prefix(prefix) {
            Some(rest) => {
                let mut name = rest.to_string();
                for (old, new) in renames {
                    name = name.replace(old, new);
                }
                Some((name, v.clone()))
            }
            None => {
                outside.push(k.clone());
                None
            }
        })
        .collect();
    (sd, outside)
}

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
