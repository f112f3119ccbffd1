//! DICOM radiographs: reading (dicom-rs, pure-Rust codecs), the stored values, and the path from
//! stored values to the 8-bit image the models were trained on, each step recorded:
//! BitsStored masking and sign, Modality LUT (rescale or LUT sequence), VOI (window with
//! LINEAR / LINEAR_EXACT / SIGMOID, or VOI LUT sequence), MONOCHROME1 inversion, 8 bits.
//!
//! Hostile files: the whole file is read first (its size bounds every later length), image
//! dimensions and pixel-data lengths are checked before anything is decoded, and the parser and
//! codecs run behind a guard that turns an unexpected panic into an error naming the file.

pub mod jpeg12;
pub mod jpegls;
pub mod results;
mod scan;
pub mod voi;

use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxIndex;

use crate::guard::guarded;

use crate::preprocess::Image;

/// Largest pixel payload decoded (bytes, all frames): far above any radiograph.
pub const MAX_PIXEL_BYTES: usize = 1 << 30;
/// Largest image side accepted.
pub const MAX_SIDE: usize = 1 << 15;

/// Why a DICOM file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct DicomError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong (naming the tag or transfer syntax where there is one).
    pub what: String,
}

/// One window (VOI) from the header.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Window {
    /// Window Center.
    pub center: f64,
    /// Window Width.
    pub width: f64,
    /// Its explanation, if any.
    pub explanation: Option<String>,
}

/// The header fields that matter for display and for `evax dicom info`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DicomInfo {
    /// Transfer syntax UID.
    pub transfer_syntax: String,
    /// Its name.
    pub transfer_syntax_name: String,
    /// Photometric Interpretation.
    pub photometric: String,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Number of Frames.
    pub frames: usize,
    /// Samples per Pixel.
    pub samples_per_pixel: usize,
    /// Bits Allocated.
    pub bits_allocated: u16,
    /// Bits Stored.
    pub bits_stored: u16,
    /// High Bit.
    pub high_bit: u16,
    /// Pixel Representation (1: signed).
    pub pixel_representation: u16,
    /// Planar Configuration.
    pub planar_configuration: u16,
    /// Rescale Slope, if present.
    pub rescale_slope: Option<f64>,
    /// Rescale Intercept, if present.
    pub rescale_intercept: Option<f64>,
    /// Windows (centre, width) in header order.
    pub windows: Vec<Window>,
    /// VOI LUT Function (LINEAR if absent).
    pub voi_lut_function: Option<String>,
    /// A Modality LUT Sequence is present.
    pub has_modality_lut_sequence: bool,
    /// A VOI LUT Sequence is present.
    pub has_voi_lut_sequence: bool,
    /// Modality.
    pub modality: String,
    /// Body Part Examined.
    pub body_part: String,
    /// Pixel Spacing (row, column) in mm, if present.
    pub pixel_spacing: Option<[f64; 2]>,
    /// Imager Pixel Spacing (row, column) in mm, if present.
    pub imager_pixel_spacing: Option<[f64; 2]>,
}

/// A parsed DICOM file.
pub struct DicomFile {
    /// Where it came from.
    pub path: PathBuf,
    /// The header fields.
    pub info: DicomInfo,
    obj: DefaultDicomObject,
}

/// Stored pixel values, sign applied, no LUT: `[frames, rows, cols, samples]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredValues {
    /// Frames held.
    pub frames: usize,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Samples per pixel.
    pub samples: usize,
    /// The values.
    pub values: Vec<i32>,
}

/// True when `bytes` look like a DICOM file (preamble + `DICM`, `DICM` first, or a bare data set
/// starting with a group 0x0002 / 0x0008 element).
pub fn looks_like_dicom(bytes: &[u8]) -> bool {
    (bytes.len() >= 132 && &bytes[128..132] == b"DICM")
        || bytes.starts_with(b"DICM")
        || (bytes.len() >= 8 && matches!(bytes[..2], [0x02, 0x00] | [0x08, 0x00]) && bytes[3] == 0)
}

fn str_of(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    let s = e.value().to_str().ok()?;
    let s = s
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string();
    (!s.is_empty()).then_some(s)
}

fn f64s_of(obj: &InMemDicomObject, tag: Tag) -> Vec<f64> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.value().to_multi_float64().ok())
        .unwrap_or_default()
}

fn int_of(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag)
        .ok()?
        .and_then(|e| e.value().to_int::<i64>().ok())
}

fn has(obj: &InMemDicomObject, tag: Tag) -> bool {
    obj.element_opt(tag).ok().flatten().is_some()
}

/// The name of a transfer syntax UID.
pub fn transfer_syntax_name(uid: &str) -> String {
    let name = match uid {
        "1.2.840.10008.1.2" => "Implicit VR Little Endian",
        "1.2.840.10008.1.2.1" => "Explicit VR Little Endian",
        "1.2.840.10008.1.2.1.99" => "Deflated Explicit VR Little Endian",
        "1.2.840.10008.1.2.2" => "Explicit VR Big Endian",
        "1.2.840.10008.1.2.5" => "RLE Lossless",
        "1.2.840.10008.1.2.4.50" => "JPEG Baseline (Process 1)",
        "1.2.840.10008.1.2.4.51" => "JPEG Extended (Process 2 & 4)",
        "1.2.840.10008.1.2.4.57" => "JPEG Lossless (Process 14)",
        "1.2.840.10008.1.2.4.70" => "JPEG Lossless SV1 (Process 14, Selection Value 1)",
        "1.2.840.10008.1.2.4.80" => "JPEG-LS Lossless",
        "1.2.840.10008.1.2.4.81" => "JPEG-LS Near-Lossless",
        "1.2.840.10008.1.2.4.90" => "JPEG 2000 Lossless",
        "1.2.840.10008.1.2.4.91" => "JPEG 2000",
        "1.2.840.10008.1.2.4.201" => "HTJ2K Lossless",
        "1.2.840.10008.1.2.4.203" => "HTJ2K",
        _ => return format!("transfer syntax {uid}"),
    };
    format!("{name} ({uid})")
}

impl DicomFile {
    /// Read and parse a DICOM file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DicomError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DicomError {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parse DICOM bytes (`path` for messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, DicomError> {
        let err = |what: String| DicomError {
            path: path.to_path_buf(),
            what,
        };
        if bytes.is_empty() {
            return Err(err("file is empty".into()));
        }
        scan::check_lengths(bytes, MAX_PIXEL_BYTES)
            .map_err(|e| err(format!("malformed DICOM structure: {e}")))?;
        let obj = guarded("malformed DICOM data", || parse(bytes)).map_err(err)?;
        let info = read_info(&obj).map_err(err)?;
        Ok(DicomFile {
            path: path.to_path_buf(),
            info,
            obj,
        })
    }

    /// Check dimensions and pixel-data size before decoding anything.
    fn check_geometry(&self) -> Result<(), String> {
        let i = &self.info;
        if i.rows == 0 || i.cols == 0 || i.rows > MAX_SIDE || i.cols > MAX_SIDE {
            return Err(format!(
                "image size {}x{} (Rows, Columns) is not plausible",
                i.cols, i.rows
            ));
        }
        if !matches!(i.bits_allocated, 1 | 8 | 16 | 32) {
            return Err(format!(
                "Bits Allocated (0028,0100) = {} is not supported",
                i.bits_allocated
            ));
        }
        if i.bits_stored == 0
            || i.bits_stored > i.bits_allocated
            || i.high_bit >= i.bits_allocated
            || i.high_bit + 1 < i.bits_stored
        {
            return Err(format!(
                "Bits Stored (0028,0101) = {}, High Bit (0028,0102) = {} do not fit Bits Allocated {}",
                i.bits_stored, i.high_bit, i.bits_allocated
            ));
        }
        if !matches!(i.samples_per_pixel, 1 | 3) {
            return Err(format!(
                "Samples per Pixel (0028,0002) = {} is not supported",
                i.samples_per_pixel
            ));
        }
        if i.frames == 0 || i.frames > 100_000 {
            return Err(format!(
                "Number of Frames (0028,0008) = {} is not plausible",
                i.frames
            ));
        }
        crate::preprocess::check_pixel_count(i.cols as u64, i.rows as u64, i.frames as u64)?;
        let bytes_per_frame =
            (i.rows * i.cols * i.samples_per_pixel * i.bits_allocated as usize).div_ceil(8);
        let total = bytes_per_frame
            .checked_mul(i.frames)
            .ok_or("pixel data size overflows")?;
        if total > MAX_PIXEL_BYTES {
            return Err(format!(
                "pixel data would need {total} bytes (limit {MAX_PIXEL_BYTES})"
            ));
        }
        let pd = self
            .obj
            .element_opt(tags::PIXEL_DATA)
            .ok()
            .flatten()
            .ok_or("no Pixel Data (7FE0,0010)")?;
        if let Some(fragments) = pd.value().fragments() {
            // Even lossless codecs rarely exceed 100:1 on radiographs; 2000:1 means a lie.
            let compressed: usize = fragments.iter().map(|f| f.len()).sum();
            if total > compressed.saturating_mul(2000).saturating_add(1 << 20) {
                return Err(format!(
                    "compressed Pixel Data (7FE0,0010) of {compressed} bytes cannot hold {} frame(s) of {}x{}x{} ({total} bytes)",
                    i.frames, i.cols, i.rows, i.samples_per_pixel
                ));
            }
        } else if let Ok(raw) = pd.value().to_bytes()
            && raw.len() < total
        {
            return Err(format!(
                "Pixel Data (7FE0,0010) holds {} bytes; {} frame(s) of {}x{}x{} at {} bits need {total}",
                raw.len(),
                i.frames,
                i.cols,
                i.rows,
                i.samples_per_pixel,
                i.bits_allocated
            ));
        }
        Ok(())
    }

    /// Patient ID (0010,0020), if present.
    pub fn patient_id(&self) -> Option<String> {
        str_of(&self.obj, tags::PATIENT_ID)
    }

    /// The stored values of frame `frame` (None: every frame), sign applied, no LUT.
    pub fn stored_values(&self, frame: Option<usize>) -> Result<StoredValues, DicomError> {
        let err = |what: String| DicomError {
            path: self.path.clone(),
            what,
        };
        self.check_geometry().map_err(err)?;
        let i = &self.info;
        let frames: Vec<usize> = match frame {
            Some(f) if f >= i.frames => {
                return Err(err(format!(
                    "frame {f} requested; the file has {} (Number of Frames)",
                    i.frames
                )));
            }
            Some(f) => vec![f],
            None => (0..i.frames).collect(),
        };
        let per_frame = i.rows * i.cols * i.samples_per_pixel;
        let mut values = Vec::with_capacity(per_frame * frames.len());
        for &f in &frames {
            let decoded = guarded("malformed DICOM data", || {
                if is_jpeg_ls(&i.transfer_syntax) {
                    return self
                        .jpeg_ls_frame(f)
                        .map(|d| (d, dicom_pixeldata::PlanarConfiguration::Standard))
                        .map_err(|e| format!("cannot decode {}: {e}", i.transfer_syntax_name));
                }
                if is_jpeg_extended(&i.transfer_syntax) {
                    // 12-bit JPEG Extended: our decoder (the JPEG crates take 8 bits only).
                    let stream = self
                        .frame_stream(f)
                        .map_err(|e| format!("cannot decode {}: {e}", i.transfer_syntax_name))?;
                    if jpeg12::frame_precision(&stream) == Some(12) {
                        return self
                            .jpeg12_frame(&stream)
                            .map(|d| (d, dicom_pixeldata::PlanarConfiguration::Standard))
                            .map_err(|e| format!("cannot decode {}: {e}", i.transfer_syntax_name));
                    }
                }
                self.obj
                    .decode_pixel_data_frame(f as u32)
                    .map(|d| (d.data().to_vec(), d.planar_configuration()))
                    .map_err(|e| format!("cannot decode {}: {e}", i.transfer_syntax_name))
            })
            .map_err(err)?;
            let (data, planar) = decoded;
            let frame_values = samples_from_bytes(&data, i, per_frame).map_err(err)?;
            // Planar configuration 1 ("PixelFirst" in dicom-rs) stores each colour plane whole.
            if i.samples_per_pixel == 3
                && planar == dicom_pixeldata::PlanarConfiguration::PixelFirst
            {
                let plane = i.rows * i.cols;
                for p in 0..plane {
                    for s in 0..3 {
                        values.push(frame_values[s * plane + p]);
                    }
                }
            } else {
                values.extend(frame_values);
            }
        }
        Ok(StoredValues {
            frames: frames.len(),
            rows: i.rows,
            cols: i.cols,
            samples: i.samples_per_pixel,
            values,
        })
    }

    /// The 8-bit image the models expect (frame `frame`), with the steps taken.
    pub fn to_image(
        &self,
        frame: usize,
        voi: &voi::VoiChoice,
    ) -> Result<(Image, Vec<String>), DicomError> {
        let stored = self.stored_values(Some(frame))?;
        voi::render(self, &stored, voi).map_err(|what| DicomError {
            path: self.path.clone(),
            what: what.to_string(),
        })
    }

    /// The encapsulated codestream of frame `f` (its fragments joined).
    fn frame_stream(&self, f: usize) -> Result<Vec<u8>, String> {
        let i = &self.info;
        let pixel = self
            .obj
            .element(tags::PIXEL_DATA)
            .map_err(|_| "no Pixel Data (7FE0,0010)".to_string())?;
        let fragments = pixel
            .value()
            .fragments()
            .ok_or("Pixel Data (7FE0,0010) is not encapsulated")?;
        let stream: Vec<u8> = if i.frames == 1 {
            fragments.concat()
        } else if fragments.len() == i.frames {
            fragments[f].clone()
        } else {
            // Frames spanning fragments: split at the basic offset table.
            let table = pixel.value().offset_table().unwrap_or(&[]);
            if table.len() != i.frames {
                return Err(format!(
                    "{} fragments for {} frames and no offset table to split them",
                    fragments.len(),
                    i.frames
                ));
            }
            let mut at = 0u32;
            let mut out = Vec::new();
            for frag in fragments {
                let next = table.get(f + 1).copied().unwrap_or(u32::MAX);
                if at >= table[f] && at < next {
                    out.extend_from_slice(frag);
                }
                at += frag.len() as u32 + 8;
            }
            out
        };
        Ok(stream)
    }

    /// Frame `f` of a JPEG-LS file through our decoder, as little-endian stored values of
    /// Bits Allocated.
    fn jpeg_ls_frame(&self, f: usize) -> Result<Vec<u8>, String> {
        let i = &self.info;
        let stream = self.frame_stream(f)?;
        if i.samples_per_pixel != 1 {
            return Err(format!(
                "JPEG-LS with {} samples per pixel: only grey images are supported",
                i.samples_per_pixel
            ));
        }
        let d = jpegls::decode(&stream, Some((i.cols, i.rows))).map_err(|e| e.to_string())?;
        Ok(match i.bits_allocated {
            8 => d.samples.iter().map(|&v| v as u8).collect(),
            16 => d.samples.iter().flat_map(|v| v.to_le_bytes()).collect(),
            b => return Err(format!("JPEG-LS with Bits Allocated {b}")),
        })
    }

    /// A 12-bit JPEG Extended frame through our decoder, as little-endian 16-bit stored values.
    fn jpeg12_frame(&self, stream: &[u8]) -> Result<Vec<u8>, String> {
        let i = &self.info;
        if i.samples_per_pixel != 1 || i.bits_allocated != 16 {
            return Err(format!(
                "12-bit JPEG with {} samples per pixel and Bits Allocated {}: only grey images \
                 stored in 16 bits are supported",
                i.samples_per_pixel, i.bits_allocated
            ));
        }
        let d = jpeg12::decode(stream).map_err(|e| e.to_string())?;
        if (d.width, d.height) != (i.cols, i.rows) {
            return Err(format!(
                "the JPEG stream is {}x{}, the header says {}x{} (Columns x Rows)",
                d.width, d.height, i.cols, i.rows
            ));
        }
        Ok(d.samples.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub(crate) fn object(&self) -> &InMemDicomObject {
        &self.obj
    }
}

/// JPEG Extended (Process 2 & 4), whose 12-bit streams evax decodes itself ([`jpeg12`]).
fn is_jpeg_extended(ts: &str) -> bool {
    ts.trim_end_matches('\0') == "1.2.840.10008.1.2.4.51"
}

/// JPEG-LS Lossless or Near-Lossless, which evax decodes itself ([`jpegls`]).
fn is_jpeg_ls(ts: &str) -> bool {
    matches!(
        ts.trim_end_matches('\0'),
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81"
    )
}

/// Unpack raw decoded bytes into masked, sign-extended sample values.
fn samples_from_bytes(data: &[u8], i: &DicomInfo, n: usize) -> Result<Vec<i32>, String> {
    let shift = i.high_bit + 1 - i.bits_stored;
    let mask: u32 = if i.bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << i.bits_stored) - 1
    };
    let signed = i.pixel_representation == 1;
    let convert = |raw: u32| -> i32 {
        let v = (raw >> shift) & mask;
        if signed && i.bits_stored < 32 && v & (1 << (i.bits_stored - 1)) != 0 {
            (v | !mask) as i32
        } else {
            v as i32
        }
    };
    let need = match i.bits_allocated {
        1 => n.div_ceil(8),
        b => n * (b as usize / 8),
    };
    if data.len() < need {
        return Err(format!(
            "decoded pixel data holds {} bytes, {need} expected for one frame",
            data.len()
        ));
    }
    Ok(match i.bits_allocated {
        1 => (0..n)
            .map(|k| ((data[k / 8] >> (k % 8)) & 1) as i32)
            .collect(),
        8 => data[..n].iter().map(|&b| convert(b as u32)).collect(),
        16 => data[..2 * n]
            .chunks_exact(2)
            .map(|b| convert(u16::from_le_bytes([b[0], b[1]]) as u32))
            .collect(),
        _ => data[..4 * n]
            .chunks_exact(4)
            .map(|b| convert(u32::from_le_bytes(b.try_into().unwrap())))
            .collect(),
    })
}

/// Parse with or without the 128-byte preamble and file meta group.
fn parse(bytes: &[u8]) -> Result<DefaultDicomObject, String> {
    let with_meta = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        Some(&bytes[128..])
    } else if bytes.starts_with(b"DICM") {
        Some(bytes)
    } else {
        None
    };
    if let Some(rest) = with_meta {
        return OpenFileOptions::new()
            .read_preamble(ReadPreamble::Never)
            .from_reader(rest)
            .map_err(|e| format!("not a readable DICOM file: {e}"));
    }
    // A bare data set: explicit VR if the first element carries a two-letter VR, else implicit.
    let explicit =
        bytes.len() >= 6 && bytes[4].is_ascii_uppercase() && bytes[5].is_ascii_uppercase();
    let ts_uid = if explicit {
        "1.2.840.10008.1.2.1"
    } else {
        "1.2.840.10008.1.2"
    };
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or("transfer syntax registry incomplete")?;
    let ds = InMemDicomObject::read_dataset_with_ts(bytes, ts)
        .map_err(|e| format!("no DICOM preamble or file meta, and not a readable data set: {e}"))?;
    if !has(&ds, tags::PIXEL_DATA) && !has(&ds, tags::ROWS) {
        return Err("not a DICOM file (no preamble, no file meta, no image attributes)".into());
    }
    ds.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax(ts_uid)
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
            .media_storage_sop_instance_uid("2.25.0"),
    )
    .map_err(|e| format!("cannot complete the file meta: {e}"))
}

fn pair(v: &[f64]) -> Option<[f64; 2]> {
    (v.len() >= 2).then(|| [v[0], v[1]])
}

fn read_info(obj: &DefaultDicomObject) -> Result<DicomInfo, String> {
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .trim()
        .to_string();
    let req = |tag: Tag, name: &str| -> Result<i64, String> {
        int_of(obj, tag).ok_or_else(|| {
            format!(
                "{name} ({:04X},{:04X}) is missing or not a number",
                tag.0, tag.1
            )
        })
    };
    let rows = req(tags::ROWS, "Rows")?;
    let cols = req(tags::COLUMNS, "Columns")?;
    let bits_allocated = req(tags::BITS_ALLOCATED, "Bits Allocated")?;
    let bits_stored = int_of(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    let high_bit = int_of(obj, tags::HIGH_BIT).unwrap_or(bits_stored - 1);
    let small = |v: i64, name: &str| -> Result<u16, String> {
        u16::try_from(v).map_err(|_| format!("{name} = {v} is out of range"))
    };
    let centers = f64s_of(obj, tags::WINDOW_CENTER);
    let widths = f64s_of(obj, tags::WINDOW_WIDTH);
    let explanations: Vec<String> = str_of(obj, tags::WINDOW_CENTER_WIDTH_EXPLANATION)
        .map(|s| s.split('\\').map(|p| p.trim().to_string()).collect())
        .unwrap_or_default();
    let windows = centers
        .iter()
        .zip(&widths)
        .enumerate()
        .map(|(k, (&center, &width))| Window {
            center,
            width,
            explanation: explanations.get(k).cloned(),
        })
        .collect();
    let photometric =
        str_of(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_else(|| "MONOCHROME2".into());
    Ok(DicomInfo {
        transfer_syntax_name: transfer_syntax_name(&ts),
        transfer_syntax: ts,
        photometric,
        rows: usize::try_from(rows).map_err(|_| format!("Rows (0028,0010) = {rows}"))?,
        cols: usize::try_from(cols).map_err(|_| format!("Columns (0028,0011) = {cols}"))?,
        frames: usize::try_from(int_of(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1))
            .map_err(|_| "Number of Frames (0028,0008) is negative".to_string())?,
        samples_per_pixel: usize::try_from(int_of(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1))
            .map_err(|_| "Samples per Pixel (0028,0002) is negative".to_string())?,
        bits_allocated: small(bits_allocated, "Bits Allocated (0028,0100)")?,
        bits_stored: small(bits_stored, "Bits Stored (0028,0101)")?,
        high_bit: small(high_bit, "High Bit (0028,0102)")?,
        pixel_representation: small(
            int_of(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0),
            "Pixel Representation (0028,0103)",
        )?,
        planar_configuration: small(
            int_of(obj, tags::PLANAR_CONFIGURATION).unwrap_or(0),
            "Planar Configuration (0028,0006)",
        )?,
        rescale_slope: f64s_of(obj, tags::RESCALE_SLOPE).first().copied(),
        rescale_intercept: f64s_of(obj, tags::RESCALE_INTERCEPT).first().copied(),
        windows,
        voi_lut_function: str_of(obj, tags::VOILUT_FUNCTION),
        has_modality_lut_sequence: has(obj, tags::MODALITY_LUT_SEQUENCE),
        has_voi_lut_sequence: has(obj, tags::VOILUT_SEQUENCE),
        modality: str_of(obj, tags::MODALITY).unwrap_or_default(),
        body_part: str_of(obj, tags::BODY_PART_EXAMINED).unwrap_or_default(),
        pixel_spacing: pair(&f64s_of(obj, tags::PIXEL_SPACING)),
        imager_pixel_spacing: pair(&f64s_of(obj, tags::IMAGER_PIXEL_SPACING)),
    })
}

/// A header summary as text, one field a line (what `evax dicom info` prints).
pub fn info_text(path: &Path, i: &DicomInfo) -> String {
    let mut out = String::new();
    let spacing = |s: Option<[f64; 2]>| s.map_or("-".into(), |[r, c]| format!("{r} x {c} mm"));
    w!(out, "file            {}", path.display());
    w!(out, "transfer syntax {}", i.transfer_syntax_name);
    w!(out, "photometric     {}", i.photometric);
    w!(
        out,
        "size            {} x {} (columns x rows), {} frame(s), {} sample(s) per pixel",
        i.cols,
        i.rows,
        i.frames,
        i.samples_per_pixel
    );
    w!(
        out,
        "bits            {} allocated, {} stored, high bit {}, {}",
        i.bits_allocated,
        i.bits_stored,
        i.high_bit,
        if i.pixel_representation == 1 {
            "signed"
        } else {
            "unsigned"
        }
    );
    let rescale = match (i.rescale_slope, i.rescale_intercept) {
        (None, None) => "none".to_string(),
        (m, b) => format!("slope {}, intercept {}", m.unwrap_or(1.0), b.unwrap_or(0.0)),
    };
    w!(
        out,
        "modality LUT    {}{}",
        rescale,
        if i.has_modality_lut_sequence {
            " (+ LUT sequence)"
        } else {
            ""
        }
    );
    let windows: Vec<String> = i
        .windows
        .iter()
        .map(|w| {
            format!(
                "c {} w {}{}",
                w.center,
                w.width,
                w.explanation
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})"))
            )
        })
        .collect();
    w!(
        out,
        "VOI             {}{}{}",
        if windows.is_empty() {
            "no window".into()
        } else {
            windows.join("; ")
        },
        i.voi_lut_function
            .as_ref()
            .map_or(String::new(), |f| format!(", {f}")),
        if i.has_voi_lut_sequence {
            " (+ VOI LUT sequence)"
        } else {
            ""
        }
    );
    w!(
        out,
        "modality        {}",
        if i.modality.is_empty() {
            "-"
        } else {
            &i.modality
        }
    );
    w!(
        out,
        "body part       {}",
        if i.body_part.is_empty() {
            "-"
        } else {
            &i.body_part
        }
    );
    w!(out, "pixel spacing   {}", spacing(i.pixel_spacing));
    w!(out, "imager spacing  {}", spacing(i.imager_pixel_spacing));
    out
}

/// What [`export`] wrote: the files and the display steps applied (for people to read).
#[derive(Debug, Clone, Default)]
pub struct Exported {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The display pipeline's steps per frame (empty for raw values).
    pub steps: Vec<String>,
}

/// Export `file` to `output`: `.png` (the 8-bit image the models see; one `OUT-N.png` per
/// frame when several) or `.npy` (`[frames, rows, cols, samples]` u8; with `raw`, the stored
/// values in their own integer type). `frames`: the frames to write (`None`: every frame).
pub fn export(
    file: &Path,
    output: &Path,
    voi: &voi::VoiChoice,
    raw: bool,
    frames: Option<usize>,
) -> crate::Result<Exported> {
    use crate::error::Error;
    let f = DicomFile::open(file)?;
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let write = |path: &Path, bytes: &[u8]| {
        crate::io::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
    };
    let list: Vec<usize> = match frames {
        None => (0..f.info.frames).collect(),
        Some(k) => vec![k],
    };
    let mut out = Exported::default();
    match ext.as_str() {
        "npy" if raw => {
            let s = f.stored_values(frames)?;
            let signed = f.info.pixel_representation == 1;
            let (descr, bytes): (&str, Vec<u8>) = match (f.info.bits_allocated, signed) {
                (1 | 8, false) => ("|u1", s.values.iter().map(|&v| v as u8).collect()),
                (1 | 8, true) => ("|i1", s.values.iter().map(|&v| v as i8 as u8).collect()),
                (16, false) => (
                    "<u2",
                    s.values
                        .iter()
                        .flat_map(|&v| (v as u16).to_le_bytes())
                        .collect(),
                ),
                (16, true) => (
                    "<i2",
                    s.values
                        .iter()
                        .flat_map(|&v| (v as i16).to_le_bytes())
                        .collect(),
                ),
                _ => (
                    "<i4",
                    s.values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
                ),
            };
            write(
                output,
                &crate::io::npy(descr, &[s.frames, s.rows, s.cols, s.samples], &bytes),
            )?;
            out.steps
                .push(format!("{} frame(s) of stored values, {descr}", s.frames));
            out.files.push(output.to_path_buf());
        }
        "npy" | "png" => {
            let mut npy_data = Vec::new();
            for &k in &list {
                let (img, steps) = f.to_image(k, voi)?;
                out.steps.extend(steps);
                if ext == "png" {
                    let path = if list.len() > 1 {
                        output.with_file_name(format!(
                            "{}-{k}.png",
                            output
                                .file_stem()
                                .map(|s| s.to_string_lossy())
                                .unwrap_or_default()
                        ))
                    } else {
                        output.to_path_buf()
                    };
                    crate::explain::overlay::Rgb::from_image(&img)
                        .save_png_grey_or_rgb(&path, img.channels == 1)
                        .map_err(|e| Error::io(&path, e))?;
                    out.files.push(path);
                } else {
                    npy_data.extend_from_slice(&img.data);
                }
            }
            if ext == "npy" {
                let i = &f.info;
                let c = if i.samples_per_pixel == 3 { 3 } else { 1 };
                write(
                    output,
                    &crate::io::npy("|u1", &[list.len(), i.rows, i.cols, c], &npy_data),
                )?;
                out.files.push(output.to_path_buf());
            }
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{}: output must end in .png or .npy",
                output.display()
            )));
        }
    }
    Ok(out)
}
