//! timm's RandAugment with the "increasing" op set, as `rand-m6-mstd0.5-inc1` configures it:
//! two ops per image, each applied with probability 0.5 at a magnitude drawn from
//! N(m, mstd) clipped to [0, 10]. Ops work on 8-bit grey or RGB images; geometric ones fill
//! with the normalisation mean (as timm's `img_mean`) and sample bilinearly.

use crate::preprocess::Image;
use crate::rng::Rng;

/// A parsed policy string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    /// Magnitude (0-10).
    pub magnitude: f64,
    /// Standard deviation of the magnitude noise.
    pub magnitude_std: f64,
    /// Ops per image.
    pub layers: usize,
    /// Fill value of geometric ops.
    pub fill: u8,
}

const OPS: [&str; 15] = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
];

impl RandAugment {
    /// Parse `rand-m{M}-mstd{S}-n{N}-inc{0|1}` (only the increasing op set is provided).
    pub fn parse(s: &str, fill: u8) -> crate::Result<Self> {
        let mut r = RandAugment {
            magnitude: 10.0,
            magnitude_std: 0.0,
            layers: 2,
            fill,
        };
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(crate::Error::Invalid(format!(
                "RandAugment policy '{s}' must start with 'rand'"
            )));
        }
        for p in parts {
            let bad = || format!("RandAugment policy '{s}': bad part '{p}'");
            if let Some(v) = p.strip_prefix("mstd") {
                r.magnitude_std = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = p.strip_prefix('m') {
                r.magnitude = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = p.strip_prefix('n') {
                r.layers = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = p.strip_prefix("inc") {
                if v != "1" {
                    return Err(crate::Error::Invalid(format!(
                        "RandAugment policy '{s}': only the increasing op set (inc1) is provided"
                    )));
                }
            } else {
                return Err(bad().into());
            }
        }
        Ok(r)
    }

    /// Apply to an image.
    pub fn apply(&self, img: &mut Image, rng: &mut Rng) {
        for _ in 0..self.layers {
            let op = OPS[rng.below(OPS.len())];
            if rng.unit() >= 0.5 {
                continue;
            }
            let noise = {
                let (u1, u2) = (rng.unit().max(1e-300), rng.unit());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            };
            let m = (self.magnitude + self.magnitude_std * noise).clamp(0.0, 10.0) / 10.0;
            let sign = if rng.unit() < 0.5 { -1.0 } else { 1.0 };
            apply_op(img, op, m, sign, self.fill);
        }
    }
}

fn map(img: &mut Image, f: impl Fn(u8) -> u8) {
    let lut: Vec<u8> = (0..=255u8).map(f).collect();
    img.data.iter_mut().for_each(|v| *v = lut[*v as usize]);
}

fn blend(img: &mut Image, other: &[u8], factor: f64) {
    for (v, &o) in img.data.iter_mut().zip(other) {
        *v = (o as f64 + factor * (*v as f64 - o as f64))
            .round()
            .clamp(0.0, 255.0) as u8;
    }
}

fn grey(img: &Image) -> Vec<f64> {
    img.data
        .chunks_exact(img.channels)
        .map(|p| {
            if p.len() == 3 {
                0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64
            } else {
                p[0] as f64
            }
        })
        .collect()
}

/// Inverse-map affine warp: output (x, y) samples input at `a * (x, y, 1)`.
fn affine(img: &mut Image, a: [f64; 6], fill: u8) {
    let (w, h, c) = (img.width, img.height, img.channels);
    let src = img.data.clone();
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64 + 0.5, y as f64 + 0.5);
            let sx = a[0] * xf + a[1] * yf + a[2] - 0.5;
            let sy = a[3] * xf + a[4] * yf + a[5] - 0.5;
            for k in 0..c {
                let v = if sx < -0.5 || sy < -0.5 || sx > w as f64 - 0.5 || sy > h as f64 - 0.5 {
                    fill as f64
                } else {
                    let (x0, y0) = (sx.floor().max(0.0) as usize, sy.floor().max(0.0) as usize);
                    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                    let (fx, fy) = (
                        (sx - x0 as f64).clamp(0.0, 1.0),
                        (sy - y0 as f64).clamp(0.0, 1.0),
                    );
                    let p = |xx: usize, yy: usize| src[(yy * w + xx) * c + k] as f64;
                    (p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx) * (1.0 - fy)
                        + (p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx) * fy
                };
                img.data[(y * w + x) * c + k] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

fn apply_op(img: &mut Image, op: &str, m: f64, sign: f64, fill: u8) {
    let (w, h) = (img.width as f64, img.height as f64);
    let enhance = 1.0 + m * 0.9 * sign;
    match op {
        "AutoContrast" => {
            for k in 0..img.channels {
                let vals = img.data.iter().skip(k).step_by(img.channels);
                let (lo, hi) = vals.fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
                if hi > lo {
                    let scale = 255.0 / (hi - lo) as f64;
                    for v in img.data.iter_mut().skip(k).step_by(img.channels) {
                        *v = ((*v - lo) as f64 * scale).round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
        "Equalize" => {
            for k in 0..img.channels {
                let mut hist = [0usize; 256];
                img.data
                    .iter()
                    .skip(k)
                    .step_by(img.channels)
                    .for_each(|&v| hist[v as usize] += 1);
                let n: usize = hist.iter().sum();
                let last = hist.iter().rposition(|&c| c > 0).map_or(0, |i| hist[i]);
                let step = (n - last) / 255;
                if step == 0 {
                    continue;
                }
                let mut lut = [0u8; 256];
                let mut acc = step / 2;
                for (i, &c) in hist.iter().enumerate() {
                    lut[i] = (acc / step).min(255) as u8;
                    acc += c;
                }
                img.data
                    .iter_mut()
                    .skip(k)
                    .step_by(img.channels)
                    .for_each(|v| *v = lut[*v as usize]);
            }
        }
        "Invert" => map(img, |v| 255 - v),
        "PosterizeIncreasing" => {
            let bits = (4 - (m * 4.0) as u32).clamp(1, 8);
            let mask = !((1u32 << (8 - bits)) - 1) as u8;
            map(img, |v| v & mask)
        }
        "SolarizeIncreasing" => {
            let t = (256.0 - m * 256.0) as i32;
            map(img, |v| if v as i32 >= t { 255 - v } else { v })
        }
        "SolarizeAdd" => {
            let add = (m * 110.0) as i32;
            map(img, |v| {
                if v < 128 {
                    (v as i32 + add).min(255) as u8
                } else {
                    v
                }
            })
        }
        "ColorIncreasing" if img.channels == 3 => {
            let g: Vec<u8> = grey(img)
                .iter()
                .flat_map(|&v| [v.round() as u8; 3])
                .collect();
            blend(img, &g, enhance);
        }
        "ContrastIncreasing" => {
            let mean = (grey(img).iter().sum::<f64>() / (w * h)).round() as u8;
            let other = vec![mean; img.data.len()];
            blend(img, &other, enhance);
        }
        "BrightnessIncreasing" => {
            let other = vec![0u8; img.data.len()];
            blend(img, &other, enhance);
        }
        "SharpnessIncreasing" => {
            // PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, borders kept.
            let (iw, ih, c) = (img.width, img.height, img.channels);
            let mut smooth = img.data.clone();
            for y in 1..ih.saturating_sub(1) {
                for x in 1..iw.saturating_sub(1) {
                    for k in 0..c {
                        let mut s = 0u32;
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let wgt = if dx == 1 && dy == 1 { 5 } else { 1 };
                                s +=
                                    wgt * img.data[((y + dy - 1) * iw + x + dx - 1) * c + k] as u32;
                            }
                        }
                        smooth[(y * iw + x) * c + k] = ((s as f64) / 13.0).round() as u8;
                    }
                }
            }
            blend(img, &smooth, enhance);
        }
        "Rotate" => {
            let t = (m * 30.0 * sign).to_radians();
            let (cx, cy) = (w / 2.0, h / 2.0);
            let (c, s) = (t.cos(), t.sin());
            affine(
                img,
                [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy],
                fill,
            );
        }
        "ShearX" => affine(img, [1.0, m * 0.3 * sign, 0.0, 0.0, 1.0, 0.0], fill),
        "ShearY" => affine(img, [1.0, 0.0, 0.0, m * 0.3 * sign, 1.0, 0.0], fill),
        "TranslateXRel" => affine(img, [1.0, 0.0, m * 0.45 * w * sign, 0.0, 1.0, 0.0], fill),
        "TranslateYRel" => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, m * 0.45 * h * sign], fill),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses_and_ops_keep_the_size() {
        let r = RandAugment::parse("rand-m6-mstd0.5-inc1", 125).unwrap();
        assert_eq!((r.magnitude, r.magnitude_std, r.layers), (6.0, 0.5, 2));
        assert!(RandAugment::parse("auto-m6", 0).is_err());
        let base = Image {
            width: 20,
            height: 16,
            channels: 1,
            data: (0..320).map(|i| (i % 251) as u8).collect(),
        };
        for op in OPS {
            let mut img = base.clone();
            apply_op(&mut img, op, 0.6, 1.0, 125);
            assert_eq!(img.data.len(), base.data.len(), "{op}");
        }
        let mut img = base.clone();
        apply_op(&mut img, "Invert", 0.0, 1.0, 0);
        assert_eq!(img.data[0], 255);
    }
}
