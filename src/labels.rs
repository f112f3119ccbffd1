//! Class label sets of the benchmarks and how their scores become probabilities.

use std::path::Path;

/// ChestX-ray14's 14 findings, in the order of the original's list files and heads.
pub const CXR14: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
];
/// CheXpert's five competition observations.
pub const CHEXPERT: [&str; 5] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
];
/// COVIDx 3-class labels.
pub const COVIDX3: [&str; 3] = ["normal", "pneumonia", "COVID-19"];
/// COVIDx 2-class labels.
pub const COVIDX2: [&str; 2] = ["negative", "positive"];

/// How logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Independent sigmoids (multi-label: CXR14, CheXpert).
    Sigmoid,
    /// Softmax over classes (single-label: COVIDx).
    Softmax,
}

impl Activation {
    /// Apply to one row of logits.
    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Activation::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            Activation::Softmax => {
                let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f32> = logits.iter().map(|&x| (x - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            }
        }
    }
}

/// Class names and activation of a head.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    /// Name of the set (`cxr14`, a file name, ...).
    pub name: String,
    /// One name per class.
    pub classes: Vec<String>,
    /// Logit-to-probability rule.
    pub activation: Activation,
}

impl LabelSet {
    /// The named set `spec` (or, without one, the default for `n` classes), with `activation`
    /// overriding its rule; an error unless it has exactly `n` classes.
    pub fn for_head(
        spec: Option<&str>,
        activation: Option<Activation>,
        n: usize,
    ) -> crate::Result<Self> {
        let labels = match spec {
            Some(spec) => LabelSet::resolve(spec, activation)?,
            None => {
                let mut l = LabelSet::for_classes(n);
                if let Some(act) = activation {
                    l.activation = act;
                }
                l
            }
        };
        if labels.classes.len() != n {
            return Err(crate::Error::Invalid(format!(
                "label set '{}' has {} classes but the head has {n}",
                labels.name,
                labels.classes.len()
            )));
        }
        Ok(labels)
    }

    /// The index of class `name` (case-insensitive), or an error listing the classes.
    pub fn index_of(&self, name: &str) -> crate::Result<usize> {
        self.classes
            .iter()
            .position(|l| l.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                crate::Error::Invalid(format!(
                    "unknown class '{name}'; classes are: {}",
                    self.classes.join(", ")
                ))
            })
    }

    /// A named set (`cxr14`, `chexpert`, `covidx3`, `covidx2`) or a file with one class a line
    /// (multi-label unless `activation` says otherwise).
    pub fn resolve(spec: &str, activation: Option<Activation>) -> crate::Result<Self> {
        let (classes, default): (Vec<String>, Activation) = match spec {
            "cxr14" => (
                CXR14.iter().map(|s| s.to_string()).collect(),
                Activation::Sigmoid,
            ),
            "chexpert" => (
                CHEXPERT.iter().map(|s| s.to_string()).collect(),
                Activation::Sigmoid,
            ),
            "covidx3" => (
                COVIDX3.iter().map(|s| s.to_string()).collect(),
                Activation::Softmax,
            ),
            "covidx2" => (
                COVIDX2.iter().map(|s| s.to_string()).collect(),
                Activation::Softmax,
            ),
            file => {
                let text = std::fs::read_to_string(Path::new(file)).map_err(|e| {
                    format!("{file}: not a known label set (cxr14, chexpert, covidx3, covidx2) and not a readable file: {e}")
                })?;
                let classes: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                if classes.is_empty() {
                    return Err(crate::Error::Invalid(format!(
                        "{file}: label file has no class names"
                    )));
                }
                (classes, Activation::Sigmoid)
            }
        };
        Ok(LabelSet {
            name: spec.to_owned(),
            classes,
            activation: activation.unwrap_or(default),
        })
    }

    /// The usual set for a head with `n` classes (14 CXR14, 5 CheXpert, 3 / 2 COVIDx), else
    /// `class_0..` with sigmoids.
    pub fn for_classes(n: usize) -> Self {
        match n {
            14 => Self::resolve("cxr14", None).expect("built in"),
            5 => Self::resolve("chexpert", None).expect("built in"),
            3 => Self::resolve("covidx3", None).expect("built in"),
            2 => Self::resolve("covidx2", None).expect("built in"),
            _ => LabelSet {
                name: format!("{n} classes"),
                classes: (0..n).map(|i| format!("class_{i}")).collect(),
                activation: Activation::Sigmoid,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_sigmoid_is_independent() {
        let p = Activation::Softmax.apply(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let s = Activation::Sigmoid.apply(&[0.0, 100.0]);
        assert_eq!(s, vec![0.5, 1.0]);
    }
}
