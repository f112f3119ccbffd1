//! `evax data check` and `evax data prepare`: the layout and counts the original's preparation
//! checks, what is missing or extra, ChestX-ray14 list labels against `Data_Entry`, and
//! linking the NIH download's image folders into one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{DataError, DatasetKind, ImageIndex, LoadOptions, Problem, cxr14, load_split};

/// One split's check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitCheck {
    /// Split name.
    pub split: String,
    /// The list file, if found.
    pub list: Option<String>,
    /// Rows read (usable + missing images).
    pub rows: usize,
    /// The count the original expects.
    pub expected: Option<usize>,
    /// Images found.
    pub found: usize,
    /// Images listed but not found (first few).
    pub missing: Vec<String>,
    /// Number missing.
    pub missing_count: usize,
    /// Malformed rows (first few).
    pub problems: Vec<String>,
    /// Number of malformed rows.
    pub problem_count: usize,
    /// Rows skipped by design (lateral views).
    pub skipped: usize,
    /// ChestX-ray14: rows whose list labels equal Data_Entry's / differ / are absent there.
    pub data_entry: Option<[usize; 3]>,
    /// Why the split could not be read at all.
    pub error: Option<String>,
}

/// The whole check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Dataset.
    pub dataset: String,
    /// Data folder.
    pub data_dir: String,
    /// Per split.
    pub splits: Vec<SplitCheck>,
    /// Image files under the data folder.
    pub images: usize,
    /// Images expected in all (ChestX-ray14: 112,120).
    pub images_expected: Option<usize>,
    /// Image files in no list (first few) and their number.
    pub extra: Vec<String>,
    /// Number of extra images.
    pub extra_count: usize,
    /// True when everything matched.
    pub ok: bool,
}

const SHOW: usize = 5;

/// Check a dataset folder against what the original expects.
pub fn check(
    kind: DatasetKind,
    data_dir: &Path,
    opts: &LoadOptions,
) -> Result<CheckReport, DataError> {
    if !data_dir.is_dir() {
        return Err(DataError::Layout(format!(
            "{}: not a folder",
            data_dir.display()
        )));
    }
    let index = ImageIndex::build(data_dir);
    let entry = match kind {
        DatasetKind::Cxr14 => match opts
            .data_entry
            .clone()
            .or_else(|| cxr14::find_data_entry(data_dir))
        {
            Some(p) => Some(cxr14::read_data_entry(&p)?.0),
            None => None,
        },
        _ => None,
    };
    let mut listed: HashSet<PathBuf> = HashSet::new();
    let mut splits = Vec::new();
    let mut ok = true;
    for &(split, expected) in kind.expected_counts() {
        if split == "images" {
            continue;
        }
        let mut c = SplitCheck {
            split: split.into(),
            list: None,
            rows: 0,
            expected: Some(expected),
            found: 0,
            missing: Vec::new(),
            missing_count: 0,
            problems: Vec::new(),
            problem_count: 0,
            skipped: 0,
            data_entry: None,
            error: None,
        };
        match load_split(
            kind,
            data_dir,
            split,
            None,
            &LoadOptions {
                strict: false,
                ..opts.clone()
            },
        ) {
            Ok(s) => {
                c.list = Some(s.list.display().to_string());
                c.rows = s.samples.len() + s.missing.len();
                c.found = s.samples.len();
                c.missing_count = s.missing.len();
                c.missing = s
                    .missing
                    .iter()
                    .take(SHOW)
                    .map(|m| m.name.clone())
                    .collect();
                c.problem_count = s.problems.len();
                c.problems = s
                    .problems
                    .iter()
                    .take(SHOW)
                    .map(Problem::to_string)
                    .collect();
                c.skipped = s.skipped;
                listed.extend(s.samples.iter().map(|x| x.path.clone()));
                if let Some(e) = &entry {
                    let mut counts = [0usize; 3];
                    for x in s.samples.iter().chain(&s.missing) {
                        match e.get(&x.name) {
                            Some(l) if *l == x.labels => counts[0] += 1,
                            Some(_) => counts[1] += 1,
                            None => counts[2] += 1,
                        }
                    }
                    ok &= counts[1] == 0 && counts[2] == 0;
                    c.data_entry = Some(counts);
                }
                // CheXpert's expected count is of all rows (both views).
                let rows = if kind == DatasetKind::Chexpert {
                    c.rows + c.skipped
                } else {
                    c.rows
                };
                ok &= rows == expected && c.missing_count == 0 && c.problem_count == 0;
            }
            Err(e) => {
                ok = false;
                c.error = Some(e.to_string());
            }
        }
        splits.push(c);
    }
    let images_expected = kind
        .expected_counts()
        .iter()
        .find(|(s, _)| *s == "images")
        .map(|&(_, n)| n);
    if let Some(n) = images_expected {
        ok &= index.len() == n;
    }
    let listed_names: HashSet<String> = listed
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let mut extra: Vec<String> = if kind == DatasetKind::Chexpert {
        Vec::new() // CheXpert names repeat across studies; extras are not meaningful by name.
    } else {
        index
            .names()
            .filter(|n| !listed_names.contains(*n))
            .cloned()
            .collect()
    };
    extra.sort();
    Ok(CheckReport {
        dataset: kind.name().into(),
        data_dir: data_dir.display().to_string(),
        splits,
        images: index.len(),
        images_expected,
        extra_count: extra.len(),
        extra: extra.into_iter().take(SHOW).collect(),
        ok,
    })
}

/// Link every ChestX-ray14 image found under `data_dir` (e.g. `images_001..012/images/`) into
/// `out/images/`, and the lists and `Data_Entry` beside it; nothing is copied. Returns the
/// number of images linked.
pub fn prepare_cxr14(data_dir: &Path, out: &Path) -> Result<usize, DataError> {
    let index = ImageIndex::build(data_dir);
    if index.is_empty() {
        return Err(DataError::Layout(format!(
            "{}: no images found",
            data_dir.display()
        )));
    }
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|e| DataError::Io(images.clone(), e))?;
    let mut n = 0;
    for name in index.names() {
        let src = std::fs::canonicalize(index.get(name).expect("listed"))
            .map_err(|e| DataError::Io(data_dir.join(name), e))?;
        let dst = images.join(name);
        if dst.exists() {
            n += 1;
            continue;
        }
        link(&src, &dst)?;
        n += 1;
    }
    let mut extras: Vec<PathBuf> = ["train", "val", "test"]
        .iter()
        .filter_map(|s| cxr14::find_list(data_dir, s))
        .collect();
    extras.extend(cxr14::find_data_entry(data_dir));
    for f in extras {
        let dst = out.join(f.file_name().expect("file"));
        if !dst.exists() {
            let src = std::fs::canonicalize(&f).map_err(|e| DataError::Io(f.clone(), e))?;
            link(&src, &dst)?;
        }
    }
    Ok(n)
}

fn link(src: &Path, dst: &Path) -> Result<(), DataError> {
    #[cfg(unix)]
    let r = std::os::unix::fs::symlink(src, dst);
    #[cfg(not(unix))]
    let r = std::fs::hard_link(src, dst);
    r.map_err(|e| DataError::Io(dst.to_path_buf(), e))
}

/// The report as text (what `evax data check` prints).
pub fn render_text(r: &CheckReport) -> String {
    let mut out = String::new();
    w!(
        out,
        "{} in {}: {} image files",
        r.dataset,
        r.data_dir,
        r.images
    );
    if let Some(n) = r.images_expected {
        w!(
            out,
            "  images: {} (the original expects {n}){}",
            r.images,
            if r.images == n { "" } else { "  MISMATCH" }
        );
    }
    for s in &r.splits {
        match &s.error {
            Some(e) => w!(out, "  {}: {e}", s.split),
            None => {
                w!(
                    out,
                    "  {}: {} rows in {} (expected {}), {} images found, {} missing, {} malformed rows{}",
                    s.split,
                    s.rows + s.skipped,
                    s.list.as_deref().unwrap_or("?"),
                    s.expected.map_or("?".into(), |n| n.to_string()),
                    s.found,
                    s.missing_count,
                    s.problem_count,
                    if s.skipped > 0 {
                        format!(", {} lateral views skipped", s.skipped)
                    } else {
                        String::new()
                    }
                );
                for m in &s.missing {
                    w!(out, "    missing {m}");
                }
                for p in &s.problems {
                    w!(out, "    {p}");
                }
                if let Some([same, differ, absent]) = s.data_entry {
                    w!(
                        out,
                        "    labels vs Data_Entry: {same} agree, {differ} differ, {absent} not in Data_Entry"
                    );
                }
            }
        }
    }
    if r.extra_count > 0 {
        w!(
            out,
            "  {} images are in no list, e.g. {}",
            r.extra_count,
            r.extra.join(", ")
        );
    }
    w!(out, "{}", if r.ok { "OK" } else { "NOT OK: see above" });
    out
}
