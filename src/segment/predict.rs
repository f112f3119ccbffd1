//! `evax seg predict`: masks for image files as the original's mmsegmentation inference makes
//! them (RGB, OpenCV bilinear resize to the model's size, EVA-X statistics x 255; logits
//! resized bilinearly back to the image's own size; sigmoid above a threshold), with overlays
//! and, on request, the raw logits. A bad input is reported and the rest go on.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::UperNet;
use crate::error::{Error, Result};
use crate::infer::{Failure, progress};
use crate::io::{UniqueStems, npy_f32, write_atomic};
use crate::model::interp::{bilinear_matrix, resample};
use crate::preprocess::{Image, Normalization, opencv};

/// The original's segmentation input `[3, H, W]`: the image as RGB, resized to `size`
/// (`(h, w)`) with OpenCV's bilinear filter, normalised with EVA-X's statistics x 255 (in
/// float64, as mmcv's `imnormalize` does).
pub fn seg_input(img: &Image, (h, w): (usize, usize)) -> Vec<f32> {
    let resized = opencv::resize_linear(img, (w, h));
    let n = Normalization::EVAX;
    let (mean, inv_std) = (n.mean as f64 * 255.0, 1.0 / (n.std as f64 * 255.0));
    let c = resized.channels;
    let plane = h * w;
    let mut out = vec![0f32; 3 * plane];
    for ch in 0..3 {
        let src = if c == 1 { 0 } else { ch };
        for i in 0..plane {
            out[ch * plane + i] = ((resized.data[i * c + src] as f64 - mean) * inv_std) as f32;
        }
    }
    out
}

/// What was written for one input.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegRecord {
    /// The input file.
    pub input: String,
    /// The image's size `[height, width]`.
    pub size: [usize; 2],
    /// The mask PNG (relative to the output folder).
    pub mask: String,
    /// The overlay PNG, if written.
    pub overlay: Option<String>,
    /// The logits `.npy` `[classes, H, W]` at the model's input size, if written.
    pub logits: Option<String>,
    /// Share of the image's pixels predicted foreground (any class but 0).
    pub foreground: f64,
}

/// A segmentation prediction run.
pub struct SegPredictJob<'a> {
    /// The model.
    pub model: &'a UperNet,
    /// The model's input size `(h, w)` (512 x 512 for the original).
    pub size: (usize, usize),
    /// Foreground when sigmoid(logit) exceeds this (one output channel).
    pub threshold: f32,
    /// Write `<stem>_logits.npy`.
    pub logits: bool,
    /// Write `<stem>_overlay.png`.
    pub overlays: bool,
}

impl SegPredictJob<'_> {
    /// Predict every input into `out_dir`, writing each file atomically and
    /// `predictions.json` last; inputs that fail are returned with the reason.
    pub fn run(
        &self,
        inputs: &[PathBuf],
        out_dir: &Path,
    ) -> Result<(Vec<SegRecord>, Vec<Failure>)> {
        check_settings(self.size, self.threshold)?;
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let pb = progress(inputs.len(), "seg");
        let mut stems = UniqueStems::default();
        let (mut records, mut failures) = (Vec::new(), Vec::new());
        for path in inputs {
            let stem = stems.next(path);
            match self.one(path, &stem, out_dir) {
                Ok(r) => records.push(r),
                Err(e) => failures.push(Failure {
                    input: path.clone(),
                    // The failure is listed under its path: the reason alone.
                    error: match e {
                        Error::Image(ie) => ie.what,
                        e => e.to_string(),
                    },
                }),
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        let index = out_dir.join("predictions.json");
        write_atomic(&index, &serde_json::to_vec_pretty(&records)?)
            .map_err(|e| Error::io(&index, e))?;
        Ok((records, failures))
    }

    fn one(&self, path: &Path, stem: &str, out_dir: &Path) -> Result<SegRecord> {
        let img = Image::open(path)?;
        let (logits, labels) = predict_labels(self.model, &img, self.size, self.threshold)?;
        let (classes, h, w) = logits.dims3()?;
        let mut record = SegRecord {
            input: path.display().to_string(),
            size: [img.height, img.width],
            mask: format!("{stem}_mask.png"),
            overlay: None,
            logits: None,
            foreground: labels.iter().filter(|&&v| v != 0).count() as f64 / labels.len() as f64,
        };
        if self.logits {
            let name = format!("{stem}_logits.npy");
            let data = logits.flatten_all()?.to_vec1::<f32>()?;
            let file = out_dir.join(&name);
            write_atomic(&file, &npy_f32(&[classes, h, w], &data))
                .map_err(|e| Error::io(&file, e))?;
            record.logits = Some(name);
        }
        // One channel: 0 / 255; several: the class index.
        let scale = if classes == 1 { 255 } else { 1 };
        let mask = Image {
            width: img.width,
            height: img.height,
            channels: 1,
            data: labels.iter().map(|&v| v * scale).collect(),
        };
        let file = out_dir.join(&record.mask);
        crate::explain::overlay::Rgb::from_image(&mask)
            .save_png_grey_or_rgb(&file, true)
            .map_err(|e| Error::io(&file, e))?;
        if self.overlays {
            let name = format!("{stem}_overlay.png");
            let file = out_dir.join(&name);
            overlay(&img, &mask.data)
                .save_png(&file)
                .map_err(|e| Error::io(&file, e))?;
            record.overlay = Some(name);
        }
        Ok(record)
    }
}

/// A threshold strictly between 0 and 1 and an input size the model takes (positive multiples
/// of 32: the patch size 16 and the pyramid's 2x2 pooling), or why not.
pub fn check_settings((h, w): (usize, usize), threshold: f32) -> Result<()> {
    if !(threshold > 0.0 && threshold < 1.0) {
        return Err(Error::Invalid(format!(
            "threshold {threshold} is not a probability strictly between 0 and 1"
        )));
    }
    if h % 32 != 0 || w % 32 != 0 || h == 0 || w == 0 {
        return Err(Error::Invalid(format!(
            "input size {h}x{w}: both sides must be positive multiples of 32 (the patch size 16 \
             and the pyramid's 2x2 pooling)"
        )));
    }
    Ok(())
}

/// The model's logits `[classes, h, w]` at its input size `size`, and the label of every pixel
/// of `img` at the image's own size: the logits resized back bilinearly (as mmsegmentation
/// does before it scores or saves), then with one channel 1 where sigmoid > `threshold`, with
/// several the largest.
pub fn predict_labels(
    model: &UperNet,
    img: &Image,
    size: (usize, usize),
    threshold: f32,
) -> Result<(Tensor, Vec<u8>)> {
    let (h, w) = size;
    let x = Tensor::from_vec(seg_input(img, size), (1, 3, h, w), &Device::Cpu)?;
    let logits = model.logits(&x)?;
    let classes = logits.dim(1)?;
    let full = resample(&logits, (img.height, img.width), bilinear_matrix)?;
    let full = full.squeeze(0)?.flatten_from(1)?.to_vec2::<f32>()?;
    let logit_threshold = (threshold / (1.0 - threshold)).ln();
    let labels = (0..img.width * img.height)
        .map(|i| {
            if classes == 1 {
                (full[0][i] > logit_threshold) as u8
            } else {
                (0..classes)
                    .max_by(|&a, &b| full[a][i].total_cmp(&full[b][i]))
                    .unwrap_or(0) as u8
            }
        })
        .collect();
    Ok((logits.squeeze(0)?, labels))
}

/// The image with its foreground tinted red (40 %), the radiograph still readable under it.
fn overlay(img: &Image, mask: &[u8]) -> crate::explain::overlay::Rgb {
    let mut rgb = crate::explain::overlay::Rgb::from_image(img);
    for (px, &m) in rgb.data.chunks_exact_mut(3).zip(mask) {
        if m != 0 {
            px[0] = (0.6 * px[0] as f32 + 0.4 * 255.0) as u8;
            px[1] = (0.6 * px[1] as f32) as u8;
            px[2] = (0.6 * px[2] as f32) as u8;
        }
    }
    rgb
}
