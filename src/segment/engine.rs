//! `evax seg train`: the original's segmentation recipe (its `schedule_*ep_adamw.py` and dataset
//! configs): AdamW at 6e-5, weight decay 0.05, layer decay 0.85, poly decay (power 1) by epoch
//! after a linear warm-up of 10 iterations from 1e-6 of the rate, batch 4, drop path 0.15; each
//! image resized to 512 x 512 (OpenCV bilinear; masks nearest), flipped left-right with
//! probability 0.5, and put through mmseg's photometric distortion; BCE on the logits at the
//! input size. Checkpoints every epoch (resumable bit for bit), an evaluation on the test list
//! every `eval_every` epochs (foreground Dice chooses `checkpoint-best.safetensors`, which `seg
//! predict` and `seg eval` load), `train_log.jsonl` and `curves.svg`.

use std::io::Write;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::SegTrainable;
use super::eval::{SegEvalJob, SegSample};
use crate::error::{Error, Result};
use crate::model::Trainable;
use crate::preprocess::{Image, opencv};
use crate::rng::Rng;
use crate::train::engine::{curves, load_checkpoint, mix, save_checkpoint};
use crate::train::optim::{AdamW, Groups};

/// The recipe's settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegTrainConfig {
    /// siim, rsna, lung or shenzhen.
    pub dataset: String,
    /// Model input side.
    pub input_size: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Epochs.
    pub epochs: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Floor of the poly decay.
    pub min_lr: f64,
    /// Power of the poly decay.
    pub power: f64,
    /// Linear warm-up, in iterations.
    pub warmup_iters: usize,
    /// The warm-up's starting fraction of the rate.
    pub warmup_ratio: f64,
    /// Layer-wise rate decay.
    pub layer_decay: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Stochastic depth of the last block.
    pub drop_path: f64,
    /// Evaluate every N epochs (and after the last).
    pub eval_every: usize,
    /// Foreground threshold of the evaluation.
    pub threshold: f32,
    /// Seed of the order and the augmentation.
    pub seed: u64,
}

impl SegTrainConfig {
    /// The original's recipe for `dataset`: 10 epochs for lung and RSNA, 50 for SIIM and
    /// Shenzhen.
    pub fn preset(dataset: &str) -> Option<Self> {
        let epochs = match dataset {
            "lung" | "rsna" => 10,
            "siim" | "shenzhen" => 50,
            _ => return None,
        };
        Some(SegTrainConfig {
            dataset: dataset.into(),
            input_size: 512,
            batch_size: 4,
            epochs,
            lr: 6e-5,
            min_lr: 0.0,
            power: 1.0,
            warmup_iters: 10,
            warmup_ratio: 1e-6,
            layer_decay: 0.85,
            weight_decay: 0.05,
            drop_path: 0.15,
            eval_every: if epochs == 10 { 2 } else { 5 },
            threshold: 0.3,
            seed: 0,
        })
    }

    /// Set one field from `key=value` text.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = || Error::Invalid(format!("--set {key}={value}: not a valid value"));
        let int = || value.parse::<usize>().map_err(|_| bad());
        let float = || value.parse::<f64>().map_err(|_| bad());
        match key {
            "input_size" => self.input_size = int()?,
            "batch_size" => self.batch_size = int()?,
            "epochs" => self.epochs = int()?,
            "lr" => self.lr = float()?,
            "min_lr" => self.min_lr = float()?,
            "power" => self.power = float()?,
            "warmup_iters" => self.warmup_iters = int()?,
            "warmup_ratio" => self.warmup_ratio = float()?,
            "layer_decay" => self.layer_decay = float()?,
            "weight_decay" => self.weight_decay = float()?,
            "drop_path" => self.drop_path = float()?,
            "eval_every" => self.eval_every = int()?,
            "threshold" => self.threshold = value.parse().map_err(|_| bad())?,
            "seed" => self.seed = value.parse().map_err(|_| bad())?,
            _ => return Err(Error::Invalid(format!("--set {key}: no such setting"))),
        }
        if self.batch_size == 0 || self.epochs == 0 || !self.input_size.is_multiple_of(32) {
            return Err(Error::Invalid(
                "batch_size and epochs must be positive, input_size a multiple of 32".into(),
            ));
        }
        Ok(())
    }

    /// The rate at epoch `epoch` (0-based) and global iteration `iter`, before layer decay.
    pub fn lr_at(&self, epoch: usize, iter: u64) -> f64 {
        let progress = epoch as f64 / self.epochs as f64;
        let regular = (self.lr - self.min_lr) * (1.0 - progress).powf(self.power) + self.min_lr;
        if (iter as usize) < self.warmup_iters {
            let k = (1.0 - iter as f64 / self.warmup_iters as f64) * (1.0 - self.warmup_ratio);
            regular * (1.0 - k)
        } else {
            regular
        }
    }
}

/// One evaluation during training.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SegEvalPoint {
    /// Epochs done.
    pub epoch: usize,
    /// Foreground Dice.
    pub fg_dice: f64,
    /// Foreground IoU.
    pub fg_iou: f64,
    /// Mean Dice over background and foreground.
    pub mdice: f64,
}

/// Where a run is, as saved in its checkpoints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SegProgress {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Next batch within it.
    pub batch: usize,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Loss of every step.
    pub losses: Vec<f32>,
    /// Evaluations so far.
    pub history: Vec<SegEvalPoint>,
    /// Index of the best (by foreground Dice).
    pub best: Option<usize>,
}

/// A segmentation training run in `out_dir`.
pub struct SegRun {
    /// Settings.
    pub cfg: SegTrainConfig,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Training pairs.
    pub train: Vec<SegSample>,
    /// Evaluation pairs.
    pub eval: Vec<SegSample>,
    /// Stop after this many steps in this invocation (a simulated interruption).
    pub max_steps: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
}

const LAST: &str = "checkpoint-last.safetensors";
const BEST: &str = "checkpoint-best.safetensors";

/// mmseg's `convert`: `x * alpha + beta`, clipped to [0, 255], truncated to 8 bits.
fn convert(v: u8, alpha: f32, beta: f32) -> u8 {
    (v as f32 * alpha + beta).clamp(0.0, 255.0) as u8
}

/// mmseg's PhotoMetricDistortion on an 8-bit image: brightness (+-32), contrast (0.5-1.5)
/// before or after saturation (0.5-1.5) and hue (+-18 of 180), each with probability 0.5. On
/// grey images (equal channels) saturation and hue change nothing, as in OpenCV's HSV; on colour
/// images they are applied in floating point.
fn photometric(img: &mut Image, rng: &mut Rng) {
    let coin = |rng: &mut Rng| rng.unit() < 0.5;
    let uniform = |rng: &mut Rng, a: f64, b: f64| (a + (b - a) * rng.unit()) as f32;
    if coin(rng) {
        let beta = uniform(rng, -32.0, 32.0);
        img.data
            .iter_mut()
            .for_each(|v| *v = convert(*v, 1.0, beta));
    }
    let contrast_first = coin(rng);
    let contrast = |img: &mut Image, rng: &mut Rng| {
        if coin(rng) {
            let alpha = uniform(rng, 0.5, 1.5);
            img.data
                .iter_mut()
                .for_each(|v| *v = convert(*v, alpha, 0.0));
        }
    };
    if contrast_first {
        contrast(img, rng);
    }
    let saturation = coin(rng).then(|| uniform(rng, 0.5, 1.5));
    let hue = coin(rng).then(|| (rng.unit() * 37.0).floor() as i32 - 18);
    if img.channels == 3 && (saturation.is_some() || hue.is_some()) {
        for px in img.data.chunks_exact_mut(3) {
            let (r, g, b) = (px[0] as f32, px[1] as f32, px[2] as f32);
            let max = r.max(g).max(b);
            let min = r.min(g).min(b);
            if max == min {
                continue; // grey: no saturation, no hue
            }
            let s = (max - min) / max;
            let mut h = if max == r {
                60.0 * (g - b) / (max - min)
            } else if max == g {
                120.0 + 60.0 * (b - r) / (max - min)
            } else {
                240.0 + 60.0 * (r - g) / (max - min)
            };
            let s = (s * saturation.unwrap_or(1.0)).clamp(0.0, 1.0);
            h = (h + 2.0 * hue.unwrap_or(0) as f32).rem_euclid(360.0);
            let c = max * s;
            let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
            let (r1, g1, b1) = match (h / 60.0) as u32 {
                0 => (c, x, 0.0),
                1 => (x, c, 0.0),
                2 => (0.0, c, x),
                3 => (0.0, x, c),
                4 => (x, 0.0, c),
                _ => (c, 0.0, x),
            };
            let m = max - c;
            for (o, v) in px.iter_mut().zip([r1 + m, g1 + m, b1 + m]) {
                *o = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    if !contrast_first {
        contrast(img, rng);
    }
}

/// OpenCV's `INTER_NEAREST` resize of a label map.
fn resize_nearest(m: &Image, (w, h): (usize, usize)) -> Image {
    let (sx, sy) = (m.width as f64 / w as f64, m.height as f64 / h as f64);
    let mut data = Vec::with_capacity(w * h);
    for y in 0..h {
        let yy = ((y as f64 * sy).floor() as usize).min(m.height - 1);
        for x in 0..w {
            let xx = ((x as f64 * sx).floor() as usize).min(m.width - 1);
            data.push(m.data[(yy * m.width + xx) * m.channels]);
        }
    }
    Image {
        width: w,
        height: h,
        channels: 1,
        data,
    }
}

/// One training pair as the original's train pipeline makes it: `[3, s, s]` input and
/// `[s, s]` 0/1 target.
fn training_pair(s: &SegSample, size: usize, rng: &mut Rng) -> Result<(Vec<f32>, Vec<f32>)> {
    let (img, mask) = s.load()?;
    let mut img = opencv::resize_linear(&img, (size, size));
    let mut mask = resize_nearest(&mask, (size, size));
    if rng.unit() < 0.5 {
        for row in img.data.chunks_exact_mut(size * img.channels) {
            let c = img.channels;
            for x in 0..size / 2 {
                for k in 0..c {
                    row.swap(x * c + k, (size - 1 - x) * c + k);
                }
            }
        }
        mask.data.chunks_exact_mut(size).for_each(|r| r.reverse());
    }
    photometric(&mut img, rng);
    // seg_input's normalisation on an image already at its size (the resize is an identity).
    let x = super::seg_input(&img, (size, size));
    Ok((x, mask.data.iter().map(|&v| v as f32).collect()))
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegRunSummary {
    /// Steps taken in all.
    pub steps: u64,
    /// Epochs done.
    pub epochs: usize,
    /// Stopped by `max_steps` (resumable).
    pub interrupted: bool,
    /// The best evaluation.
    pub best: Option<SegEvalPoint>,
}

impl SegRun {
    /// Train, resuming from `checkpoint-last.safetensors` in the output folder if present.
    pub fn run(&self, model: &mut SegTrainable) -> Result<SegRunSummary> {
        let cfg = &self.cfg;
        if self.train.is_empty() {
            return Err(Error::Invalid("no training pairs".into()));
        }
        std::fs::create_dir_all(&self.out_dir).map_err(|e| Error::io(&self.out_dir, e))?;
        let config = serde_json::to_string_pretty(cfg)?;
        let cfg_path = self.out_dir.join("config.json");
        crate::io::write_atomic(&cfg_path, config.as_bytes())
            .map_err(|e| Error::io(&cfg_path, e))?;
        let last = self.out_dir.join(LAST);
        let mut opt = AdamW::new();
        let mut prog = SegProgress::default();
        if last.is_file() {
            prog = load_checkpoint(&last, model, &mut opt)?;
        }
        let groups: Groups = model
            .vars()
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    model.param_group(k, cfg.layer_decay, cfg.weight_decay),
                )
            })
            .collect();
        let iters = self.train.len().div_ceil(cfg.batch_size);
        let log_path = self.out_dir.join("train_log.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let pb = if self.progress {
            crate::infer::progress(iters * cfg.epochs, "seg train")
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_position((prog.epoch * iters + prog.batch) as u64);
        let s = cfg.input_size;
        let mut this_run = 0u64;
        while prog.epoch < cfg.epochs {
            let epoch = prog.epoch;
            let mut order: Vec<usize> = (0..self.train.len()).collect();
            let mut rng = Rng::new(mix(&[cfg.seed, epoch as u64, 0x5e9]));
            for i in (1..order.len()).rev() {
                let j = ((rng.unit() * (i + 1) as f64) as usize).min(i);
                order.swap(i, j);
            }
            while prog.batch < iters {
                let it = prog.batch;
                let idx = &order[it * cfg.batch_size..((it + 1) * cfg.batch_size).min(order.len())];
                let pairs: Vec<Result<(Vec<f32>, Vec<f32>)>> = idx
                    .par_iter()
                    .enumerate()
                    .map(|(j, &i)| {
                        let mut rng = Rng::new(mix(&[cfg.seed, epoch as u64, it as u64, j as u64]));
                        training_pair(&self.train[i], s, &mut rng).map_err(|e| {
                            Error::Invalid(format!("{}: {e}", self.train[i].image.display()))
                        })
                    })
                    .collect();
                let (mut x, mut y) = (Vec::new(), Vec::new());
                for p in pairs {
                    let (a, b) = p?;
                    x.extend(a);
                    y.extend(b);
                }
                let n = idx.len();
                let xt = Tensor::from_vec(x, (n, 3, s, s), model.device())?;
                let yt = Tensor::from_vec(y, (n, 1, s, s), model.device())?;
                let mut rng = Rng::new(mix(&[cfg.seed, epoch as u64, it as u64, 0xd0]));
                let logits = model.forward_seg(&xt, cfg.drop_path, Some(&mut rng))?;
                let loss = crate::train::bce_with_logits(&logits, &yt)?;
                let lv = loss.to_scalar::<f32>()?;
                if !lv.is_finite() {
                    return Err(Error::Invalid(format!(
                        "loss is {lv} at epoch {epoch}, batch {it}: stopping (the last checkpoint is {})",
                        last.display()
                    )));
                }
                let grads = model.grads(&loss.backward()?)?;
                let lr = cfg.lr_at(epoch, prog.steps);
                opt.update(model.vars(), &grads, lr, &groups, 1.0)?;
                prog.steps += 1;
                prog.batch += 1;
                prog.losses.push(lv);
                this_run += 1;
                pb.inc(1);
                pb.set_message(format!("loss {lv:.4} lr {lr:.2e}"));
                let _ = writeln!(
                    log,
                    "{}",
                    serde_json::json!({"epoch": epoch, "batch": it, "step": prog.steps, "loss": lv, "lr": lr})
                );
                if self.max_steps.is_some_and(|m| this_run >= m) {
                    save_checkpoint(&last, model, &opt, &prog, &config)?;
                    pb.finish_and_clear();
                    return Ok(self.summary(&prog, true));
                }
            }
            prog.epoch += 1;
            prog.batch = 0;
            let done = prog.epoch;
            if !self.eval.is_empty()
                && (done.is_multiple_of(cfg.eval_every.max(1)) || done == cfg.epochs)
            {
                let point = self.evaluate(model, done)?;
                let _ = writeln!(log, "{}", serde_json::json!({ "eval": &point }));
                let better = prog
                    .best
                    .is_none_or(|b| point.fg_dice > prog.history[b].fg_dice);
                prog.history.push(point);
                if better {
                    prog.best = Some(prog.history.len() - 1);
                    let best = self.out_dir.join(BEST);
                    let sd = model.state_dict()?;
                    let t: std::collections::HashMap<String, Tensor> = sd
                        .iter()
                        .map(|(k, p)| Ok((k.clone(), p.to_tensor(&Device::Cpu)?)))
                        .collect::<Result<_>>()?;
                    let meta = std::collections::HashMap::from([(
                        "evax.seg_train_config".to_string(),
                        config.clone(),
                    )]);
                    crate::checkpoint::save_safetensors(
                        &t.into_iter().collect(),
                        Some(meta),
                        &best,
                    )?;
                }
                let evals: Vec<(f64, f64)> = prog
                    .history
                    .iter()
                    .map(|e| (e.epoch as f64, e.fg_dice))
                    .collect();
                let svg = self.out_dir.join("curves.svg");
                crate::io::write_atomic(
                    &svg,
                    curves(&prog.losses, &evals, "foreground Dice").as_bytes(),
                )
                .map_err(|e| Error::io(&svg, e))?;
            }
            save_checkpoint(&last, model, &opt, &prog, &config)?;
        }
        pb.finish_and_clear();
        Ok(self.summary(&prog, false))
    }

    fn summary(&self, prog: &SegProgress, interrupted: bool) -> SegRunSummary {
        SegRunSummary {
            steps: prog.steps,
            epochs: prog.epoch,
            interrupted,
            best: prog.best.map(|b| prog.history[b].clone()),
        }
    }

    /// Score the current weights on the evaluation pairs (into `eval/` of the output folder).
    fn evaluate(&self, model: &SegTrainable, epoch: usize) -> Result<SegEvalPoint> {
        let upernet = model.to_upernet()?;
        let tag = PathBuf::from(format!("{}#epoch{epoch}", self.out_dir.display()));
        let job = SegEvalJob {
            model: &upernet,
            weights: &tag,
            size: (self.cfg.input_size, self.cfg.input_size),
            threshold: self.cfg.threshold,
        };
        let (r, failures) = job.run(&self.eval, &self.out_dir.join("eval"))?;
        if let Some(f) = failures.first() {
            return Err(Error::Invalid(format!(
                "{}: {}",
                f.input.display(),
                f.error
            )));
        }
        Ok(SegEvalPoint {
            epoch,
            fg_dice: r.fg_dice,
            fg_iou: r.fg_iou,
            mdice: r.scores.mdice,
        })
    }
}

/// The starting weights of a run: an mmsegmentation checkpoint as it is, or an EVA-X
/// checkpoint (MIM or fine-tuned) as the backbone, its `pos_embed` resampled to the grid, with
/// the pyramid and a head of `channels` channels initialised at random (seeded).
pub fn initial_state_dict(
    ck: &crate::checkpoint::Checkpoint,
    input_size: usize,
    channels: usize,
    seed: u64,
) -> Result<(
    std::collections::BTreeMap<String, crate::checkpoint::Param>,
    Vec<String>,
)> {
    if ck.tensors.keys().any(|k| k.starts_with("decode_head.")) {
        return Ok((ck.tensors.clone(), Vec::new()));
    }
    let eva = crate::model::adapt::to_eva_layout(&ck.tensors)?;
    let mut cfg = crate::model::eva_x::infer_config(&eva.tensors, &Default::default())?;
    let grid = (input_size / cfg.patch_size, input_size / cfg.patch_size);
    cfg.train_grid = grid;
    let mut sd = super::random_state_dict(&cfg, channels, seed);
    let mut notes = vec![format!(
        "backbone from {} ({}); pyramid and UperNet head ({channels} channels) initialised fresh",
        ck.path.display(),
        cfg.variant()
    )];
    let mut used = 0;
    for (k, p) in &eva.tensors {
        let key = format!("backbone.{k}");
        if k == "pos_embed" {
            sd.insert(key, crate::model::adapt::resample_pos_embed(p, grid)?);
            used += 1;
        } else if let Some(slot) = sd.get_mut(&key) {
            *slot = p.clone();
            used += 1;
        }
    }
    notes.push(format!("{used} backbone tensors loaded"));
    Ok((sd, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_schedule_with_linear_warm_up_as_mmcv() {
        let c = SegTrainConfig::preset("lung").unwrap();
        // Epoch 0, iteration 0: 1e-6 of the rate; iteration 5: half way; after 10: regular.
        assert!((c.lr_at(0, 0) - 6e-5 * 1e-6).abs() < 1e-15);
        let k = 0.5 * (1.0 - 1e-6);
        assert!((c.lr_at(0, 5) - 6e-5 * (1.0 - k)).abs() < 1e-15);
        assert_eq!(c.lr_at(0, 10), 6e-5);
        // Poly by epoch, power 1: epoch 5 of 10 halves it.
        assert!((c.lr_at(5, 1000) - 3e-5).abs() < 1e-15);
        assert_eq!(SegTrainConfig::preset("siim").unwrap().epochs, 50);
        assert!(SegTrainConfig::preset("covid").is_none());
    }

    #[test]
    fn nearest_resize_and_photometric_distortion_keep_grey_grey() {
        let m = Image {
            width: 4,
            height: 2,
            channels: 1,
            data: vec![0, 1, 1, 0, 1, 1, 0, 0],
        };
        // cv2.resize(m, (2, 1), interpolation=INTER_NEAREST) takes source columns 0, 2, row 0.
        assert_eq!(resize_nearest(&m, (2, 1)).data, vec![0, 1]);
        let mut img = Image {
            width: 2,
            height: 1,
            channels: 3,
            data: vec![10, 10, 10, 200, 200, 200],
        };
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            photometric(&mut img, &mut rng);
            for px in img.data.chunks_exact(3) {
                assert!(px[0] == px[1] && px[1] == px[2], "{px:?}");
            }
        }
    }
}
