//! AdamW as PyTorch computes it (decoupled weight decay, bias corrections), the per-iteration
//! learning-rate schedule, and gradient clipping.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var};
use rayon::prelude::*;

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
    /// Moments of parameters that live on a GPU, kept there (read them with
    /// [`AdamW::moments`]; `m` / `v` seed them after a resume).
    on_device: BTreeMap<String, (Tensor, Tensor)>,
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
            on_device: BTreeMap::new(),
        }
    }

    /// The first and second moments of parameter `name`, wherever they are kept.
    pub fn moments(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if let Some((m, v)) = self.on_device.get(name) {
            let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            return Ok(Some((host(m)?, host(v)?)));
        }
        Ok(match (self.m.get(name), self.v.get(name)) {
            (Some(m), Some(v)) => Some((m.clone(), v.clone())),
            _ => None,
        })
    }

    /// The same update as the host loop, as tensor operations on the parameter's device.
    #[allow(clippy::too_many_arguments)]
    fn update_on_device(
        &mut self,
        name: &str,
        var: &Var,
        g: &Tensor,
        (decay, step_size, gs): (f64, f64, f64),
        (b1, b2, eps, bc2_sqrt): (f64, f64, f64, f64),
    ) -> Result<()> {
        let p = var.as_tensor();
        if !self.on_device.contains_key(name) {
            let seed = |h: Option<&Vec<f32>>| match h {
                Some(h) => Tensor::from_slice(h, p.shape(), p.device()),
                None => p.zeros_like(),
            };
            let state = (seed(self.m.get(name))?, seed(self.v.get(name))?);
            self.on_device.insert(name.to_string(), state);
        }
        let (m, v) = self.on_device.get_mut(name).expect("inserted above");
        let g = g.affine(gs, 0.0)?;
        let p = p.affine(decay, 0.0)?;
        *m = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
        *v = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, eps)?;
        let p = (p - m.div(&denom)?.affine(step_size, 0.0)?)?;
        var.set(&p)
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
            let (scale, wd) = groups.get(name).copied().unwrap_or((1.0, 0.0));
            let lr_i = lr * scale;
            if !var.device().is_cpu() {
                let f = (1.0 - lr_i * wd, lr_i / bc1, grad_scale);
                let consts = (self.beta1, self.beta2, self.eps, bc2.sqrt());
                self.update_on_device(name, var, g, f, consts)?;
                continue;
            }
            let n = var.elem_count();
            let m = self.m.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            let v = self.v.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            let step = HostStep {
                m: RefCell::new(m),
                v: RefCell::new(v),
                decay: (1.0 - lr_i * wd) as f32,
                step_size: (lr_i / bc1) as f32,
                gs: grad_scale as f32,
                b1,
                b2,
                eps,
                bc2_sqrt,
            };
            var.as_tensor()
                .inplace_op2(&g.to_dtype(DType::F32)?.contiguous()?, &step)?;
        }
        Ok(())
    }
}

impl Default for AdamW {
    fn default() -> Self {
        Self::new()
    }
}

/// One AdamW step of a parameter on the host, in place in the variable's own storage: the
/// same arithmetic, in the same order, as PyTorch's single-tensor AdamW, elements split
/// across threads (each element's result does not depend on the split).
struct HostStep<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    decay: f32,
    step_size: f32,
    gs: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc2_sqrt: f32,
}

impl InplaceOp2 for HostStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameter or gradient not contiguous");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "adamw: {} values, gradient {}, moments {}",
                p.len(),
                g.len(),
                m.len()
            );
        }
        let (b1, b2, eps, bc2_sqrt) = (self.b1, self.b2, self.eps, self.bc2_sqrt);
        let (decay, step_size, gs) = (self.decay, self.step_size, self.gs);
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    let gi = g * gs;
                    *p *= decay;
                    *m = b1 * *m + (1.0 - b1) * gi;
                    *v = b2 * *v + (1.0 - b2) * gi * gi;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * *m / denom;
                }
            });
        Ok(())
    }
}

/// Global L2 norm of gradients.
pub fn grad_norm(grads: &Grads) -> Result<f64> {
    if let Some(first) = grads.values().next()
        && !first.device().is_cpu()
    {
        // One read back instead of one per parameter (each waits for the device).
        let sums = grads
            .values()
            .map(|g| g.sqr()?.sum_all())
            .collect::<Result<Vec<_>>>()?;
        let total = Tensor::stack(&sums, 0)?
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?;
        return Ok(total.to_scalar::<f64>()?.sqrt());
    }
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

    #[test]
    fn device_update_matches_the_host_loop() {
        // The GPU path's tensor operations, run on CPU tensors, against the host loop.
        let dev = candle_core::Device::Cpu;
        let p0: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let (host_var, dev_var) = (
            Var::from_slice(&p0, (8, 8), &dev).unwrap(),
            Var::from_slice(&p0, (8, 8), &dev).unwrap(),
        );
        let (mut host, mut on_dev) = (AdamW::new(), AdamW::new());
        let groups = Groups::from([("w".to_string(), (0.5, 0.05))]);
        for step in 1..=3 {
            let g: Vec<f32> = (0..64).map(|i| ((i * step) as f32 * 0.11).cos()).collect();
            let g = Tensor::from_vec(g, (8, 8), &dev).unwrap();
            let vars = BTreeMap::from([("w".to_string(), host_var.clone())]);
            let grads = Grads::from([("w".to_string(), g.clone())]);
            host.update(&vars, &grads, 1e-3, &groups, 0.8).unwrap();
            on_dev.step += 1;
            let t = on_dev.step as i32;
            let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
            let lr_i = 1e-3 * 0.5;
            on_dev
                .update_on_device(
                    "w",
                    &dev_var,
                    &g,
                    (1.0 - lr_i * 0.05, lr_i / bc1, 0.8),
                    (0.9, 0.999, 1e-8, bc2.sqrt()),
                )
                .unwrap();
        }
        let a = host_var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = dev_var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), 64);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-6, "parameters differ by {d}");
        let (m, v) = on_dev.moments("w").unwrap().expect("moments");
        let (hm, hv) = host.moments("w").unwrap().expect("moments");
        assert_eq!((m.len(), v.len()), (64, 64));
        let dm = m
            .iter()
            .zip(&hm)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        let dv = v
            .iter()
            .zip(&hv)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(dm < 1e-7 && dv < 1e-7, "moments differ by {dm} / {dv}");
    }
}
