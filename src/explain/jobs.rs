//! The batch jobs behind `evax cam` and `evax cam-eval`: streaming over images with bounded
//! memory, writing CAMs, overlays, indexes and metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rayon::prelude::*;

use super::cam_maps;
use super::localize::{self, BoxMapping, NihBox, ScoredBox, Scores};
use super::overlay::{Rgb, cam_on_original, show_cam_on_image};
use crate::error::Error;
use crate::infer::{Failure, progress};
use crate::labels::LabelSet;
use crate::model::Classifier;
use crate::preprocess::{Image, Normalization, Preprocess, cam_eval_input};

/// Which classes to explain.
#[derive(Debug, Clone)]
pub enum ClassChoice {
    /// These class indices for every image.
    Fixed(Vec<usize>),
    /// The K highest-scoring classes of each image.
    Top(usize),
}

/// One written CAM, as listed in `cams.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CamRecord {
    /// The input image.
    pub input: String,
    /// Class name.
    pub class: String,
    /// Class index in the head.
    pub class_index: usize,
    /// The class logit.
    pub logit: f32,
    /// Its probability under the label set's activation.
    pub probability: f32,
    /// The CAM `[H, W]` as .npy (relative to the output folder).
    pub cam: String,
    /// The overlay PNG (relative to the output folder), if written.
    pub overlay: Option<String>,
}

/// Settings of `evax cam`.
pub struct CamJob<'a> {
    /// The model.
    pub model: &'a dyn Classifier,
    /// Evaluation transform.
    pub preprocess: Preprocess,
    /// Class names and activation.
    pub labels: LabelSet,
    /// Classes to explain.
    pub classes: ClassChoice,
    /// Target layer (as the model's [`crate::explain::CamSource::check_cam_layer`] accepts).
    pub layer: String,
    /// Images per batch.
    pub batch: usize,
    /// Write overlay PNGs.
    pub overlays: bool,
    /// For DICOM inputs, also write each overlay as a Secondary Capture image and the
    /// image's probabilities and findings as a Structured Report (`<name>_sr.dcm`).
    pub dicom_out: Option<crate::dicom::results::Producer>,
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl CamJob<'_> {
    /// Compute and write CAMs for `inputs` into `out_dir`, the files of input `i` named after
    /// `names[i]` (see [`crate::io::output_names`]); returns the records and failures.
    pub fn run(
        &self,
        inputs: &[PathBuf],
        names: &[String],
        out_dir: &Path,
    ) -> crate::Result<(Vec<CamRecord>, Vec<Failure>)> {
        if names.len() != inputs.len() {
            return Err(Error::Invalid(format!(
                "{} output names for {} inputs",
                names.len(),
                inputs.len()
            )));
        }
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let (h, w) = self.preprocess.size;
        let pb = progress(inputs.len(), "cam");
        let mut records = Vec::new();
        let mut failures = Vec::new();
        let batch_size = self.batch.max(1);
        for (c, chunk) in inputs.chunks(batch_size).enumerate() {
            let chunk_names = &names[c * batch_size..c * batch_size + chunk.len()];
            let (ok, data) = load_batch(
                chunk,
                |p| p.as_path(),
                |img| {
                    let crop = self.preprocess.resize_crop(img);
                    // The overlay is drawn on the original (only when asked for).
                    let keep = (self.overlays || self.dicom_out.is_some()).then(|| img.clone());
                    (self.preprocess.normalize(&crop), keep)
                },
                &mut failures,
            );
            let ok: Vec<(&PathBuf, Option<Image>, &String)> = ok
                .into_iter()
                .map(|(i, crop)| (&chunk[i], crop, &chunk_names[i]))
                .collect();
            pb.inc(chunk.len() as u64);
            if ok.is_empty() {
                continue;
            }
            let result = Tensor::from_vec(data, (ok.len(), 3, h, w), self.model.device())
                .map_err(|e| e.to_string())
                .and_then(|x| {
                    let choose = |_: usize, logits: &[f32]| match &self.classes {
                        ClassChoice::Fixed(c) => c.clone(),
                        ClassChoice::Top(k) => {
                            let mut idx: Vec<usize> = (0..logits.len()).collect();
                            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                            idx.truncate(*k);
                            idx
                        }
                    };
                    self.model
                        .activation_grads(&x, &self.layer, &choose)
                        .map_err(|e| e.to_string())
                });
            let batch = match result {
                Ok(b) => b,
                Err(e) => {
                    failures.extend(ok.iter().map(|(p, _, _)| Failure {
                        input: (*p).clone(),
                        error: e.clone(),
                    }));
                    continue;
                }
            };
            let maps: Vec<Vec<Vec<f32>>> = batch
                .rounds
                .iter()
                .map(|r| cam_maps(r, (h, w)))
                .collect::<Result<_, _>>()?;
            for (i, (path, original, stem)) in ok.iter().enumerate() {
                let probs = self.labels.activation.apply(&batch.logits[i]);
                // A DICOM source gets its results as DICOM too.
                let source = match &self.dicom_out {
                    Some(producer) => match crate::dicom::DicomFile::open(path.as_path()) {
                        Ok(src) => {
                            let classes = crate::dicom::results::ClassResult::list(
                                &self.labels.classes,
                                &probs,
                                producer.threshold,
                            );
                            let sr = out_dir.join(format!("{}_sr.dcm", safe_name(stem)));
                            crate::dicom::results::write(
                                crate::dicom::results::report_bytes(&src, producer, &classes),
                                &sr,
                            )?;
                            Some(src)
                        }
                        Err(_) => None, // not a DICOM file: PNG / JPEG outputs only
                    },
                    None => None,
                };
                for (r, &class) in batch.targets[i].iter().enumerate() {
                    let cam = &maps[r][i];
                    let name = self
                        .labels
                        .classes
                        .get(class)
                        .cloned()
                        .unwrap_or_else(|| format!("class_{class}"));
                    let base = format!("{}_{}", safe_name(stem), safe_name(&name));
                    let npy = format!("{base}.npy");
                    let npy_path = out_dir.join(&npy);
                    crate::io::write_atomic(&npy_path, &crate::io::npy_f32(&[h, w], cam))
                        .map_err(|e| Error::io(&npy_path, e))?;
                    let pic = original.as_ref().map(|original| {
                        let geometry = self
                            .preprocess
                            .crop_geometry((original.width, original.height));
                        let mut pic = cam_on_original(original, cam, geometry);
                        pic.caption(
                            &format!("{name} {:.2}", probs[class]),
                            (pic.width / 140).clamp(1, 8),
                        );
                        pic
                    });
                    if let (Some(src), Some(pic)) = (&source, &pic) {
                        let sc = out_dir.join(format!("{base}_sc.dcm"));
                        let what = format!("Grad-CAM of {name} (probability {:.3})", probs[class]);
                        crate::dicom::results::write(
                            crate::dicom::results::secondary_capture_bytes(src, pic, &what),
                            &sc,
                        )?;
                    }
                    let overlay = match (&pic, self.overlays) {
                        (Some(pic), true) => {
                            let png = format!("{base}.png");
                            let png_path = out_dir.join(&png);
                            pic.save_png(&png_path)
                                .map_err(|e| Error::io(&png_path, e))?;
                            Some(png)
                        }
                        _ => None,
                    };
                    records.push(CamRecord {
                        input: path.display().to_string(),
                        class: name,
                        class_index: class,
                        logit: batch.logits[i][class],
                        probability: probs[class],
                        cam: npy,
                        overlay,
                    });
                }
            }
        }
        pb.finish_and_clear();
        let index = serde_json::to_vec_pretty(&records)?;
        let index_path = out_dir.join("cams.json");
        crate::io::write_atomic(&index_path, &index).map_err(|e| Error::io(&index_path, e))?;
        Ok((records, failures))
    }
}

/// Decode and prepare one batch in parallel: for each input that loads, its index in `items`
/// and the payload `prepare` returns beside the model input; the inputs are concatenated in
/// order, failures appended to `failures`.
fn load_batch<'a, I: Sync, T: Send>(
    items: &'a [I],
    path: impl Fn(&'a I) -> &'a Path + Sync,
    prepare: impl Fn(&Image) -> (Vec<f32>, T) + Sync,
    failures: &mut Vec<Failure>,
) -> (Vec<(usize, T)>, Vec<f32>) {
    let loaded: Vec<_> = items
        .par_iter()
        .map(|it| Image::open(path(it)).map(|img| prepare(&img)))
        .collect();
    let mut ok = Vec::new();
    let mut data = Vec::new();
    for (i, r) in loaded.into_iter().enumerate() {
        match r {
            Ok((x, extra)) => {
                data.extend_from_slice(&x);
                ok.push((i, extra));
            }
            Err(e) => failures.push(Failure {
                input: path(&items[i]).to_path_buf(),
                error: e.what,
            }),
        }
    }
    (ok, data)
}

/// Which preprocessing `cam-eval` scores with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CamEvalPreprocess {
    /// `get_cams.py`: the whole image bilinearly to the input size, 0.5056 / 0.252.
    Original,
    /// The classification transform (resize shorter side, centre crop, EVA-X statistics).
    Classification,
}

/// Settings of `evax cam-eval`.
pub struct CamEvalJob<'a> {
    /// The model.
    pub model: &'a dyn Classifier,
    /// Input size.
    pub size: (usize, usize),
    /// Preprocessing.
    pub preprocess: CamEvalPreprocess,
    /// Fixed threshold (used unless `search`).
    pub threshold: f32,
    /// Sweep 0.01..0.60 and report the best, plus the honest split.
    pub search: bool,
    /// Seed of the image split.
    pub seed: u64,
    /// Images per batch.
    pub batch: usize,
    /// Write overlays with the box drawn.
    pub overlays: bool,
    /// Target layer (as the model's [`crate::explain::CamSource::check_cam_layer`] accepts).
    pub layer: String,
}

/// Metrics of one scoring.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scored {
    /// Threshold used.
    pub threshold: f32,
    /// Over all boxes.
    pub overall: Scores,
    /// Per finding.
    pub per_finding: BTreeMap<String, Scores>,
}

/// One fold of the honest variant: threshold tuned on one half of the images, scored on the
/// other.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HonestFold {
    /// Half the threshold was chosen on (0 or 1).
    pub tuned_on_half: usize,
    /// Boxes in the tuning half.
    pub tuning_boxes: usize,
    /// Scores on the other half at the tuned threshold.
    pub scored: Scored,
}

/// Everything `cam-eval` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CamEvalReport {
    /// Weights evaluated.
    pub weights: String,
    /// Preprocessing used.
    pub preprocess: String,
    /// Whether the threshold was searched on the evaluation boxes (the original's protocol).
    pub searched: bool,
    /// The scores at the reported threshold.
    pub result: Scored,
    /// The honest variant (with `--search`): two folds.
    pub honest: Vec<HonestFold>,
    /// Boxes in the CSV.
    pub boxes_total: usize,
    /// Boxes scored.
    pub boxes_scored: usize,
    /// Boxes whose image was not found.
    pub boxes_missing: usize,
    /// Images named in the CSV but not found.
    pub images_missing: usize,
    /// Malformed CSV rows.
    pub bad_rows: Vec<String>,
    /// Images that could not be read.
    pub failures: Vec<Failure>,
}

/// Index image files under `dir` by file name (any depth; the NIH download's
/// `images_001/images/` layout included).
fn index_images(dir: &Path) -> HashMap<String, PathBuf> {
    let (paths, _) = crate::infer::collect_inputs(&[dir.to_path_buf()]);
    paths
        .into_iter()
        .filter_map(|p| Some((p.file_name()?.to_string_lossy().into_owned(), p)))
        .collect()
}

impl CamEvalJob<'_> {
    fn scored(&self, boxes: &[&ScoredBox], ti: usize, t: f32) -> Scored {
        let (overall, per_finding) = localize::report(boxes, ti);
        Scored {
            threshold: t,
            overall,
            per_finding,
        }
    }

    /// Score every box of `boxes_csv` whose image is in `images`; write `metrics.json`,
    /// `per_box.csv`, `missing.txt` (and overlays) into `out_dir`.
    pub fn run(
        &self,
        weights: &Path,
        boxes_csv: &Path,
        images: &Path,
        out_dir: &Path,
    ) -> crate::Result<CamEvalReport> {
        std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let (boxes, bad) = localize::read_boxes(boxes_csv)?;
        let files = index_images(images);
        let mut by_image: BTreeMap<String, Vec<NihBox>> = BTreeMap::new();
        for b in &boxes {
            by_image.entry(b.image.clone()).or_default().push(b.clone());
        }
        let mut missing = Vec::new();
        let mut present = Vec::new();
        for (name, bs) in by_image {
            match files.get(&name) {
                Some(p) => present.push((p.clone(), bs)),
                None => missing.extend(bs.iter().map(|b| b.image.clone())),
            }
        }
        let mut grid = localize::thresholds();
        grid.push(self.threshold);
        let fixed_ti = grid.len() - 1;
        let (h, w) = self.size;
        let overlay_dir = out_dir.join("overlays");
        if self.overlays {
            std::fs::create_dir_all(&overlay_dir).map_err(|e| Error::io(&overlay_dir, e))?;
        }
        let pb = progress(present.len(), "cam-eval");
        let mut scored: Vec<ScoredBox> = Vec::new();
        let mut failures = Vec::new();
        for chunk in present.chunks(self.batch.max(1)) {
            let (ok, data) = load_batch(
                chunk,
                |(p, _)| p.as_path(),
                |img| {
                    let (x, pic, mapping) = self.prepare(img);
                    (x, (pic, mapping))
                },
                &mut failures,
            );
            let ok: Vec<_> = ok
                .into_iter()
                .map(|(i, (pic, mapping))| (&chunk[i].0, &chunk[i].1, pic, mapping))
                .collect();
            pb.inc(chunk.len() as u64);
            if ok.is_empty() {
                continue;
            }
            let x = Tensor::from_vec(data, (ok.len(), 3, h, w), self.model.device())?;
            let classes: Vec<Vec<usize>> = ok
                .iter()
                .map(|(_, bs, _, _)| {
                    let mut c: Vec<usize> = bs
                        .iter()
                        .filter_map(|b| localize::finding_class(&b.finding))
                        .collect();
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            let batch = self
                .model
                .activation_grads(&x, &self.layer, &|i, _| classes[i].clone())?;
            let maps: Vec<Vec<Vec<f32>>> = batch
                .rounds
                .iter()
                .map(|r| cam_maps(r, (h, w)))
                .collect::<Result<_, _>>()?;
            for (i, (_, bs, pic, mapping)) in ok.iter().enumerate() {
                for b in bs.iter() {
                    let class = localize::finding_class(&b.finding).expect("validated");
                    let r = batch.targets[i]
                        .iter()
                        .position(|&c| c == class)
                        .expect("requested");
                    let cam = &maps[r][i];
                    let pixels = mapping.map(&b.bbox);
                    let ious = grid
                        .iter()
                        .map(|&t| localize::iou(cam, (h, w), &pixels, t))
                        .collect();
                    if self.overlays {
                        let mut o = show_cam_on_image(pic, cam);
                        o.rect(pixels.x, pixels.y, pixels.w, pixels.h, 1, [0, 255, 0]);
                        let k = (512 / h.max(w)).max(1);
                        let mut o = if k > 1 { o.upscale(k) } else { o };
                        o.caption(&b.finding, (o.width / 140).clamp(1, 4));
                        let name = format!(
                            "{}_{}.png",
                            safe_name(&crate::io::file_stem(Path::new(&b.image))),
                            safe_name(&b.finding)
                        );
                        let path = overlay_dir.join(name);
                        o.save_png(&path).map_err(|e| Error::io(&path, e))?;
                    }
                    scored.push(ScoredBox {
                        nih: b.clone(),
                        pixels,
                        ious,
                    });
                }
            }
        }
        pb.finish_and_clear();
        let all: Vec<&ScoredBox> = scored.iter().collect();
        let (result, honest) = if self.search && !all.is_empty() {
            let ti = localize::best_threshold(&all);
            let mut folds = Vec::new();
            for half in 0..2 {
                let tune: Vec<&ScoredBox> = all
                    .iter()
                    .copied()
                    .filter(|b| localize::half_of(&b.nih.image, self.seed) == half)
                    .collect();
                let test: Vec<&ScoredBox> = all
                    .iter()
                    .copied()
                    .filter(|b| localize::half_of(&b.nih.image, self.seed) != half)
                    .collect();
                if tune.is_empty() || test.is_empty() {
                    continue;
                }
                let t = localize::best_threshold(&tune);
                folds.push(HonestFold {
                    tuned_on_half: half,
                    tuning_boxes: tune.len(),
                    scored: self.scored(&test, t, grid[t]),
                });
            }
            (self.scored(&all, ti, grid[ti]), folds)
        } else {
            (self.scored(&all, fixed_ti, self.threshold), Vec::new())
        };
        let ti = grid
            .iter()
            .position(|&t| t == result.threshold)
            .unwrap_or(fixed_ti);
        let mut csv = String::from("image,finding,x,y,w,h,threshold,iou\n");
        for b in &scored {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                b.nih.image,
                b.nih.finding,
                b.pixels.x,
                b.pixels.y,
                b.pixels.w,
                b.pixels.h,
                result.threshold,
                b.ious[ti]
            ));
        }
        let write = |name: &str, bytes: &[u8]| {
            crate::io::write_atomic(&out_dir.join(name), bytes)
                .map_err(|e| Error::io(out_dir.join(name), e))
        };
        write("per_box.csv", csv.as_bytes())?;
        let mut miss = missing.clone();
        miss.dedup();
        write(
            "missing.txt",
            (miss.join("\n") + if miss.is_empty() { "" } else { "\n" }).as_bytes(),
        )?;
        let report = CamEvalReport {
            weights: weights.display().to_string(),
            preprocess: match self.preprocess {
                CamEvalPreprocess::Original => "original".into(),
                CamEvalPreprocess::Classification => "classification".into(),
            },
            searched: self.search,
            result,
            honest,
            boxes_total: boxes.len() + bad.len(),
            boxes_scored: scored.len(),
            boxes_missing: missing.len(),
            images_missing: miss.len(),
            bad_rows: bad
                .iter()
                .map(|b| format!("{}:{}: {}", boxes_csv.display(), b.line, b.what))
                .collect(),
            failures,
        };
        write("metrics.json", &serde_json::to_vec_pretty(&report)?)?;
        Ok(report)
    }

    /// The model input, the picture for overlays, and how boxes map onto the CAM.
    fn prepare(&self, img: &Image) -> (Vec<f32>, Rgb, BoxMapping) {
        let (h, w) = self.size;
        match self.preprocess {
            CamEvalPreprocess::Original => {
                let x = cam_eval_input(img, self.size, Normalization::OTHERS);
                let shown: Vec<u8> = x[..h * w]
                    .iter()
                    .map(|v| {
                        ((v * Normalization::OTHERS.std + Normalization::OTHERS.mean) * 255.0)
                            .round()
                            .clamp(0.0, 255.0) as u8
                    })
                    .collect();
                let pic = Rgb::from_image(&Image {
                    width: w,
                    height: h,
                    channels: 1,
                    data: shown,
                });
                let mapping = BoxMapping {
                    scale: w as f64 / img.width as f64,
                    offset: (0, 0),
                };
                (x, pic, mapping)
            }
            CamEvalPreprocess::Classification => {
                let pre = Preprocess::eval(self.size, self.model.normalization());
                let crop = pre.resize_crop(img);
                let scale = pre.resize_short as f64 / img.width.min(img.height) as f64;
                let (nw, nh) = (
                    (img.width as f64 * scale) as i64,
                    (img.height as f64 * scale) as i64,
                );
                let half =
                    |d: i64| crate::preprocess::round_half_even(d.max(0) as f64 / 2.0) as i64;
                let offset = (half(nw - w as i64), half(nh - h as i64));
                (
                    pre.normalize(&crop),
                    Rgb::from_image(&crop),
                    BoxMapping { scale, offset },
                )
            }
        }
    }
}

/// The scores as text (what `evax cam-eval` prints).
pub fn summary_text(r: &CamEvalReport) -> String {
    let mut out = String::new();
    let o = &r.result.overall;
    w!(
        out,
        "threshold {:.2}{}: AP25 {:.2}  AP50 {:.2}  mIoU {:.2}  mAP {:.2}  ({} boxes)",
        r.result.threshold,
        if r.searched {
            " (searched on these boxes, as the original)"
        } else {
            ""
        },
        o.ap25 * 100.0,
        o.ap50 * 100.0,
        o.miou * 100.0,
        o.map * 100.0,
        o.boxes
    );
    for (f, s) in &r.result.per_finding {
        w!(
            out,
            "  {f:<14} AP25 {:6.2}  AP50 {:6.2}  mIoU {:6.2}  mAP {:6.2}  ({} boxes)",
            s.ap25 * 100.0,
            s.ap50 * 100.0,
            s.miou * 100.0,
            s.map * 100.0,
            s.boxes
        );
    }
    for f in &r.honest {
        let o = &f.scored.overall;
        w!(
            out,
            "honest: threshold {:.2} tuned on half {} ({} boxes), scored on the other: mAP {:.2}  mIoU {:.2}  ({} boxes)",
            f.scored.threshold,
            f.tuned_on_half,
            f.tuning_boxes,
            o.map * 100.0,
            o.miou * 100.0,
            o.boxes
        );
    }
    out
}
