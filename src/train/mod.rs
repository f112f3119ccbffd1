//! Fine-tuning (REFERENCE.md 5): the engine (resumable runs, evaluation, checkpoints), its
//! settings and presets, setup from a checkpoint, AdamW and the schedule, augmentation, and the
//! losses. Models take part through [`crate::model::Trainable`].

pub mod augment;
pub mod config;
pub mod engine;
pub mod optim;
pub mod parallel;
pub mod randaugment;
pub mod setup;

use candle_core::{D, Result, Tensor};

/// Mean binary cross-entropy with logits (multi-label).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let t = (logits.relu()? - (logits * targets)?)?;
    let soft = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (t + soft)?.mean_all()
}

/// Mean cross-entropy of one-hot (or soft) targets, with label smoothing `eps`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let k = logits.dim(D::Minus1)? as f64;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let smooth = ((targets * (1.0 - eps))? + eps / k)?;
    (smooth * logp)?.sum(D::Minus1)?.neg()?.mean_all()
}
