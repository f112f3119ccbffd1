//! COVIDx CXR-3 / CXR-4 lists: `patient_id filename label source`, 3 classes (normal,
//! pneumonia, COVID-19) or 2 (negative, positive); images in `<split>/` or anywhere below the
//! data folder.

use std::path::Path;

use super::{
    DataError, DatasetKind, ImageIndex, LoadOptions, Problem, Sample, Split, find_file, read_text,
};

/// Load a COVIDx split (`train`, `test`, `val`).
pub fn load(
    kind: DatasetKind,
    data_dir: &Path,
    split: &str,
    list: Option<&Path>,
    _opts: &LoadOptions,
) -> Result<Split, DataError> {
    let list = match list {
        Some(l) => l.to_path_buf(),
        None => find_file(
            data_dir,
            &[
                format!("{split}.txt"),
                format!("{split}_COVIDx9A.txt"),
                format!("{split}_COVIDx8A.txt"),
                format!("{split}_split.txt"),
            ],
        )
        .ok_or_else(|| {
            DataError::Layout(format!(
                "{}: no {split}.txt list (pass --list)",
                data_dir.display()
            ))
        })?,
    };
    let classes = kind.classes();
    let text = read_text(&list)?;
    let mut index: Option<ImageIndex> = None;
    let mut samples = Vec::new();
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let problem = |what: String| Problem {
            file: list.clone(),
            line: i + 1,
            what,
        };
        if f.len() != 4 {
            problems.push(problem(format!(
                "expected 'patient_id filename label source', found {} fields",
                f.len()
            )));
            continue;
        }
        let Some(c) = classes.iter().position(|c| c.eq_ignore_ascii_case(f[2])) else {
            problems.push(problem(format!(
                "unknown label '{}' (expected {})",
                f[2],
                classes.join(", ")
            )));
            continue;
        };
        let mut labels = vec![0f32; classes.len()];
        labels[c] = 1.0;
        let name = f[1].to_string();
        let direct = data_dir.join(split).join(&name);
        let path = if direct.is_file() {
            Some(direct.clone())
        } else {
            index
                .get_or_insert_with(|| ImageIndex::build(data_dir))
                .get(&name)
                .cloned()
        };
        let s = |path| Sample {
            name: name.clone(),
            path,
            labels: labels.clone(),
            line: i + 1,
        };
        match path {
            Some(p) => samples.push(s(p)),
            None => missing.push(s(direct)),
        }
    }
    Ok(Split {
        kind,
        list,
        samples,
        missing,
        problems,
        skipped: 0,
    })
}
