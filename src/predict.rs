//! The [`Predictor`]: a model, its preprocessing and its labels, shared by `evax predict`,
//! `evax embed` and the server; and the writers of their outputs (CSV, JSON, safetensors,
//! NPY).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::error::{Error, Result, ResultExt};
use crate::infer::{self, Failure};
use crate::labels::{Activation, LabelSet};
use crate::model::{Classifier, LoadOptions, registry};
use crate::preprocess::{Image, Normalization, Preprocess};

/// The largest model input side accepted (2048 pixels: 16,384 patch tokens of 16).
pub const MAX_INPUT_SIDE: usize = 2048;

/// How to build a [`Predictor`].
#[derive(Debug, Clone, Default)]
pub struct PredictorOptions {
    /// The checkpoint.
    pub weights: PathBuf,
    /// Top-level entry holding the state dict, if not one of the usual ones.
    pub state_key: Option<String>,
    /// Device, kernels and RoPE grid.
    pub load: LoadOptions,
    /// Input size (default: the size the weights were trained at).
    pub input_size: Option<(usize, usize)>,
    /// Normalisation (default: the family's, as the original uses it).
    pub normalization: Option<Normalization>,
    /// Label set name or file (default: by the head's class count).
    pub labels: Option<String>,
    /// Override of the label set's activation.
    pub activation: Option<Activation>,
    /// Images per forward pass.
    pub batch: usize,
}

/// One image's prediction.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    /// The input as given.
    pub input: String,
    /// Class logits.
    pub logits: Vec<f32>,
    /// Probabilities under the label set's activation.
    pub probabilities: Vec<f32>,
    /// Classes at or above the threshold.
    pub findings: Vec<String>,
}

/// Embeddings of a set of inputs, in input order.
pub struct Embeddings {
    /// Inputs embedded (the failed ones left out).
    pub inputs: Vec<String>,
    /// `[N, C]`.
    pub pooled: Tensor,
    /// `[N, T, C]`, when asked for and the family has tokens.
    pub tokens: Option<Tensor>,
    /// Feature maps `[N, C, h, w]` of the layers asked for, by layer name.
    pub intermediates: Vec<(String, Tensor)>,
}

/// A model with its preprocessing and labels.
pub struct Predictor {
    /// The model.
    pub model: Box<dyn Classifier>,
    /// The checkpoint it came from.
    pub weights: PathBuf,
    /// The evaluation transform.
    pub preprocess: Preprocess,
    /// Class names and activation (`None` for weights without a head).
    pub labels: Option<LabelSet>,
    /// Images per forward pass.
    pub batch: usize,
}

impl Predictor {
    /// Load the checkpoint and set up preprocessing and labels.
    pub fn load(o: &PredictorOptions) -> Result<Self> {
        let (model, _) = registry::load_file(&o.weights, o.state_key.as_deref(), &o.load)?;
        let m = model.input_multiple();
        let size = o.input_size.unwrap_or_else(|| model.default_input_size());
        if size.0 == 0 || size.1 == 0 || !size.0.is_multiple_of(m) || !size.1.is_multiple_of(m) {
            return Err(Error::Invalid(format!(
                "input size {}x{} is not a positive multiple of {m} (the model's patch size)",
                size.0, size.1
            )));
        }
        if size.0.max(size.1) > MAX_INPUT_SIDE {
            return Err(Error::Invalid(format!(
                "input size {}x{} is larger than {MAX_INPUT_SIDE} pixels a side (attention memory \
                 grows with the square of the token count)",
                size.0, size.1
            )));
        }
        let norm = o.normalization.unwrap_or_else(|| model.normalization());
        let labels = match model.num_classes() {
            Some(n) => Some(
                LabelSet::for_head(o.labels.as_deref(), o.activation, n)
                    .context(o.weights.display())?,
            ),
            None => None,
        };
        Ok(Predictor {
            model,
            weights: o.weights.clone(),
            preprocess: Preprocess::eval(size, norm),
            labels,
            batch: o.batch.max(1),
        })
    }

    /// The label set, or an error for weights without a classification head.
    pub fn labels(&self) -> Result<&LabelSet> {
        self.labels.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the checkpoint has no classification head; use `evax embed`",
                self.weights.display()
            ))
        })
    }

    /// Predictions for a preprocessed batch `[n, 3, H, W]`, one per name in `inputs`.
    pub fn predict_batch(
        &self,
        x: &Tensor,
        inputs: &[String],
        threshold: f32,
    ) -> Result<Vec<Prediction>> {
        let labels = self.labels()?;
        let rows = self.model.logits(x)?.to_vec2::<f32>()?;
        if rows.len() != inputs.len() {
            return Err(Error::Invalid(format!(
                "{} logit rows for {} inputs",
                rows.len(),
                inputs.len()
            )));
        }
        Ok(inputs
            .iter()
            .zip(rows)
            .map(|(input, logits)| {
                let probabilities = labels.activation.apply(&logits);
                let findings = labels
                    .classes
                    .iter()
                    .zip(&probabilities)
                    .filter(|(_, p)| **p >= threshold)
                    .map(|(c, _)| c.clone())
                    .collect();
                Prediction {
                    input: input.clone(),
                    logits,
                    probabilities,
                    findings,
                }
            })
            .collect())
    }

    /// The preprocessed tensor of one decoded image `[1, 3, H, W]`.
    pub fn image_tensor(&self, img: &Image) -> Result<Tensor> {
        let (h, w) = self.preprocess.size;
        Ok(Tensor::from_vec(
            self.preprocess.apply(img),
            (1, 3, h, w),
            self.model.device(),
        )?)
    }

    /// Predict every input file (decoded and preprocessed in parallel, in batches); the
    /// predictions in input order and the inputs that failed.
    pub fn predict_files(
        &self,
        paths: &[PathBuf],
        threshold: f32,
        pb: &ProgressBar,
    ) -> Result<(Vec<Prediction>, Vec<Failure>)> {
        self.labels()?;
        let mut preds = Vec::new();
        let failures = infer::for_each_batch(
            paths,
            &self.preprocess,
            self.batch,
            self.model.device(),
            pb,
            |pos, x| {
                let names: Vec<String> = pos
                    .iter()
                    .map(|&i| paths[i].display().to_string())
                    .collect();
                preds.extend(
                    self.predict_batch(&x, &names, threshold)
                        .map_err(|e| e.to_string())?,
                );
                Ok(())
            },
        );
        Ok((preds, failures))
    }

    /// Embed every input file: `pooled`, and `tokens` and the feature maps of the named
    /// `layers` (see [`crate::model::Backbone::layer_names`]) if asked, in input order; `None`
    /// when no input could be embedded. An unknown layer is an error before any work.
    pub fn embed_files(
        &self,
        paths: &[PathBuf],
        with_tokens: bool,
        layers: &[String],
        pb: &ProgressBar,
    ) -> Result<(Option<Embeddings>, Vec<Failure>)> {
        let names = self.model.layer_names();
        let indices = layers
            .iter()
            .map(|l| crate::model::layer_index(&names, l))
            .collect::<Result<Vec<usize>, _>>()?;
        let mut inputs = Vec::new();
        let mut pooled = Vec::new();
        let mut tokens = Vec::new();
        let mut maps: Vec<Vec<Tensor>> = vec![Vec::new(); indices.len()];
        let cpu = candle_core::Device::Cpu;
        let failures = infer::for_each_batch(
            paths,
            &self.preprocess,
            self.batch,
            self.model.device(),
            pb,
            |pos, x| {
                let mut run = || -> Result<()> {
                    let r = self.model.embed(&x)?;
                    let intermediates = if indices.is_empty() {
                        Vec::new()
                    } else {
                        self.model.forward_intermediates(&x, &indices)?
                    };
                    pooled.push(r.pooled.to_device(&cpu)?);
                    if let (true, Some(t)) = (with_tokens, r.tokens) {
                        tokens.push(t.to_device(&cpu)?);
                    }
                    for (m, t) in maps.iter_mut().zip(intermediates) {
                        m.push(t.to_device(&cpu)?);
                    }
                    Ok(())
                };
                run().map_err(|e| e.to_string())?;
                inputs.extend(pos.iter().map(|&i| paths[i].display().to_string()));
                Ok(())
            },
        );
        if inputs.is_empty() {
            return Ok((None, failures));
        }
        let tokens = if tokens.is_empty() {
            None
        } else {
            Some(Tensor::cat(&tokens, 0)?)
        };
        let intermediates = layers
            .iter()
            .zip(&maps)
            .map(|(l, m)| Ok((l.clone(), Tensor::cat(m, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            Some(Embeddings {
                inputs,
                pooled: Tensor::cat(&pooled, 0)?,
                tokens,
                intermediates,
            }),
            failures,
        ))
    }
}

/// The lower-case extension of `path`.
fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// An error unless `path` ends in one of `exts`.
pub fn check_extension(path: &Path, exts: &[&str]) -> Result<()> {
    if exts.contains(&extension(path).as_str()) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{}: output must end in .{}",
            path.display(),
            exts.join(" or .")
        )))
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Write predictions atomically as `.json` (a list of objects) or `.csv` (`input`, `prob_*`,
/// `logit_*`, `findings`).
pub fn write_predictions(path: &Path, labels: &LabelSet, preds: &[Prediction]) -> Result<()> {
    check_extension(path, &["csv", "json"])?;
    let bytes = if extension(path) == "json" {
        serde_json::to_vec_pretty(preds)?
    } else {
        let mut s = String::from("input");
        for c in &labels.classes {
            s.push_str(&format!(",prob_{c}"));
        }
        for c in &labels.classes {
            s.push_str(&format!(",logit_{c}"));
        }
        s.push_str(",findings\n");
        for p in preds {
            s.push_str(&csv_field(&p.input));
            for v in p.probabilities.iter().chain(&p.logits) {
                s.push_str(&format!(",{v}"));
            }
            s.push(',');
            s.push_str(&csv_field(&p.findings.join(";")));
            s.push('\n');
        }
        s.into_bytes()
    };
    crate::io::write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
}

/// Write a tensor as an f32 `.npy`, atomically.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    crate::io::write_atomic(path, &crate::io::npy_f32(t.dims(), &data))
        .map_err(|e| Error::io(path, e))
}

/// Write embeddings atomically: `.safetensors` (tensors `pooled`, `tokens`, `layer.NAME`; the
/// inputs in the metadata key `inputs`) or `.npy` (pooled; `OUT.tokens.npy`, `OUT.NAME.npy` and
/// `OUT.inputs.txt` beside).
pub fn write_embeddings(path: &Path, e: &Embeddings) -> Result<()> {
    check_extension(path, &["safetensors", "npy"])?;
    if extension(path) == "safetensors" {
        let mut out = BTreeMap::from([("pooled".to_string(), e.pooled.clone())]);
        if let Some(t) = &e.tokens {
            out.insert("tokens".into(), t.clone());
        }
        for (name, t) in &e.intermediates {
            out.insert(format!("layer.{name}"), t.clone());
        }
        let meta = HashMap::from([("inputs".to_string(), serde_json::to_string(&e.inputs)?)]);
        crate::checkpoint::save_safetensors(&out, Some(meta), path)?;
    } else {
        write_npy(path, &e.pooled)?;
        if let Some(t) = &e.tokens {
            write_npy(&path.with_extension("tokens.npy"), t)?;
        }
        for (name, t) in &e.intermediates {
            write_npy(&path.with_extension(format!("{name}.npy")), t)?;
        }
        let list = path.with_extension("inputs.txt");
        crate::io::write_atomic(&list, (e.inputs.join("\n") + "\n").as_bytes())
            .map_err(|err| Error::io(&list, err))?;
    }
    Ok(())
}
