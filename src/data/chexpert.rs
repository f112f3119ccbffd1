//! CheXpert (v1.0 and v1.0-small): `train.csv` / `valid.csv`, frontal views only, the five
//! competition observations, uncertain labels (-1) mapped by a policy, blanks as 0, the
//! `CheXpert-v1.0-small/` path prefix stripped.

use std::path::{Path, PathBuf};

use super::{DataError, LoadOptions, Problem, Sample, Split, csv_fields, find_file, read_text};
use crate::labels::CHEXPERT;

/// What an uncertain (-1) label becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UncertaintyPolicy {
    /// The original's: U-Ones for Edema and Atelectasis, U-Zeros for the other three.
    #[default]
    Original,
    /// Every uncertain label is positive.
    Ones,
    /// Every uncertain label is negative.
    Zeros,
    /// Uncertain labels are left out of that class's metrics (NaN).
    Ignore,
}

impl UncertaintyPolicy {
    /// From `original`, `ones`, `zeros`, `ignore`.
    pub fn parse(s: &str) -> crate::Result<Self> {
        Ok(match s {
            "original" => Self::Original,
            "ones" | "u-ones" => Self::Ones,
            "zeros" | "u-zeros" => Self::Zeros,
            "ignore" => Self::Ignore,
            _ => {
                return Err(crate::Error::Invalid(format!(
                    "unknown uncertainty policy '{s}' (original, ones, zeros, ignore)"
                )));
            }
        })
    }

    fn uncertain(self, class: &str) -> f32 {
        match self {
            Self::Original if class == "Edema" || class == "Atelectasis" => 1.0,
            Self::Original | Self::Zeros => 0.0,
            Self::Ones => 1.0,
            Self::Ignore => f32::NAN,
        }
    }
}

/// Path prefixes of the CSVs' `Path` column.
const PREFIXES: [&str; 2] = ["CheXpert-v1.0-small/", "CheXpert-v1.0/"];

/// Load a CheXpert split (`valid` or `train`).
pub fn load(
    data_dir: &Path,
    split: &str,
    list: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Split, DataError> {
    let split = match split {
        "val" | "test" => "valid",
        s => s,
    };
    let csv = match list {
        Some(l) => l.to_path_buf(),
        None => find_file(
            data_dir,
            &[
                format!("{split}.csv"),
                format!("CheXpert-v1.0-small/{split}.csv"),
                format!("CheXpert-v1.0/{split}.csv"),
            ],
        )
        .ok_or_else(|| {
            DataError::Layout(format!(
                "{}: no {split}.csv (pass --list)",
                data_dir.display()
            ))
        })?,
    };
    let text = read_text(&csv)?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| csv_fields(h))
        .ok_or_else(|| DataError::Layout(format!("{}: empty file", csv.display())))?;
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let path_col = col("Path")
        .ok_or_else(|| DataError::Layout(format!("{}: no 'Path' column", csv.display())))?;
    let view_col = col("Frontal/Lateral");
    let class_cols: Vec<usize> = CHEXPERT
        .iter()
        .map(|c| {
            col(c).ok_or_else(|| DataError::Layout(format!("{}: no '{c}' column", csv.display())))
        })
        .collect::<Result<_, _>>()?;
    let base = csv.parent().unwrap_or(data_dir).to_path_buf();
    let mut samples = Vec::new();
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    let mut skipped = 0;
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f = csv_fields(line);
        let problem = |what: String| Problem {
            file: csv.clone(),
            line: i + 1,
            what,
        };
        if f.len() != header.len() {
            problems.push(problem(format!(
                "{} fields, header has {}",
                f.len(),
                header.len()
            )));
            continue;
        }
        if let Some(v) = view_col
            && f[v].trim() != "Frontal"
        {
            skipped += 1;
            continue;
        }
        let mut labels = Vec::with_capacity(CHEXPERT.len());
        let mut bad = None;
        for (c, &ci) in CHEXPERT.iter().zip(&class_cols) {
            match f[ci].trim() {
                "" | "0" | "0.0" => labels.push(0.0),
                "1" | "1.0" => labels.push(1.0),
                "-1" | "-1.0" => labels.push(opts.policy.uncertain(c)),
                other => {
                    bad = Some(format!("{c}: '{other}' is not 1, 0, -1 or blank"));
                    break;
                }
            }
        }
        if let Some(b) = bad {
            problems.push(problem(b));
            continue;
        }
        let name = f[path_col].trim().to_string();
        let rel = PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(&name);
        let candidates: [PathBuf; 3] = [data_dir.join(rel), base.join(rel), data_dir.join(&name)];
        let sample = |path: PathBuf| Sample {
            name: name.clone(),
            path,
            labels: labels.clone(),
            line: i + 1,
        };
        match candidates.iter().find(|p| p.is_file()) {
            Some(p) => samples.push(sample(p.clone())),
            None => missing.push(sample(candidates[0].clone())),
        }
    }
    Ok(Split {
        kind: super::DatasetKind::Chexpert,
        list: csv,
        samples,
        missing,
        problems,
        skipped,
    })
}
