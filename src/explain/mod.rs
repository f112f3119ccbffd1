//! Grad-CAM for EVA-X, computed as pytorch-grad-cam 1.5 does (REFERENCE.md 7).
//!
//! The model runs its fast inference path up to the target layer; from there on it is rebuilt
//! from differentiable operations with the layer's output as a leaf variable, so one CAM costs a
//! forward pass plus a backward pass through the layers after the target only.
//!
//! The CAM arithmetic works on (activation, gradient) pairs laid out on the patch grid, so a
//! model family only has to provide those through [`CamSource`] (EVA-X's:
//! `model/eva_x/cam.rs`).

pub mod jobs;
pub mod localize;
pub mod overlay;

use candle_core::{Tensor, Var};

use crate::model::ModelError;
use crate::preprocess::bilinear::resize_bilinear;

/// Activations and gradients of one target per image, on the patch grid.
pub struct ActivationGrads {
    /// `[B, N, C]` activations of the patch tokens (N = gh * gw, row-major).
    pub activations: Tensor,
    /// `[B, N, C]` gradients of each image's target logit.
    pub gradients: Tensor,
    /// Patch grid.
    pub grid: (usize, usize),
}

/// The result of one Grad-CAM batch.
pub struct CamBatch {
    /// Logits `[B, K]`.
    pub logits: Vec<Vec<f32>>,
    /// Target classes of each image.
    pub targets: Vec<Vec<usize>>,
    /// One entry per round of targets.
    pub rounds: Vec<ActivationGrads>,
}

/// A model Grad-CAM can explain (each family implements it beside its architecture).
pub trait CamSource {
    /// The layer the original explains (`layer` names as [`CamSource::check_cam_layer`] takes
    /// them).
    fn default_cam_layer(&self) -> String;

    /// An error unless `layer` names a layer this model can explain (the message lists the
    /// accepted forms).
    fn check_cam_layer(&self, layer: &str) -> Result<(), ModelError>;

    /// Logits `[B, K]` of a batch, the target classes `choose(b, logits_b)` picked for each
    /// image, and for each round r the activations and gradients at `layer` of the logit of
    /// each image's r-th target (images with fewer targets get a zero gradient in that round).
    fn activation_grads(
        &self,
        x: &Tensor,
        layer: &str,
        choose: &dyn Fn(usize, &[f32]) -> Vec<usize>,
    ) -> Result<CamBatch, ModelError>;
}

/// The rounds of a Grad-CAM batch from differentiable `logits` and the target layer's output
/// `leaf`: the targets `choose` picks per image from its logits, and for each round r the
/// activations and gradients (of each image's r-th target logit) laid out as `[B, N, C]` on
/// `grid` by `to_grid`. Shared by every family's [`CamSource`].
pub fn gradient_rounds(
    logits: &Tensor,
    leaf: &Var,
    to_grid: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    grid: (usize, usize),
    choose: &dyn Fn(usize, &[f32]) -> Vec<usize>,
) -> Result<CamBatch, ModelError> {
    let (b, k) = logits.dims2()?;
    let logit_rows = logits.to_vec2::<f32>()?;
    let targets: Vec<Vec<usize>> = logit_rows
        .iter()
        .enumerate()
        .map(|(i, l)| choose(i, l))
        .collect();
    let rounds = targets.iter().map(|t| t.len()).max().unwrap_or(0);
    let activations = to_grid(leaf.as_tensor())?;
    let mut out = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let mut mask = vec![0f32; b * k];
        for (i, t) in targets.iter().enumerate() {
            if let Some(&c) = t.get(r) {
                if c >= k {
                    return Err(ModelError::Input(format!(
                        "class {c} out of range (head has {k})"
                    )));
                }
                mask[i * k + c] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (b, k), logits.device())?;
        let loss = (logits * &mask)?.sum_all()?;
        let grads = loss.backward()?;
        let g = grads
            .get(leaf.as_tensor())
            .ok_or_else(|| ModelError::Input("no gradient reached the CAM layer".into()))?;
        out.push(ActivationGrads {
            activations: activations.clone(),
            gradients: to_grid(g)?,
            grid,
        });
    }
    Ok(CamBatch {
        logits: logit_rows,
        targets,
        rounds: out,
    })
}

/// `(x - min) / (max + 1e-7)` after subtracting the min, as pytorch-grad-cam's
/// `scale_cam_image`.
fn scale_unit(v: &mut [f32]) {
    let min = v.iter().cloned().fold(f32::INFINITY, f32::min);
    v.iter_mut().for_each(|x| *x -= min);
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    v.iter_mut().for_each(|x| *x /= 1e-7 + max);
}

/// Grad-CAM maps `[H, W]` in [0, 1] for each image of a round: channel weights are the grid
/// mean of the gradient, the map is the ReLU of the weighted activation sum, scaled to [0, 1],
/// resized bilinearly (OpenCV) to `size`, then ReLU and scaled once more.
pub fn cam_maps(ag: &ActivationGrads, size: (usize, usize)) -> Result<Vec<Vec<f32>>, ModelError> {
    let a = ag.activations.to_vec3::<f32>()?;
    let g = ag.gradients.to_vec3::<f32>()?;
    let mut maps = Vec::with_capacity(a.len());
    for (a, g) in a.iter().zip(&g) {
        let n = a.len();
        let c = a.first().map_or(0, |r| r.len());
        let mut w = vec![0f32; c];
        for row in g {
            w.iter_mut().zip(row).for_each(|(w, v)| *w += v);
        }
        w.iter_mut().for_each(|w| *w /= n as f32);
        let mut cam: Vec<f32> = a
            .iter()
            .map(|row| row.iter().zip(&w).map(|(a, w)| a * w).sum::<f32>().max(0.0))
            .collect();
        scale_unit(&mut cam);
        let mut up = resize_bilinear(&cam, 1, ag.grid, size);
        up.iter_mut().for_each(|v| *v = v.max(0.0));
        scale_unit(&mut up);
        maps.push(up);
    }
    Ok(maps)
}
