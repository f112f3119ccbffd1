//! Training-time image transforms: timm's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3,
//! bicubic), horizontal flip and RandAugment, or the plain evaluation transform.

use crate::preprocess::resize::resize_bicubic;
use crate::preprocess::{Image, Normalization, Preprocess};
use crate::rng::Rng;

use super::randaugment::RandAugment;

/// A training transform.
#[derive(Debug, Clone, Copy)]
pub enum Augment {
    /// The evaluation transform (resize, centre crop).
    Plain(Preprocess),
    /// RandomResizedCrop to `size` + horizontal flip (p = 0.5) + RandAugment.
    Timm {
        /// Output side.
        size: usize,
        /// Normalisation.
        norm: Normalization,
        /// RandAugment policy (None: off).
        rand_augment: Option<RandAugment>,
    },
}

/// timm's `RandomResizedCrop.get_params`: (top, left, height, width).
pub fn rrc_params(rng: &mut Rng, w: usize, h: usize) -> (usize, usize, usize, usize) {
    let area = (w * h) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (0.08 + rng.unit() * (1.0 - 0.08));
        let ratio = (lo + rng.unit() * (hi - lo)).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let top = rng.below(h - ch + 1);
            let left = rng.below(w - cw + 1);
            return (top, left, ch, cw);
        }
    }
    let r = w as f64 / h as f64;
    let (cw, ch) = if r < 3.0 / 4.0 {
        (w, (w as f64 / (3.0 / 4.0)).round() as usize)
    } else if r > 4.0 / 3.0 {
        ((h as f64 * 4.0 / 3.0).round() as usize, h)
    } else {
        (w, h)
    };
    (
        (h - ch.min(h)) / 2,
        (w - cw.min(w)) / 2,
        ch.min(h),
        cw.min(w),
    )
}

impl Augment {
    /// The `[3, size, size]` tensor data of one training image.
    pub fn apply(&self, img: &Image, rng: &mut Rng) -> Vec<f32> {
        match self {
            Augment::Plain(p) => p.apply(img),
            Augment::Timm {
                size,
                norm,
                rand_augment,
            } => {
                let (top, left, ch, cw) = rrc_params(rng, img.width, img.height);
                let c = img.channels;
                let mut crop = Vec::with_capacity(cw * ch * c);
                for y in top..top + ch {
                    crop.extend_from_slice(
                        &img.data[(y * img.width + left) * c..(y * img.width + left + cw) * c],
                    );
                }
                let mut data = resize_bicubic(&crop, (cw, ch), c, (*size, *size));
                if rng.unit() < 0.5 {
                    for row in data.chunks_exact_mut(size * c) {
                        for x in 0..size / 2 {
                            for k in 0..c {
                                row.swap(x * c + k, (size - 1 - x) * c + k);
                            }
                        }
                    }
                }
                let mut out = Image {
                    width: *size,
                    height: *size,
                    channels: c,
                    data,
                };
                if let Some(ra) = rand_augment {
                    ra.apply(&mut out, rng);
                }
                Preprocess::eval((*size, *size), *norm).normalize(&out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_stay_inside_and_follow_the_ratio_bounds() {
        let mut rng = Rng::new(5);
        for _ in 0..2000 {
            let (t, l, h, w) = rrc_params(&mut rng, 300, 200);
            assert!(t + h <= 200 && l + w <= 300 && h > 0 && w > 0);
        }
    }
}
