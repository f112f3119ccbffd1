//! Image decoding and the original's evaluation preprocessing, bit-exact with PIL +
//! torchvision: resize of the shorter side (Pillow bicubic), centre crop, `ToTensor`,
//! `Normalize`.
//!
//! Images are kept with 1 channel when grey (PIL's RGB conversion replicates the channel, and
//! every step is per channel, so the result is the same at a third of the work).
//!
//! Departure from the original: 16-bit PNGs are scaled to 8 bits by their bit depth
//! (`v * 255 / 65535`, rounded) where PIL's RGB conversion clips them to 255.

pub mod bilinear;
pub mod opencv;
pub mod resize;

use std::io::Cursor;
use std::path::{Path, PathBuf};

/// EVA-X normalisation mean (all three channels).
pub const EVAX_MEAN: f32 = 0.491_852_43;
/// EVA-X normalisation standard deviation.
#[allow(clippy::excessive_precision)] // the original's literal
pub const EVAX_STD: f32 = 0.285_093_09;
/// Normalisation mean of the other models in the original comparisons.
pub const OTHERS_MEAN: f32 = 0.5056;
/// Normalisation standard deviation of the other models.
pub const OTHERS_STD: f32 = 0.252;

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct ImageError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub what: String,
}

/// An 8-bit image, 1 (grey) or 3 (RGB) interleaved channels.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 or 3.
    pub channels: usize,
    /// Row-major interleaved samples.
    pub data: Vec<u8>,
}

/// Largest image side accepted (guards against absurd headers).
const MAX_SIDE: usize = 1 << 15;

/// Default limit on the pixels an image may declare (rows x columns x frames): 100 megapixels,
/// five times a large computed radiograph (about 4,300 x 4,300).
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

static MAX_PIXELS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MAX_PIXELS);

/// The pixel-count limit every decoder checks against the header before allocating anything
/// (PNG IHDR, JPEG SOF, DICOM Rows x Columns x Number of Frames).
pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Set the pixel-count limit for this process (`evax --max-pixels N`).
pub fn set_max_pixels(n: u64) {
    MAX_PIXELS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// An error unless `width x height x frames` is within [`max_pixels`].
pub(crate) fn check_pixel_count(width: u64, height: u64, frames: u64) -> Result<(), String> {
    let n = width.saturating_mul(height).saturating_mul(frames);
    let limit = max_pixels();
    if n > limit {
        return Err(format!(
            "header declares {width} x {height}{} = {n} pixels, over the limit of {limit} \
             (raise it with --max-pixels)",
            if frames == 1 {
                String::new()
            } else {
                format!(" x {frames} frames")
            }
        ));
    }
    Ok(())
}

impl Image {
    /// Decode a PNG or JPEG file (by content, not extension).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ImageError {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        Self::decode_guarded(&bytes).map_err(|what| ImageError {
            path: path.to_path_buf(),
            what,
        })
    }

    /// Decode PNG, JPEG or DICOM bytes (DICOM: first frame, first VOI window, MONOCHROME1
    /// inverted, 8 bits; see [`crate::dicom`]).
    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        Self::decode_guarded(bytes).map_err(crate::Error::Invalid)
    }

    /// Decode behind the panic guard: a bug in a third-party decoder fails this image only.
    fn decode_guarded(bytes: &[u8]) -> Result<Self, String> {
        crate::guard::guarded("the image decoder failed", || Self::decode_inner(bytes))
    }

    fn decode_inner(bytes: &[u8]) -> Result<Self, String> {
        if bytes.is_empty() {
            return Err("file is empty".into());
        }
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes)
        } else if bytes.starts_with(&[0xff, 0xd8]) {
            decode_jpeg(bytes)
        } else if crate::dicom::looks_like_dicom(bytes) {
            let f =
                crate::dicom::DicomFile::from_bytes(bytes, Path::new("")).map_err(|e| e.what)?;
            let (img, _) = f
                .to_image(0, &crate::dicom::voi::VoiChoice::First)
                .map_err(|e| e.what)?;
            Ok(img)
        } else {
            Err("not a PNG, JPEG or DICOM image".into())
        }
    }

    /// Crop `w x h` at (`left`, `top`).
    fn crop(&self, left: usize, top: usize, w: usize, h: usize) -> Image {
        let c = self.channels;
        let mut data = Vec::with_capacity(w * h * c);
        for y in top..top + h {
            let row = &self.data[(y * self.width + left) * c..(y * self.width + left + w) * c];
            data.extend_from_slice(row);
        }
        Image {
            width: w,
            height: h,
            channels: c,
            data,
        }
    }
}

fn decode_png(bytes: &[u8]) -> Result<Image, String> {
    let mut dec = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: 1 << 31 });
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().map_err(|e| format!("invalid PNG: {e}"))?;
    let ihdr = reader.info();
    check_pixel_count(ihdr.width as u64, ihdr.height as u64, 1)?;
    let size = reader.output_buffer_size().ok_or("PNG image too large")?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("invalid or truncated PNG: {e}"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!("unsupported PNG size {w}x{h}"));
    }
    let samples = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("palette PNG not expanded".into()),
    };
    let n = w * h * samples;
    let values: Vec<u8> = match info.bit_depth {
        png::BitDepth::Sixteen => buf[..2 * n]
            .chunks_exact(2)
            .map(|b| {
                let v = u16::from_be_bytes([b[0], b[1]]) as u32;
                ((v * 255 + 32767) / 65535) as u8
            })
            .collect(),
        _ => buf[..n].to_vec(),
    };
    // Drop alpha (PIL's convert('RGB') discards it without compositing).
    let (channels, data) = match samples {
        1 => (1, values),
        2 => (1, values.chunks_exact(2).map(|p| p[0]).collect()),
        3 => (3, values),
        _ => (
            3,
            values
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        ),
    };
    Ok(Image {
        width: w,
        height: h,
        channels,
        data,
    })
}

fn decode_jpeg(bytes: &[u8]) -> Result<Image, String> {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default()
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE);
    let mut probe = zune_jpeg::JpegDecoder::new_with_options(Cursor::new(bytes), opts);
    probe
        .decode_headers()
        .map_err(|e| format!("invalid JPEG: {e:?}"))?;
    let (w, h) = probe.dimensions().ok_or("JPEG without a frame header")?;
    check_pixel_count(w as u64, h as u64, 1)?;
    let grey = matches!(probe.input_colorspace(), Some(ColorSpace::Luma));
    let out = if grey {
        ColorSpace::Luma
    } else {
        ColorSpace::RGB
    };
    // Strictly first, so that a file cut short is an error (as in PIL) rather than an image
    // whose missing part is filled in; other strict-mode complaints (stray bytes between
    // markers and the like, which libjpeg only warns about) fall back to the lenient decoder.
    let opts = opts.jpeg_set_out_colorspace(out);
    let mut dec =
        zune_jpeg::JpegDecoder::new_with_options(Cursor::new(bytes), opts.set_strict_mode(true));
    let data = match dec.decode() {
        Ok(data) => data,
        Err(zune_jpeg::errors::DecodeErrors::ExhaustedData) => {
            return Err("truncated JPEG: the data ends before the image does".into());
        }
        Err(_) => {
            dec = zune_jpeg::JpegDecoder::new_with_options(Cursor::new(bytes), opts);
            dec.decode()
                .map_err(|e| format!("invalid or truncated JPEG: {e:?}"))?
        }
    };
    let info = dec.info().ok_or("JPEG without a frame header")?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = if grey { 1 } else { 3 };
    if data.len() != w * h * channels {
        return Err(format!("JPEG decoded to {} bytes for {w}x{h}", data.len()));
    }
    Ok(Image {
        width: w,
        height: h,
        channels,
        data,
    })
}

/// Normalisation statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Mean subtracted from every channel.
    pub mean: f32,
    /// Standard deviation every channel is divided by.
    pub std: f32,
}

impl Normalization {
    /// EVA-X's statistics (0.49185243 / 0.28509309).
    pub const EVAX: Self = Self {
        mean: EVAX_MEAN,
        std: EVAX_STD,
    };
    /// The other models' statistics (0.5056 / 0.252).
    pub const OTHERS: Self = Self {
        mean: OTHERS_MEAN,
        std: OTHERS_STD,
    };
}

/// The original's evaluation transform for one input size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Output height and width.
    pub size: (usize, usize),
    /// Target of the shorter side before cropping.
    pub resize_short: usize,
    /// Normalisation.
    pub norm: Normalization,
}

/// Python's `round` (half to even) for non-negative halves.
pub(crate) fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && (r as i64) % 2 != 0 {
        r - 1.0
    } else {
        r
    };
    r.max(0.0) as usize
}

/// How an image maps onto the model's input crop (see [`Preprocess::crop_geometry`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropGeometry {
    /// The size after the resize, `(width, height)`.
    pub resized: (usize, usize),
    /// Added to a resized coordinate to get the crop's, `(x, y)`.
    pub offset: (f64, f64),
    /// The crop, `(width, height)`.
    pub crop: (usize, usize),
}

impl Preprocess {
    /// The evaluation transform of the original for `size` (height, width): shorter side to
    /// `int(s / 0.875)` when the larger output side `s <= 224`, else to `s`; centre crop.
    pub fn eval(size: (usize, usize), norm: Normalization) -> Self {
        let s = size.0.max(size.1);
        let resize_short = if s <= 224 {
            (s as f64 / 0.875) as usize
        } else {
            s
        };
        Preprocess {
            size,
            resize_short,
            norm,
        }
    }

    /// The size an image of `(width, height)` is resized to before the crop, as torchvision's
    /// `Resize(s)`: short side to s, long side int(s * long / short).
    fn resized_size(&self, (w, h): (usize, usize)) -> (usize, usize) {
        let s = self.resize_short;
        if w <= h {
            (s, (s as f64 * h as f64 / w as f64) as usize)
        } else {
            ((s as f64 * w as f64 / h as f64) as usize, s)
        }
    }

    /// Resize and crop to the 8-bit image the model sees (before `ToTensor`).
    pub fn resize_crop(&self, img: &Image) -> Image {
        let (w, h) = (img.width, img.height);
        let (nw, nh) = self.resized_size((w, h));
        let (ch, cw) = self.size;
        if ch <= nh && cw <= nw {
            let top = round_half_even((nh - ch) as f64 / 2.0);
            let left = round_half_even((nw - cw) as f64 / 2.0);
            if (nw, nh) == (w, h) {
                return img.crop(left, top, cw, ch);
            }
            // Only the window the crop keeps is resampled.
            let data = resize::resize_bicubic_window(
                &img.data,
                (w, h),
                img.channels,
                (nw, nh),
                (left, top, cw, ch),
            );
            return Image {
                width: cw,
                height: ch,
                channels: img.channels,
                data,
            };
        }
        // torchvision pads with zeros when the crop is larger than the image.
        let resized = resize::resize_bicubic(&img.data, (w, h), img.channels, (nw, nh));
        let c = img.channels;
        let mut padded = Image {
            width: cw.max(nw),
            height: ch.max(nh),
            channels: c,
            data: vec![0; cw.max(nw) * ch.max(nh) * c],
        };
        let (left, top) = ((padded.width - nw) / 2, (padded.height - nh) / 2);
        for y in 0..nh {
            let dst = ((top + y) * padded.width + left) * c;
            padded.data[dst..dst + nw * c].copy_from_slice(&resized[y * nw * c..(y + 1) * nw * c]);
        }
        padded.crop((padded.width - cw) / 2, (padded.height - ch) / 2, cw, ch)
    }

    /// Where an image of `(width, height)` lands in the crop [`Preprocess::resize_crop`] makes:
    /// the resized size `(nw, nh)` and the offset to add to a resized coordinate to get the
    /// crop's (`u = (x + 0.5) * nw / width - 0.5 + off_x`).
    pub fn crop_geometry(&self, (w, h): (usize, usize)) -> CropGeometry {
        let (nw, nh) = self.resized_size((w, h));
        let (ch, cw) = self.size;
        let (off_x, off_y) = if ch <= nh && cw <= nw {
            (
                -(round_half_even((nw - cw) as f64 / 2.0) as f64),
                -(round_half_even((nh - ch) as f64 / 2.0) as f64),
            )
        } else {
            let (pw, ph) = (cw.max(nw), ch.max(nh));
            (
                ((pw - nw) / 2) as f64 - ((pw - cw) / 2) as f64,
                ((ph - nh) / 2) as f64 - ((ph - ch) / 2) as f64,
            )
        };
        CropGeometry {
            resized: (nw, nh),
            offset: (off_x, off_y),
            crop: (cw, ch),
        }
    }

    /// The full transform into a `[3, H, W]` f32 buffer (channel-first).
    pub fn apply(&self, img: &Image) -> Vec<f32> {
        self.normalize(&self.resize_crop(img))
    }

    /// `ToTensor` + `Normalize` of an already resized and cropped 8-bit image.
    pub fn normalize(&self, crop: &Image) -> Vec<f32> {
        let (h, w) = self.size;
        let mut lut = [0f32; 256];
        for (v, l) in lut.iter_mut().enumerate() {
            *l = (v as f32 / 255.0 - self.norm.mean) / self.norm.std;
        }
        let mut out = vec![0f32; 3 * h * w];
        let plane = h * w;
        for c in 0..3 {
            let src_c = if crop.channels == 1 { 0 } else { c };
            for (i, o) in out[c * plane..(c + 1) * plane].iter_mut().enumerate() {
                *o = lut[crop.data[i * crop.channels + src_c] as usize];
            }
        }
        out
    }

    /// Decode and transform one file.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Vec<f32>, ImageError> {
        Ok(self.apply(&Image::open(path)?))
    }
}

/// The Grad-CAM scoring transform of the original's `get_cams.py` (REFERENCE.md 7): the whole
/// image to [0, 1] floats, resized straight to `size` bilinearly (no antialiasing), normalised.
/// Returns `[3, H, W]`.
pub fn cam_eval_input(img: &Image, size: (usize, usize), norm: Normalization) -> Vec<f32> {
    let (w, h, c) = (img.width, img.height, img.channels);
    let mut planes = vec![0f32; c * h * w];
    for ch in 0..c {
        for i in 0..h * w {
            planes[ch * h * w + i] = img.data[i * c + ch] as f32 / 255.0;
        }
    }
    let resized = bilinear::resize_bilinear(&planes, c, (h, w), size);
    let plane = size.0 * size.1;
    let mut out = Vec::with_capacity(3 * plane);
    for ch in 0..3 {
        let src = &resized[(if c == 1 { 0 } else { ch }) * plane..][..plane];
        out.extend(src.iter().map(|v| (v - norm.mean) / norm.std));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_is_half_even() {
        assert_eq!(round_half_even(58.5), 58);
        assert_eq!(round_half_even(59.5), 60);
        assert_eq!(round_half_even(16.0), 16);
        assert_eq!(round_half_even(16.4), 16);
    }

    #[test]
    fn eval_sizes_follow_the_original() {
        assert_eq!(
            Preprocess::eval((224, 224), Normalization::EVAX).resize_short,
            256
        );
        assert_eq!(
            Preprocess::eval((480, 480), Normalization::EVAX).resize_short,
            480
        );
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert_eq!(Image::decode(b"").unwrap_err().to_string(), "file is empty");
        assert!(Image::decode(b"\x89PNG\r\n\x1a\nxx").is_err());
        assert!(Image::decode(&[0xff, 0xd8, 0xff]).is_err());
        assert_eq!(
            Image::decode(b"GIF89a").unwrap_err().to_string(),
            "not a PNG, JPEG or DICOM image"
        );
    }
}
