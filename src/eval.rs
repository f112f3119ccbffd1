//! `evax eval`: a checkpoint on a dataset split with the original's protocol (REFERENCE.md 6),
//! resumable. Predictions are appended to a journal as they are made; an interrupted run picks up
//! from the journal, and the final files are written atomically.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::data::{DatasetKind, Split};
use crate::infer::{Failure, batches, progress};
use crate::metrics::{self, AucSummary, Bootstrap, Classification};
use crate::model::Classifier;
use crate::preprocess::Preprocess;
use crate::shard::{Manifest, Shard, manifest_path};

/// The reason recorded for listed images that are not on disk.
pub const NOT_FOUND: &str = "image not found";

/// Settings of one evaluation.
pub struct EvalJob<'a> {
    /// The model.
    pub model: &'a dyn Classifier,
    /// The checkpoint path (recorded in outputs and the journal).
    pub weights: PathBuf,
    /// The split.
    pub split: &'a Split,
    /// Evaluation transform.
    pub preprocess: Preprocess,
    /// Images per batch.
    pub batch: usize,
    /// Bootstrap resamples (0: none).
    pub bootstrap: usize,
    /// Bootstrap seed.
    pub seed: u64,
    /// Evaluate only this part of the split (`evax merge` joins the parts).
    pub shard: Option<Shard>,
}

/// What an evaluation's metrics depend on besides the predictions (a shard's manifest keeps it,
/// so that `evax merge` recomputes them on the union).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportSettings {
    /// Dataset name.
    pub dataset: String,
    /// List file.
    pub list: String,
    /// Checkpoint.
    pub weights: String,
    /// Input size.
    pub input_size: (usize, usize),
    /// Bootstrap resamples (0: none).
    pub bootstrap: usize,
    /// Bootstrap seed.
    pub seed: u64,
}

/// What `metrics.json` holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    /// Dataset name.
    pub dataset: String,
    /// List file.
    pub list: String,
    /// Checkpoint.
    pub weights: String,
    /// Input size.
    pub input_size: (usize, usize),
    /// Images evaluated (rows of y_pred.npy).
    pub images: usize,
    /// Class names.
    pub classes: Vec<String>,
    /// Mean AUROC over the classes with a defined AUROC.
    pub mauc: f64,
    /// AUROC per class (0 where undefined, as the original records it).
    pub auc_per_class: BTreeMap<String, f64>,
    /// Classes left out of the mean (labels all one value).
    pub left_out: Vec<String>,
    /// Bootstrap confidence intervals.
    pub bootstrap: Option<BootstrapReport>,
    /// Top-1 accuracy (single-label datasets).
    pub accuracy: Option<f64>,
    /// Confusion matrix, sensitivity, PPV (single-label datasets).
    pub classification: Option<Classification>,
    /// Images not evaluated (missing or unreadable), with reasons.
    pub skipped: Vec<Failure>,
    /// Predictions reused from an interrupted run.
    pub resumed: usize,
    /// The evaluated images' names, labels and scores, row by row (also in the `.npy` files).
    #[serde(skip)]
    pub predictions: Predictions,
}

/// Labels and scores of the evaluated images, `[rows, K]` row-major.
#[derive(Debug, Clone, Default)]
pub struct Predictions {
    /// Image names as the list gives them.
    pub names: Vec<String>,
    /// Labels.
    pub y_true: Vec<f32>,
    /// Sigmoid scores.
    pub y_pred: Vec<f32>,
}

/// Bootstrap intervals by class name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootstrapReport {
    /// Resamples.
    pub resamples: usize,
    /// Seed.
    pub seed: u64,
    /// Level.
    pub level: f64,
    /// Per class.
    pub auc_per_class: BTreeMap<String, Option<[f64; 2]>>,
    /// Of the mAUC.
    pub mauc: [f64; 2],
}

/// FNV-1a over the listed image names, so a journal is only reused for the same list.
fn names_hash(samples: &[crate::data::Sample]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in samples {
        for b in s.name.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The prediction journal: a header line naming the run, then records of (row index as u32,
/// K logits as f32), little-endian.
struct Journal {
    path: PathBuf,
    header: String,
    k: usize,
}

impl Journal {
    fn record_len(&self) -> usize {
        4 + 4 * self.k
    }

    /// Logits already made by an earlier run of the same job.
    fn load(&self) -> BTreeMap<usize, Vec<f32>> {
        let mut done = BTreeMap::new();
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return done;
        };
        let mut bytes = Vec::new();
        if f.read_to_end(&mut bytes).is_err() || !bytes.starts_with(self.header.as_bytes()) {
            return done;
        }
        // A torn last record (interrupted write) is ignored.
        for rec in bytes[self.header.len()..].chunks_exact(self.record_len()) {
            let i = u32::from_le_bytes(rec[..4].try_into().unwrap()) as usize;
            let v = rec[4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            done.insert(i, v);
        }
        done
    }

    /// Open for appending, rewriting it with the header and `done` (which drops a torn tail).
    fn open(&self, done: &BTreeMap<usize, Vec<f32>>) -> std::io::Result<std::fs::File> {
        let mut buf = self.header.clone().into_bytes();
        for (i, v) in done {
            buf.extend_from_slice(&(*i as u32).to_le_bytes());
            v.iter()
                .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        }
        crate::io::write_atomic(&self.path, &buf)?;
        std::fs::OpenOptions::new().append(true).open(&self.path)
    }
}

impl EvalJob<'_> {
    /// Run, writing `y_pred.npy`, `y_gt.npy`, `metrics.json`, `report.md` and `skipped.txt`.
    pub fn run(&self, out_dir: &Path) -> crate::Result<EvalReport> {
        use crate::error::Error;
        let kind = self.split.kind;
        let classes = kind.classes();
        let k = classes.len();
        match self.model.num_classes() {
            Some(n) if n == k => {}
            n => {
                return Err(Error::Invalid(format!(
                    "{}: the head has {} classes, {} has {k}",
                    self.weights.display(),
                    n.map_or("no".into(), |n| n.to_string()),
                    kind.name()
                )));
            }
        }
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let all = &self.split.samples;
        let rows_taken = self.shard.map_or(0..all.len(), |s| s.range(all.len()));
        let samples = &all[rows_taken.clone()];
        let journal = Journal {
            path: out_dir.join("predictions.journal"),
            header: format!(
                "{}\n",
                serde_json::json!({
                    "evax-eval-journal": 1,
                    "weights": self.weights.display().to_string(),
                    "list": self.split.list.display().to_string(),
                    "images": format!("{:016x}", names_hash(samples)),
                    "rows": samples.len(),
                    "classes": k,
                    "size": [self.preprocess.size.0, self.preprocess.size.1],
                    "norm": [self.preprocess.norm.mean, self.preprocess.norm.std],
                    "shard": self.shard,
                })
            ),
            k,
        };
        let mut done = journal.load();
        done.retain(|&i, _| i < samples.len());
        let resumed = done.len();
        let mut file = journal
            .open(&done)
            .map_err(|e| Error::io(&journal.path, e))?;
        let todo: Vec<(usize, PathBuf)> = samples
            .iter()
            .enumerate()
            .filter(|(i, _)| !done.contains_key(i))
            .map(|(i, s)| (i, s.path.clone()))
            .collect();
        let pb = progress(samples.len(), "eval");
        pb.inc(resumed as u64);
        let (h, w) = self.preprocess.size;
        // Listed images not on disk: reported once, by the first part.
        let mut skipped: Vec<Failure> = if self.shard.is_none_or(|s| s.index == 0) {
            self.split
                .missing
                .iter()
                .map(|s| Failure {
                    input: s.path.clone(),
                    error: NOT_FOUND.into(),
                })
                .collect()
        } else {
            Vec::new()
        };
        for b in batches(todo, self.preprocess, self.batch) {
            skipped.extend(b.failures);
            if !b.positions.is_empty() {
                let n = b.positions.len();
                let x = Tensor::from_vec(b.data, (n, 3, h, w), self.model.device())?;
                let logits = self.model.logits(&x)?.to_vec2::<f32>()?;
                let mut rec = Vec::with_capacity(n * journal.record_len());
                for (&i, row) in b.positions.iter().zip(logits) {
                    rec.extend_from_slice(&(i as u32).to_le_bytes());
                    row.iter()
                        .for_each(|v| rec.extend_from_slice(&v.to_le_bytes()));
                    done.insert(i, row);
                }
                file.write_all(&rec)
                    .and_then(|_| file.sync_data())
                    .map_err(|e| Error::io(&journal.path, e))?;
            }
            pb.inc(b.covered as u64);
        }
        pb.finish_and_clear();
        // Rows in list order, evaluated images only.
        let rows: Vec<usize> = (0..samples.len())
            .filter(|i| done.contains_key(i))
            .collect();
        let y_pred: Vec<f32> = rows
            .iter()
            .flat_map(|i| done[i].iter().map(|&v| sigmoid(v)))
            .collect();
        let y_gt: Vec<f32> = rows
            .iter()
            .flat_map(|&i| samples[i].labels.iter().copied())
            .collect();
        let settings = self.settings();
        let mut report = report(
            &settings,
            self.split.kind,
            (&y_gt, &y_pred, rows.len()),
            skipped,
            resumed,
        );
        write_outputs(out_dir, &report, &y_gt, &y_pred)?;
        if let Some(shard) = self.shard {
            let m = Manifest {
                command: "eval".into(),
                shard,
                rows: [rows_taken.start, rows_taken.end],
                total: all.len(),
                settings: serde_json::to_value(&settings)?,
            };
            crate::shard::write_manifest(&manifest_path(out_dir, true), &m)?;
        }
        let _ = std::fs::remove_file(&journal.path);
        report.predictions = Predictions {
            names: rows.iter().map(|&i| samples[i].name.clone()).collect(),
            y_true: y_gt,
            y_pred,
        };
        Ok(report)
    }

    fn settings(&self) -> ReportSettings {
        ReportSettings {
            dataset: self.split.kind.name().into(),
            list: self.split.list.display().to_string(),
            weights: self.weights.display().to_string(),
            input_size: self.preprocess.size,
            bootstrap: self.bootstrap,
            seed: self.seed,
        }
    }
}

/// Write `y_pred.npy`, `y_gt.npy`, `metrics.json`, `report.md` and `skipped.txt`.
pub fn write_outputs(
    out_dir: &Path,
    report: &EvalReport,
    y_gt: &[f32],
    y_pred: &[f32],
) -> crate::Result<()> {
    let k = report.classes.len();
    let write = |name: &str, bytes: &[u8]| {
        crate::io::write_atomic(&out_dir.join(name), bytes)
            .map_err(|e| crate::Error::io(out_dir.join(name), e))
    };
    write(
        "y_pred.npy",
        &crate::io::npy_f32(&[report.images, k], y_pred),
    )?;
    write("y_gt.npy", &crate::io::npy_f32(&[report.images, k], y_gt))?;
    write("metrics.json", &serde_json::to_vec_pretty(report)?)?;
    write("report.md", markdown(report).as_bytes())?;
    let skipped_txt: String = report
        .skipped
        .iter()
        .map(|f| format!("{}\t{}\n", f.input.display(), f.error))
        .collect();
    write("skipped.txt", skipped_txt.as_bytes())
}

/// The metrics of `n` rows of labels and scores (`[n, K]` row-major) under `settings`.
pub fn report(
    settings: &ReportSettings,
    kind: DatasetKind,
    (y_gt, y_pred, n): (&[f32], &[f32], usize),
    skipped: Vec<Failure>,
    resumed: usize,
) -> EvalReport {
    let classes = kind.classes();
    let k = classes.len();
    let t: Vec<f64> = y_gt.iter().map(|&v| v as f64).collect();
    let p: Vec<f64> = y_pred.iter().map(|&v| v as f64).collect();
    let auc: AucSummary = metrics::auc_summary(&t, &p, k);
    let boot: Option<Bootstrap> = (settings.bootstrap > 0 && n > 0)
        .then(|| metrics::bootstrap(&t, &p, k, settings.bootstrap, settings.seed));
    let cls = kind
        .single_label()
        .then(|| metrics::classification(&t, &p, k));
    EvalReport {
        dataset: settings.dataset.clone(),
        list: settings.list.clone(),
        weights: settings.weights.clone(),
        input_size: settings.input_size,
        images: n,
        classes: classes.to_vec(),
        mauc: auc.mean,
        auc_per_class: classes
            .iter()
            .cloned()
            .zip(auc.per_class.iter().copied())
            .collect(),
        left_out: auc.left_out.iter().map(|&c| classes[c].clone()).collect(),
        bootstrap: boot.map(|b| BootstrapReport {
            resamples: b.resamples,
            seed: b.seed,
            level: b.level,
            auc_per_class: classes
                .iter()
                .cloned()
                .zip(b.per_class.iter().copied())
                .collect(),
            mauc: b.mean,
        }),
        accuracy: cls.as_ref().map(|c| c.accuracy),
        classification: cls,
        skipped,
        resumed,
        predictions: Predictions::default(),
    }
}

fn fmt_ci(ci: Option<[f64; 2]>) -> String {
    ci.map_or("-".into(), |[a, b]| {
        format!("{:.2}-{:.2}", a * 100.0, b * 100.0)
    })
}

/// The short Markdown report.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = format!(
        "# evax eval: {} ({} images)\n\nweights `{}`, list `{}`, input {}x{}\n\n",
        r.dataset, r.images, r.weights, r.list, r.input_size.0, r.input_size.1
    );
    s.push_str(&format!("**mAUC {:.2}**", r.mauc * 100.0));
    if let Some(b) = &r.bootstrap {
        s.push_str(&format!(
            " (95 % CI {}, {} bootstrap resamples)",
            fmt_ci(Some(b.mauc)),
            b.resamples
        ));
    }
    if let Some(a) = r.accuracy {
        s.push_str(&format!(", accuracy {:.2}", a * 100.0));
    }
    s.push_str("\n\n| class | AUROC | 95 % CI |\n|---|---|---|\n");
    for c in &r.classes {
        let auc = if r.left_out.contains(c) {
            "undefined (left out)".to_string()
        } else {
            format!("{:.2}", r.auc_per_class[c] * 100.0)
        };
        let ci = r.bootstrap.as_ref().and_then(|b| b.auc_per_class[c]);
        s.push_str(&format!("| {c} | {auc} | {} |\n", fmt_ci(ci)));
    }
    if let Some(c) = &r.classification {
        s.push_str("\n| true \\ predicted |");
        for n in &r.classes {
            s.push_str(&format!(" {n} |"));
        }
        s.push_str(" sensitivity |\n|---|");
        s.push_str(&"---|".repeat(r.classes.len() + 1));
        s.push('\n');
        for (i, n) in r.classes.iter().enumerate() {
            s.push_str(&format!("| {n} |"));
            for v in &c.confusion[i] {
                s.push_str(&format!(" {v} |"));
            }
            s.push_str(&format!(
                " {} |\n",
                c.sensitivity[i].map_or("-".into(), |v| format!("{:.2}", v * 100.0))
            ));
        }
        s.push_str("| PPV |");
        for v in &c.ppv {
            s.push_str(&format!(
                " {} |",
                v.map_or("-".into(), |v| format!("{:.2}", v * 100.0))
            ));
        }
        s.push_str(" |\n");
    }
    if !r.skipped.is_empty() {
        s.push_str(&format!(
            "\n{} images were not evaluated (see skipped.txt).\n",
            r.skipped.len()
        ));
    }
    s
}
