//! What every trainable family shares: timm's truncated-normal initialisation, drop-path masks,
//! a differentiable `pos_embed` resampling, the ViT-style layer-wise lr-decay groups, and the
//! variables as a state dict.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor, Var};

use super::interp::bicubic_matrix;
use crate::checkpoint::{Param, StorageDtype};
use crate::rng::Rng;

/// A sample of a truncated normal (at two standard deviations), as timm's `trunc_normal_`.
pub fn trunc_normal(rng: &mut Rng, std: f64) -> f32 {
    loop {
        let (u1, u2) = (rng.unit().max(1e-300), rng.unit());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            return (z * std) as f32;
        }
    }
}

/// Per-image drop-path scale `[B, 1, 1]`: 0 with probability `rate`, else 1 / (1 - rate).
pub fn drop_mask(rng: &mut Rng, b: usize, rate: f64, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(drop_scales(rng, b, rate)?, (b, 1, 1), device)
}

/// `b` per-image scales; a generator for some rows of a larger batch ([`Rng::for_rows`])
/// draws the whole batch's and returns its rows' (an error if they do not fit).
fn drop_scales(rng: &mut Rng, b: usize, rate: f64) -> Result<Vec<f32>> {
    let keep = 1.0 - rate;
    let (start, total) = rng.batch_rows().unwrap_or((0, b));
    if start + b > total {
        candle_core::bail!("rows {start}..{} of a batch of {total}", start + b);
    }
    let all: Vec<f32> = (0..total)
        .map(|_| {
            if rng.unit() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    Ok(all[start..start + b].to_vec())
}

/// Drop-path scales `[B, 1, 1]` (0 or 1 / keep) of every block of a `depth`-block model for
/// its two residual branches: the rate rises linearly from 0 at the first block to
/// `drop_path` at the last; `None` for a block whose rate is 0 and for all without `rng`.
/// Drawn block by block (attention, then MLP), sent to the device in one copy: a copy from
/// host memory waits for the device, so one per block would stall a GPU.
pub fn drop_path_schedule(
    rng: Option<&mut Rng>,
    drop_path: f64,
    depth: usize,
    b: usize,
    device: &Device,
) -> Result<Vec<Option<(Tensor, Tensor)>>> {
    let Some(r) = rng else {
        return Ok(vec![None; depth]);
    };
    let rates: Vec<f64> = (0..depth)
        .map(|i| {
            if depth > 1 {
                drop_path * i as f64 / (depth - 1) as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut all = Vec::new();
    for &rate in rates.iter().filter(|&&r| r > 0.0) {
        all.extend(drop_scales(r, b, rate)?);
        all.extend(drop_scales(r, b, rate)?);
    }
    let n = all.len() / b.max(1);
    let t = Tensor::from_vec(all, (n, b, 1, 1), device)?;
    let mut next = 0;
    rates
        .iter()
        .map(|&rate| {
            if rate > 0.0 {
                let pair = (t.get(next)?, t.get(next + 1)?);
                next += 2;
                Ok(Some(pair))
            } else {
                Ok(None)
            }
        })
        .collect()
}

/// The original's layer id of a parameter: patch embedding, class token and position embedding
/// 0, block i i + 1, everything after the blocks depth + 1.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

/// `(lr_scale, weight_decay)` of a parameter: `layer_decay^(depth + 1 - layer_id)`, and no
/// weight decay on 1-D parameters, `pos_embed` and `cls_token`.
pub fn param_group(
    name: &str,
    ndim: usize,
    depth: usize,
    layer_decay: f64,
    weight_decay: f64,
) -> (f64, f64) {
    let scale = layer_decay.powi((depth + 1 - layer_id(name, depth)) as i32);
    let no_decay = ndim == 1 || name == "pos_embed" || name == "cls_token";
    (scale, if no_decay { 0.0 } else { weight_decay })
}

/// Current values of `vars` as a state dict (f32).
pub fn state_dict(vars: &BTreeMap<String, Var>) -> Result<BTreeMap<String, Param>> {
    vars.iter()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                Param {
                    dtype: StorageDtype::F32,
                    shape: v.dims().to_vec(),
                    data: v.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                },
            ))
        })
        .collect()
}

/// `pos` `[1, 1 + g0 * g1, C]` (class entry first) for a `grid`, resampled bicubically as the
/// original does, by a fixed matrix so that it stays differentiable.
pub fn resample_pos_embed(
    pos: &Tensor,
    (g0, g1): (usize, usize),
    grid: (usize, usize),
) -> Result<Tensor> {
    if grid == (g0, g1) {
        return Ok(pos.clone());
    }
    let c = pos.dim(2)?;
    let my = bicubic_matrix(g0, grid.0);
    let mx = bicubic_matrix(g1, grid.1);
    let mut m = vec![0f32; grid.0 * grid.1 * g0 * g1];
    for oy in 0..grid.0 {
        for ox in 0..grid.1 {
            for y in 0..g0 {
                for x in 0..g1 {
                    m[(oy * grid.1 + ox) * g0 * g1 + y * g1 + x] =
                        (my[oy * g0 + y] * mx[ox * g1 + x]) as f32;
                }
            }
        }
    }
    let m = Tensor::from_vec(m, (grid.0 * grid.1, g0 * g1), pos.device())?;
    let patch = m
        .matmul(&pos.narrow(1, 1, g0 * g1)?.squeeze(0)?)?
        .unsqueeze(0)?;
    Tensor::cat(&[&pos.narrow(1, 0, 1)?, &patch], 1)?.reshape((1, 1 + grid.0 * grid.1, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_draws_what_the_per_block_masks_draw() {
        let dev = Device::Cpu;
        let (mut r1, mut r2) = (Rng::new(7), Rng::new(7));
        let all = drop_path_schedule(Some(&mut r1), 0.3, 5, 6, &dev).unwrap();
        assert_eq!(all.len(), 5);
        for (i, got) in all.iter().enumerate() {
            let rate = 0.3 * i as f64 / 4.0;
            let want = (rate > 0.0).then(|| {
                let a = drop_mask(&mut r2, 6, rate, &dev).unwrap();
                (a, drop_mask(&mut r2, 6, rate, &dev).unwrap())
            });
            match (got, want) {
                (None, None) => assert_eq!(i, 0),
                (Some((a, m)), Some((wa, wm))) => {
                    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(v(a), v(&wa), "block {i} attention");
                    assert_eq!(v(m), v(&wm), "block {i} mlp");
                    assert_eq!(a.dims(), &[6, 1, 1]);
                }
                _ => panic!("block {i}: presence differs"),
            }
        }
        assert_eq!(r1.unit(), r2.unit(), "both used the same draws");
    }
}
