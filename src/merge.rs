//! `evax merge`: the parts of a sharded run ([`crate::shard`]) put back together as one run
//! writes them: predictions concatenated in input order, an evaluation's labels and scores
//! joined and its metrics (bootstrap intervals included) recomputed on the union.

use std::path::{Path, PathBuf};

use crate::data::DatasetKind;
use crate::eval::{EvalReport, ReportSettings, report, write_outputs};
use crate::infer::Failure;
use crate::predict::Prediction;
use crate::shard::{Manifest, manifest_path, read_manifest};
use crate::{Error, Result};

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The sharded command (`eval`, `predict`).
    pub command: String,
    /// Parts joined.
    pub parts: usize,
    /// Rows (images) in the merged output.
    pub rows: usize,
    /// The evaluation's report, for `eval`.
    pub eval: Option<EvalReport>,
}

/// Join the parts at `inputs` (each an output folder or file of one shard, any order) into
/// `output` (a folder for `eval`, a `.csv` / `.json` file for `predict`).
pub fn merge(inputs: &[PathBuf], output: &Path) -> Result<MergeReport> {
    let mut parts: Vec<(Manifest, PathBuf)> = inputs
        .iter()
        .map(|p| {
            let m = manifest_path(p, p.is_dir());
            read_manifest(&m).map(|man| (man, p.clone()))
        })
        .collect::<Result<_>>()?;
    check_parts(&mut parts)?;
    let command = parts[0].0.command.clone();
    match command.as_str() {
        "eval" => merge_eval(&parts, output),
        "predict" => merge_predict(&parts, output),
        "embed" => merge_embed(&parts, output),
        "cam" => merge_cam(&parts, output),
        c => Err(Error::Invalid(format!(
            "{}: shards of '{c}' cannot be merged",
            parts[0].1.display()
        ))),
    }
}

/// The parts must be one run's: the same command, settings and total, every index once, their
/// rows tiling the whole list. Sorts them by index.
fn check_parts(parts: &mut [(Manifest, PathBuf)]) -> Result<()> {
    let Some((first, first_path)) = parts.first().cloned() else {
        return Err(Error::Invalid(
            "nothing to merge: give the shards' outputs".into(),
        ));
    };
    for (m, p) in parts.iter() {
        let differs = |what: &str| {
            Error::Invalid(format!(
                "{} and {} are not parts of one run: their {what} differ",
                first_path.display(),
                p.display()
            ))
        };
        if m.command != first.command {
            return Err(differs("commands"));
        }
        if m.shard.count != first.shard.count || m.total != first.total {
            return Err(differs("shard counts or input totals"));
        }
        if m.settings != first.settings {
            return Err(differs("settings (checkpoint, list or options)"));
        }
    }
    parts.sort_by_key(|(m, _)| m.shard.index);
    let n = first.shard.count;
    let have: Vec<usize> = parts.iter().map(|(m, _)| m.shard.index).collect();
    if have != (0..n).collect::<Vec<_>>() {
        let mut problems: Vec<String> = (0..n)
            .filter(|k| have.iter().filter(|h| *h == k).count() > 1)
            .map(|k| format!("{k}/{n} given twice"))
            .collect();
        problems.extend(
            (0..n)
                .filter(|k| !have.contains(k))
                .map(|k| format!("missing {k}/{n}")),
        );
        return Err(Error::Invalid(format!(
            "the run has {n} shards; given {have:?}: {}",
            problems.join(", ")
        )));
    }
    let mut next = 0;
    for (m, p) in parts.iter() {
        if m.rows[0] != next || m.rows[1] < m.rows[0] {
            return Err(Error::Invalid(format!(
                "{}: rows {:?} do not follow row {next}",
                p.display(),
                m.rows
            )));
        }
        next = m.rows[1];
    }
    if next != first.total {
        return Err(Error::Invalid(format!(
            "the shards cover {next} of {} rows",
            first.total
        )));
    }
    Ok(())
}

fn merge_eval(parts: &[(Manifest, PathBuf)], out_dir: &Path) -> Result<MergeReport> {
    let settings: ReportSettings = serde_json::from_value(parts[0].0.settings.clone())
        .map_err(|e| Error::Invalid(format!("{}: settings: {e}", parts[0].1.display())))?;
    let kind = DatasetKind::parse(&settings.dataset)?;
    let k = kind.classes().len();
    let (mut y_gt, mut y_pred, mut skipped, mut rows) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (_, dir) in parts {
        let read = |name: &str| -> Result<Vec<f32>> {
            let (shape, v) = crate::io::read_npy_f32(&dir.join(name))?;
            if shape.len() != 2 || shape[1] != k {
                return Err(Error::Invalid(format!(
                    "{}: shape {shape:?}, expected [rows, {k}]",
                    dir.join(name).display()
                )));
            }
            Ok(v)
        };
        let (g, p) = (read("y_gt.npy")?, read("y_pred.npy")?);
        if g.len() != p.len() {
            return Err(Error::Invalid(format!(
                "{}: y_gt.npy and y_pred.npy have different row counts",
                dir.display()
            )));
        }
        rows += g.len() / k.max(1);
        y_gt.extend(g);
        y_pred.extend(p);
        let metrics = dir.join("metrics.json");
        let bytes = std::fs::read(&metrics).map_err(|e| Error::io(&metrics, e))?;
        #[derive(serde::Deserialize)]
        struct Skipped {
            skipped: Vec<Failure>,
        }
        let s: Skipped = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("{}: {e}", metrics.display())))?;
        skipped.extend(s.skipped);
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let r = report(&settings, kind, (&y_gt, &y_pred, rows), skipped, 0);
    write_outputs(out_dir, &r, &y_gt, &y_pred)?;
    Ok(MergeReport {
        command: "eval".into(),
        parts: parts.len(),
        rows,
        eval: Some(r),
    })
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The output's extension, which every part must share.
fn same_extension(parts: &[(Manifest, PathBuf)], output: &Path) -> Result<String> {
    let want = extension(output);
    if let Some((_, p)) = parts.iter().find(|(_, p)| extension(p) != want) {
        return Err(Error::Invalid(format!(
            "{}: merging into .{want} needs .{want} parts",
            p.display()
        )));
    }
    Ok(want)
}

/// Grad-CAM folders: every part's maps and overlays copied into one folder, `cams.json`
/// joined in input order.
fn merge_cam(parts: &[(Manifest, PathBuf)], out_dir: &Path) -> Result<MergeReport> {
    use crate::explain::jobs::CamRecord;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut records: Vec<CamRecord> = Vec::new();
    let mut inputs = 0;
    for (m, dir) in parts {
        let index = dir.join("cams.json");
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let part: Vec<CamRecord> = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", index.display())))?;
        for r in &part {
            for f in std::iter::once(&r.cam).chain(r.overlay.as_ref()) {
                if f.contains(['/', '\\']) || f.starts_with('.') {
                    return Err(Error::Invalid(format!(
                        "{}: '{f}' is not a file name of the folder",
                        index.display()
                    )));
                }
                let (from, to) = (dir.join(f), out_dir.join(f));
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                crate::io::write_atomic(&to, &bytes).map_err(|e| Error::io(&to, e))?;
            }
        }
        inputs += m.rows[1] - m.rows[0];
        records.extend(part);
    }
    let index = out_dir.join("cams.json");
    crate::io::write_atomic(&index, &serde_json::to_vec_pretty(&records)?)
        .map_err(|e| Error::io(&index, e))?;
    Ok(MergeReport {
        command: "cam".into(),
        parts: parts.len(),
        rows: inputs,
        eval: None,
    })
}

/// An f32 array: shape and values.
type Array = (Vec<usize>, Vec<f32>);

/// Embeddings: every tensor concatenated along the image axis, the input lists joined.
fn merge_embed(parts: &[(Manifest, PathBuf)], output: &Path) -> Result<MergeReport> {
    let want = same_extension(parts, output)?;
    let settings = &parts[0].0.settings;
    let mut names = vec!["pooled".to_string()];
    if settings["tokens"].as_bool() == Some(true) {
        names.push("tokens".into());
    }
    if let Some(layers) = settings["layers"].as_array() {
        names.extend(
            layers
                .iter()
                .filter_map(|l| l.as_str())
                .map(|l| format!("layer.{l}")),
        );
    }
    let mut joined: Vec<Array> = vec![(Vec::new(), Vec::new()); names.len()];
    let mut inputs: Vec<String> = Vec::new();
    for (_, p) in parts {
        let (tensors, part_inputs): (Vec<Array>, Vec<String>) = if want == "safetensors" {
            let ck = crate::checkpoint::Checkpoint::load(p)?;
            let list = ck.metadata.get("inputs").ok_or_else(|| {
                Error::Invalid(format!("{}: no `inputs` in the metadata", p.display()))
            })?;
            let list: Vec<String> = serde_json::from_str(list)?;
            let t = names
                .iter()
                .map(|n| {
                    let t = ck
                        .tensors
                        .get(n)
                        .ok_or_else(|| Error::Invalid(format!("{}: no tensor {n}", p.display())))?;
                    Ok((t.shape.clone(), t.data.clone()))
                })
                .collect::<Result<_>>()?;
            (t, list)
        } else {
            let file = |n: &str| match n {
                "pooled" => p.clone(),
                "tokens" => p.with_extension("tokens.npy"),
                l => p.with_extension(format!("{}.npy", &l["layer.".len()..])),
            };
            let t = names
                .iter()
                .map(|n| crate::io::read_npy_f32(&file(n)))
                .collect::<Result<_>>()?;
            let list_path = p.with_extension("inputs.txt");
            let text = std::fs::read_to_string(&list_path).map_err(|e| Error::io(&list_path, e))?;
            (t, text.lines().map(str::to_string).collect())
        };
        for ((shape, data), (name, (all_shape, all))) in
            tensors.into_iter().zip(names.iter().zip(joined.iter_mut()))
        {
            if shape.first() != Some(&part_inputs.len()) {
                return Err(Error::Invalid(format!(
                    "{}: {name} has {:?} rows for {} inputs",
                    p.display(),
                    shape.first(),
                    part_inputs.len()
                )));
            }
            if all_shape.is_empty() {
                *all_shape = shape.clone();
                all_shape[0] = 0;
            } else if all_shape[1..] != shape[1..] {
                return Err(Error::Invalid(format!(
                    "{}: {name} has shape {shape:?}, the first part {all_shape:?}",
                    p.display()
                )));
            }
            all_shape[0] += shape[0];
            all.extend(data);
        }
        inputs.extend(part_inputs);
    }
    let dev = candle_core::Device::Cpu;
    let mut tensors = joined
        .into_iter()
        .map(|(shape, data)| Ok(candle_core::Tensor::from_vec(data, shape, &dev)?))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let pooled = tensors.next().expect("pooled is always there");
    let tokens = if names.iter().any(|n| n == "tokens") {
        tensors.next()
    } else {
        None
    };
    let intermediates = names
        .iter()
        .filter_map(|n| n.strip_prefix("layer."))
        .map(str::to_string)
        .zip(tensors)
        .collect();
    let rows = inputs.len();
    let e = crate::predict::Embeddings {
        inputs,
        pooled,
        tokens,
        intermediates,
    };
    crate::predict::write_embeddings(output, &e)?;
    Ok(MergeReport {
        command: "embed".into(),
        parts: parts.len(),
        rows,
        eval: None,
    })
}

fn merge_predict(parts: &[(Manifest, PathBuf)], output: &Path) -> Result<MergeReport> {
    let want = same_extension(parts, output)?;
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p, e));
    let (bytes, rows) = match want.as_str() {
        "json" => {
            let mut all: Vec<Prediction> = Vec::new();
            for (_, p) in parts {
                let part: Vec<Prediction> = serde_json::from_str(&read(p)?)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
                all.extend(part);
            }
            (serde_json::to_vec_pretty(&all)?, all.len())
        }
        "csv" => {
            let mut out = String::new();
            let mut rows = 0;
            for (i, (_, p)) in parts.iter().enumerate() {
                let text = read(p)?;
                let (header, body) = text.split_once('\n').unwrap_or((&text, ""));
                if i == 0 {
                    out.push_str(header);
                    out.push('\n');
                } else if !out.starts_with(header) {
                    return Err(Error::Invalid(format!(
                        "{}: its columns differ from the first part's",
                        p.display()
                    )));
                }
                rows += body.lines().count();
                out.push_str(body);
            }
            (out.into_bytes(), rows)
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{}: merged predictions are .csv or .json",
                output.display()
            )));
        }
    };
    crate::io::write_atomic(output, &bytes).map_err(|e| Error::io(output, e))?;
    Ok(MergeReport {
        command: "predict".into(),
        parts: parts.len(),
        rows,
        eval: None,
    })
}
