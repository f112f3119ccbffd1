//! Throughput of the forward pass and of Grad-CAM with random weights (`evax bench`).

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::compute::{Precision, device_name};
use crate::explain::cam_maps;
use crate::model::eva_x::random_state_dict;
use crate::model::random::Baseline;
use crate::model::registry;
use crate::model::{Classifier, EvaX, EvaXConfig, LoadOptions, ModelError};
use crate::model::{EvaXTrainable, Trainable};
use crate::train::bce_with_logits;
use crate::train::optim::{AdamW, Groups};

/// One benchmark's settings and figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Model preset (`ti`, `s`, `b`).
    pub model: String,
    /// Its name (`EVA-X-S`, ...).
    pub variant: String,
    /// Images per batch.
    pub batch: usize,
    /// Input side in pixels.
    pub input_size: usize,
    /// Timed iterations (after one warm-up).
    pub iters: usize,
    /// Threads the compute pool used.
    pub threads: usize,
    /// Mean seconds per batch (per training step with `--train`).
    pub batch_s: f64,
    /// Seconds per training step (`--train` only; same as `batch_s`).
    pub step_s: Option<f64>,
    /// Fastest batch, seconds.
    pub min_batch_s: f64,
    /// Images per second at the mean.
    pub img_per_s: f64,
    /// Model FLOPs per image (multiply-adds x 2).
    pub gflop_per_img: f64,
    /// Achieved GFLOP/s at the mean.
    pub gflop_per_s: f64,
    /// Peak resident memory of the process (MiB).
    pub peak_rss_mb: f64,
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    /// The arithmetic (`f32`, `bf16`, `f16`).
    pub precision: Precision,
}

/// Where and how a benchmark computes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The device.
    pub device: Device,
    /// The arithmetic; reduced precision is implemented for the EVA-X models.
    pub precision: Precision,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

/// Forward FLOPs of one image (matrix products only).
pub fn flops_per_image(cfg: &EvaXConfig, input: usize) -> f64 {
    let g = input / cfg.patch_size;
    let t = (g * g + 1) as f64;
    let (c, h) = (cfg.dim as f64, cfg.mlp_hidden as f64);
    let patch = 2.0 * (g * g) as f64 * c * (3 * cfg.patch_size * cfg.patch_size) as f64;
    let block = 2.0 * t * c * 3.0 * c
        + 4.0 * t * t * c
        + 2.0 * t * c * c
        + 2.0 * t * c * 2.0 * h
        + 2.0 * t * h * c;
    patch + cfg.depth as f64 * block
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What a benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The forward pass (features, pooling and head).
    Forward,
    /// One Grad-CAM per image at the last block's norm1 (forward + partial backward + maps).
    Cam,
    /// One training step: forward (drop path 0.1), BCE loss, backward, AdamW.
    Train,
}

/// Time a workload on random weights of a model: an EVA-X preset (`ti`, `s`, `b`) or a
/// comparison baseline (`r50`, `dn121`, `vit-s`).
pub fn run(
    model_name: &str,
    batch: usize,
    input: usize,
    iters: usize,
    work: Workload,
    target: &Target,
) -> Result<BenchResult, ModelError> {
    let dev = &target.device;
    if batch == 0 || iters == 0 {
        return Err(ModelError::Input(format!(
            "bench needs at least one image a batch and one timed iteration (got --batch {batch}, \
             --iters {iters})"
        )));
    }
    if let Some(preset) = model_name.strip_prefix("seg-") {
        return run_seg(model_name, preset, (batch, input), iters, work, target);
    }
    let unknown = || {
        ModelError::Input(format!(
            "unknown model '{model_name}' (ti, s, b, r50, dn121, vit-s, seg-ti, seg-s, seg-b)"
        ))
    };
    let baseline = Baseline::from_name(model_name);
    let cfg = match baseline {
        Some(_) => None,
        None => Some(EvaXConfig::preset(model_name).ok_or_else(unknown)?),
    };
    let load = LoadOptions {
        rope_grid: None,
        device: dev.clone(),
        kernels: Default::default(),
        precision: target.precision,
    };
    let (model, variant, gflop): (Box<dyn Classifier>, String, f64) = match (&cfg, baseline) {
        (Some(cfg), _) => {
            let sd = random_state_dict(cfg, 0);
            let load = LoadOptions {
                rope_grid: Some(cfg.rope_grid),
                ..load.clone()
            };
            (
                Box::new(EvaX::from_eva_state_dict(&sd, &load)?.0),
                cfg.variant(),
                flops_per_image(cfg, input) / 1e9,
            )
        }
        (None, Some(b)) => {
            let m = registry::load(&b.random_checkpoint(0), &load)?.0;
            let name = m.name();
            (m, name, b.flops_per_image(input) / 1e9)
        }
        (None, None) => return Err(unknown()),
    };
    let multiple = model.input_multiple();
    if input == 0 || !input.is_multiple_of(multiple) {
        return Err(ModelError::Input(format!(
            "input size {input} is not a multiple of {multiple}"
        )));
    }
    let x = Tensor::randn(0f32, 1f32, (batch, 3, input, input), dev)?;
    let layer = model.default_cam_layer();
    let trainable: Option<Box<dyn Trainable>> = match (work, &cfg, baseline) {
        (Workload::Train, Some(cfg), _) => {
            let mut cfg = cfg.clone();
            cfg.train_grid = (input / cfg.patch_size, input / cfg.patch_size);
            let mut t = EvaXTrainable::from_state_dict_on(
                &random_state_dict(&cfg, 0),
                14,
                0,
                dev,
                Default::default(),
            )?;
            t.precision = target.precision;
            Some(Box::new(t))
        }
        (Workload::Train, None, Some(b)) => {
            let mut t =
                registry::load_trainable(&b.random_checkpoint(0), 14, 0, dev, Default::default())?;
            t.set_precision(target.precision)?;
            Some(t)
        }
        _ => None,
    };
    let targets = Tensor::rand(0f32, 1f32, (batch, 14), dev)?
        .ge(0.5)?
        .to_dtype(candle_core::DType::F32)?;
    let groups: Groups = trainable.as_ref().map_or_else(Groups::new, |t| {
        t.vars()
            .keys()
            .map(|k| (k.clone(), t.param_group(k, 0.55, 0.05)))
            .collect()
    });
    let mut opt = AdamW::new();
    let mut rng = crate::rng::Rng::new(0);
    let mut step = || -> Result<(), ModelError> {
        match work {
            Workload::Train => {
                let t = trainable.as_ref().expect("built above");
                let logits = t.forward_train(&x, 0.1, Some(&mut rng))?;
                let loss = bce_with_logits(&logits, &targets)?;
                let grads = t.grads(&loss.backward()?)?;
                opt.update(t.vars(), &grads, 1e-4, &groups, 1.0)?;
            }
            Workload::Forward => {
                model.logits(&x)?;
            }
            Workload::Cam => {
                let b = model.activation_grads(&x, &layer, &|_, _| vec![0])?;
                cam_maps(&b.rounds[0], (input, input))?;
            }
        }
        // Asynchronous devices: the step is done when the device is.
        dev.synchronize()?;
        Ok(())
    };
    let (mean, min, n) = timed(iters, &mut step)?;
    Ok(result(
        model_name,
        variant,
        (batch, input),
        (mean, min, n),
        gflop,
        work,
        target,
    ))
}

/// One warm-up call (pools, caches, page faults), then `iters` timed ones: mean and fastest
/// seconds, and how many.
fn timed(
    iters: usize,
    step: &mut dyn FnMut() -> Result<(), ModelError>,
) -> Result<(f64, f64, usize), ModelError> {
    step()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok((mean, min, times.len()))
}

fn result(
    model: &str,
    variant: String,
    (batch, input): (usize, usize),
    (mean, min, iters): (f64, f64, usize),
    gflop: f64,
    work: Workload,
    target: &Target,
) -> BenchResult {
    BenchResult {
        model: model.to_string(),
        variant,
        batch,
        input_size: input,
        iters,
        threads: rayon::current_num_threads(),
        batch_s: mean,
        step_s: (work == Workload::Train).then_some(mean),
        min_batch_s: min,
        img_per_s: batch as f64 / mean,
        gflop_per_img: gflop,
        gflop_per_s: gflop * batch as f64 / mean,
        peak_rss_mb: peak_rss_mb(),
        device: device_name(&target.device),
        precision: target.precision,
    }
}

/// The original's segmentation model (`seg-ti`, `seg-s`, `seg-b`: EVA-X of that size at full
/// depth, the pyramid, UperNet with 256 channels, one output channel) on random weights: the
/// prediction (logits at the input size) or one training step (drop path 0.15, BCE on a random
/// mask, backward, AdamW).
fn run_seg(
    model_name: &str,
    preset: &str,
    (batch, input): (usize, usize),
    iters: usize,
    work: Workload,
    target: &Target,
) -> Result<BenchResult, ModelError> {
    let dev = &target.device;
    use crate::segment::{SegTrainable, UperNet, head_flops, random_state_dict};
    let mut cfg = EvaXConfig::preset(preset)
        .ok_or_else(|| ModelError::Input(format!("unknown model '{model_name}'")))?;
    if input == 0 || !input.is_multiple_of(32) {
        return Err(ModelError::Input(format!(
            "input size {input} is not a multiple of 32"
        )));
    }
    let grid = (input / cfg.patch_size, input / cfg.patch_size);
    cfg.train_grid = grid;
    let sd = random_state_dict(&cfg, 256, 0);
    let gflop = (flops_per_image(&cfg, input) + head_flops(grid, cfg.dim, 256)) / 1e9;
    let variant = format!("{} + UperNet-256", cfg.variant());
    let x = Tensor::randn(0f32, 1f32, (batch, 3, input, input), dev)?;
    let (mean, min, n) = match work {
        Workload::Train => {
            let mut model = SegTrainable::from_state_dict(&sd, dev, Default::default())?;
            model.set_precision(target.precision)?;
            let targets = Tensor::rand(0f32, 1f32, (batch, 1, input, input), dev)?
                .ge(0.5)?
                .to_dtype(candle_core::DType::F32)?;
            let groups: Groups = model
                .vars()
                .keys()
                .map(|k| (k.clone(), (1.0, 0.05)))
                .collect();
            let mut opt = AdamW::new();
            let mut rng = crate::rng::Rng::new(0);
            timed(iters, &mut || {
                let logits = model.forward_seg(&x, 0.15, Some(&mut rng))?;
                let grads = model.grads(&bce_with_logits(&logits, &targets)?.backward()?)?;
                opt.update(model.vars(), &grads, 6e-5, &groups, 1.0)?;
                dev.synchronize()?;
                Ok(())
            })?
        }
        Workload::Forward => {
            let load = LoadOptions {
                device: dev.clone(),
                precision: target.precision,
                ..Default::default()
            };
            let model = UperNet::from_state_dict(&sd, &load)?.0;
            timed(iters, &mut || {
                model.logits(&x)?;
                dev.synchronize()?;
                Ok(())
            })?
        }
        Workload::Cam => {
            return Err(ModelError::Input(
                "no Grad-CAM for the segmentation model".into(),
            ));
        }
    };
    Ok(result(
        model_name,
        variant,
        (batch, input),
        (mean, min, n),
        gflop,
        work,
        target,
    ))
}

/// Input-pipeline throughput: decode + preprocess of one image file, repeated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineResult {
    /// The image.
    pub image: String,
    /// Images processed.
    pub images: usize,
    /// Threads used.
    pub threads: usize,
    /// Images per second.
    pub img_per_s: f64,
    /// Share of the time spent decoding (single-threaded measurement).
    pub decode_share: f64,
}

/// Time decoding and the evaluation transform of `path` at `size`, `n` times over the thread
/// pool (the file is read from disk each time, as a dataset would be).
pub fn pipeline(path: &std::path::Path, size: usize, n: usize) -> crate::Result<PipelineResult> {
    use crate::preprocess::{Image, Normalization, Preprocess};
    use rayon::prelude::*;
    let pre = Preprocess::eval((size, size), Normalization::EVAX);
    pre.load(path)?;
    // Split of one image's cost, single-threaded.
    let reps = 10;
    let t0 = Instant::now();
    for _ in 0..reps {
        Image::open(path)?;
    }
    let decode = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..reps {
        pre.load(path)?;
    }
    let total = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    (0..n)
        .into_par_iter()
        .try_for_each(|_| pre.load(path).map(|_| ()).map_err(|e| e.to_string()))?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(PipelineResult {
        image: path.display().to_string(),
        images: n,
        threads: rayon::current_num_threads(),
        img_per_s: n as f64 / secs,
        decode_share: decode / total,
    })
}

/// A benchmark result as one line of text (what `evax bench` prints).
pub fn render_text(r: &BenchResult, work: Workload) -> String {
    match work {
        Workload::Train => format!(
            "{} training step, batch {} at {}px, {}: {:.2} s per step (best {:.2} s), {:.1} img/s, peak RSS {:.0} MiB",
            r.variant,
            r.batch,
            r.input_size,
            place(r),
            r.batch_s,
            r.min_batch_s,
            r.img_per_s,
            r.peak_rss_mb
        ),
        Workload::Cam => format!(
            "{} Grad-CAM batch {} at {}px, {}: {:.1} ms per CAM ({:.1} ms/batch, best {:.1} ms), peak RSS {:.0} MiB",
            r.variant,
            r.batch,
            r.input_size,
            place(r),
            r.batch_s * 1e3 / r.batch as f64,
            r.batch_s * 1e3,
            r.min_batch_s * 1e3,
            r.peak_rss_mb
        ),
        Workload::Forward => format!(
            "{} batch {} at {}px, {}: {:.1} img/s ({:.1} ms/batch, best {:.1} ms), {:.0} GFLOP/s, peak RSS {:.0} MiB",
            r.variant,
            r.batch,
            r.input_size,
            place(r),
            r.img_per_s,
            r.batch_s * 1e3,
            r.min_batch_s * 1e3,
            r.gflop_per_s,
            r.peak_rss_mb
        ),
    }
}

/// A pipeline benchmark as one line of text.
pub fn pipeline_text(r: &PipelineResult, size: usize) -> String {
    format!(
        "pipeline {} -> {size}: {:.0} img/s on {} threads ({} images; decoding is {:.0} % of the work)",
        r.image,
        r.img_per_s,
        r.threads,
        r.images,
        r.decode_share * 100.0
    )
}

/// Where a benchmark ran, for its line: the CPU's thread count or the device, and the
/// arithmetic when not f32.
fn place(r: &BenchResult) -> String {
    let mut s = if r.device == "cpu" {
        format!("{} threads", r.threads)
    } else {
        r.device.clone()
    };
    if r.precision != Precision::F32 {
        s.push_str(&format!(", {}", r.precision.name()));
    }
    if r.device == "cpu" && r.precision == Precision::Bf16 {
        s.push_str(&format!(" ({})", crate::kernels::bf16::cpu_unit()));
    }
    s
}
