//! Heatmap overlays as pytorch-grad-cam's `show_cam_on_image` draws them (JET colours, half
//! image, half heatmap, rescaled by the maximum), with a caption and optional boxes, written as
//! PNG.

use std::path::Path;

/// An 8-bit RGB picture.
#[derive(Debug, Clone)]
pub struct Rgb {
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// Interleaved RGB.
    pub data: Vec<u8>,
}

/// The JET colour of `v` in [0, 255] (MATLAB / OpenCV jet: blue, cyan, yellow, red).
pub fn jet(v: u8) -> [u8; 3] {
    let x = v as f32 / 255.0;
    let c = |o: f32| ((1.5 - (4.0 * x - o).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(3.0), c(2.0), c(1.0)]
}

/// Blend a CAM `[h, w]` in [0, 1] onto a picture of the same size: `0.5 * jet + 0.5 * image`,
/// divided by its maximum, as `show_cam_on_image(image_weight=0.5)`.
pub fn show_cam_on_image(image: &Rgb, cam: &[f32]) -> Rgb {
    assert_eq!(cam.len(), image.width * image.height, "CAM size");
    let mut f: Vec<f32> = Vec::with_capacity(image.data.len());
    for (px, &v) in image.data.chunks_exact(3).zip(cam) {
        let heat = jet((255.0 * v.clamp(0.0, 1.0)) as u8);
        for c in 0..3 {
            f.push(0.5 * heat[c] as f32 / 255.0 + 0.5 * px[c] as f32 / 255.0);
        }
    }
    let max = f.iter().cloned().fold(0.0f32, f32::max).max(1e-12);
    Rgb {
        width: image.width,
        height: image.height,
        data: f.iter().map(|v| (255.0 * v / max) as u8).collect(),
    }
}

/// A CAM `[ch, cw]` over the model's input crop drawn on the whole original image at its own
/// resolution: each pixel's place in the crop found through the resize and centre crop
/// `g`, the CAM read there bilinearly (no heat outside the crop, whose edge is outlined), and
/// blended in proportion to its value (`0.6 * cam` of JET colour), so that the anatomy stays
/// readable under weak heat; a JET colour bar (1 at the top, 0 at the bottom) on the right.
pub fn cam_on_original(
    img: &crate::preprocess::Image,
    cam: &[f32],
    g: crate::preprocess::CropGeometry,
) -> Rgb {
    let (w, h) = (img.width, img.height);
    let (cw, ch) = g.crop;
    assert_eq!(cam.len(), cw * ch, "CAM size");
    let base = Rgb::from_image(img);
    let bar = (w / 40).max(12);
    let gap = (bar / 3).max(4);
    let mut out = Rgb {
        width: w + gap + bar,
        height: h,
        data: vec![0; (w + gap + bar) * h * 3],
    };
    let sx = g.resized.0 as f64 / w as f64;
    let sy = g.resized.1 as f64 / h as f64;
    let at = |u: f64, v: f64| -> Option<f32> {
        if u < -0.5 || v < -0.5 || u > cw as f64 - 0.5 || v > ch as f64 - 0.5 {
            return None;
        }
        let (u, v) = (u.clamp(0.0, (cw - 1) as f64), v.clamp(0.0, (ch - 1) as f64));
        let (x0, y0) = (u.floor() as usize, v.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(cw - 1), (y0 + 1).min(ch - 1));
        let (fx, fy) = ((u - x0 as f64) as f32, (v - y0 as f64) as f32);
        let c = |x: usize, y: usize| cam[y * cw + x].clamp(0.0, 1.0);
        let top = c(x0, y0) * (1.0 - fx) + c(x1, y0) * fx;
        let bottom = c(x0, y1) * (1.0 - fx) + c(x1, y1) * fx;
        Some(top * (1.0 - fy) + bottom * fy)
    };
    for y in 0..h {
        let v = (y as f64 + 0.5) * sy - 0.5 + g.offset.1;
        for x in 0..w {
            let u = (x as f64 + 0.5) * sx - 0.5 + g.offset.0;
            let src = &base.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
            let dst = (y * out.width + x) * 3;
            let px = match at(u, v) {
                Some(c) => {
                    let heat = jet((255.0 * c) as u8);
                    let a = 0.6 * c;
                    [0, 1, 2].map(|k| (src[k] as f32 * (1.0 - a) + heat[k] as f32 * a) as u8)
                }
                None => [src[0], src[1], src[2]],
            };
            out.data[dst..dst + 3].copy_from_slice(&px);
        }
    }
    // The crop's edge, in original coordinates.
    let to_x = |u: f64| ((u + 0.5 - g.offset.0) / sx - 0.5).round() as i64;
    let to_y = |v: f64| ((v + 0.5 - g.offset.1) / sy - 0.5).round() as i64;
    let (x0, y0) = (to_x(-0.5), to_y(-0.5));
    let (x1, y1) = (to_x(cw as f64 - 0.5), to_y(ch as f64 - 0.5));
    let thick = (w.max(h) / 600).max(1) as i64;
    out.rect(x0, y0, x1 - x0, y1 - y0, thick, [200, 200, 200]);
    // The colour bar.
    for y in 0..h {
        let c = jet((255.0 * (1.0 - y as f32 / (h.max(2) - 1) as f32)) as u8);
        for x in w + gap..w + gap + bar {
            let i = (y * out.width + x) * 3;
            out.data[i..i + 3].copy_from_slice(&c);
        }
    }
    out
}

impl Rgb {
    /// From an 8-bit grey or RGB image.
    pub fn from_image(img: &crate::preprocess::Image) -> Self {
        let data = if img.channels == 1 {
            img.data.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            img.data.clone()
        };
        Rgb {
            width: img.width,
            height: img.height,
            data,
        }
    }

    /// Nearest-neighbour enlargement by an integer factor.
    pub fn upscale(&self, k: usize) -> Rgb {
        let (w, h) = (self.width * k, self.height * k);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let i = ((y / k) * self.width + x / k) * 3;
                data.extend_from_slice(&self.data[i..i + 3]);
            }
        }
        Rgb {
            width: w,
            height: h,
            data,
        }
    }

    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Outline a rectangle `thickness` pixels wide.
    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, thickness: i64, c: [u8; 3]) {
        for t in 0..thickness {
            for i in x - t..=x + w + t {
                self.put(i, y - t, c);
                self.put(i, y + h + t, c);
            }
            for j in y - t..=y + h + t {
                self.put(x - t, j, c);
                self.put(x + w + t, j, c);
            }
        }
    }

    /// Write `text` (upper-cased) at the top left on a dark band, glyphs `scale` times 5x7.
    pub fn caption(&mut self, text: &str, scale: usize) {
        let band = (9 * scale) as i64;
        for y in 0..band.min(self.height as i64) {
            for x in 0..self.width as i64 {
                let i = (y as usize * self.width + x as usize) * 3;
                for c in 0..3 {
                    self.data[i + c] /= 3;
                }
            }
        }
        let mut x0 = scale as i64;
        for ch in text.chars() {
            if let Some(rows) = glyph(ch.to_ascii_uppercase()) {
                for (r, row) in rows.iter().enumerate() {
                    for col in 0..5 {
                        if row & (0x10 >> col) != 0 {
                            for dy in 0..scale as i64 {
                                for dx in 0..scale as i64 {
                                    let px = x0 + col * scale as i64 + dx;
                                    let py = scale as i64 + r as i64 * scale as i64 + dy;
                                    self.put(px, py, [255, 255, 255]);
                                }
                            }
                        }
                    }
                }
            }
            x0 += 6 * scale as i64;
        }
    }

    /// Write as an 8-bit RGB PNG, atomically.
    pub fn save_png(&self, path: &Path) -> std::io::Result<()> {
        self.save_png_grey_or_rgb(path, false)
    }

    /// Write as an 8-bit PNG, atomically: greyscale (the first channel) when `grey`, else RGB.
    pub fn save_png_grey_or_rgb(&self, path: &Path, grey: bool) -> std::io::Result<()> {
        crate::io::write_atomic(path, &self.encode_png(grey)?)
    }

    /// The 8-bit RGB PNG encoding.
    pub fn png_bytes(&self) -> std::io::Result<Vec<u8>> {
        self.encode_png(false)
    }

    fn encode_png(&self, grey: bool) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, self.width as u32, self.height as u32);
            enc.set_color(if grey {
                png::ColorType::Grayscale
            } else {
                png::ColorType::Rgb
            });
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(std::io::Error::other)?;
            let data: Vec<u8> = if grey {
                self.data.chunks_exact(3).map(|p| p[0]).collect()
            } else {
                self.data.clone()
            };
            w.write_image_data(&data).map_err(std::io::Error::other)?;
        }
        Ok(buf)
    }
}

/// 5x7 glyphs (rows of 5 bits, most significant bit on the left) for the characters captions
/// use; anything else is drawn as a blank.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cams_land_on_the_original_where_the_crop_took_it() {
        use crate::preprocess::{Image, Normalization, Preprocess};
        // A landscape image: the crop keeps its middle, the sides get no heat.
        let (w, h) = (400, 300);
        let img = Image {
            width: w,
            height: h,
            channels: 1,
            data: vec![100; w * h],
        };
        let pre = Preprocess::eval((224, 224), Normalization::EVAX);
        let g = pre.crop_geometry((w, h));
        let (rw, rh) = g.resized;
        assert_eq!(rh, 256, "short side resized to 224 / 0.875");
        assert_eq!(rw, (256.0 * 400.0 / 300.0) as usize);
        // The crop's centre is the image's centre.
        let centre = ((112.0 - g.offset.0 + 0.5) * w as f64 / rw as f64 - 0.5) as i64;
        assert!((centre - (w as i64 - 1) / 2).abs() <= 1, "{centre}");
        let out = cam_on_original(&img, &vec![1.0; 224 * 224], g);
        assert!(
            out.width > w && out.height == h,
            "the colour bar is beside the image"
        );
        let px =
            |x: usize, y: usize| &out.data[(y * out.width + x) * 3..(y * out.width + x) * 3 + 3];
        assert_eq!(px(2, h / 2), &[100, 100, 100], "outside the crop: no heat");
        assert_ne!(px(w / 2, h / 2), &[100, 100, 100], "inside: heat");
        assert_eq!(
            px(w + out.width.saturating_sub(w) - 1, 0),
            &jet(255),
            "bar top is 1"
        );
    }

    #[test]
    fn jet_runs_blue_to_red() {
        assert_eq!(jet(0), [0, 0, 128]);
        assert_eq!(jet(255), [128, 0, 0]);
        let mid = jet(128);
        assert!(mid[1] > 200);
    }
}
