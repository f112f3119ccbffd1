//! AdamW as PyTorch computes it (decoupled weight decay, bias corrections), the per-iteration
//! learning-rate schedule, and gradient clipping.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// AdamW state.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// eps.
    pub eps: f64,
    /// Updates taken.
    pub step: u64,
    /// First moments by parameter.
    pub m: BTreeMap<String, Vec<f32>>,
    /// Second moments by parameter.
    pub v: BTreeMap<String, Vec<f32>>,
}

/// Per-parameter learning-rate scale and weight decay.
pub type Groups = BTreeMap<String, (f64, f64)>;

/// Gradients by parameter name.
pub type Grads = BTreeMap<String, Tensor>;

/// The gradients of `vars` from a backward pass, by name.
pub fn grads_by_name(vars: &BTreeMap<String, Var>, store: &GradStore) -> Grads {
    vars.iter()
        .filter_map(|(k, v)| Some((k.clone(), store.get(v.as_tensor())?.clone())))
        .collect()
}

/// Add `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut Grads, more: Grads) -> Result<()> {
    for (k, g) in more {
        let sum = match acc.remove(&k) {
            Some(a) => (a + g)?,
            None => g,
        };
        acc.insert(k, sum);
    }
    Ok(())
}

impl AdamW {
    /// A fresh optimiser (betas 0.9 / 0.999, eps 1e-8 as the original).
    pub fn new() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of every variable with a gradient: `lr * lr_scale` and the group's weight
    /// decay. Gradients are first multiplied by `grad_scale` (clipping, accumulation).
    pub fn update(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &Grads,
        lr: f64,
        groups: &Groups,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let bc2_sqrt = bc2.sqrt() as f32;
        for (name, var) in vars {
            let Some(g) = grads.get(name) else {
                continue;
            };
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            let (scale, wd) = groups.get(name).copied().unwrap_or((1.0, 0.0));
            let lr_i = lr * scale;
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; p.len()]);
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; p.len()]);
            let decay = (1.0 - lr_i * wd) as f32;
            let step_size = (lr_i / bc1) as f32;
            let gs = grad_scale as f32;
            for i in 0..p.len() {
                let gi = g[i] * gs;
                p[i] *= decay;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] -= step_size * m[i] / denom;
            }
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

impl Default for AdamW {
    fn default() -> Self {
        Self::new()
    }
}

/// Global L2 norm of gradients.
pub fn grad_norm(grads: &Grads) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

/// The learning-rate schedule of the original (per iteration, `epoch` fractional): linear warm-up
/// over `warmup` epochs, then constant or a half-cycle cosine from `lr` to `min_lr` at `epochs`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Base learning rate.
    pub lr: f64,
    /// Floor of the cosine.
    pub min_lr: f64,
    /// Warm-up epochs.
    pub warmup: f64,
    /// Total epochs.
    pub epochs: f64,
    /// Constant after warm-up instead of cosine.
    pub fixed: bool,
}

impl Schedule {
    /// The learning rate at fractional epoch `e`.
    pub fn at(&self, e: f64) -> f64 {
        if e < self.warmup {
            self.lr * e / self.warmup
        } else if self.fixed || self.epochs <= self.warmup {
            self.lr
        } else {
            let t = ((e - self.warmup) / (self.epochs - self.warmup)).min(1.0);
            self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            lr: 1e-3,
            min_lr: 1e-6,
            warmup: 5.0,
            epochs: 45.0,
            fixed: false,
        };
        assert_eq!(s.at(0.0), 0.0);
        assert!((s.at(2.5) - 5e-4).abs() < 1e-12);
        assert!((s.at(5.0) - 1e-3).abs() < 1e-12);
        assert!((s.at(45.0) - 1e-6).abs() < 1e-12);
        assert_eq!(Schedule { fixed: true, ..s }.at(30.0), 1e-3);
    }
}
