//! `evax seg eval`: the original's segmentation evaluation. Each image is predicted as
//! [`predict_labels`] does (at the image's own size) and scored against its mask; mmseg's
//! IoUMetric sums intersections and unions over the set ([`IouTotals`]); per-image Dice and
//! IoU of the foreground go to `per_image.csv`. Resumable: each image's counts are appended to
//! a journal as it is done, and a rerun of the same job skips them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::UperNet;
use super::metrics::{IouTotals, SegScores};
use super::predict::{check_settings, predict_labels};
use crate::error::{Error, Result};
use crate::infer::{Failure, progress};
use crate::io::write_atomic;
use crate::preprocess::Image;

/// Image extensions looked for beside a split's stem, in this order.
const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "dcm", "dicom"];

/// One image and its mask.
#[derive(Debug, Clone, PartialEq)]
pub struct SegSample {
    /// The name in the split list.
    pub stem: String,
    /// `images/<stem>.<ext>`.
    pub image: PathBuf,
    /// `masks/<stem>.png`.
    pub mask: PathBuf,
}

impl SegSample {
    /// The image and its mask as labels ([`read_mask`]), which must be the same size.
    pub fn load(&self) -> Result<(Image, Image)> {
        let img = Image::open(&self.image)?;
        let mask = read_mask(&self.mask)?;
        if (mask.width, mask.height) != (img.width, img.height) {
            return Err(Error::Invalid(format!(
                "{}: mask is {}x{}, image {}x{}",
                self.mask.display(),
                mask.width,
                mask.height,
                img.width,
                img.height
            )));
        }
        Ok((img, mask))
    }
}

/// The samples of a split list (one stem a line, as the original's split files) in a folder
/// laid out as `seg prepare` writes it: `images/<stem>.{png,jpg,jpeg,dcm}` and
/// `masks/<stem>.png`. Stems whose files are missing are returned as failures.
pub fn read_split(data_dir: &Path, list: &Path) -> Result<(Vec<SegSample>, Vec<Failure>)> {
    let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
    let (mut samples, mut failures) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let stem = line.split_whitespace().next().unwrap_or("");
        if stem.is_empty() {
            continue;
        }
        if stem.contains(['/', '\\']) || stem == ".." {
            return Err(Error::Invalid(format!(
                "{} line {}: '{stem}' is a path, not a name",
                list.display(),
                n + 1
            )));
        }
        let image = IMAGE_EXTENSIONS
            .iter()
            .map(|e| data_dir.join("images").join(format!("{stem}.{e}")))
            .find(|p| p.is_file());
        let mask = data_dir.join("masks").join(format!("{stem}.png"));
        match image {
            Some(image) if mask.is_file() => samples.push(SegSample {
                stem: stem.to_string(),
                image,
                mask,
            }),
            Some(_) => failures.push(Failure {
                input: mask,
                error: "no mask for this image".into(),
            }),
            None => failures.push(Failure {
                input: data_dir.join("images").join(stem),
                error: format!("no image {stem}.png/.jpg/.jpeg/.dcm"),
            }),
        }
    }
    if samples.is_empty() && failures.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no names listed",
            list.display()
        )));
    }
    Ok((samples, failures))
}

/// A mask as class labels: 0/1 as stored, or 0/255 read as 0/1 (any other value is an
/// error naming it).
pub fn read_mask(path: &Path) -> Result<Image> {
    let mut m = Image::open(path)?;
    if m.channels != 1 {
        // An RGB mask: its first channel (grey masks saved as RGB have equal channels).
        m.data = m.data.chunks_exact(m.channels).map(|p| p[0]).collect();
        m.channels = 1;
    }
    let max = m.data.iter().copied().max().unwrap_or(0);
    if max == 255 {
        if let Some(v) = m.data.iter().find(|&&v| v != 0 && v != 255) {
            return Err(Error::Invalid(format!(
                "{}: a 0/255 mask with the value {v}",
                path.display()
            )));
        }
        m.data.iter_mut().for_each(|v| *v = (*v == 255) as u8);
    } else if max > 1 {
        return Err(Error::Invalid(format!(
            "{}: mask values must be 0/1 or 0/255, found {max}",
            path.display()
        )));
    }
    Ok(m)
}

/// The evaluation's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegEvalReport {
    /// The checkpoint.
    pub weights: String,
    /// Images scored.
    pub images: usize,
    /// Images that could not be scored.
    pub failed: usize,
    /// The threshold on sigmoid(logit).
    pub threshold: f32,
    /// mmseg's per-class IoU and Dice (class 0 the background) and their means.
    #[serde(flatten)]
    pub scores: SegScores,
    /// The foreground's IoU (class 1).
    pub fg_iou: f64,
    /// The foreground's Dice (class 1).
    pub fg_dice: f64,
}

/// A segmentation evaluation run.
pub struct SegEvalJob<'a> {
    /// The model (one output channel: background / foreground).
    pub model: &'a UperNet,
    /// Its checkpoint (named in the outputs and the journal).
    pub weights: &'a Path,
    /// The model's input size `(h, w)`.
    pub size: (usize, usize),
    /// Foreground where sigmoid(logit) exceeds this.
    pub threshold: f32,
}

/// One image's counts: intersection, predicted and true pixels of background and foreground.
type Counts = [u64; 6];

impl SegEvalJob<'_> {
    /// Score every sample, writing `metrics.json`, `per_image.csv` and `report.md` into
    /// `out_dir`.
    pub fn run(
        &self,
        samples: &[SegSample],
        out_dir: &Path,
    ) -> Result<(SegEvalReport, Vec<Failure>)> {
        check_settings(self.size, self.threshold)?;
        if self.model.classes != 1 {
            return Err(Error::Invalid(format!(
                "{}: {} output channels; seg eval scores the original's one-channel \
                 (background / foreground) models",
                self.weights.display(),
                self.model.classes
            )));
        }
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let journal = out_dir.join("per_image.journal");
        let header = format!(
            "evax-seg-eval-journal 1\t{}\t{}\t{}x{}\t{}\n",
            self.weights.display(),
            self.threshold,
            self.size.0,
            self.size.1,
            names_hash(samples)
        );
        let mut done = load_journal(&journal, &header);
        // Rewrite the journal with what is kept (a torn last line is dropped), then append.
        let mut kept = header.clone();
        for (stem, c) in &done {
            kept.push_str(&journal_line(stem, c));
        }
        write_atomic(&journal, kept.as_bytes()).map_err(|e| Error::io(&journal, e))?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .map_err(|e| Error::io(&journal, e))?;
        let pb = progress(samples.len(), "seg eval");
        let mut failures = Vec::new();
        for s in samples {
            if !done.contains_key(&s.stem) {
                match self.count(s) {
                    Ok(c) => {
                        file.write_all(journal_line(&s.stem, &c).as_bytes())
                            .and_then(|_| file.flush())
                            .map_err(|e| Error::io(&journal, e))?;
                        done.insert(s.stem.clone(), c);
                    }
                    Err(e) => failures.push(Failure {
                        input: s.image.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        // Totals and rows in the split's order.
        let mut totals = IouTotals::new(2);
        let mut csv = String::from("image,dice,iou,predicted_pixels,true_pixels\n");
        let mut images = 0;
        for s in samples {
            let Some(c) = done.get(&s.stem) else {
                continue;
            };
            totals.add_counts(&[c[0], c[3]], &[c[1], c[4]], &[c[2], c[5]]);
            let (i, p, l) = (c[3] as f64, c[4] as f64, c[5] as f64);
            let blank = |v: f64| {
                if v.is_nan() {
                    String::new()
                } else {
                    format!("{v:.6}")
                }
            };
            csv.push_str(&format!(
                "{},{},{},{},{}\n",
                s.stem,
                blank(2.0 * i / (p + l)),
                blank(i / (p + l - i)),
                c[4],
                c[5]
            ));
            images += 1;
        }
        let scores = totals.scores();
        let report = SegEvalReport {
            weights: self.weights.display().to_string(),
            images,
            failed: failures.len(),
            threshold: self.threshold,
            fg_iou: scores.iou_per_class[1],
            fg_dice: scores.dice_per_class[1],
            scores,
        };
        let write = |name: &str, bytes: &[u8]| {
            let p = out_dir.join(name);
            write_atomic(&p, bytes).map_err(|e| Error::io(&p, e))
        };
        write("per_image.csv", csv.as_bytes())?;
        write("metrics.json", &serde_json::to_vec_pretty(&report)?)?;
        write("report.md", summary_text(&report).as_bytes())?;
        let _ = std::fs::remove_file(&journal);
        Ok((report, failures))
    }

    fn count(&self, s: &SegSample) -> Result<Counts> {
        let (img, mask) = s.load()?;
        let (_, pred) = predict_labels(self.model, &img, self.size, self.threshold)?;
        let mut c = [0u64; 6];
        for (&p, &l) in pred.iter().zip(&mask.data) {
            let (p, l) = (p as usize, l as usize);
            c[3 * p + 1] += 1;
            c[3 * l + 2] += 1;
            if p == l {
                c[3 * p] += 1;
            }
        }
        Ok(c)
    }
}

/// FNV-1a over the split's names, so that a journal is only reused for the same list.
fn names_hash(samples: &[SegSample]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in samples.iter().flat_map(|s| s.stem.bytes().chain([0])) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn journal_line(stem: &str, c: &Counts) -> String {
    let nums: Vec<String> = c.iter().map(|v| v.to_string()).collect();
    format!("{stem}\t{}\n", nums.join("\t"))
}

/// The images an earlier run of the same job finished (whole lines only).
fn load_journal(path: &Path, header: &str) -> BTreeMap<String, Counts> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    let Some(body) = text.strip_prefix(header) else {
        return BTreeMap::new();
    };
    body.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let mut f = l.trim_end().split('\t');
            let stem = f.next()?.to_string();
            let v: Vec<u64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
            Some((stem, v.try_into().ok()?))
        })
        .collect()
}

/// The human summary.
pub fn summary_text(r: &SegEvalReport) -> String {
    format!(
        "# Segmentation evaluation\n\n{} images ({} failed), threshold {}\n\n\
         | | IoU | Dice |\n|---|---|---|\n| background | {:.4} | {:.4} |\n\
         | foreground | {:.4} | {:.4} |\n| mean | {:.4} | {:.4} |\n",
        r.images,
        r.failed,
        r.threshold,
        r.scores.iou_per_class[0],
        r.scores.dice_per_class[0],
        r.fg_iou,
        r.fg_dice,
        r.scores.miou,
        r.scores.mdice
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_keeps_whole_lines_of_the_same_job_only() {
        let dir = std::env::temp_dir().join(format!("evax-unit-{}-segjournal", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("j");
        let header = "evax-seg-eval-journal 1\tw\t0.3\t512x512\t7\n";
        let body = format!(
            "{header}{}{}b\t1\t2",
            journal_line("a", &[1, 2, 3, 4, 5, 6]),
            journal_line("c", &[0; 6])
        );
        std::fs::write(&p, body).unwrap();
        let done = load_journal(&p, header);
        assert_eq!(done.len(), 2);
        assert_eq!(done["a"], [1, 2, 3, 4, 5, 6]);
        // Another job's journal is not reused.
        assert!(load_journal(&p, "evax-seg-eval-journal 1\tother\n").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn masks_are_0_1_or_0_255_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("evax-unit-{}-segmask", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let save = |name: &str, data: Vec<u8>| {
            let p = dir.join(name);
            crate::explain::overlay::Rgb {
                width: 2,
                height: 2,
                data: data.iter().flat_map(|&v| [v; 3]).collect(),
            }
            .save_png_grey_or_rgb(&p, true)
            .unwrap();
            p
        };
        assert_eq!(
            read_mask(&save("a.png", vec![0, 1, 1, 0])).unwrap().data,
            [0, 1, 1, 0]
        );
        assert_eq!(
            read_mask(&save("b.png", vec![0, 255, 0, 0])).unwrap().data,
            [0, 1, 0, 0]
        );
        let e = read_mask(&save("c.png", vec![0, 255, 7, 0]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.png: a 0/255 mask with the value 7"), "{e}");
        let e = read_mask(&save("d.png", vec![0, 2, 0, 0]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.png: mask values must be 0/1 or 0/255, found 2"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
