//! `evax compare`: several models (run folders or checkpoints, any family) evaluated on the same
//! split with the original's protocol, in one table: per-class AUROC, mAUC with bootstrap
//! intervals, and a paired bootstrap test of each model against the first (the comparison the
//! seed's readers make by hand). Each model's evaluation is resumable in its own folder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::data::Split;
use crate::error::{Error, Result};
use crate::eval::{EvalJob, EvalReport};
use crate::metrics::{self, Interval, Paired};
use crate::model::LoadOptions;
use crate::predict::{Predictor, PredictorOptions};

/// Settings of one comparison.
pub struct CompareJob<'a> {
    /// Run folders (their `checkpoint-best.safetensors`) or checkpoint files; the first is
    /// the reference of the paired tests.
    pub models: Vec<PathBuf>,
    /// The split every model is evaluated on.
    pub split: &'a Split,
    /// Device and kernels.
    pub load: LoadOptions,
    /// Images per forward pass.
    pub batch: usize,
    /// Bootstrap resamples (intervals and paired tests).
    pub bootstrap: usize,
    /// Bootstrap seed (the same resamples for every model).
    pub seed: u64,
}

/// One model's line of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelRow {
    /// Short name (the run folder's or the checkpoint's).
    pub name: String,
    /// The checkpoint evaluated.
    pub weights: String,
    /// Architecture (`EVA-X-S`, `ResNet-50`, ...).
    pub model: String,
    /// Mean AUROC.
    pub mauc: f64,
    /// Its bootstrap interval.
    pub mauc_interval: Option<Interval>,
    /// AUROC per class.
    pub auc_per_class: BTreeMap<String, f64>,
    /// Top-1 accuracy (single-label datasets).
    pub accuracy: Option<f64>,
    /// The paired test against the first model (none for the first).
    pub vs_first: Option<Paired>,
}

/// A model that could not be evaluated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelFailure {
    /// What was given.
    pub input: String,
    /// Why it failed.
    pub error: String,
}

/// What `compare.json` holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Dataset.
    pub dataset: String,
    /// List file.
    pub list: String,
    /// Images every model was evaluated on.
    pub images: usize,
    /// Class names.
    pub classes: Vec<String>,
    /// Bootstrap resamples and seed.
    pub bootstrap: (usize, u64),
    /// The models, in the order given.
    pub models: Vec<ModelRow>,
    /// Models that could not be evaluated.
    pub failures: Vec<ModelFailure>,
}

/// The checkpoint of a run folder (its best) or a file as given, and a short name for it.
fn resolve(input: &Path) -> Result<(PathBuf, String)> {
    if input.is_dir() {
        let best = input.join("checkpoint-best.safetensors");
        if !best.is_file() {
            return Err(Error::Invalid(format!(
                "{}: a folder without checkpoint-best.safetensors (give a run folder of \
                 `evax finetune` or a checkpoint file)",
                input.display()
            )));
        }
        let name = input
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "run".into());
        return Ok((best, name));
    }
    if !input.is_file() {
        return Err(Error::Invalid(format!(
            "{}: no such file or folder",
            input.display()
        )));
    }
    let name = input
        .file_stem()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    Ok((input.to_path_buf(), name))
}

/// A folder name from `name`, unique among `taken`.
fn unique(name: &str, taken: &[String]) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut candidate = clean.clone();
    let mut i = 2;
    while taken.contains(&candidate) {
        candidate = format!("{clean}-{i}");
        i += 1;
    }
    candidate
}

impl CompareJob<'_> {
    fn evaluate(&self, weights: &Path, out: &Path) -> Result<(EvalReport, String)> {
        let p = Predictor::load(&PredictorOptions {
            weights: weights.to_path_buf(),
            state_key: None,
            load: self.load.clone(),
            input_size: None,
            normalization: None,
            labels: None,
            activation: None,
            batch: self.batch,
        })?;
        let job = EvalJob {
            shard: None,
            model: p.model.as_ref(),
            weights: weights.to_path_buf(),
            split: self.split,
            preprocess: p.preprocess,
            batch: self.batch,
            bootstrap: self.bootstrap,
            seed: self.seed,
        };
        Ok((job.run(out)?, p.model.name()))
    }

    /// Evaluate every model (into `out_dir/models/NAME/`), then write `compare.json`,
    /// `compare.md` and `compare.svg`. A model that fails is reported and the rest go on.
    pub fn run(&self, out_dir: &Path, note: &mut dyn FnMut(&str)) -> Result<Comparison> {
        let classes = self.split.kind.classes();
        let k = classes.len();
        let mut rows: Vec<ModelRow> = Vec::new();
        let mut failures = Vec::new();
        let mut first: Option<(String, crate::eval::Predictions)> = None;
        let mut taken = Vec::new();
        for input in &self.models {
            let attempt = resolve(input).and_then(|(weights, name)| {
                let name = unique(&name, &taken);
                taken.push(name.clone());
                note(&format!("{name}: evaluating {}", weights.display()));
                let (r, model) = self.evaluate(&weights, &out_dir.join("models").join(&name))?;
                let y: Vec<f64> = r.predictions.y_true.iter().map(|&v| v as f64).collect();
                let s: Vec<f64> = r.predictions.y_pred.iter().map(|&v| v as f64).collect();
                let vs_first = match &first {
                    None => None,
                    Some((fname, f)) => {
                        if f.names != r.predictions.names {
                            return Err(Error::Invalid(format!(
                                "{name}: evaluated on other images than {fname} ({} vs {}; an \
                                 image unreadable for one of them?)",
                                r.predictions.names.len(),
                                f.names.len()
                            )));
                        }
                        let a: Vec<f64> = f.y_pred.iter().map(|&v| v as f64).collect();
                        Some(metrics::paired_bootstrap(
                            &y,
                            &a,
                            &s,
                            k,
                            self.bootstrap,
                            self.seed,
                        ))
                    }
                };
                if first.is_none() {
                    first = Some((name.clone(), r.predictions.clone()));
                }
                Ok(ModelRow {
                    name,
                    weights: weights.display().to_string(),
                    model,
                    mauc: r.mauc,
                    mauc_interval: r.bootstrap.as_ref().map(|b| b.mauc),
                    auc_per_class: r.auc_per_class.clone(),
                    accuracy: r.accuracy,
                    vs_first,
                })
            });
            match attempt {
                Ok(row) => rows.push(row),
                Err(e) => {
                    // Errors about a file name it already; others get the input in front.
                    let shown = input.display().to_string();
                    let error = e.to_string();
                    let error = if error.contains(&shown) {
                        error
                    } else {
                        format!("{shown}: {error}")
                    };
                    note(&format!("failed: {error}"));
                    failures.push(ModelFailure {
                        input: shown,
                        error,
                    });
                }
            }
        }
        let c = Comparison {
            dataset: self.split.kind.name().into(),
            list: self.split.list.display().to_string(),
            images: first.as_ref().map_or(0, |(_, p)| p.names.len()),
            classes,
            bootstrap: (self.bootstrap, self.seed),
            models: rows,
            failures,
        };
        let write = |name: &str, bytes: &[u8]| {
            crate::io::write_atomic(&out_dir.join(name), bytes)
                .map_err(|e| Error::io(out_dir.join(name), e))
        };
        write("compare.json", &serde_json::to_vec_pretty(&c)?)?;
        write("compare.md", markdown(&c).as_bytes())?;
        write("compare.svg", svg(&c).as_bytes())?;
        Ok(c)
    }
}

fn pct(v: f64) -> String {
    format!("{:.2}", v * 100.0)
}

fn interval(i: Option<Interval>) -> String {
    i.map_or("-".into(), |[a, b]| format!("[{}, {}]", pct(a), pct(b)))
}

/// The comparison as Markdown: a summary table and the per-class AUROCs.
pub fn markdown(c: &Comparison) -> String {
    let mut s = format!(
        "# evax compare: {} ({} images, list `{}`)\n\n",
        c.dataset, c.images, c.list
    );
    let _ = writeln!(
        s,
        "mAUC with 95 % bootstrap intervals ({} resamples, seed {}); each model against the \
         first by a paired bootstrap of the mAUC difference.\n",
        c.bootstrap.0, c.bootstrap.1
    );
    s.push_str("| model | architecture | mAUC | 95 % CI | vs first | 95 % CI | p |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for m in &c.models {
        let (d, di, p) = match &m.vs_first {
            Some(v) => (
                format!("{:+.2}", v.delta * 100.0),
                interval(Some(v.interval)),
                format!("{:.3}", v.p_value),
            ),
            None => ("(reference)".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | **{}** | {} | {d} | {di} | {p} |",
            m.name,
            m.model,
            pct(m.mauc),
            interval(m.mauc_interval)
        );
    }
    if !c.models.is_empty() {
        s.push_str("\n## AUROC per class\n\n| class |");
        for m in &c.models {
            let _ = write!(s, " {} |", m.name);
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(c.models.len()));
        s.push('\n');
        for cls in &c.classes {
            let _ = write!(s, "| {cls} |");
            for m in &c.models {
                let _ = write!(
                    s,
                    " {} |",
                    m.auc_per_class.get(cls).map_or("-".into(), |v| pct(*v))
                );
            }
            s.push('\n');
        }
    }
    if !c.failures.is_empty() {
        s.push_str("\n## Not evaluated\n\n");
        for f in &c.failures {
            let _ = writeln!(s, "- {}", f.error);
        }
    }
    s
}

/// Escape text for SVG.
fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// mAUC and its interval per model, as a dot-and-whisker chart.
pub fn svg(c: &Comparison) -> String {
    let (w, row, top, left, right) = (720.0, 28.0, 40.0, 220.0, 40.0);
    let h = top + row * c.models.len().max(1) as f64 + 40.0;
    let lo_hi = c
        .models
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), m| {
            let [a, b] = m.mauc_interval.unwrap_or([m.mauc, m.mauc]);
            (lo.min(a).min(m.mauc), hi.max(b).max(m.mauc))
        });
    let (lo, hi) = if lo_hi.0.is_finite() && lo_hi.1 > lo_hi.0 {
        (lo_hi.0 - 0.005, lo_hi.1 + 0.005)
    } else {
        (0.5, 1.0)
    };
    let x = |v: f64| left + (v - lo) / (hi - lo) * (w - left - right);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{left}\" y=\"20\">{} mAUC, 95 % bootstrap interval</text>\n",
        esc(&c.dataset)
    );
    for (i, m) in c.models.iter().enumerate() {
        let y = top + row * i as f64 + row / 2.0;
        let [a, b] = m.mauc_interval.unwrap_or([m.mauc, m.mauc]);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} ({})</text>\n\
             <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#555\"/>\n\
             <circle cx=\"{:.1}\" cy=\"{y}\" r=\"4\" fill=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{}</text>",
            left - 8.0,
            y + 4.0,
            esc(&m.name),
            esc(&m.model),
            x(a),
            x(b),
            x(m.mauc),
            if i == 0 { "#c0392b" } else { "#2471a3" },
            x(b) + 6.0,
            y + 4.0,
            pct(m.mauc)
        );
    }
    let axis = h - 30.0;
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{axis}\" y2=\"{axis}\" stroke=\"black\"/>",
        w - right
    );
    for t in 0..=4 {
        let v = lo + (hi - lo) * t as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
            x(v),
            axis + 14.0,
            pct(v)
        );
    }
    s.push_str("</svg>\n");
    s
}
