//! DICOM against pydicom (dicom_reference.safetensors / .json), exports, model inputs, and
//! hostile files.

mod common;

use common::*;

use std::path::Path;

use evax::checkpoint::Checkpoint;
use evax::dicom::{DicomFile, voi::VoiChoice};
use evax::fixtures::shared_or_skip;

const LOSSY: [&str; 3] = [
    "RG1_J2KI.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "siim_chest_jpeg_baseline.dcm",
];

#[test]
fn stored_values_and_headers_match_pydicom() {
    let Some(sh) = shared_or_skip("stored_values_and_headers_match_pydicom") else {
        return;
    };
    let refs = Checkpoint::load(sh.join("fixtures/dicom_reference.safetensors"))
        .unwrap()
        .tensors;
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sh.join("fixtures/dicom_reference.json")).unwrap())
            .unwrap();
    let mut names: Vec<&String> = refs.keys().collect();
    names.sort();
    assert_eq!(names.len(), 9, "DICOM files in the reference");
    for name in names {
        let f = DicomFile::open(sh.join("data/dicom").join(name)).unwrap();
        let v = f.stored_values(None).unwrap();
        let want = &refs[name.as_str()];
        assert_eq!(
            want.shape,
            vec![v.frames, v.rows, v.cols, v.samples],
            "{name}: shape"
        );
        assert_eq!(v.values.len(), want.data.len(), "{name}: length");
        let max = v
            .values
            .iter()
            .zip(&want.data)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(0.0, f64::max);
        let differing = v
            .values
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| **a as f32 != **b)
            .count();
        eprintln!(
            "{name}: {}, max difference {max} ({differing} values differ)",
            f.info.transfer_syntax_name
        );
        if LOSSY.contains(&name.as_str()) {
            assert!(max <= 4.0, "{name}: lossy decode differs by {max}");
        } else {
            assert_eq!(max, 0.0, "{name}: lossless syntax must match exactly");
        }
        let h = &json[name.as_str()];
        let i = &f.info;
        assert_eq!(h["transfer_syntax"], i.transfer_syntax, "{name}");
        assert_eq!(h["photometric"], i.photometric, "{name}");
        assert_eq!(h["rows"], i.rows, "{name}");
        assert_eq!(h["cols"], i.cols, "{name}");
        assert_eq!(h["frames"], i.frames, "{name}");
        assert_eq!(h["samples_per_pixel"], i.samples_per_pixel, "{name}");
        assert_eq!(h["bits_allocated"], i.bits_allocated, "{name}");
        assert_eq!(h["bits_stored"], i.bits_stored, "{name}");
        assert_eq!(h["pixel_representation"], i.pixel_representation, "{name}");
        assert_eq!(h["modality"], i.modality, "{name}");
        assert_eq!(h["body_part"], i.body_part, "{name}");
        assert_eq!(h["rescale_slope"].as_f64(), i.rescale_slope, "{name}");
        assert_eq!(
            h["rescale_intercept"].as_f64(),
            i.rescale_intercept,
            "{name}"
        );
        assert_eq!(
            h["window_center"].as_f64(),
            i.windows.first().map(|w| w.center),
            "{name}"
        );
        assert_eq!(
            h["window_width"].as_f64(),
            i.windows.first().map(|w| w.width),
            "{name}"
        );
        assert_eq!(
            h["has_modality_lut_sequence"], i.has_modality_lut_sequence,
            "{name}"
        );
        assert_eq!(h["has_voi_lut_sequence"], i.has_voi_lut_sequence, "{name}");
        let (lo, hi) = v
            .values
            .iter()
            .fold((i32::MAX, i32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        if !LOSSY.contains(&name.as_str()) {
            assert_eq!(h["pixel_min"].as_f64(), Some(lo as f64), "{name}");
            assert_eq!(h["pixel_max"].as_f64(), Some(hi as f64), "{name}");
        }
    }
}

fn png_grey(path: &Path) -> (usize, usize, Vec<u8>) {
    let img = evax::preprocess::Image::open(path).unwrap();
    assert_eq!(img.channels, 1);
    (img.width, img.height, img.data)
}

#[test]
fn monochrome1_chest_exports_dark_lungs_and_siim_matches_its_pixels() {
    let Some(sh) =
        shared_or_skip("monochrome1_chest_exports_dark_lungs_and_siim_matches_its_pixels")
    else {
        return;
    };
    let dir = scratch("export");
    let out = dir.join("rg1.png");
    let o = evax(&[
        "dicom",
        "export",
        s(&sh.join("data/dicom/RG1_J2KI.dcm")),
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("MONOCHROME1 inverted"));
    let (w, h, px) = png_grey(&out);
    // Lungs (central band of each half, upper-middle rows) darker than the spine / mediastinum.
    let mean = |x0: usize, x1: usize, y0: usize, y1: usize| {
        let mut sum = 0u64;
        for y in y0..y1 {
            for x in x0..x1 {
                sum += px[y * w + x] as u64;
            }
        }
        sum as f64 / ((x1 - x0) * (y1 - y0)) as f64
    };
    let lungs =
        (mean(w / 5, w * 2 / 5, h / 4, h / 2) + mean(w * 3 / 5, w * 4 / 5, h / 4, h / 2)) / 2.0;
    let mediastinum = mean(w * 9 / 20, w * 11 / 20, h / 4, h / 2);
    eprintln!("RG1_J2KI: lungs {lungs:.0}, mediastinum {mediastinum:.0}");
    assert!(
        lungs + 30.0 < mediastinum,
        "lungs {lungs} should be darker than the mediastinum {mediastinum}"
    );

    // The SIIM chest (8-bit MONOCHROME2, no window) exports to its stored pixels exactly.
    let out = dir.join("siim.png");
    let o = evax(&[
        "dicom",
        "export",
        s(&sh.join("data/dicom/siim_chest_jpeg_baseline.dcm")),
        "--voi",
        "none",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, px) = png_grey(&out);
    let stored = DicomFile::open(sh.join("data/dicom/siim_chest_jpeg_baseline.dcm"))
        .unwrap()
        .stored_values(Some(0))
        .unwrap();
    assert_eq!(px.len(), stored.values.len());
    assert!(px.iter().zip(&stored.values).all(|(&a, &b)| a as i32 == b));
    // With the default VOI it is the same image (8-bit, no window in the header: kept).
    let o = evax(&[
        "dicom",
        "export",
        s(&sh.join("data/dicom/siim_chest_jpeg_baseline.dcm")),
        "-o",
        s(&dir.join("siim2.png")),
    ]);
    assert!(o.status.success());
    assert_eq!(png_grey(&dir.join("siim2.png")).2, px);

    // --raw NPY: stored values, [frames, rows, cols, samples], int16 for the CT.
    let npy = dir.join("ct.npy");
    let o = evax(&[
        "dicom",
        "export",
        s(&sh.join("data/dicom/CT_small.dcm")),
        "--raw",
        "-o",
        s(&npy),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = std::fs::read(&npy).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'descr': '<i2'") && header.contains("(1, 128, 128, 1)"),
        "{header}"
    );
    let refs = Checkpoint::load(sh.join("fixtures/dicom_reference.safetensors"))
        .unwrap()
        .tensors;
    let vals: Vec<f32> = b[10 + hlen..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
        .collect();
    assert_eq!(vals, refs["CT_small.dcm"].data);
}

#[test]
fn voi_choices_and_info() {
    let Some(sh) = shared_or_skip("voi_choices_and_info") else {
        return;
    };
    let f = DicomFile::open(sh.join("data/dicom/MR_small.dcm")).unwrap();
    let (img, steps) = f.to_image(0, &VoiChoice::First).unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s.contains("VOI window: centre 600, width 1600, LINEAR")),
        "{steps:?}"
    );
    assert_eq!((img.width, img.height, img.channels), (64, 64, 1));
    let (none, steps) = f.to_image(0, &VoiChoice::None).unwrap();
    assert!(steps.iter().any(|s| s.starts_with("no VOI")));
    assert_eq!(*none.data.iter().max().unwrap(), 255);
    assert_eq!(*none.data.iter().min().unwrap(), 0);
    let e = f
        .to_image(0, &VoiChoice::Window(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("window 2 requested; the header has 1"), "{e}");
    let ct = DicomFile::open(sh.join("data/dicom/CT_small.dcm")).unwrap();
    let (_, steps) = ct.to_image(0, &VoiChoice::First).unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s == "rescale: slope 1, intercept -1024"),
        "{steps:?}"
    );
    let o = evax(&[
        "dicom",
        "info",
        "--json",
        s(&sh.join("data/dicom/RG1_J2KI.dcm")),
    ]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["photometric"], "MONOCHROME1");
    assert_eq!(v["body_part"], "CHEST");
    assert_eq!(v["rows"], 1955);
}

#[test]
fn predict_and_embed_accept_dicom_and_mixed_folders() {
    let Some(sh) = shared_or_skip("predict_and_embed_accept_dicom_and_mixed_folders") else {
        return;
    };
    let dir = scratch("mixed");
    std::fs::copy(
        sh.join("data/dicom/siim_chest_jpeg_baseline.dcm"),
        dir.join("a_siim.dcm"),
    )
    .unwrap();
    std::fs::copy(sh.join("data/dicom/RG1_J2KI.dcm"), dir.join("b_rg1.dcm")).unwrap();
    std::fs::copy(sh.join("data/nih/00000001_000.png"), dir.join("c_nih.png")).unwrap();
    let out = scratch("mixed-out");
    let weights = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let o = evax(&[
        "predict",
        "--weights",
        s(&weights),
        "-o",
        s(&out.join("p.json")),
        s(&dir),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("p.json")).unwrap()).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    // The PNG row is the reference logits of 00000001_000.png.
    let refs = Checkpoint::load(sh.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    let row: Vec<f32> = v[2]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(row.len(), 14);
    let d = row
        .iter()
        .zip(&refs["ti_ft/logits"].data[..14])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= 1e-5, "logits differ by {d}");
    // A DICOM input gives what its exported PNG gives.
    let png = out.join("siim.png");
    assert!(
        evax(&["dicom", "export", s(&dir.join("a_siim.dcm")), "-o", s(&png)])
            .status
            .success()
    );
    let o = evax(&[
        "predict",
        "--weights",
        s(&weights),
        "-o",
        s(&out.join("q.json")),
        s(&png),
    ]);
    assert!(o.status.success());
    let q: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("q.json")).unwrap()).unwrap();
    let logits = |v: &serde_json::Value| -> Vec<f64> {
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    assert_eq!(logits(&q[0]).len(), 14);
    assert_eq!(logits(&v[0]).len(), 14);
    let d = logits(&q[0])
        .iter()
        .zip(logits(&v[0]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-5, "DICOM and its PNG export differ by {d}");
    let o = evax(&[
        "embed",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_mim_fp16.pt")),
        "-o",
        s(&out.join("e.safetensors")),
        s(&dir),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = Checkpoint::load(out.join("e.safetensors")).unwrap();
    assert_eq!(e.tensors["pooled"].shape, vec![3, 192]);
}

#[test]
fn files_without_preamble_or_meta_and_deflated_files_read() {
    let Some(sh) = shared_or_skip("files_without_preamble_or_meta_and_deflated_files_read") else {
        return;
    };
    let bytes = std::fs::read(sh.join("data/dicom/MR_small.dcm")).unwrap();
    let want = DicomFile::open(sh.join("data/dicom/MR_small.dcm"))
        .unwrap()
        .stored_values(None)
        .unwrap();
    // No preamble: starts with DICM.
    let no_preamble = DicomFile::from_bytes(&bytes[128..], Path::new("no_preamble.dcm")).unwrap();
    assert_eq!(no_preamble.stored_values(None).unwrap(), want);
    // No preamble and no file meta: the bare data set (explicit VR little endian).
    let meta_len = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    let dataset = &bytes[144 + meta_len..];
    let bare = DicomFile::from_bytes(dataset, Path::new("bare.dcm")).unwrap();
    assert_eq!(bare.stored_values(None).unwrap(), want);
    // Implicit VR data set without meta.
    let imp = std::fs::read(sh.join("data/dicom/MR_small_implicit.dcm")).unwrap();
    let meta_len = u32::from_le_bytes(imp[140..144].try_into().unwrap()) as usize;
    let bare =
        DicomFile::from_bytes(&imp[144 + meta_len..], Path::new("bare_implicit.dcm")).unwrap();
    assert_eq!(bare.stored_values(None).unwrap(), want);
}

#[test]
fn mutated_files_never_panic() {
    let Some(sh) = shared_or_skip("mutated_files_never_panic") else {
        return;
    };
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(sh.join("data/dicom"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .filter(|(_, b)| b.len() < 200_000) // the big J2K chest is slow to decode repeatedly
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "small DICOM files in the shared data");
    let mut tally = FuzzTally::default();
    for k in fuzz_range(300) {
        let (name, src) = &files[(k as usize) % files.len()];
        let bytes = mutate(k, src);
        if let Ok(dump) = std::env::var("EVAX_FUZZ_DUMP") {
            std::fs::write(format!("{dump}-{k}.dcm"), &bytes).unwrap();
        }
        tally.run(k, name, || {
            let f = DicomFile::from_bytes(&bytes, Path::new(name)).map_err(|e| e.to_string())?;
            f.stored_values(None).map_err(|e| e.to_string())?;
            f.to_image(0, &VoiChoice::First)
                .map_err(|e| e.to_string())?;
            Ok(())
        });
    }
    tally.report("DICOM", 1024.0);
}

/// Re-encode a file: new transfer syntax UID in the meta (and `edit` applied to the data set).
fn rewrite(
    src: &Path,
    ts: &str,
    edit: impl FnOnce(&mut dicom_object::InMemDicomObject),
) -> Vec<u8> {
    let mut obj = dicom_object::open_file(src).unwrap();
    edit(&mut obj);
    obj.meta_mut().transfer_syntax = ts.to_string();
    obj.meta_mut().update_information_group_length();
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap(); // preamble, DICM, meta, data set
    out
}

#[test]
fn deflated_multiframe_and_unsupported_syntaxes() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let Some(sh) = shared_or_skip("deflated_multiframe_and_unsupported_syntaxes") else {
        return;
    };
    let mr = sh.join("data/dicom/MR_small.dcm");
    let want = DicomFile::open(&mr).unwrap().stored_values(None).unwrap();
    // Deflated Explicit VR Little Endian.
    let deflated = rewrite(&mr, "1.2.840.10008.1.2.1.99", |_| {});
    let f = DicomFile::from_bytes(&deflated, Path::new("deflated.dcm")).unwrap();
    assert!(
        f.info
            .transfer_syntax_name
            .starts_with("Deflated Explicit VR Little Endian")
    );
    assert_eq!(f.stored_values(None).unwrap(), want);
    // Two frames (the second inverted): the first by default, all on request.
    let two = rewrite(&mr, "1.2.840.10008.1.2.1", |obj| {
        let px = obj
            .element(tags::PIXEL_DATA)
            .unwrap()
            .value()
            .to_bytes()
            .unwrap()
            .into_owned();
        let mut both = px.clone();
        both.extend(
            px.chunks_exact(2)
                .flat_map(|c| (4095 - i16::from_le_bytes([c[0], c[1]])).to_le_bytes()),
        );
        obj.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from("2"),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(both),
        ));
    });
    let f = DicomFile::from_bytes(&two, Path::new("two.dcm")).unwrap();
    assert_eq!(f.info.frames, 2);
    let all = f.stored_values(None).unwrap();
    assert_eq!(all.frames, 2);
    assert_eq!(&all.values[..want.values.len()], &want.values[..]);
    assert_eq!(all.values[want.values.len()], 4095 - want.values[0]);
    assert_eq!(
        f.stored_values(Some(1)).unwrap().values,
        all.values[want.values.len()..].to_vec()
    );
    assert!(
        f.stored_values(Some(2))
            .unwrap_err()
            .to_string()
            .contains("frame 2 requested; the file has 2")
    );
    // A stream that is not what its transfer syntax says (JPEG 2000 labelled JPEG-LS): the
    // error names the file, the syntax and the problem.
    let jls = rewrite(
        &sh.join("data/dicom/MR_small_jp2klossless.dcm"),
        "1.2.840.10008.1.2.4.80",
        |_| {},
    );
    let f = DicomFile::from_bytes(&jls, Path::new("jpegls.dcm")).unwrap();
    let e = f.stored_values(None).unwrap_err().to_string();
    assert!(
        e.starts_with("jpegls.dcm: cannot decode JPEG-LS Lossless (1.2.840.10008.1.2.4.80)")
            && e.contains("no start-of-image marker"),
        "{e}"
    );
    // A pixel-data length that does not match the header.
    let short = rewrite(&mr, "1.2.840.10008.1.2.1", |obj| {
        obj.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(640u16),
        ));
    });
    let e = DicomFile::from_bytes(&short, Path::new("short.dcm"))
        .unwrap()
        .stored_values(None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Pixel Data (7FE0,0010) holds 8192 bytes"), "{e}");
}

/// JPEG-LS (lossless and near-lossless, 8, 12 and 16 bits) decoded by evax's own decoder
/// exactly as pydicom decodes it: files made by CharLS through pydicom
/// (`scripts/make-jpegls-testdata.py`), committed under `tests/data/jpegls`.
#[test]
fn jpeg_ls_files_decode_as_pydicom_decodes_them() {
    let names = [
        "lossless8",
        "near8",
        "lossless12",
        "lossless16",
        "near16",
        "noise8",
        "noise16",
    ];
    assert_decoded_as_pydicom("jpegls", &names, "JPEG-LS");
}

/// Every `tests/data/DIR/NAME.dcm` (of transfer syntax `syntax...`) gives exactly the stored
/// values pydicom gave (`NAME.npy`).
fn assert_decoded_as_pydicom(dir: &str, names: &[&str], syntax: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(dir);
    let mut compared = 0;
    for name in names {
        let f = DicomFile::open(dir.join(format!("{name}.dcm"))).unwrap();
        assert!(
            f.info.transfer_syntax_name.starts_with(syntax),
            "{name}: {}",
            f.info.transfer_syntax_name
        );
        let v = f
            .stored_values(None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (shape, want) = read_npy(&dir.join(format!("{name}.npy")));
        assert_eq!(shape, vec![v.rows, v.cols], "{name}: shape");
        assert_eq!(v.values.len(), want.len(), "{name}: length");
        let wrong = v
            .values
            .iter()
            .zip(&want)
            .filter(|(a, b)| **a as f32 != **b)
            .count();
        assert_eq!(wrong, 0, "{name}: {wrong} of {} samples differ", want.len());
        compared += 1;
    }
    assert_eq!(compared, names.len());
}

/// The 12-bit JPEG Extended test files (scripts/make-jpeg12-testdata.py).
const JPEG12_FILES: [&str; 7] = [
    "q90",
    "q50_odd",
    "q100_odd",
    "q5",
    "noise_q75",
    "edges_q60",
    "restart5_q80",
];

/// 12-bit JPEG Extended files (made by libjpeg-turbo, see scripts/make-jpeg12-testdata.py)
/// decode to exactly what pydicom (pylibjpeg-libjpeg) gives, sample for sample; libjpeg-turbo's
/// own decoding differs from it in 126 to 468 samples per file.
#[test]
fn jpeg_extended_12_bit_files_decode_as_pydicom_decodes_them() {
    assert_decoded_as_pydicom("jpeg12", &JPEG12_FILES, "JPEG Extended (Process 2 & 4)");
    // A stream cut short is an error, not an image completed with zeros.
    let stream = jpeg12_stream("q90");
    let e = evax::dicom::jpeg12::decode(&stream[..stream.len() * 3 / 4]).unwrap_err();
    assert!(e.to_string().contains("ends early"), "{e}");
    assert!(evax::dicom::jpeg12::decode(&stream).is_ok());
}

/// The JPEG stream inside a 12-bit test file (to its end).
fn jpeg12_stream(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/jpeg12/{name}.dcm"));
    let b = std::fs::read(path).unwrap();
    let at = b.windows(3).position(|w| w == [0xff, 0xd8, 0xff]).unwrap();
    b[at..].to_vec()
}

/// Our 12-bit JPEG decoder on damaged streams: errors, never a panic (the DICOM layer's guard
/// is not involved here).
#[test]
fn mutated_12_bit_jpeg_streams_never_panic() {
    let streams: Vec<(&str, Vec<u8>)> = JPEG12_FILES
        .iter()
        .map(|n| (*n, jpeg12_stream(n)))
        .collect();
    assert_eq!(streams.len(), 7);
    let mut tally = FuzzTally::default();
    for k in fuzz_range(1000) {
        let (name, src) = &streams[(k as usize) % streams.len()];
        let bytes = mutate(k, src);
        tally.run(k, name, || {
            evax::dicom::jpeg12::decode(&bytes)
                .map(|_| ())
                .map_err(|e| format!("{name}: {e}"))
        });
    }
    tally.report("12-bit JPEG", 1024.0);
}

/// `evax cam --dicom-out` on a DICOM radiograph: a Secondary Capture of the overlay and an
/// Enhanced SR of the probabilities, in the source's study with new series and instances,
/// referencing the source; read back with dicom-rs and by `evax dicom info`.
#[test]
fn cam_writes_secondary_capture_and_structured_report() {
    let Some(sh) = shared_or_skip("cam_writes_secondary_capture_and_structured_report") else {
        return;
    };
    use dicom_dictionary_std::tags;
    let src_path = sh.join("data/dicom/siim_chest_jpeg_baseline.dcm");
    let dir = scratch("dicom-out");
    let o = evax(&[
        "cam",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "--top",
        "2",
        "--dicom-out",
        "-o",
        s(&dir),
        s(&src_path),
        s(&sh.join("data/nih/00000001_000.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read =
        |p: &Path| dicom_object::open_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let text = |o: &dicom_object::DefaultDicomObject, t| {
        o.element(t)
            .unwrap_or_else(|_| panic!("{t} missing"))
            .to_str()
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    let src = read(&src_path);
    let mut dcm: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    dcm.sort();
    // Two overlays (top 2 classes) and one report, for the DICOM input only.
    assert_eq!(dcm.len(), 3, "{dcm:?}");
    let mut series = std::collections::BTreeSet::new();
    let mut instances = std::collections::BTreeSet::new();
    for p in &dcm {
        let o = read(p);
        for t in [
            tags::PATIENT_ID,
            tags::PATIENT_NAME,
            tags::STUDY_INSTANCE_UID,
            tags::STUDY_DATE,
            tags::ACCESSION_NUMBER,
        ] {
            assert_eq!(text(&o, t), text(&src, t), "{}: {t} copied", p.display());
        }
        for t in [tags::SERIES_INSTANCE_UID, tags::SOP_INSTANCE_UID] {
            assert_ne!(text(&o, t), text(&src, t), "{}: {t} new", p.display());
            assert!(text(&o, t).starts_with("2.25."));
        }
        assert_eq!(
            o.meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0'),
            text(&o, tags::SOP_INSTANCE_UID)
        );
        series.insert(text(&o, tags::SERIES_INSTANCE_UID));
        instances.insert(text(&o, tags::SOP_INSTANCE_UID));
        for t in [
            tags::SERIES_NUMBER,
            tags::INSTANCE_NUMBER,
            tags::CONTENT_DATE,
            tags::CONTENT_TIME,
            tags::MANUFACTURER,
        ] {
            assert!(!text(&o, t).is_empty(), "{}: {t}", p.display());
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with("_sc.dcm") {
            assert_eq!(text(&o, tags::SOP_CLASS_UID), "1.2.840.10008.5.1.4.1.1.7");
            assert_eq!(text(&o, tags::MODALITY), "OT");
            assert_eq!(text(&o, tags::CONVERSION_TYPE), "WSD");
            assert_eq!(text(&o, tags::PHOTOMETRIC_INTERPRETATION), "RGB");
            let rows: usize = text(&o, tags::ROWS).parse().unwrap();
            let cols: usize = text(&o, tags::COLUMNS).parse().unwrap();
            assert_eq!(
                rows,
                text(&src, tags::ROWS).parse::<usize>().unwrap(),
                "overlay at the source's size"
            );
            assert!(
                cols > text(&src, tags::COLUMNS).parse::<usize>().unwrap(),
                "and a colour bar"
            );
            let px = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
            assert_eq!(px.len(), (rows * cols * 3).div_ceil(2) * 2);
            let refs = o
                .element(tags::SOURCE_IMAGE_SEQUENCE)
                .unwrap()
                .items()
                .unwrap();
            assert_eq!(
                text_item(&refs[0], tags::REFERENCED_SOP_INSTANCE_UID),
                text(&src, tags::SOP_INSTANCE_UID)
            );
        } else {
            assert!(name.ends_with("_sr.dcm"), "{name}");
            assert_eq!(
                text(&o, tags::SOP_CLASS_UID),
                "1.2.840.10008.5.1.4.1.1.88.22"
            );
            assert_eq!(text(&o, tags::MODALITY), "SR");
            assert_eq!(text(&o, tags::VALUE_TYPE), "CONTAINER");
            assert_eq!(text(&o, tags::COMPLETION_FLAG), "COMPLETE");
            assert_eq!(text(&o, tags::VERIFICATION_FLAG), "UNVERIFIED");
            let content = o.element(tags::CONTENT_SEQUENCE).unwrap().items().unwrap();
            // Model, checkpoint, software, threshold, 14 probabilities, findings.
            assert_eq!(content.len(), 4 + 14 + 1);
        }
    }
    assert_eq!(series.len(), 3, "a new series each");
    assert_eq!(instances.len(), 3);
    // The report's probabilities are the ones cams.json gives.
    let sr = dcm
        .iter()
        .find(|p| p.to_string_lossy().ends_with("_sr.dcm"))
        .unwrap();
    let o = evax(&["dicom", "info", s(sr)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info = String::from_utf8_lossy(&o.stdout).into_owned();
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cams.json")).unwrap()).unwrap();
    let first = idx
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["input"].as_str().unwrap().ends_with(".dcm"))
        .unwrap();
    let line = format!(
        "  {}: {:.6} (probability)",
        first["class"].as_str().unwrap(),
        first["probability"].as_f64().unwrap()
    );
    assert!(info.contains(&line), "{line} not in\n{info}");
    assert!(
        info.contains(&text(&src, tags::SOP_INSTANCE_UID)),
        "evidence"
    );
}

fn text_item(o: &dicom_object::InMemDicomObject, t: dicom_core::Tag) -> String {
    o.element(t)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}
