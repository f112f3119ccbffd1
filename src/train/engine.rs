//! The fine-tuning loop: seeded data order and augmentation, gradient accumulation, the
//! schedule, clipping, evaluation every N epochs, atomic resumable checkpoints, logs and curves.
//!
//! Every random draw is derived from (seed, epoch, batch, image) rather than from one running
//! generator, so a run resumed from any saved step takes exactly the steps an uninterrupted run
//! takes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::augment::Augment;
use super::config::TrainConfig;
use super::optim::{AdamW, Grads, Groups, Schedule, accumulate, grad_norm};
use super::parallel::{DataParallel, HostBatch, batch_grads};
use super::{bce_with_logits, cross_entropy};
use crate::error::ResultExt;
use crate::infer::batches;
use crate::metrics;
use crate::model::Trainable;
use crate::preprocess::{Image, Normalization, Preprocess};
use crate::rng::Rng;

/// Labelled images for training or evaluation.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// (image, label vector).
    pub samples: Vec<(PathBuf, Vec<f32>)>,
    /// Class names.
    pub classes: Vec<String>,
    /// Single-label (cross-entropy, accuracy) rather than multi-label (BCE, AUROC).
    pub single_label: bool,
}

/// One evaluation during training.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalPoint {
    /// Epochs completed.
    pub epoch: usize,
    /// Split evaluated.
    pub split: String,
    /// Mean AUROC.
    pub mauc: f64,
    /// Per-class AUROC.
    pub auc_per_class: Vec<f64>,
    /// Accuracy (single-label data).
    pub accuracy: Option<f64>,
}

impl EvalPoint {
    fn metric(&self, name: &str) -> f64 {
        if name == "accuracy" {
            self.accuracy.unwrap_or(0.0)
        } else {
            self.mauc
        }
    }
}

/// Where a run is, as saved in its checkpoints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Next batch within the epoch.
    pub batch: usize,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Evaluations so far.
    pub history: Vec<EvalPoint>,
    /// Index in `history` of the best evaluation.
    pub best: Option<usize>,
    /// Mean loss of each optimiser step (for the curves).
    pub losses: Vec<f32>,
    /// The f16 loss scale and the finite steps taken at it (dynamic loss scaling as PyTorch's
    /// GradScaler: start 2^16, halve and skip the step on an overflow, double after 2000).
    #[serde(default)]
    pub loss_scale: Option<(f64, u64)>,
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Optimiser steps taken in all.
    pub steps: u64,
    /// Epochs completed.
    pub epochs: usize,
    /// Stopped by `max_steps` before the end (resumable).
    pub interrupted: bool,
    /// The best evaluation (on `eval_split`, by `select_metric`).
    pub best: Option<EvalPoint>,
    /// The last evaluation.
    pub last: Option<EvalPoint>,
    /// Split used to choose `best`.
    pub selected_on: String,
    /// Steps reused from a checkpoint.
    pub resumed_at_step: u64,
}

/// A fine-tuning run in `out_dir`.
pub struct Run {
    /// Settings.
    pub cfg: TrainConfig,
    /// Output folder (checkpoints, logs, curves).
    pub out_dir: PathBuf,
    /// Training data.
    pub train: TrainData,
    /// Evaluation data.
    pub eval: TrainData,
    /// Stop after this many optimiser steps in this invocation (a simulated interruption).
    pub max_steps: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
}

/// SplitMix64 of several values: an independent seed per (seed, epoch, batch, image).
pub(crate) fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = Rng::new(h).next_u64();
    }
    h
}

const LAST: &str = "checkpoint-last.safetensors";
const BEST: &str = "checkpoint-best.safetensors";

impl Run {
    fn augment(&self, norm: Normalization) -> crate::Result<Augment> {
        let s = self.cfg.input_size;
        Ok(if self.cfg.augment == "timm" {
            let fill = (255.0 * norm.mean).round() as u8;
            let rand_augment = match self.cfg.rand_augment.as_str() {
                "" | "none" => None,
                p => Some(super::randaugment::RandAugment::parse(p, fill)?),
            };
            Augment::Timm {
                size: s,
                norm,
                rand_augment,
            }
        } else {
            Augment::Plain(Preprocess::eval((s, s), norm))
        })
    }

    /// The images of one epoch, in order (data_pct subset, repeated, or a fake epoch's draw;
    /// shuffled by epoch).
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let n = self.train.samples.len();
        let div = self.cfg.fake_epoch_div.max(1);
        let mut order: Vec<usize> = if div > 1 {
            let seg = (n / div).max(1);
            let drawn = match self.cfg.fake_epoch_segments {
                0 => div,
                k => k.min(div),
            };
            (0..seg)
                .map(|i| {
                    let r =
                        Rng::new(mix(&[self.cfg.seed, epoch as u64, i as u64, 0xfa])).below(drawn);
                    (r * seg + i).min(n - 1)
                })
                .collect()
        } else {
            crate::data::data_pct_indices(n, self.cfg.data_pct, self.cfg.seed)
        };
        Rng::new(mix(&[self.cfg.seed, epoch as u64, 0x5348])).shuffle(&mut order);
        order
    }

    fn groups(&self, model: &dyn Trainable) -> Groups {
        model
            .vars()
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    model.param_group(k, self.cfg.layer_decay, self.cfg.weight_decay),
                )
            })
            .collect()
    }

    /// Train (resuming from `checkpoint-last.safetensors` in the output folder if present).
    pub fn run(&self, model: &mut dyn Trainable) -> crate::Result<RunSummary> {
        self.run_with(model, None)
    }

    /// [`Run::run`] with each batch split between `model` and the replicas of `parallel`
    /// (data-parallel training: the same steps as one device given the whole batch).
    pub fn run_data_parallel(
        &self,
        model: &mut dyn Trainable,
        parallel: &mut DataParallel,
    ) -> crate::Result<RunSummary> {
        self.run_with(model, Some(parallel))
    }

    fn run_with(
        &self,
        model: &mut dyn Trainable,
        mut parallel: Option<&mut DataParallel>,
    ) -> crate::Result<RunSummary> {
        let cfg = &self.cfg;
        std::fs::create_dir_all(&self.out_dir).map_err(|e| crate::Error::io(&self.out_dir, e))?;
        let config = self.out_dir.join("config.toml");
        crate::io::write_atomic(&config, cfg.to_toml().as_bytes())
            .map_err(|e| crate::Error::io(&config, e))?;
        let mut opt = AdamW::new();
        let mut prog = Progress::default();
        let last = self.out_dir.join(LAST);
        if last.is_file() {
            prog = load_checkpoint(&last, model, &mut opt)?;
        }
        if let Some(dp) = parallel.as_deref_mut() {
            dp.sync(model)?;
        }
        let resumed_at_step = prog.steps;
        if model.precision() == crate::compute::Precision::F16 && prog.loss_scale.is_none() {
            prog.loss_scale = Some((65536.0, 0));
        }
        let groups = self.groups(model);
        let schedule = Schedule {
            lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: cfg.warmup_epochs,
            epochs: cfg.epochs as f64,
            fixed: cfg.fixed_lr,
        };
        let augment = self.augment(model.normalization())?;
        let n_epoch = self.epoch_order(0).len();
        let iters = n_epoch.div_ceil(cfg.batch_size);
        let k = self.train.classes.len();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.out_dir.join("train_log.jsonl"))
            .map_err(|e| crate::Error::io(self.out_dir.join("train_log.jsonl"), e))?;
        let pb = if self.progress {
            crate::infer::progress(iters * cfg.epochs, "train")
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_position((prog.epoch * iters + prog.batch) as u64);
        let mut acc: Grads = BTreeMap::new();
        let mut acc_loss = 0f32;
        let mut acc_n = 0;
        let mut this_run = 0u64;
        let mut t_step = Instant::now();
        let mut images_since = 0usize;
        let paths: Arc<Vec<PathBuf>> =
            Arc::new(self.train.samples.iter().map(|(p, _)| p.clone()).collect());
        while prog.epoch < cfg.epochs {
            let epoch = prog.epoch;
            let order = Arc::new(self.epoch_order(epoch));
            // The epoch's batches decoded and augmented ahead on a background thread (two in
            // flight), so that the device does not wait for the CPU between steps; each image's
            // randomness comes from (seed, epoch, batch, position), so prefetching changes
            // nothing. Leaving the loop early drops the receiver, which stops the thread.
            let batches = prefetch_batches(
                paths.clone(),
                order.clone(),
                augment,
                (cfg.seed, epoch, cfg.batch_size),
                prog.batch..iters,
            );
            while prog.batch < iters {
                let it = prog.batch;
                let idx = &order[it * cfg.batch_size..((it + 1) * cfg.batch_size).min(order.len())];
                let (got, x) = batches.recv().map_err(|_| {
                    crate::Error::Invalid("the batch loader stopped unexpectedly".into())
                })?;
                debug_assert_eq!(got, it);
                let x = x?;
                let mut y = Vec::with_capacity(idx.len() * k);
                for &i in idx {
                    y.extend_from_slice(&self.train.samples[i].1);
                }
                let n = idx.len();
                let batch = HostBatch {
                    x: &x,
                    y: &y,
                    n,
                    side: cfg.input_size,
                    classes: k,
                };
                let (single, smoothing) = (self.train.single_label, cfg.smoothing);
                let loss_fn = move |l: &Tensor, t: &Tensor| {
                    if single {
                        cross_entropy(l, t, smoothing)
                    } else {
                        bce_with_logits(l, t)
                    }
                };
                let loss_scale = prog.loss_scale.map_or(1.0, |(s, _)| s);
                let (lv, grads) = batch_grads(
                    &*model,
                    parallel.as_deref_mut(),
                    &batch,
                    &loss_fn,
                    cfg.drop_path,
                    mix(&[cfg.seed, epoch as u64, it as u64, 0xd0]),
                    loss_scale / cfg.accum_iter as f64,
                )?;
                if !lv.is_finite() {
                    return Err(crate::Error::Invalid(format!(
                        "loss is {lv} at epoch {epoch}, batch {it}: stopping (the last checkpoint is {})",
                        last.display()
                    )));
                }
                accumulate(&mut acc, grads)?;
                acc_loss += lv;
                acc_n += 1;
                images_since += n;
                prog.batch += 1;
                pb.inc(1);
                let boundary = (it + 1) % cfg.accum_iter == 0 || it + 1 == iters;
                if boundary {
                    // As the original: the rate of the step's first pass, at the fraction of
                    // the epoch seen before it (passes per epoch = len / batch_size, so with
                    // batch_size x accum_iter = the seed's effective batch, its steps).
                    let first = it - it % cfg.accum_iter;
                    let lr = schedule.at(epoch as f64 + first as f64 / iters as f64);
                    let norm = grad_norm(&acc)? / loss_scale;
                    if let Some((scale, good)) = prog.loss_scale.as_mut() {
                        if !norm.is_finite() {
                            // An f16 overflow: skip the step at a halved scale.
                            *scale /= 2.0;
                            *good = 0;
                            acc.clear();
                            acc_loss = 0.0;
                            acc_n = 0;
                            continue;
                        }
                        *good += 1;
                        if *good == 2000 {
                            *scale *= 2.0;
                            *good = 0;
                        }
                    }
                    let clip = if cfg.clip_grad > 0.0 && norm > cfg.clip_grad {
                        cfg.clip_grad / (norm + 1e-6)
                    } else {
                        1.0
                    };
                    opt.update(model.vars(), &acc, lr, &groups, clip / loss_scale)?;
                    if let Some(dp) = parallel.as_deref_mut() {
                        dp.sync(model)?;
                    }
                    acc.clear();
                    prog.steps += 1;
                    this_run += 1;
                    let mean = acc_loss / acc_n as f32;
                    prog.losses.push(mean);
                    let ips = images_since as f64 / t_step.elapsed().as_secs_f64();
                    pb.set_message(format!("loss {mean:.4} lr {lr:.2e} {ips:.1} img/s"));
                    let line = serde_json::json!({"epoch": epoch, "batch": it, "step": prog.steps, "loss": mean, "lr": lr, "grad_norm": norm, "img_per_s": ips});
                    let _ = writeln!(log, "{line}");
                    acc_loss = 0.0;
                    acc_n = 0;
                    images_since = 0;
                    t_step = Instant::now();
                    let stop = self.max_steps.is_some_and(|m| this_run >= m);
                    // A save at the last batch keeps batch == iters: a resumed run then starts
                    // with this epoch's evaluation, as the uninterrupted run continues.
                    if stop
                        || (cfg.save_every_steps > 0
                            && prog.steps.is_multiple_of(cfg.save_every_steps as u64))
                    {
                        save_checkpoint(&last, model, &opt, &prog, &cfg.to_toml())?;
                        if stop {
                            pb.finish_and_clear();
                            return Ok(self.summary(&prog, true, resumed_at_step));
                        }
                    }
                }
            }
            prog.epoch += 1;
            prog.batch = 0;
            let done = prog.epoch;
            if done.is_multiple_of(cfg.eval_every.max(1)) || done == cfg.epochs {
                let point = self.evaluate(model, done)?;
                let _ = writeln!(log, "{}", serde_json::json!({"eval": &point}));
                let better = prog
                    .best
                    .map(|b| {
                        point.metric(&cfg.select_metric)
                            > prog.history[b].metric(&cfg.select_metric)
                    })
                    .unwrap_or(true);
                prog.history.push(point);
                if better {
                    prog.best = Some(prog.history.len() - 1);
                    save_weights(&self.out_dir.join(BEST), model, cfg)?;
                }
                let curves = self.out_dir.join("curves.svg");
                crate::io::write_atomic(&curves, curves_svg(&prog, &cfg.select_metric).as_bytes())
                    .map_err(|e| crate::Error::io(&curves, e))?;
            }
            save_checkpoint(&last, model, &opt, &prog, &cfg.to_toml())?;
        }
        pb.finish_and_clear();
        Ok(self.summary(&prog, false, resumed_at_step))
    }

    fn summary(&self, prog: &Progress, interrupted: bool, resumed_at_step: u64) -> RunSummary {
        RunSummary {
            steps: prog.steps,
            epochs: prog.epoch,
            interrupted,
            best: prog.best.map(|b| prog.history[b].clone()),
            last: prog.history.last().cloned(),
            selected_on: self.cfg.eval_split.clone(),
            resumed_at_step,
        }
    }

    /// Metrics of the current weights on the evaluation data.
    pub fn evaluate(&self, model: &dyn Trainable, epoch: usize) -> crate::Result<EvalPoint> {
        let inference = model.to_inference()?;
        let s = self.cfg.input_size;
        let pre = Preprocess::eval((s, s), inference.normalization());
        let k = self.eval.classes.len();
        let items: Vec<(usize, PathBuf)> = self
            .eval
            .samples
            .iter()
            .map(|(p, _)| p.clone())
            .enumerate()
            .collect();
        let mut scores: HashMap<usize, Vec<f32>> = HashMap::new();
        for b in batches(items, pre, self.cfg.batch_size) {
            if let Some(f) = b.failures.first() {
                return Err(crate::Error::Invalid(format!(
                    "{}: {}",
                    f.input.display(),
                    f.error
                )));
            }
            let x = Tensor::from_vec(b.data, (b.positions.len(), 3, s, s), inference.device())?;
            let logits = inference.logits(&x).and_then(|l| Ok(l.to_vec2::<f32>()?))?;
            for (&i, row) in b.positions.iter().zip(logits) {
                scores.insert(i, row.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect());
            }
        }
        let n = self.eval.samples.len();
        let y: Vec<f64> = self
            .eval
            .samples
            .iter()
            .flat_map(|(_, l)| l.iter().map(|&v| v as f64))
            .collect();
        let p: Vec<f64> = (0..n)
            .flat_map(|i| scores[&i].iter().map(|&v| v as f64).collect::<Vec<_>>())
            .collect();
        let auc = metrics::auc_summary(&y, &p, k);
        Ok(EvalPoint {
            epoch,
            split: self.cfg.eval_split.clone(),
            mauc: auc.mean,
            auc_per_class: auc.per_class,
            accuracy: self
                .eval
                .single_label
                .then(|| metrics::classification(&y, &p, k).accuracy),
        })
    }
}

fn tensors_of(model: &dyn Trainable, prefix: &str) -> crate::Result<BTreeMap<String, Tensor>> {
    Ok(model
        .vars()
        .iter()
        .chain(model.buffers().iter())
        .map(|(k, v)| (format!("{prefix}{k}"), v.as_tensor().clone()))
        .collect())
}

/// The weights alone, in the models_eva layout (loadable by `predict`, `eval`, `cam`).
fn save_weights(path: &Path, model: &dyn Trainable, cfg: &TrainConfig) -> crate::Result<()> {
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("evax.train_config".to_string(), cfg.to_toml()),
    ]);
    meta.extend(model.checkpoint_metadata());
    Ok(crate::checkpoint::save_safetensors(
        &tensors_of(model, "")?,
        Some(meta),
        path,
    )?)
}

/// Weights, optimiser moments, progress and the run's settings (`config`, TOML) in one file,
/// written atomically.
pub(crate) fn save_checkpoint<P: serde::Serialize>(
    path: &Path,
    model: &dyn Trainable,
    opt: &AdamW,
    prog: &P,
    config: &str,
) -> crate::Result<()> {
    let mut t = tensors_of(model, "model.")?;
    for (k, v) in model.vars().iter() {
        let shape = v.dims();
        if let Some((m, s)) = opt.moments(k)? {
            let m = Tensor::from_vec(m, shape, &Device::Cpu)?;
            let s = Tensor::from_vec(s, shape, &Device::Cpu)?;
            t.insert(format!("adam.m.{k}"), m);
            t.insert(format!("adam.v.{k}"), s);
        }
    }
    let mut meta = HashMap::from([
        ("evax.progress".to_string(), serde_json::to_string(prog)?),
        ("evax.adam_step".to_string(), opt.step.to_string()),
        ("evax.train_config".to_string(), config.to_string()),
    ]);
    meta.extend(model.checkpoint_metadata());
    Ok(crate::checkpoint::save_safetensors(&t, Some(meta), path)?)
}

/// A batch loader's output: the batch index and its images `[n, 3, s, s]` flattened, or the
/// first image that failed.
type LoadedBatch = (usize, crate::Result<Vec<f32>>);

/// Decode and augment batches `its` of an epoch's `order` on a background thread, in order,
/// at most two ahead of the consumer.
fn prefetch_batches(
    paths: Arc<Vec<PathBuf>>,
    order: Arc<Vec<usize>>,
    augment: Augment,
    (seed, epoch, batch_size): (u64, usize, usize),
    its: std::ops::Range<usize>,
) -> std::sync::mpsc::Receiver<LoadedBatch> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<LoadedBatch>(2);
    std::thread::spawn(move || {
        for it in its {
            let idx = &order[it * batch_size..((it + 1) * batch_size).min(order.len())];
            let loaded: Vec<crate::Result<Vec<f32>>> = idx
                .par_iter()
                .enumerate()
                .map(|(j, &i)| {
                    let img = Image::open(&paths[i])?;
                    let mut rng = Rng::new(mix(&[seed, epoch as u64, it as u64, j as u64]));
                    Ok(augment.apply(&img, &mut rng))
                })
                .collect();
            let batch = loaded
                .into_iter()
                .collect::<crate::Result<Vec<Vec<f32>>>>()
                .map(|v| v.concat());
            if tx.send((it, batch)).is_err() {
                return; // the consumer left
            }
        }
    });
    rx
}

/// Restore what [`save_checkpoint`] wrote into `model` and `opt`; returns the progress.
pub(crate) fn load_checkpoint<P: serde::de::DeserializeOwned>(
    path: &Path,
    model: &mut dyn Trainable,
    opt: &mut AdamW,
) -> crate::Result<P> {
    let ck = crate::checkpoint::Checkpoint::load(path)?;
    let prog: P = serde_json::from_str(ck.metadata.get("evax.progress").ok_or(format!(
        "{}: not an evax training checkpoint",
        path.display()
    ))?)
    .context(path.display())?;
    opt.step = ck
        .metadata
        .get("evax.adam_step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for (k, var) in model.buffers().iter().chain(model.vars()) {
        let p = ck
            .tensors
            .get(&format!("model.{k}"))
            .ok_or(format!("{}: lacks model.{k}", path.display()))?;
        let t = p.to_tensor(model.device())?;
        var.set(&t)
            .map_err(|e| format!("{}: model.{k}: {e}", path.display()))?;
        if let (Some(m), Some(v)) = (
            ck.tensors.get(&format!("adam.m.{k}")),
            ck.tensors.get(&format!("adam.v.{k}")),
        ) {
            opt.m.insert(k.clone(), m.data.clone());
            opt.v.insert(k.clone(), v.data.clone());
        }
    }
    Ok(prog)
}

/// Loss per step and the selection metric per evaluation, as an SVG line chart.
pub fn curves_svg(prog: &Progress, metric: &str) -> String {
    let evals: Vec<(f64, f64)> = prog
        .history
        .iter()
        .map(|e| (e.epoch as f64, e.metric(metric)))
        .collect();
    curves(&prog.losses, &evals, metric)
}

/// Loss per step and `metric` per evaluation `(epoch, value)`, as an SVG line chart.
pub fn curves(losses: &[f32], evals: &[(f64, f64)], metric: &str) -> String {
    let (w, h, pad) = (640.0, 240.0, 40.0);
    let panel = |x0: f64, title: &str, pts: &[(f64, f64)], colour: &str| -> String {
        let pw = w / 2.0 - pad * 1.5;
        let (xmax, ymin, ymax) = pts.iter().fold(
            (1.0f64, f64::INFINITY, f64::NEG_INFINITY),
            |(a, b, c), &(x, y)| (a.max(x), b.min(y), c.max(y)),
        );
        let (ymin, ymax) = if ymin < ymax {
            (ymin, ymax)
        } else {
            (ymin - 0.5, ymin + 0.5)
        };
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + x / xmax * pw,
                    h - pad - (y - ymin) / (ymax - ymin) * (h - 2.0 * pad)
                )
            })
            .collect();
        format!(
            "<rect x='{x0}' y='{pad}' width='{pw}' height='{}' fill='none' stroke='#999'/>\
             <text x='{x0}' y='{}' font-size='13'>{title}</text>\
             <text x='{x0}' y='{}' font-size='10'>{ymin:.4}</text><text x='{x0}' y='{}' font-size='10'>{ymax:.4}</text>\
             <polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{}'/>",
            h - 2.0 * pad,
            pad - 8.0,
            h - pad + 12.0,
            pad + 10.0,
            path.join(" ")
        )
    };
    let loss: Vec<(f64, f64)> = losses
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as f64 + 1.0, l as f64))
        .collect();
    format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif'>{}{}</svg>\n",
        panel(pad, "training loss per step", &loss, "#c03"),
        panel(
            w / 2.0 + pad / 2.0,
            &format!("{metric} per evaluation (epoch)"),
            evals,
            "#06c"
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_epochs_draw_one_image_per_segment_position() {
        let data = TrainData {
            samples: (0..100)
                .map(|i| (PathBuf::from(format!("{i}.png")), vec![0.0]))
                .collect(),
            classes: vec!["a".into()],
            single_label: false,
        };
        let cfg = TrainConfig::build(None, None, &["fake_epoch_div=20".into()]).unwrap();
        let run = Run {
            cfg,
            out_dir: PathBuf::new(),
            train: data.clone(),
            eval: data,
            max_steps: None,
            progress: false,
        };
        let a = run.epoch_order(0);
        assert_eq!(a.len(), 5);
        let mut pos: Vec<usize> = a.iter().map(|i| i % 5).collect();
        pos.sort_unstable();
        assert_eq!(pos, vec![0, 1, 2, 3, 4]);
        assert_ne!(a, run.epoch_order(1));
        assert_eq!(a, run.epoch_order(0));
        // All 20 segments are drawn over many epochs; with the original's randint(0, 9), only
        // the first 10 (images 0..50).
        let all: Vec<usize> = (0..200).flat_map(|e| run.epoch_order(e)).collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().any(|&i| i >= 50) && all.iter().any(|&i| i < 50));
        let mut half = run;
        half.cfg.fake_epoch_segments = 10;
        let seen: Vec<usize> = (0..200).flat_map(|e| half.epoch_order(e)).collect();
        assert_eq!(seen.len(), 1000);
        assert!(seen.iter().all(|&i| i < 50));
        assert!(seen.iter().any(|&i| i >= 45), "segment 9 is drawn");
    }
}
