//! 2-D rotary position embedding of EVA-02 / EVA-X ("fast" variant, interleaved pairs).

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

/// Per-head rotary dimension split: 32 angles per axis for head_dim 64.
const THETA: f64 = 10000.0;

/// Cos and sin tables, `[grid_h * grid_w, head_dim]`, row-major over the patch grid.
#[derive(Debug)]
pub struct RopeTables {
    /// Cosines of the angles.
    pub cos: Vec<f32>,
    /// Sines of the angles.
    pub sin: Vec<f32>,
    /// Rotary width (the head dimension).
    pub dim: usize,
    /// Copies on devices other than the CPU, by device, type and layout (a copy from host
    /// memory waits for the device: made once, not at every block).
    on_device: Mutex<Vec<DeviceTables>>,
}

/// One device copy of the tables: device, type, the kernel layout's scale (bits) or none, cos,
/// sin.
type DeviceTables = (Device, DType, Option<u64>, Tensor, Tensor);

impl Clone for RopeTables {
    fn clone(&self) -> Self {
        RopeTables::from_parts(self.cos.clone(), self.sin.clone(), self.dim)
    }
}

/// Angles for one axis of length `n` with reference grid `r`: `[n, half]`, each frequency
/// repeated twice (interleaved), positions `i / n * r`.
fn axis_angles(n: usize, r: f64, half: usize) -> Vec<f64> {
    let nfreq = half / 2;
    let freqs: Vec<f64> = (0..nfreq)
        .map(|j| 1.0 / THETA.powf((2 * j) as f64 / half as f64))
        .collect();
    let mut a = vec![0.0; n * half];
    for i in 0..n {
        let t = i as f64 / n as f64 * r;
        for (j, f) in freqs.iter().enumerate() {
            a[i * half + 2 * j] = t * f;
            a[i * half + 2 * j + 1] = t * f;
        }
    }
    a
}

impl RopeTables {
    /// Tables for a `grid_h x grid_w` patch grid, reference grid `r`, head dimension `head_dim`.
    /// Each token's angles are its row's angles followed by its column's.
    pub fn new((grid_h, grid_w): (usize, usize), r: f64, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let ay = axis_angles(grid_h, r, half);
        let ax = axis_angles(grid_w, r, half);
        let n = grid_h * grid_w;
        let mut cos = Vec::with_capacity(n * head_dim);
        let mut sin = Vec::with_capacity(n * head_dim);
        for y in 0..grid_h {
            for x in 0..grid_w {
                for &a in ay[y * half..(y + 1) * half]
                    .iter()
                    .chain(&ax[x * half..(x + 1) * half])
                {
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        RopeTables::from_parts(cos, sin, head_dim)
    }

    /// Tables given as `[n, dim]` cosines and sines.
    pub fn from_parts(cos: Vec<f32>, sin: Vec<f32>, dim: usize) -> Self {
        RopeTables {
            cos,
            sin,
            dim,
            on_device: Mutex::new(Vec::new()),
        }
    }

    /// The tables as `[n, dim]` tensors of type `dt` on `dev` (cached off the CPU).
    pub fn tensors(&self, dev: &Device, dt: DType) -> Result<(Tensor, Tensor)> {
        self.cached(dev, dt, None, || {
            let n = self.cos.len() / self.dim.max(1);
            let t = |v: &[f32]| Tensor::from_slice(v, (n, self.dim), dev)?.to_dtype(dt);
            Ok((t(&self.cos)?, t(&self.sin)?))
        })
    }

    /// The tables in the layout of candle's interleaved RoPE kernel over all `1 + n` tokens:
    /// `[1 + n, dim / 2]`, one angle per pair, the class token's row the identity, every value
    /// times `scale` (the attention's `1 / sqrt(d)` folded into the query's rotation).
    pub fn kernel_tensors(&self, dev: &Device, dt: DType, scale: f64) -> Result<(Tensor, Tensor)> {
        self.cached(dev, dt, Some(scale.to_bits()), || {
            let half = self.dim / 2;
            let table = |v: &[f32], cls: f32| {
                let mut out = vec![cls; half];
                out.extend(v.iter().step_by(2).map(|&x| (x as f64 * scale) as f32));
                let rows = out.len() / half.max(1);
                Tensor::from_vec(out, (rows, half), dev)?.to_dtype(dt)
            };
            Ok((table(&self.cos, scale as f32)?, table(&self.sin, 0.0)?))
        })
    }

    fn cached(
        &self,
        dev: &Device,
        dt: DType,
        key: Option<u64>,
        make: impl FnOnce() -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        if dev.is_cpu() {
            return make();
        }
        let mut cache = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, _, c, s)) = cache
            .iter()
            .find(|(d, t, k, _, _)| d.same_device(dev) && *t == dt && *k == key)
        {
            return Ok((c.clone(), s.clone()));
        }
        let (c, s) = make()?;
        cache.push((dev.clone(), dt, key, c.clone(), s.clone()));
        Ok((c, s))
    }
}

impl RopeTables {
    /// No rotary embedding (plain ViTs): empty tables, which the attention kernels skip.
    pub fn none(head_dim: usize) -> Self {
        RopeTables::from_parts(Vec::new(), Vec::new(), head_dim)
    }
}

/// Recover the reference grid `r` from stored tables `[n*n, 64]` (cos, sin): the angle of the
/// column-x part of token (0, 1) at frequency 1 is `r / n`. Rounded to an integer when it is
/// within 0.05 of one (stored tables are often fp16).
pub fn infer_reference_grid(
    cos: &[f32],
    sin: &[f32],
    tokens: usize,
    head_dim: usize,
) -> Option<f64> {
    let n = (tokens as f64).sqrt().round() as usize;
    if n * n != tokens || n < 2 || cos.len() != tokens * head_dim || sin.len() != cos.len() {
        return None;
    }
    let col = head_dim / 2; // first column-axis angle, frequency 1
    let angle = (sin[head_dim + col] as f64).atan2(cos[head_dim + col] as f64);
    let r = angle * n as f64;
    if !(r.is_finite() && r > 0.0) {
        return None;
    }
    Some(if (r - r.round()).abs() < 0.05 {
        r.round()
    } else {
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_grid_round_trips() {
        for r in [14.0, 16.0] {
            let t = RopeTables::new((14, 14), r, 64);
            assert_eq!(infer_reference_grid(&t.cos, &t.sin, 196, 64), Some(r));
        }
    }

    #[test]
    fn row_part_comes_first() {
        let t = RopeTables::new((3, 3), 3.0, 64);
        // token (1, 0): row angle 1 at frequency 1 in column 0, column part all zero.
        let row = &t.sin[3 * 64..4 * 64];
        assert!((row[0] - 1f32.sin()).abs() < 1e-7);
        assert_eq!(row[32], 0.0);
    }
}
