//! Setting up a fine-tuning run from settings: the initial weights, the data, and the job
//! behind `evax finetune` (so a server or a binding can start one too).

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::config::TrainConfig;
use super::engine::{EvalPoint, Run, RunSummary, TrainData};
use super::parallel;
use crate::checkpoint::Checkpoint;
use crate::compute::Precision;
use crate::data::{self, DatasetKind, LoadOptions as DataOptions, chexpert::UncertaintyPolicy};
use crate::error::{Error, Result, ResultExt};
use crate::kernels::Kernels;
use crate::model::{Trainable, registry};

/// Initial weights: a checkpoint (MIM or fine-tuned; its head kept if it has `classes` rows,
/// else re-initialised), or a fresh initialisation of the configured size `model`.
pub fn initial_model(
    weights: Option<&Path>,
    model: &str,
    input: usize,
    classes: usize,
    seed: u64,
    device: &Device,
    kernels: Kernels,
) -> Result<Box<dyn Trainable>> {
    let m = match weights {
        Some(w) => {
            let ck = Checkpoint::load(w)?;
            let found = registry::recognise(&ck).context(w.display())?;
            if let Some(want) = registry::Family::of_model(model).filter(|f| *f != found) {
                return Err(Error::Invalid(format!(
                    "{}: these are {} weights, but the recipe (model = \"{model}\") is for {}; \
                     pick a recipe for {} (e.g. --preset {}) or set model=...",
                    w.display(),
                    found.name(),
                    want.name(),
                    found.name(),
                    match found {
                        registry::Family::EvaX => "cxr14-s",
                        registry::Family::Vit => "cxr14-vit-s",
                        registry::Family::ResNet => "cxr14-r50",
                        registry::Family::DenseNet => "cxr14-dn121",
                    }
                )));
            }
            registry::load_trainable(&ck, classes, seed, device, kernels)
                .context(format!("{}: cannot fine-tune these weights", w.display()))?
        }
        None => registry::init_trainable(model, input, classes, seed, device, kernels)?,
    };
    let p = m.input_multiple();
    if input == 0 || !input.is_multiple_of(p) {
        return Err(Error::Invalid(format!(
            "input_size {input} is not a positive multiple of the model's patch size {p}"
        )));
    }
    Ok(m)
}

/// A split of a dataset as training data, with the rows and images that had to be skipped
/// described in `warnings`.
pub fn train_data(
    kind: DatasetKind,
    dir: &Path,
    split: &str,
    cfg: &TrainConfig,
    warnings: &mut Vec<String>,
) -> Result<TrainData> {
    let opts = DataOptions {
        policy: UncertaintyPolicy::parse(&cfg.uncertainty)?,
        ..Default::default()
    };
    let s = data::load_split(kind, dir, split, None, &opts)?;
    warnings.extend(s.problems.iter().take(10).map(|p| format!("bad row: {p}")));
    if !s.missing.is_empty() {
        warnings.push(format!(
            "{}: {} listed images not found (skipped)",
            s.list.display(),
            s.missing.len()
        ));
    }
    if s.samples.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no usable images",
            s.list.display()
        )));
    }
    Ok(TrainData {
        samples: s.samples.into_iter().map(|x| (x.path, x.labels)).collect(),
        classes: kind.classes(),
        single_label: kind.single_label(),
    })
}

/// A fine-tuning job: settings, starting weights, data and output folder.
pub struct Finetune {
    /// The settings (preset, file and overrides already applied).
    pub cfg: TrainConfig,
    /// Starting weights (default: a random initialisation of `cfg.model`).
    pub weights: Option<PathBuf>,
    /// The dataset's folder.
    pub data_dir: PathBuf,
    /// Output folder (a run there is resumed).
    pub out_dir: PathBuf,
    /// Stop after this many optimiser steps.
    pub max_steps: Option<u64>,
    /// Device of the parameters.
    pub device: Device,
    /// Arithmetic of the forward (master weights and optimiser state stay f32).
    pub precision: Precision,
    /// Kernels.
    pub kernels: Kernels,
    /// More devices for data-parallel training (each batch split between `device` and
    /// these; `--gpus`); empty for one device.
    pub replicas: Vec<Device>,
}

impl Finetune {
    /// Load data and weights, announce the run through `note`, train, and write
    /// `summary.json`.
    pub fn run(self, note: &mut dyn FnMut(&str)) -> Result<RunSummary> {
        let cfg = self.cfg;
        let kind = DatasetKind::parse(&cfg.dataset)?;
        let mut warnings = Vec::new();
        let train = train_data(kind, &self.data_dir, &cfg.train_split, &cfg, &mut warnings)?;
        let eval = train_data(kind, &self.data_dir, &cfg.eval_split, &cfg, &mut warnings)?;
        warnings.iter().for_each(|w| note(w));
        // The model as configured on `device` (the main one, and any data-parallel replicas).
        let make = |device: &Device| -> Result<Box<dyn Trainable>> {
            let mut m = initial_model(
                self.weights.as_deref(),
                &cfg.model,
                cfg.input_size,
                train.classes.len(),
                cfg.seed,
                device,
                self.kernels,
            )?;
            m.set_precision(self.precision)?;
            Ok(m)
        };
        let mut model = make(&self.device)?;
        model.init_notes().iter().for_each(|n| note(n));
        note(&format!(
            "fine-tuning {} on {} ({} training images, evaluating on {} {}); selecting on {} {}",
            model.name(),
            kind.name(),
            train.samples.len(),
            eval.samples.len(),
            cfg.eval_split,
            cfg.eval_split,
            cfg.select_metric
        ));
        let mut parallel = if self.replicas.is_empty() {
            None
        } else {
            let mut all = vec![self.device.clone()];
            all.extend(self.replicas.iter().cloned());
            let collective = parallel::collective_for(&all)?;
            note(&format!(
                "data-parallel on {} devices: each batch of {} split between them",
                all.len(),
                cfg.batch_size
            ));
            Some(parallel::DataParallel::new(
                model.as_ref(),
                &self.replicas,
                collective,
                &make,
            )?)
        };
        let run = Run {
            cfg,
            out_dir: self.out_dir.clone(),
            train,
            eval,
            max_steps: self.max_steps,
            progress: true,
        };
        let s = match parallel.as_mut() {
            Some(dp) => run.run_data_parallel(model.as_mut(), dp)?,
            None => run.run(model.as_mut())?,
        };
        let path = self.out_dir.join("summary.json");
        crate::io::write_atomic(&path, &serde_json::to_vec_pretty(&s)?)
            .map_err(|e| Error::io(&path, e))?;
        Ok(s)
    }
}

/// The end of a run as text: interruption, the best and the last evaluation in `metric`.
pub fn summary_text(s: &RunSummary, metric: &str) -> String {
    let show = |p: &EvalPoint| {
        if metric == "accuracy" {
            format!(
                "accuracy {:.2} (mAUC {:.2})",
                p.accuracy.unwrap_or(0.0) * 100.0,
                p.mauc * 100.0
            )
        } else {
            format!("mAUC {:.2}", p.mauc * 100.0)
        }
    };
    let mut out = String::new();
    if s.interrupted {
        out.push_str(&format!(
            "stopped after {} optimiser steps as asked; run again to resume\n",
            s.steps
        ));
    }
    if let Some(b) = &s.best {
        out.push_str(&format!(
            "best (on {}, epoch {}): {}\n",
            s.selected_on,
            b.epoch,
            show(b)
        ));
    }
    if let Some(l) = &s.last {
        out.push_str(&format!(
            "last evaluation (epoch {}): {}\n",
            l.epoch,
            show(l)
        ));
    }
    out
}
