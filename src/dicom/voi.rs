//! From stored values to 8 bits: Modality LUT, VOI, MONOCHROME1 inversion (DICOM PS3.3 C.11).

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::{DicomFile, StoredValues};
use crate::preprocess::Image;

/// Which VOI transform to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoiChoice {
    /// None: 8-bit data kept as stored; deeper data scaled from its minimum to its maximum.
    None,
    /// The first window of the header (or the first VOI LUT when there is no window; min-max
    /// when there is neither).
    First,
    /// The N-th window of the header (1-based).
    Window(usize),
}

impl VoiChoice {
    /// From `none`, `first` or a window number N (1-based).
    pub fn parse(s: &str) -> crate::Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "first" => Ok(Self::First),
            n => match n.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Self::Window(k)),
                _ => Err(crate::Error::Invalid(format!(
                    "--voi '{s}': expected none, first or a window number (1, 2, ...)"
                ))),
            },
        }
    }
}

/// A lookup table from a LUT sequence item.
struct Lut {
    first: i64,
    data: Vec<f64>,
    bits: u32,
}

impl Lut {
    fn read(seq: Tag, obj: &InMemDicomObject) -> crate::Result<Option<Self>> {
        let Some(e) = obj.element_opt(seq).ok().flatten() else {
            return Ok(None);
        };
        let Some(item) = e.items().and_then(|i| i.first()) else {
            return Ok(None);
        };
        let where_ = format!("({:04X},{:04X})", seq.0, seq.1);
        let desc: Vec<i64> = item
            .element(tags::LUT_DESCRIPTOR)
            .map_err(|_| format!("{where_} item has no LUT Descriptor (0028,3002)"))?
            .value()
            .to_multi_int()
            .map_err(|e| format!("LUT Descriptor (0028,3002): {e}"))?;
        if desc.len() != 3 {
            return Err(crate::Error::Invalid(format!(
                "LUT Descriptor (0028,3002) has {} values, 3 expected",
                desc.len()
            )));
        }
        // Entries are US (0 means 65536) or SS (values above 32767 read as negative);
        // first mapped value US or SS; bits 8..=16. Anything else is a damaged header.
        let n = match desc[0] {
            0 => 65536,
            e @ 1..=65535 => e as usize,
            e @ -32768..=-1 => (e + 65536) as usize,
            e => {
                return Err(crate::Error::Invalid(format!(
                    "LUT Descriptor (0028,3002) declares {e} entries"
                )));
            }
        };
        if !(-32768..=65535).contains(&desc[1]) {
            return Err(crate::Error::Invalid(format!(
                "LUT Descriptor (0028,3002) first mapped value {} is out of range",
                desc[1]
            )));
        }
        if !(1..=16).contains(&desc[2]) {
            return Err(crate::Error::Invalid(format!(
                "LUT Descriptor (0028,3002) declares {} bits per entry",
                desc[2]
            )));
        }
        let value = item
            .element(tags::LUT_DATA)
            .map_err(|_| format!("{where_} item has no LUT Data (0028,3006)"))?
            .value();
        let data: Vec<f64> = match value.to_multi_int::<i64>() {
            Ok(v) if v.len() >= n => v.iter().take(n).map(|&x| x as f64).collect(),
            _ => {
                let bytes = value
                    .to_bytes()
                    .map_err(|e| format!("LUT Data (0028,3006): {e}"))?;
                if bytes.len() < 2 * n {
                    return Err(crate::Error::Invalid(format!(
                        "LUT Data (0028,3006) holds {} bytes for {n} entries",
                        bytes.len()
                    )));
                }
                bytes
                    .chunks_exact(2)
                    .take(n)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as f64)
                    .collect()
            }
        };
        Ok(Some(Lut {
            first: desc[1],
            data,
            bits: desc[2] as u32,
        }))
    }

    fn apply(&self, x: f64) -> f64 {
        let i = (x.round() as i64).saturating_sub(self.first);
        let i = i.clamp(0, self.data.len() as i64 - 1) as usize;
        self.data[i]
    }
}

/// DICOM's window functions, output in [0, 255].
fn window(x: f64, c: f64, w: f64, function: &str) -> f64 {
    const YMAX: f64 = 255.0;
    match function {
        "LINEAR_EXACT" => {
            if x <= c - w / 2.0 {
                0.0
            } else if x > c + w / 2.0 {
                YMAX
            } else {
                ((x - c) / w + 0.5) * YMAX
            }
        }
        "SIGMOID" => YMAX / (1.0 + (-4.0 * (x - c) / w).exp()),
        _ => {
            let w1 = (w - 1.0).max(f64::MIN_POSITIVE);
            if x <= c - 0.5 - (w - 1.0) / 2.0 {
                0.0
            } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                YMAX
            } else {
                ((x - (c - 0.5)) / w1 + 0.5) * YMAX
            }
        }
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

/// Render stored values to the 8-bit image, recording each step.
pub fn render(
    file: &DicomFile,
    s: &StoredValues,
    voi: &VoiChoice,
) -> crate::Result<(Image, Vec<String>)> {
    let i = &file.info;
    let mut steps = vec![format!(
        "stored values: {} of {} bits, {}",
        i.bits_stored,
        i.bits_allocated,
        if i.pixel_representation == 1 {
            "signed"
        } else {
            "unsigned"
        }
    )];
    let n = s.rows * s.cols * s.samples;
    let frame = &s.values[..n];
    if s.samples == 3 {
        // Colour: decoders deliver RGB (YBR_FULL converted where stored natively).
        let max = ((1u64 << i.bits_stored.min(16)) - 1) as f64;
        let mut rgb: Vec<f64> = frame.iter().map(|&v| v as f64 * 255.0 / max).collect();
        if i.photometric == "YBR_FULL" && !i.transfer_syntax.starts_with("1.2.840.10008.1.2.4.") {
            for p in rgb.chunks_exact_mut(3) {
                let (y, cb, cr) = (p[0], p[1] - 128.0, p[2] - 128.0);
                p[0] = y + 1.402 * cr;
                p[1] = y - 0.344136 * cb - 0.714136 * cr;
                p[2] = y + 1.772 * cb;
            }
            steps.push("YBR_FULL converted to RGB".into());
        }
        steps.push(format!("{} samples scaled to 8 bits", i.photometric));
        let data = rgb
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect();
        return Ok((
            Image {
                width: s.cols,
                height: s.rows,
                channels: 3,
                data,
            },
            steps,
        ));
    }
    let obj = file.object();
    let mut v: Vec<f64> = frame.iter().map(|&x| x as f64).collect();
    let mut modality_identity = true;
    if let Some(lut) = Lut::read(tags::MODALITY_LUT_SEQUENCE, obj)? {
        modality_identity = false;
        v.iter_mut().for_each(|x| *x = lut.apply(*x));
        steps.push(format!(
            "Modality LUT sequence ({} entries from {})",
            lut.data.len(),
            lut.first
        ));
    } else {
        let (m, b) = (
            i.rescale_slope.unwrap_or(1.0),
            i.rescale_intercept.unwrap_or(0.0),
        );
        if m != 1.0 || b != 0.0 {
            modality_identity = false;
            v.iter_mut().for_each(|x| *x = *x * m + b);
            steps.push(format!("rescale: slope {m}, intercept {b}"));
        }
    }
    let function = i
        .voi_lut_function
        .as_deref()
        .unwrap_or("LINEAR")
        .to_ascii_uppercase();
    let win = match voi {
        VoiChoice::None => None,
        VoiChoice::First => i.windows.first(),
        VoiChoice::Window(k) => Some(i.windows.get(k - 1).ok_or_else(|| {
            format!(
                "window {k} requested; the header has {} (Window Center/Width (0028,1050-1051))",
                i.windows.len()
            )
        })?),
    };
    let voi_lut = match (voi, win) {
        (VoiChoice::First, None) => Lut::read(tags::VOILUT_SEQUENCE, obj)?,
        _ => None,
    };
    if let Some(w) = win {
        if w.width.is_nan() || w.width <= 0.0 || !w.center.is_finite() {
            return Err(crate::Error::Invalid(format!(
                "Window Width (0028,1051) = {} is not positive",
                w.width
            )));
        }
        v.iter_mut()
            .for_each(|x| *x = window(*x, w.center, w.width, &function));
        steps.push(format!(
            "VOI window: centre {}, width {}, {function}",
            w.center, w.width
        ));
    } else if let Some(lut) = voi_lut {
        let scale = 255.0 / ((1u64 << lut.bits) - 1) as f64;
        v.iter_mut().for_each(|x| *x = lut.apply(*x) * scale);
        steps.push(format!(
            "VOI LUT sequence ({} entries, {} bits)",
            lut.data.len(),
            lut.bits
        ));
    } else if modality_identity && i.bits_stored <= 8 && i.pixel_representation == 0 {
        // 8-bit data without a window is already a display image: keep it.
        let full = ((1u32 << i.bits_stored) - 1) as f64;
        v.iter_mut().for_each(|x| *x = *x * 255.0 / full);
        steps.push(format!(
            "no VOI: {}-bit stored values kept (0..{full} to 0..255)",
            i.bits_stored
        ));
    } else {
        let (lo, hi) = min_max(&v);
        let span = if hi > lo { hi - lo } else { 1.0 };
        v.iter_mut().for_each(|x| *x = (*x - lo) / span * 255.0);
        steps.push(format!(
            "no VOI{}: values {lo}..{hi} scaled to 0..255",
            if matches!(voi, VoiChoice::None) {
                ""
            } else {
                " in the header"
            }
        ));
    }
    if i.photometric == "MONOCHROME1" {
        v.iter_mut().for_each(|x| *x = 255.0 - *x);
        steps.push("MONOCHROME1 inverted (air dark)".into());
    }
    steps.push("rounded to 8 bits".into());
    let data = v
        .iter()
        .map(|x| x.round().clamp(0.0, 255.0) as u8)
        .collect();
    Ok((
        Image {
            width: s.cols,
            height: s.rows,
            channels: 1,
            data,
        },
        steps,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_functions_follow_the_standard() {
        // LINEAR, c = 100, w = 21: below 89.5 -> 0, above 109.5 -> 255.
        assert_eq!(window(89.0, 100.0, 21.0, "LINEAR"), 0.0);
        assert_eq!(window(110.0, 100.0, 21.0, "LINEAR"), 255.0);
        assert!((window(99.5, 100.0, 21.0, "LINEAR") - 127.5).abs() < 1e-9);
        assert!((window(100.0, 100.0, 20.0, "LINEAR_EXACT") - 127.5).abs() < 1e-9);
        assert!((window(100.0, 100.0, 20.0, "SIGMOID") - 127.5).abs() < 1e-9);
        assert_eq!(VoiChoice::parse("2").unwrap(), VoiChoice::Window(2));
        assert!(VoiChoice::parse("0").is_err());
    }
}
