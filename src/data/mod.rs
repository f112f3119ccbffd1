//! The benchmark datasets, read from the original's own files (REFERENCE.md 4): ChestX-ray14
//! lists and `Data_Entry_2017*.csv`, CheXpert's `train.csv` / `valid.csv`, COVIDx CXR-3 / CXR-4
//! lists. Bad rows are reported with file and line; missing images are listed, not fatal.

pub mod check;
pub mod chexpert;
pub mod covidx;
pub mod cxr14;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::labels::{self, Activation};

/// The datasets evax knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// NIH ChestX-ray14, 14 findings, multi-label.
    Cxr14,
    /// CheXpert v1.0(-small), 5 competition observations, multi-label.
    Chexpert,
    /// COVIDx CXR-3, 3 classes.
    Covidx3,
    /// COVIDx CXR-4, 2 classes.
    Covidx4,
}

impl DatasetKind {
    /// From `cxr14`, `chexpert`, `covidx3`, `covidx4`.
    pub fn parse(s: &str) -> crate::Result<Self> {
        Ok(match s {
            "cxr14" => Self::Cxr14,
            "chexpert" => Self::Chexpert,
            "covidx3" => Self::Covidx3,
            "covidx4" => Self::Covidx4,
            _ => {
                return Err(crate::Error::Invalid(format!(
                    "unknown dataset '{s}' (cxr14, chexpert, covidx3, covidx4)"
                )));
            }
        })
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cxr14 => "cxr14",
            Self::Chexpert => "chexpert",
            Self::Covidx3 => "covidx3",
            Self::Covidx4 => "covidx4",
        }
    }

    /// Class names in head order.
    pub fn classes(self) -> Vec<String> {
        let c: &[&str] = match self {
            Self::Cxr14 => &labels::CXR14,
            Self::Chexpert => &labels::CHEXPERT,
            Self::Covidx3 => &labels::COVIDX3,
            Self::Covidx4 => &labels::COVIDX2,
        };
        c.iter().map(|s| s.to_string()).collect()
    }

    /// True for single-label (COVIDx) datasets.
    pub fn single_label(self) -> bool {
        matches!(self, Self::Covidx3 | Self::Covidx4)
    }

    /// How predictions are reported for this dataset (`predict`'s rule).
    pub fn activation(self) -> Activation {
        if self.single_label() {
            Activation::Softmax
        } else {
            Activation::Sigmoid
        }
    }

    /// Line counts of the original's splits, as its preparation checks them.
    pub fn expected_counts(self) -> &'static [(&'static str, usize)] {
        match self {
            Self::Cxr14 => &[
                ("train", 75_312),
                ("val", 11_212),
                ("test", 25_596),
                ("images", 112_120),
            ],
            Self::Chexpert => &[("valid", 234)],
            Self::Covidx3 => &[("train", 30_483), ("test", 400)],
            Self::Covidx4 => &[("train", 67_863), ("val", 8_473)],
        }
    }
}

/// A problem in a list or CSV file, with where it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.what)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.what)
        }
    }
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image as the list names it.
    pub name: String,
    /// Where it was found (or would be).
    pub path: PathBuf,
    /// Label vector (0/1; NaN where a label is to be ignored).
    pub labels: Vec<f32>,
    /// Line in the list file.
    pub line: usize,
}

/// A split of a dataset, read and resolved.
#[derive(Debug, Clone)]
pub struct Split {
    /// The dataset.
    pub kind: DatasetKind,
    /// The list / CSV file.
    pub list: PathBuf,
    /// Samples whose image exists, in list order.
    pub samples: Vec<Sample>,
    /// Samples whose image was not found.
    pub missing: Vec<Sample>,
    /// Rows that could not be read.
    pub problems: Vec<Problem>,
    /// Rows skipped by design (e.g. CheXpert lateral views).
    pub skipped: usize,
}

/// Why a split could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The layout is not what the dataset needs.
    #[error("{0}")]
    Layout(String),
    /// Rows are malformed and `--strict` was asked for (or nothing usable remains).
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Rows(Vec<Problem>),
}

/// Options for reading a split.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// CheXpert uncertainty policy.
    pub policy: chexpert::UncertaintyPolicy,
    /// ChestX-ray14 labels from this `Data_Entry_2017*.csv[.gz]` instead of the list's columns.
    pub data_entry: Option<PathBuf>,
    /// Missing images and bad rows are errors.
    pub strict: bool,
}

/// Read a text file (transparently gunzipping `.gz`).
pub fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Io(path.to_path_buf(), e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(|e| DataError::Io(path.to_path_buf(), e))?;
        Ok(s)
    } else {
        String::from_utf8(bytes).map_err(|_| {
            DataError::Io(
                path.to_path_buf(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
            )
        })
    }
}

/// Image files under a folder, by file name (any depth: the NIH download's
/// `images_001..012/images/` layout included, without copying).
#[derive(Debug, Default)]
pub struct ImageIndex {
    by_name: HashMap<String, PathBuf>,
    /// File names found more than once (the first is used).
    pub duplicates: Vec<String>,
}

impl ImageIndex {
    /// Walk `dir` for image files.
    pub fn build(dir: &Path) -> Self {
        let (paths, _) = crate::infer::collect_inputs(&[dir.to_path_buf()]);
        let mut idx = ImageIndex::default();
        for p in paths {
            if let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) {
                match idx.by_name.entry(name) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        idx.duplicates.push(e.key().clone())
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(p);
                    }
                }
            }
        }
        idx
    }

    /// The path of an image by file name.
    pub fn get(&self, name: &str) -> Option<&PathBuf> {
        self.by_name.get(name)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when no image was found.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// All file names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }
}

/// The first of `candidates` (relative to `dir`) that exists.
pub fn find_file(dir: &Path, candidates: &[String]) -> Option<PathBuf> {
    candidates.iter().map(|c| dir.join(c)).find(|p| p.is_file())
}

/// Load a split of a dataset: `list` if given, else the split's usual file in `data_dir`.
pub fn load_split(
    kind: DatasetKind,
    data_dir: &Path,
    split: &str,
    list: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Split, DataError> {
    if !data_dir.is_dir() {
        return Err(DataError::Layout(format!(
            "{}: not a folder",
            data_dir.display()
        )));
    }
    let result = match kind {
        DatasetKind::Cxr14 => cxr14::load(data_dir, split, list, opts),
        DatasetKind::Chexpert => chexpert::load(data_dir, split, list, opts),
        DatasetKind::Covidx3 | DatasetKind::Covidx4 => {
            covidx::load(kind, data_dir, split, list, opts)
        }
    }?;
    if opts.strict && (!result.problems.is_empty() || !result.missing.is_empty()) {
        let mut p = result.problems.clone();
        p.extend(result.missing.iter().map(|s| Problem {
            file: result.list.clone(),
            line: s.line,
            what: format!("image {} not found", s.name),
        }));
        return Err(DataError::Rows(p));
    }
    Ok(result)
}

/// Indices of a `data_pct` subset: a seeded random `pct` of `0..n` (at least one), repeated in
/// order until the epoch has `n` entries again (length `subset / pct`), as the original trains
/// on COVIDx 1 % and 10 %.
pub fn data_pct_indices(n: usize, pct: f64, seed: u64) -> Vec<usize> {
    if pct >= 1.0 || n == 0 {
        return (0..n).collect();
    }
    let k = ((n as f64 * pct) as usize).max(1);
    let mut all: Vec<usize> = (0..n).collect();
    crate::rng::Rng::new(seed).shuffle(&mut all);
    let mut subset = all[..k].to_vec();
    subset.sort_unstable();
    let len = (k as f64 / pct).round() as usize;
    subset.iter().copied().cycle().take(len).collect()
}

/// Per-class prevalence of a split (positives, labelled rows).
pub fn prevalence(samples: &[Sample], classes: usize) -> Vec<(usize, usize)> {
    let mut out = vec![(0usize, 0usize); classes];
    for s in samples {
        for (c, &v) in s.labels.iter().enumerate().take(classes) {
            if !v.is_nan() {
                out[c].1 += 1;
                if v > 0.5 {
                    out[c].0 += 1;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_pct_is_seeded_and_keeps_epoch_length() {
        let a = data_pct_indices(1000, 0.01, 0);
        assert_eq!(a.len(), 1000);
        assert_eq!(a, data_pct_indices(1000, 0.01, 0));
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 10);
        assert_ne!(a, data_pct_indices(1000, 0.01, 1));
        assert_eq!(data_pct_indices(5, 1.0, 0), vec![0, 1, 2, 3, 4]);
    }
}

/// Split one CSV line into fields (double-quoted fields may hold commas and `""`).
pub fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches(['\r', '\n']).chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod csv_tests {
    #[test]
    fn quoted_fields() {
        assert_eq!(
            super::csv_fields("a,\"b,c\",\"d\"\"e\",\r"),
            vec!["a", "b,c", "d\"e", ""]
        );
    }
}

impl DatasetKind {
    /// The split `evax eval` uses by default: test for cxr14 and covidx3, valid for chexpert,
    /// val for covidx4.
    pub fn default_eval_split(self) -> &'static str {
        match self {
            DatasetKind::Cxr14 | DatasetKind::Covidx3 => "test",
            DatasetKind::Chexpert => "valid",
            DatasetKind::Covidx4 => "val",
        }
    }
}

/// What reading a split had to skip, as lines for people: bad rows, then missing images
/// (at most `limit` of those, then a count).
pub fn split_warnings(s: &Split, limit: usize) -> Vec<String> {
    let mut out: Vec<String> = s.problems.iter().map(|p| format!("bad row: {p}")).collect();
    for m in s.missing.iter().take(limit) {
        out.push(format!(
            "missing: {} ({}:{})",
            m.path.display(),
            s.list.display(),
            m.line
        ));
    }
    if s.missing.len() > limit {
        out.push(format!("missing: ... and {} more", s.missing.len() - limit));
    }
    out
}

/// Label prevalence per class of a split as a Markdown table (what `evax data stats` prints);
/// missing images are counted too.
pub fn stats_text(s: &Split) -> String {
    let classes = s.kind.classes();
    let mut out = String::new();
    w!(
        out,
        "{} ({} images{})",
        s.list.display(),
        s.samples.len(),
        if s.missing.is_empty() {
            String::new()
        } else {
            format!(", {} missing images counted too", s.missing.len())
        }
    );
    let all: Vec<Sample> = s.samples.iter().chain(&s.missing).cloned().collect();
    w!(
        out,
        "| class | positives | labelled | prevalence |\n|---|---|---|---|"
    );
    for (c, (pos, n)) in classes.iter().zip(prevalence(&all, classes.len())) {
        w!(
            out,
            "| {c} | {pos} | {n} | {:.2} % |",
            100.0 * pos as f64 / n.max(1) as f64
        );
    }
    out
}
