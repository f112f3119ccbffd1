//! Batch inference over image files: input discovery, parallel preprocessing, batching, and a
//! record of the inputs that failed (a bad file never stops the run).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::preprocess::Preprocess;

/// File extensions taken as images when walking a folder.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "dcm", "dicom"];
/// File extensions taken as lists of inputs (one path a line, first field).
pub const LIST_EXTENSIONS: [&str; 3] = ["txt", "lst", "list"];

/// An input that could not be used, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// The path as given or found.
    pub input: PathBuf,
    /// What went wrong.
    pub error: String,
}

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, failures: &mut Vec<Failure>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            failures.push(Failure {
                input: dir.to_path_buf(),
                error: format!("cannot list folder: {e}"),
            });
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            walk(&p, out, failures);
        } else if has_ext(&p, &IMAGE_EXTENSIONS) {
            out.push(p);
        }
    }
}

/// Expand command-line inputs: image files as given, folders walked (sorted, recursive, image
/// extensions only), list files read (first field of each non-empty line; relative paths
/// resolved against the list's folder when they do not exist as given).
pub fn collect_inputs(args: &[PathBuf]) -> (Vec<PathBuf>, Vec<Failure>) {
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for a in args {
        if a.is_dir() {
            walk(a, &mut out, &mut failures);
        } else if has_ext(a, &LIST_EXTENSIONS) {
            match std::fs::read_to_string(a) {
                Ok(text) => {
                    let base = a.parent().unwrap_or(Path::new("."));
                    for line in text.lines() {
                        let Some(first) = line.split_whitespace().next() else {
                            continue;
                        };
                        let p = PathBuf::from(first);
                        out.push(if p.is_relative() && !p.exists() {
                            base.join(p)
                        } else {
                            p
                        });
                    }
                }
                Err(e) => failures.push(Failure {
                    input: a.clone(),
                    error: format!("cannot read list file: {e}"),
                }),
            }
        } else {
            out.push(a.clone());
        }
    }
    (out, failures)
}

/// A progress bar for `n` items on stderr (hidden when stderr is not a terminal).
pub fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta}}, {{per_sec}}]"
        ))
        .expect("static template"),
    );
    pb
}

/// One preprocessed batch.
pub struct Batch {
    /// Positions (in the input list) of the images that loaded, in order.
    pub positions: Vec<usize>,
    /// Their `[n, 3, H, W]` data.
    pub data: Vec<f32>,
    /// Inputs of this batch that failed.
    pub failures: Vec<Failure>,
    /// Inputs this batch covered (loaded or failed).
    pub covered: usize,
}

/// Batches of preprocessed images, decoded in parallel on a background thread while the caller
/// works on the previous batch. At most `PREFETCH` batches wait in memory; batches arrive in
/// input order.
pub fn batches(
    inputs: Vec<(usize, PathBuf)>,
    pre: Preprocess,
    batch: usize,
) -> impl Iterator<Item = Batch> {
    let plane = 3 * pre.size.0 * pre.size.1;
    batches_with(inputs, batch, plane, move |p| {
        pre.load(p).map_err(|e| e.what)
    })
}

/// [`batches`] with any loader returning `plane` values per image. A loader that panics fails
/// that image only; should the background thread stop anyway, every input it did not cover
/// arrives as a failure, so a run can never end short without saying so.
pub fn batches_with(
    inputs: Vec<(usize, PathBuf)>,
    batch: usize,
    plane: usize,
    load: impl Fn(&Path) -> Result<Vec<f32>, String> + Send + Sync + 'static,
) -> impl Iterator<Item = Batch> {
    const PREFETCH: usize = 2;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(PREFETCH);
    let all = inputs.clone();
    std::thread::spawn(move || {
        for chunk in inputs.chunks(batch.max(1)) {
            let loaded: Vec<_> = chunk
                .par_iter()
                .map(|(_, p)| crate::guard::guarded("the image decoder failed", || load(p)))
                .collect();
            let mut b = Batch {
                positions: Vec::with_capacity(chunk.len()),
                data: Vec::with_capacity(chunk.len() * plane),
                failures: Vec::new(),
                covered: chunk.len(),
            };
            for ((i, p), r) in chunk.iter().zip(loaded) {
                match r {
                    Ok(v) if v.len() == plane => {
                        b.positions.push(*i);
                        b.data.extend_from_slice(&v);
                    }
                    Ok(v) => b.failures.push(Failure {
                        input: p.clone(),
                        error: format!("preprocessing gave {} values, {plane} expected", v.len()),
                    }),
                    Err(error) => b.failures.push(Failure {
                        input: p.clone(),
                        error,
                    }),
                }
            }
            if tx.send(b).is_err() {
                return; // the consumer stopped
            }
        }
    });
    let mut covered = 0;
    let mut ended = false;
    let mut rx = rx.into_iter();
    std::iter::from_fn(move || {
        if ended {
            return None;
        }
        match rx.next() {
            Some(b) => {
                covered += b.covered;
                Some(b)
            }
            None => {
                ended = true;
                let rest = &all[covered.min(all.len())..];
                (!rest.is_empty()).then(|| Batch {
                    positions: Vec::new(),
                    data: Vec::new(),
                    failures: rest
                        .iter()
                        .map(|(_, p)| Failure {
                            input: p.clone(),
                            error: "not processed: the preprocessing thread stopped".into(),
                        })
                        .collect(),
                    covered: rest.len(),
                })
            }
        }
    })
}

/// Decode and preprocess `inputs` in batches of `batch` (in parallel, prefetched), calling `run`
/// with the positions (in `inputs`) of the images that loaded and their `[n, 3, H, W]` batch
/// on `device`.
/// Returns the inputs that failed, in order.
pub fn for_each_batch(
    inputs: &[PathBuf],
    pre: &Preprocess,
    batch: usize,
    device: &Device,
    pb: &ProgressBar,
    mut run: impl FnMut(&[usize], Tensor) -> Result<(), String>,
) -> Vec<Failure> {
    let (h, w) = pre.size;
    let mut failures = Vec::new();
    let indexed: Vec<(usize, PathBuf)> = inputs.iter().cloned().enumerate().collect();
    for b in batches(indexed, *pre, batch) {
        failures.extend(b.failures);
        if !b.positions.is_empty() {
            let n = b.positions.len();
            let result = Tensor::from_vec(b.data, (n, 3, h, w), device)
                .map_err(|e| e.to_string())
                .and_then(|x| run(&b.positions, x));
            if let Err(e) = result {
                failures.extend(b.positions.iter().map(|&i| Failure {
                    input: inputs[i].clone(),
                    error: e.clone(),
                }));
            }
        }
        pb.inc(b.covered as u64);
    }
    pb.finish_and_clear();
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decoder_fails_its_image_only() {
        let inputs: Vec<(usize, PathBuf)> = (0..7)
            .map(|i| (i, PathBuf::from(format!("img{i}.png"))))
            .collect();
        let got: Vec<Batch> = batches_with(inputs, 3, 2, |p| {
            if p.to_str() == Some("img4.png") {
                panic!("decoder bug");
            }
            Ok(vec![1.0, 2.0])
        })
        .collect();
        let positions: Vec<usize> = got.iter().flat_map(|b| b.positions.clone()).collect();
        let failures: Vec<&Failure> = got.iter().flat_map(|b| &b.failures).collect();
        assert_eq!(positions, vec![0, 1, 2, 3, 5, 6]);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].input, PathBuf::from("img4.png"));
        assert!(
            failures[0].error.contains("decoder bug"),
            "{}",
            failures[0].error
        );
        assert_eq!(got.iter().map(|b| b.covered).sum::<usize>(), 7);
    }

    #[test]
    fn a_wrong_sized_result_fails_its_image() {
        let inputs: Vec<(usize, PathBuf)> =
            (0..3).map(|i| (i, PathBuf::from(format!("{i}")))).collect();
        let got: Vec<Batch> = batches_with(inputs, 2, 2, |_| Ok(vec![0.0])).collect();
        let failures: Vec<&Failure> = got.iter().flat_map(|b| &b.failures).collect();
        assert_eq!(failures.len(), 3);
        assert!(failures[0].error.contains("1 values, 2 expected"));
    }
}
