//! `evax seg prepare`: the original's four segmentation datasets (its `data_splits/prepare_*.py`)
//! from their public downloads into one layout: `images/<name>.png`, `masks/<name>.png` (0/1)
//! and the split lists `train.txt`, `test.txt` (one name a line).
//!
//! - **SIIM** (`dicom-images-train/**.dcm`, `train-rle.csv`): the stored pixel values as 8 bits
//!   (numpy's `astype(uint8)`), the mask from the run-length code: relative starts, filled
//!   column by column. As the original: only images with a pneumothorax, and of several rows
//!   for an image the last (a dict overwrite). `--all-parts` takes the union of the rows and
//!   keeps the negative images (empty masks).
//! - **RSNA** (`stage_2_train_images/*.dcm`, `stage_2_train_labels.csv`): the patient from the
//!   DICOM's Patient ID, its box filled (corners included, as `cv2.rectangle(..., -1)`). As
//!   the original: the patient's last row only, and only patients whose last row has a box.
//!   `--all-parts` fills every box of the patient. Images are written as PNG (the original
//!   re-encodes them as JPEG at quality 75, which loses detail).
//! - **lung** (`Train/Images`, `Train/Masks`, `Test/Images`, `Test/Masks`): copied, the split
//!   from the folders.
//! - **Shenzhen** (`CXR_png/*.png`, `Annotations/masks/*.png` or `masks/*.png`): the masks of
//!   one image (same first 13 characters) merged by maximum, any non-zero value foreground.
//!
//! Without `--splits DIR` (holding `train.txt` and `test.txt`, such as the original's
//! `data_splits/`), 70 % of the names (sorted, then shuffled with `--seed`) train.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::dicom::DicomFile;
use crate::error::{Error, Result};
use crate::explain::overlay::Rgb;
use crate::infer::{Failure, progress};
use crate::io::write_atomic;
use crate::preprocess::Image;

/// The original's segmentation datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegDataset {
    /// SIIM-ACR pneumothorax.
    Siim,
    /// RSNA pneumonia detection (boxes as masks).
    Rsna,
    /// Lung masks.
    Lung,
    /// Shenzhen lung masks.
    Shenzhen,
}

/// What to prepare and how.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Which dataset.
    pub dataset: SegDataset,
    /// The download, as published.
    pub raw: PathBuf,
    /// The folder to write.
    pub out: PathBuf,
    /// A folder with `train.txt` and `test.txt` to use instead of a random split.
    pub splits: Option<PathBuf>,
    /// SIIM: every run-length row and the negative images; RSNA: every box.
    pub all_parts: bool,
    /// Seed of the random split.
    pub seed: u64,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrepareReport {
    /// Image / mask pairs written.
    pub pairs: usize,
    /// Names in `train.txt`.
    pub train: usize,
    /// Names in `test.txt`.
    pub test: usize,
    /// Inputs left out, and why.
    pub skipped: Vec<Failure>,
}

/// Prepare a dataset (see the module's description).
pub fn prepare(o: &PrepareOptions) -> Result<PrepareReport> {
    for sub in ["images", "masks"] {
        let d = o.out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let mut skipped = Vec::new();
    let (names, fixed_split) = match o.dataset {
        SegDataset::Siim => (siim(o, &mut skipped)?, None),
        SegDataset::Rsna => (rsna(o, &mut skipped)?, None),
        SegDataset::Lung => {
            let (names, split) = lung(o, &mut skipped)?;
            (names, Some(split))
        }
        SegDataset::Shenzhen => (shenzhen(o, &mut skipped)?, None),
    };
    let (train, test) = match (&o.splits, fixed_split) {
        (Some(dir), _) => {
            let read = |f: &str| -> Result<Vec<String>> {
                let p = dir.join(f);
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                Ok(text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect())
            };
            let (mut train, mut test) = (read("train.txt")?, read("test.txt")?);
            for list in [&mut train, &mut test] {
                list.retain(|n| {
                    let ok = names.contains(n);
                    if !ok {
                        skipped.push(Failure {
                            input: PathBuf::from(n),
                            error: "in the split list but not prepared".into(),
                        });
                    }
                    ok
                });
            }
            (train, test)
        }
        (None, Some(split)) => split,
        (None, None) => random_split(&names, o.seed),
    };
    let write_list = |name: &str, list: &[String]| -> Result<()> {
        let p = o.out.join(name);
        let text: String = list.iter().map(|n| format!("{n}\n")).collect();
        write_atomic(&p, text.as_bytes()).map_err(|e| Error::io(&p, e))
    };
    write_list("train.txt", &train)?;
    write_list("test.txt", &test)?;
    Ok(PrepareReport {
        pairs: names.len(),
        train: train.len(),
        test: test.len(),
        skipped,
    })
}

/// 70 % of the sorted names, shuffled with `seed`, train; the rest test (each list sorted).
fn random_split(names: &BTreeSet<String>, seed: u64) -> (Vec<String>, Vec<String>) {
    let mut all: Vec<String> = names.iter().cloned().collect();
    let mut rng = crate::rng::Rng::new(seed);
    for i in (1..all.len()).rev() {
        let j = (rng.unit() * (i + 1) as f64) as usize;
        all.swap(i, j.min(i));
    }
    let cut = all.len() * 7 / 10;
    let (mut train, mut test) = (all[..cut].to_vec(), all[cut..].to_vec());
    train.sort();
    test.sort();
    (train, test)
}

/// Write a grey 8-bit PNG atomically.
fn save_grey(path: &Path, width: usize, height: usize, data: &[u8]) -> Result<()> {
    Rgb {
        width,
        height,
        data: data.iter().flat_map(|&v| [v; 3]).collect(),
    }
    .save_png_grey_or_rgb(path, true)
    .map_err(|e| Error::io(path, e))
}

/// A pair under `name`: the image's stored values as 8 bits and the mask.
fn save_pair(o: &PrepareOptions, name: &str, img: &Image, mask: &[u8]) -> Result<()> {
    let grey: Vec<u8> = img.data.iter().step_by(img.channels).copied().collect();
    save_grey(
        &o.out.join("images").join(format!("{name}.png")),
        img.width,
        img.height,
        &grey,
    )?;
    save_grey(
        &o.out.join("masks").join(format!("{name}.png")),
        img.width,
        img.height,
        mask,
    )
}

/// A DICOM's first frame's stored values cast to 8 bits as numpy's `astype(uint8)` (modulo
/// 256), first sample of each pixel.
fn dicom_as_u8(path: &Path) -> Result<Image> {
    let d = DicomFile::open(path)?;
    let v = d.stored_values(Some(0))?;
    Ok(Image {
        width: v.cols,
        height: v.rows,
        channels: 1,
        data: v
            .values
            .iter()
            .step_by(v.samples)
            .map(|&x| x as u8)
            .collect(),
    })
}

/// The rows of a CSV file with a header: each row as a map from the (trimmed) column name to
/// the (trimmed) field, with its line number.
fn read_csv(path: &Path, needed: &[&str]) -> Result<Vec<(usize, BTreeMap<String, String>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = lines
        .next()
        .map(|(_, h)| h.split(',').map(|c| c.trim().to_string()).collect())
        .unwrap_or_default();
    for n in needed {
        if !header.iter().any(|h| h == n) {
            return Err(Error::Invalid(format!(
                "{}: no column '{n}' in the header {header:?}",
                path.display()
            )));
        }
    }
    Ok(lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let row = header
                .iter()
                .cloned()
                .zip(l.split(',').map(|f| f.trim().to_string()))
                .collect();
            (i + 1, row)
        })
        .collect())
}

/// Every file under `dir` (recursively) with extension `ext`, by its stem.
fn files_by_stem(dir: &Path, ext: &str) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case(ext)) {
                out.insert(crate::io::file_stem(&p), p);
            }
        }
    }
    Ok(out)
}

/// SIIM's run-length code as a `rows x cols` mask (1 inside): pairs of (start relative to the
/// end of the previous run, length), positions counted column by column.
pub fn rle_to_mask(rle: &str, rows: usize, cols: usize) -> std::result::Result<Vec<u8>, String> {
    let nums: Vec<i64> = rle
        .split_whitespace()
        .map(|t| t.parse().map_err(|_| format!("'{t}' is not a number")))
        .collect::<std::result::Result<_, _>>()?;
    if !nums.len().is_multiple_of(2) {
        return Err(format!(
            "{} numbers: starts and lengths must pair up",
            nums.len()
        ));
    }
    let n = (rows * cols) as i64;
    let mut mask = vec![0u8; rows * cols];
    let mut pos = 0i64;
    for pair in nums.chunks_exact(2) {
        let (start, len) = (pair[0], pair[1]);
        if start < 0 || len < 0 {
            return Err(format!("negative start or length ({start} {len})"));
        }
        pos += start;
        if pos + len > n {
            return Err(format!(
                "a run ends at {} past the {rows}x{cols} image",
                pos + len
            ));
        }
        for k in pos..pos + len {
            let k = k as usize;
            mask[(k % rows) * cols + k / rows] = 1;
        }
        pos += len;
    }
    Ok(mask)
}

fn siim(o: &PrepareOptions, skipped: &mut Vec<Failure>) -> Result<BTreeSet<String>> {
    let csv_path = o.raw.join("train-rle.csv");
    let rows = read_csv(&csv_path, &["ImageId", "EncodedPixels"])?;
    // Per image: its rows' codes in file order.
    let mut codes: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for (line, row) in rows {
        codes
            .entry(row["ImageId"].clone())
            .or_default()
            .push((line, row.get("EncodedPixels").cloned().unwrap_or_default()));
    }
    let files = files_by_stem(&o.raw.join("dicom-images-train"), "dcm")?;
    let pb = progress(files.len(), "siim");
    let mut names = BTreeSet::new();
    for (id, path) in &files {
        pb.inc(1);
        let Some(rows) = codes.get(id) else {
            continue;
        };
        let positive: Vec<&(usize, String)> = rows.iter().filter(|(_, c)| c != "-1").collect();
        // The original: the last row only (a dict overwrite), and only when it is a mask.
        let used: Vec<&(usize, String)> = if o.all_parts {
            positive
        } else {
            match rows.last() {
                Some(last) if last.1 != "-1" && !last.1.is_empty() => vec![last],
                _ => continue,
            }
        };
        let done = (|| -> Result<()> {
            let img = dicom_as_u8(path)?;
            let mut mask = vec![0u8; img.width * img.height];
            for (line, code) in used {
                let part = rle_to_mask(code, img.height, img.width).map_err(|e| {
                    Error::Invalid(format!("{} line {line}: {e}", csv_path.display()))
                })?;
                mask.iter_mut().zip(part).for_each(|(m, p)| *m |= p);
            }
            save_pair(o, id, &img, &mask)
        })();
        match done {
            Ok(()) => {
                names.insert(id.clone());
            }
            Err(e) => skipped.push(Failure {
                input: path.clone(),
                error: e.to_string(),
            }),
        }
    }
    pb.finish_and_clear();
    Ok(names)
}

fn rsna(o: &PrepareOptions, skipped: &mut Vec<Failure>) -> Result<BTreeSet<String>> {
    let csv_path = o.raw.join("stage_2_train_labels.csv");
    let rows = read_csv(&csv_path, &["patientId", "x", "y", "width", "height"])?;
    let mut boxes: BTreeMap<String, Vec<Option<[f64; 4]>>> = BTreeMap::new();
    for (line, row) in rows {
        let f = |k: &str| row[k].parse::<f64>().ok().filter(|v| v.is_finite());
        let b = match (f("x"), f("y"), f("width"), f("height")) {
            (Some(x), Some(y), Some(w), Some(h)) => Some([x, y, w, h]),
            (None, None, None, None) => None,
            _ => {
                return Err(Error::Invalid(format!(
                    "{} line {line}: a box needs x, y, width and height",
                    csv_path.display()
                )));
            }
        };
        boxes.entry(row["patientId"].clone()).or_default().push(b);
    }
    let files = files_by_stem(&o.raw.join("stage_2_train_images"), "dcm")?;
    let pb = progress(files.len(), "rsna");
    let mut names = BTreeSet::new();
    for (stem, path) in &files {
        pb.inc(1);
        let done = (|| -> Result<bool> {
            let d = DicomFile::open(path)?;
            let patient = d.patient_id().unwrap_or_else(|| stem.clone());
            let Some(rows) = boxes.get(&patient) else {
                return Err(Error::Invalid(format!(
                    "patient {patient} is not in the labels"
                )));
            };
            // The original: the patient's last row; with --all-parts, every box.
            let used: Vec<[f64; 4]> = if o.all_parts {
                rows.iter().flatten().copied().collect()
            } else {
                rows.last().copied().flatten().into_iter().collect()
            };
            if used.is_empty() {
                return Ok(false);
            }
            let img = dicom_as_u8(path)?;
            let mut mask = vec![0u8; img.width * img.height];
            for [x, y, w, h] in used {
                // cv2.rectangle(mask, (int(x), int(y)), (int(x + w), int(y + h)), 255, -1).
                let (x0, y0) = (x.trunc() as i64, y.trunc() as i64);
                let (x1, y1) = ((x + w).trunc() as i64, (y + h).trunc() as i64);
                let clip = |v: i64, n: usize| v.clamp(0, n as i64 - 1) as usize;
                if x1 < 0 || y1 < 0 || x0 >= img.width as i64 || y0 >= img.height as i64 {
                    continue;
                }
                for r in clip(y0, img.height)..=clip(y1, img.height) {
                    for c in clip(x0, img.width)..=clip(x1, img.width) {
                        mask[r * img.width + c] = 1;
                    }
                }
            }
            save_pair(o, stem, &img, &mask)?;
            Ok(true)
        })();
        match done {
            Ok(true) => {
                names.insert(stem.clone());
            }
            Ok(false) => {}
            Err(e) => skipped.push(Failure {
                input: path.clone(),
                error: e.to_string(),
            }),
        }
    }
    pb.finish_and_clear();
    Ok(names)
}

/// A mask file as 0/1: any non-zero value is foreground.
fn binary_mask(path: &Path) -> Result<Image> {
    let mut m = Image::open(path)?;
    m.data = m
        .data
        .chunks_exact(m.channels)
        .map(|p| (p[0] != 0) as u8)
        .collect();
    m.channels = 1;
    Ok(m)
}

/// Copy an image file to `images/<name>.png` (PNG bytes as they are; anything else decoded and
/// written as PNG).
fn copy_image(o: &PrepareOptions, src: &Path, name: &str) -> Result<(usize, usize)> {
    let img = Image::open(src)?;
    let dst = o.out.join("images").join(format!("{name}.png"));
    if src
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        std::fs::copy(src, &dst).map_err(|e| Error::io(&dst, e))?;
    } else {
        Rgb::from_image(&img)
            .save_png_grey_or_rgb(&dst, img.channels == 1)
            .map_err(|e| Error::io(&dst, e))?;
    }
    Ok((img.width, img.height))
}

/// Write `mask` as `masks/<name>.png` after checking it has the image's size.
fn save_mask(o: &PrepareOptions, name: &str, size: (usize, usize), mask: &Image) -> Result<()> {
    if (mask.width, mask.height) != size {
        return Err(Error::Invalid(format!(
            "mask {}x{} for an image of {}x{}",
            mask.width, mask.height, size.0, size.1
        )));
    }
    save_grey(
        &o.out.join("masks").join(format!("{name}.png")),
        mask.width,
        mask.height,
        &mask.data,
    )
}

type Split = (Vec<String>, Vec<String>);

fn lung(o: &PrepareOptions, skipped: &mut Vec<Failure>) -> Result<(BTreeSet<String>, Split)> {
    let mut names = BTreeSet::new();
    let mut split: Split = (Vec::new(), Vec::new());
    for (part, list) in [("Train", &mut split.0), ("Test", &mut split.1)] {
        let images = files_by_stem(&o.raw.join(part).join("Images"), "png")?;
        let masks = o.raw.join(part).join("Masks");
        for (name, path) in images {
            let done = (|| -> Result<()> {
                let size = copy_image(o, &path, &name)?;
                save_mask(
                    o,
                    &name,
                    size,
                    &binary_mask(&masks.join(format!("{name}.png")))?,
                )
            })();
            match done {
                Ok(()) => {
                    names.insert(name.clone());
                    list.push(name);
                }
                Err(e) => skipped.push(Failure {
                    input: path,
                    error: e.to_string(),
                }),
            }
        }
    }
    Ok((names, split))
}

fn shenzhen(o: &PrepareOptions, skipped: &mut Vec<Failure>) -> Result<BTreeSet<String>> {
    let mask_dir = ["Annotations/masks", "masks"]
        .iter()
        .map(|d| o.raw.join(d))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no Annotations/masks or masks folder",
                o.raw.display()
            ))
        })?;
    // The masks of one image share its first 13 characters (CHNCXR_0001_0).
    let mut groups: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (stem, path) in files_by_stem(&mask_dir, "png")? {
        let prefix: String = stem.chars().take(13).collect();
        groups.entry(prefix).or_default().push(path);
    }
    let mut names = BTreeSet::new();
    for (name, parts) in groups {
        let image = o.raw.join("CXR_png").join(format!("{name}.png"));
        let done = (|| -> Result<()> {
            let size = copy_image(o, &image, &name)?;
            let mut merged: Option<Image> = None;
            for p in &parts {
                let m = binary_mask(p)?;
                merged = Some(match merged {
                    None => m,
                    Some(mut acc) => {
                        if (acc.width, acc.height) != (m.width, m.height) {
                            return Err(Error::Invalid(format!(
                                "{}: not the size of the other masks",
                                p.display()
                            )));
                        }
                        acc.data.iter_mut().zip(&m.data).for_each(|(a, b)| *a |= b);
                        acc
                    }
                });
            }
            save_mask(o, &name, size, &merged.expect("a group has a mask"))
        })();
        match done {
            Ok(()) => {
                names.insert(name);
            }
            Err(e) => skipped.push(Failure {
                input: image,
                error: e.to_string(),
            }),
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_starts_are_relative_and_fill_column_by_column() {
        // A 3 x 2 image: positions run down the first column (0, 1, 2), then the second.
        // "1 2 1 1": skip 1, fill 2 (positions 1, 2), skip 1 (3), fill 1 (position 4).
        let m = rle_to_mask("1 2 1 1", 3, 2).unwrap();
        assert_eq!(m, vec![0, 0, 1, 1, 1, 0]);
        assert!(rle_to_mask("1 2 3", 3, 2).unwrap_err().contains("pair up"));
        assert!(
            rle_to_mask("5 2", 3, 2)
                .unwrap_err()
                .contains("past the 3x2 image")
        );
        assert!(
            rle_to_mask("x 1", 3, 2)
                .unwrap_err()
                .contains("'x' is not a number")
        );
    }
}
