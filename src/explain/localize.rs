//! Localisation scoring of CAMs against the NIH boxes, as the original's `get_cams.py` does it
//! (REFERENCE.md 7): boxes truncated to integers, scaled to the CAM and truncated again,
//! IoU of `cam > t` with the box, AP25 / AP50 / mIoU / mAP per finding and overall.

use std::collections::BTreeMap;
use std::path::Path;

use crate::labels::CXR14;

/// One row of `BBox_List_2017.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct NihBox {
    /// Image file name.
    pub image: String,
    /// Finding label as written in the CSV (`Infiltrate` for CXR14's Infiltration).
    pub finding: String,
    /// Left, top, width, height in the 1024 x 1024 image.
    pub bbox: [f64; 4],
    /// Line number in the CSV (1-based).
    pub line: usize,
}

/// A malformed CSV row.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// Line number (1-based).
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

/// Read the NIH box list; tolerates the trailing empty columns; bad rows are returned, not fatal.
pub fn read_boxes(path: &Path) -> Result<(Vec<NihBox>, Vec<BadRow>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut boxes = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || (i == 0 && line.starts_with("Image Index")) {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let filled: Vec<&str> = fields.iter().copied().filter(|f| !f.is_empty()).collect();
        if filled.len() != 6 {
            bad.push(BadRow {
                line: line_no,
                what: format!(
                    "expected image, finding and 4 box values, found {} fields",
                    filled.len()
                ),
            });
            continue;
        }
        let mut bbox = [0f64; 4];
        let mut ok = true;
        for (j, v) in filled[2..6].iter().enumerate() {
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => bbox[j] = x,
                _ => {
                    bad.push(BadRow {
                        line: line_no,
                        what: format!("box value '{v}' is not a non-negative number"),
                    });
                    ok = false;
                    break;
                }
            }
        }
        if ok && finding_class(filled[1]).is_none() {
            bad.push(BadRow {
                line: line_no,
                what: format!("unknown finding '{}'", filled[1]),
            });
            ok = false;
        }
        if ok {
            boxes.push(NihBox {
                image: filled[0].to_string(),
                finding: filled[1].to_string(),
                bbox,
                line: line_no,
            });
        }
    }
    Ok((boxes, bad))
}

/// The CXR14 class index of a box finding (`Infiltrate` is CXR14's `Infiltration`).
pub fn finding_class(finding: &str) -> Option<usize> {
    let name = if finding == "Infiltrate" {
        "Infiltration"
    } else {
        finding
    };
    CXR14.iter().position(|c| *c == name)
}

/// How a box maps into CAM pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxMapping {
    /// Multiply original coordinates by this (after truncating them to integers).
    pub scale: f64,
    /// Then subtract this offset (a centre crop), in CAM pixels.
    pub offset: (i64, i64),
}

/// A box in CAM pixels (integers, as the original truncates them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PixelBox {
    /// Left.
    pub x: i64,
    /// Top.
    pub y: i64,
    /// Width.
    pub w: i64,
    /// Height.
    pub h: i64,
}

impl BoxMapping {
    /// Map a box: each value truncated to an integer, scaled, truncated again, then shifted.
    pub fn map(&self, b: &[f64; 4]) -> PixelBox {
        let t = |v: f64| ((v as i64) as f64 * self.scale) as i64;
        PixelBox {
            x: t(b[0]) - self.offset.0,
            y: t(b[1]) - self.offset.1,
            w: t(b[2]),
            h: t(b[3]),
        }
    }
}

/// The thresholds the original sweeps: 0.01, 0.02, ..., 0.60.
pub fn thresholds() -> Vec<f32> {
    (1..=60).map(|i| i as f32 / 100.0).collect()
}

/// IoU of `cam > t` (a `[h, w]` map) with the box (clipped to the map).
pub fn iou(cam: &[f32], (h, w): (usize, usize), b: &PixelBox, t: f32) -> f64 {
    let (x0, x1) = (
        b.x.clamp(0, w as i64) as usize,
        (b.x + b.w).clamp(0, w as i64) as usize,
    );
    let (y0, y1) = (
        b.y.clamp(0, h as i64) as usize,
        (b.y + b.h).clamp(0, h as i64) as usize,
    );
    let box_area = (x1 - x0) * (y1 - y0);
    let mut inter = 0usize;
    let mut cam_area = 0usize;
    for y in 0..h {
        for x in 0..w {
            if cam[y * w + x] > t {
                cam_area += 1;
                if (y0..y1).contains(&y) && (x0..x1).contains(&x) {
                    inter += 1;
                }
            }
        }
    }
    let union = cam_area + box_area - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

/// Localisation scores of a set of boxes at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scores {
    /// Boxes scored.
    pub boxes: usize,
    /// Share of boxes with IoU > 0.25.
    pub ap25: f64,
    /// Share of boxes with IoU > 0.5.
    pub ap50: f64,
    /// Mean IoU.
    pub miou: f64,
    /// (AP25 + AP50) / 2.
    pub map: f64,
}

/// Scores of a list of IoUs.
pub fn scores(ious: &[f64]) -> Scores {
    let n = ious.len().max(1) as f64;
    let ap25 = ious.iter().filter(|&&v| v > 0.25).count() as f64 / n;
    let ap50 = ious.iter().filter(|&&v| v > 0.5).count() as f64 / n;
    Scores {
        boxes: ious.len(),
        ap25,
        ap50,
        miou: ious.iter().sum::<f64>() / n,
        map: (ap25 + ap50) / 2.0,
    }
}

/// Per-threshold IoUs of every scored box.
#[derive(Debug, Clone)]
pub struct ScoredBox {
    /// The box.
    pub nih: NihBox,
    /// Its position in CAM pixels.
    pub pixels: PixelBox,
    /// IoU at each of [`thresholds`].
    pub ious: Vec<f64>,
}

/// The threshold index with the best overall mAP over `boxes` (the first of ties).
pub fn best_threshold(boxes: &[&ScoredBox]) -> usize {
    let n = thresholds().len();
    let mut best = (0, f64::NEG_INFINITY);
    for ti in 0..n {
        let ious: Vec<f64> = boxes.iter().map(|b| b.ious[ti]).collect();
        let m = scores(&ious).map;
        if m > best.1 {
            best = (ti, m);
        }
    }
    best.0
}

/// Overall and per-finding scores at threshold index `ti`.
pub fn report(boxes: &[&ScoredBox], ti: usize) -> (Scores, BTreeMap<String, Scores>) {
    let all: Vec<f64> = boxes.iter().map(|b| b.ious[ti]).collect();
    let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for b in boxes {
        per.entry(b.nih.finding.clone())
            .or_default()
            .push(b.ious[ti]);
    }
    (
        scores(&all),
        per.into_iter().map(|(k, v)| (k, scores(&v))).collect(),
    )
}

/// Split images into two halves by a seeded hash of their names (FNV-1a), for choosing a
/// threshold on one half and scoring it on the other.
pub fn half_of(image: &str, seed: u64) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in image.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche so that similar names spread evenly.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h & 1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_exact_box_is_one() {
        let mut cam = vec![0f32; 10 * 10];
        for y in 2..5 {
            for x in 3..7 {
                cam[y * 10 + x] = 1.0;
            }
        }
        let b = PixelBox {
            x: 3,
            y: 2,
            w: 4,
            h: 3,
        };
        assert_eq!(iou(&cam, (10, 10), &b, 0.5), 1.0);
        let half = PixelBox {
            x: 3,
            y: 2,
            w: 2,
            h: 3,
        };
        assert_eq!(iou(&cam, (10, 10), &half, 0.5), 0.5);
    }

    #[test]
    fn boxes_are_truncated_twice() {
        let m = BoxMapping {
            scale: 224.0 / 1024.0,
            offset: (0, 0),
        };
        let b = m.map(&[591.644, 457.278, 114.861, 113.777]);
        assert_eq!(
            b,
            PixelBox {
                x: 129,
                y: 99,
                w: 24,
                h: 24
            }
        );
    }

    #[test]
    fn infiltrate_is_infiltration() {
        assert_eq!(finding_class("Infiltrate"), Some(3));
        assert_eq!(finding_class("Mass"), Some(4));
        assert_eq!(finding_class("Cat"), None);
    }
}
