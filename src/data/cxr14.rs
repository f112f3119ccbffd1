//! ChestX-ray14: the original's list files (`name l1 ... l14`), name-only lists with labels from
//! NIH's `Data_Entry_2017*.csv` (findings separated by `|`, "No Finding" = all zeros), images in
//! one folder or in the NIH download's `images_001..012/images/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{
    DataError, ImageIndex, LoadOptions, Problem, Sample, Split, csv_fields, find_file, read_text,
};
use crate::labels::CXR14;

/// Label vectors by image name.
pub type LabelMap = HashMap<String, Vec<f32>>;

/// Label vectors by image name from `Data_Entry_2017*.csv[.gz]`, and its bad rows.
pub fn read_data_entry(path: &Path) -> Result<(LabelMap, Vec<Problem>), DataError> {
    let text = read_text(path)?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| csv_fields(h))
        .ok_or_else(|| DataError::Layout(format!("{}: empty file", path.display())))?;
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(ci), Some(cf)) = (col("Image Index"), col("Finding Labels")) else {
        return Err(DataError::Layout(format!(
            "{}: header lacks 'Image Index' and 'Finding Labels'",
            path.display()
        )));
    };
    let mut map = HashMap::new();
    let mut problems = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f = csv_fields(line);
        let problem = |what: String| Problem {
            file: path.to_path_buf(),
            line: i + 1,
            what,
        };
        let (Some(name), Some(findings)) = (f.get(ci), f.get(cf)) else {
            problems.push(problem(format!(
                "{} fields, header has {}",
                f.len(),
                header.len()
            )));
            continue;
        };
        let mut v = vec![0f32; CXR14.len()];
        let mut ok = true;
        for finding in findings.split('|').map(str::trim) {
            if finding == "No Finding" {
                continue;
            }
            match CXR14.iter().position(|c| *c == finding) {
                Some(c) => v[c] = 1.0,
                None => {
                    problems.push(problem(format!("unknown finding '{finding}'")));
                    ok = false;
                }
            }
        }
        if ok {
            map.insert(name.trim().to_string(), v);
        }
    }
    Ok((map, problems))
}

/// One parsed list row.
type Row = (String, Option<Vec<f32>>, usize);

/// Parse a list: `name l1 ... l14`, or `name` alone (labels to come from `Data_Entry`).
pub fn parse_list(path: &Path, text: &str) -> (Vec<Row>, Vec<Problem>) {
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let problem = |what: String| Problem {
            file: path.to_path_buf(),
            line: i + 1,
            what,
        };
        match f.len() {
            1 => rows.push((f[0].to_string(), None, i + 1)),
            n if n == CXR14.len() + 1 => {
                let labels: Result<Vec<f32>, String> = f[1..]
                    .iter()
                    .map(|v| match *v {
                        "0" => Ok(0.0),
                        "1" => Ok(1.0),
                        other => Err(format!("label '{other}' is not 0 or 1")),
                    })
                    .collect();
                match labels {
                    Ok(l) => rows.push((f[0].to_string(), Some(l), i + 1)),
                    Err(e) => problems.push(problem(e)),
                }
            }
            n => problems.push(problem(format!(
                "expected an image name and {} labels, found {n} fields",
                CXR14.len()
            ))),
        }
    }
    (rows, problems)
}

/// The `Data_Entry_2017*.csv[.gz]` in `data_dir`, if any.
pub fn find_data_entry(data_dir: &Path) -> Option<PathBuf> {
    let names = [
        "Data_Entry_2017_v2020.csv",
        "Data_Entry_2017_v2020.csv.gz",
        "Data_Entry_2017.csv",
        "Data_Entry_2017.csv.gz",
    ];
    find_file(data_dir, &names.map(String::from))
}

/// The usual list file of a split in `data_dir`.
pub fn find_list(data_dir: &Path, split: &str) -> Option<PathBuf> {
    find_file(
        data_dir,
        &[
            format!("{split}_official.txt"),
            format!("splits/{split}_official.txt"),
            format!("data_splits/{split}_official.txt"),
            format!("{split}_list.txt"),
            format!("{split}.txt"),
        ],
    )
}

/// Load a ChestX-ray14 split.
pub fn load(
    data_dir: &Path,
    split: &str,
    list: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Split, DataError> {
    let list = match list {
        Some(l) => l.to_path_buf(),
        None => find_list(data_dir, split).ok_or_else(|| {
            DataError::Layout(format!(
                "{}: no list for split '{split}' (looked for {split}_official.txt, splits/{split}_official.txt, \
                 {split}_list.txt, {split}.txt); pass --list",
                data_dir.display()
            ))
        })?,
    };
    let text = read_text(&list)?;
    let (rows, mut problems) = parse_list(&list, &text);
    let need_entry = rows.iter().any(|r| r.1.is_none());
    let entry_path = opts
        .data_entry
        .clone()
        .or_else(|| find_data_entry(data_dir));
    let entry = match (&entry_path, need_entry) {
        (Some(p), true) => Some(read_data_entry(p)?.0),
        (None, true) => {
            return Err(DataError::Layout(format!(
                "{}: lists image names without labels and no Data_Entry_2017*.csv was found in {} (pass --data-entry)",
                list.display(),
                data_dir.display()
            )));
        }
        _ => None,
    };
    let index = ImageIndex::build(data_dir);
    let mut samples = Vec::new();
    let mut missing = Vec::new();
    for (name, labels, line) in rows {
        // The list's own labels win; name-only rows take Data_Entry's.
        let labels = labels.or_else(|| entry.as_ref().and_then(|e| e.get(&name).cloned()));
        let Some(labels) = labels else {
            problems.push(Problem {
                file: list.clone(),
                line,
                what: format!("{name} is not in the Data_Entry file"),
            });
            continue;
        };
        match index.get(&name) {
            Some(p) => samples.push(Sample {
                name,
                path: p.clone(),
                labels,
                line,
            }),
            None => missing.push(Sample {
                path: data_dir.join(&name),
                name,
                labels,
                line,
            }),
        }
    }
    Ok(Split {
        kind: super::DatasetKind::Cxr14,
        list,
        samples,
        missing,
        problems,
        skipped: 0,
    })
}
