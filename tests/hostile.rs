//! Hostile inputs from the wild, through the command line: each gives a clear error naming the
//! file, exit status 1 and no panic, and the other inputs of a batch are still processed.

mod common;
use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use evax::checkpoint::{Checkpoint, pickle, save_safetensors};
use evax::fixtures::shared_or_skip;

/// Runs `args`; expects exit status 1, no panic, and `name` (and `what`) in the error.
fn expect_error(args: &[&str], name: &str, what: &str) -> String {
    let o = evax(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{name}: exit status; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{name}: panicked: {err}");
    assert!(
        err.contains(name),
        "{name}: error does not name the file: {err}"
    );
    assert!(
        err.contains(what),
        "{name}: error does not say '{what}': {err}"
    );
    eprintln!("{name}: {}", err.trim().lines().last().unwrap_or(""));
    err
}

/// A torch zip checkpoint whose data.pkl is `pkl`.
fn zip_checkpoint(path: &Path, pkl: &[u8]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

/// Pickles nesting lists, dicts, tuples and reduce calls `n` deep.
fn nested_pickles(n: usize) -> Vec<(&'static str, Vec<u8>)> {
    let mut lists = b"\x80\x02".to_vec();
    lists.extend(std::iter::repeat_n(b']', n));
    lists.extend(std::iter::repeat_n(b'a', n - 1));
    let mut dicts = b"\x80\x02".to_vec();
    for _ in 0..n {
        dicts.extend_from_slice(b"}K\x00");
    }
    dicts.push(b'}');
    dicts.extend(std::iter::repeat_n(b's', n));
    let mut tuples = b"\x80\x02".to_vec();
    tuples.extend(std::iter::repeat_n(b'(', n));
    tuples.extend(std::iter::repeat_n(b't', n));
    let mut calls = b"\x80\x02".to_vec();
    for _ in 0..n {
        calls.extend_from_slice(b"cevil\nfunction\n");
    }
    calls.push(b')');
    for _ in 0..n {
        calls.extend_from_slice(b"\x85R");
    }
    let mut out = vec![
        ("lists", lists),
        ("dicts", dicts),
        ("tuples", tuples),
        ("calls", calls),
    ];
    for (_, p) in &mut out {
        p.push(b'.');
    }
    out
}

#[test]
fn pickles_nested_a_million_deep_are_refused() {
    let Some(sh) = shared_or_skip("pickles_nested_a_million_deep_are_refused") else {
        return;
    };
    let dir = scratch("nested");
    // The legacy format: the fixture's magic, protocol and sys-info pickles, then the bomb.
    let legacy = std::fs::read(sh.join("fixtures/eva_x_ti_mim_fp16_legacy.pt")).unwrap();
    let mut pos = 0;
    for _ in 0..3 {
        pos = pickle::unpickle(&legacy, pos, &mut pickle::KeepPersistent)
            .unwrap()
            .1;
    }
    let img = sh.join("data/nih/00000001_000.png");
    let cases = nested_pickles(1_000_000);
    assert_eq!(cases.len(), 4);
    let mut files = 0;
    for (what, pkl) in cases {
        let z = dir.join(format!("nested_{what}.pth"));
        zip_checkpoint(&z, &pkl);
        let mut l = legacy[..pos].to_vec();
        l.extend_from_slice(&pkl);
        let lf = dir.join(format!("nested_{what}_legacy.pt"));
        std::fs::write(&lf, &l).unwrap();
        for f in [&z, &lf] {
            let name = f.file_name().unwrap().to_str().unwrap();
            expect_error(&["info", s(f)], name, "nests deeper than");
            let out = dir.join("p.csv");
            expect_error(
                &["predict", "--weights", s(f), "-o", s(&out), s(&img)],
                name,
                "nests deeper than",
            );
            files += 1;
        }
    }
    assert_eq!(files, 8);
}

/// The Ti fine-tuned fixture's tensors with `edit` applied, as safetensors.
fn edited_checkpoint(sh: &Path, path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let ck = Checkpoint::load(sh.join("fixtures/eva_x_ti_cxr14_ft.pth")).unwrap();
    let mut t: Vec<(String, Tensor)> = ck
        .tensors
        .iter()
        .map(|(k, p)| (k.clone(), p.to_tensor(&Device::Cpu).unwrap()))
        .collect();
    edit(&mut t);
    save_safetensors(&t.into_iter().collect(), None, path).unwrap();
}

fn replace(t: &mut [(String, Tensor)], key: &str, new: Tensor) {
    let slot = t.iter_mut().find(|(k, _)| k == key).expect(key);
    slot.1 = new;
}

#[test]
fn degenerate_shapes_are_refused() {
    let Some(sh) = shared_or_skip("degenerate_shapes_are_refused") else {
        return;
    };
    let dir = scratch("shapes");
    let zeros =
        |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    let cases: Vec<(&str, &str, Tensor, &str)> = vec![
        (
            "scalar_patch.safetensors",
            "patch_embed.proj.weight",
            scalar.clone(),
            "expected [C, 3, p, p]",
        ),
        (
            "zero_dim.safetensors",
            "patch_embed.proj.weight",
            zeros(&[0, 3, 16, 16]),
            "not an EVA-X patch embedding",
        ),
        (
            "patch_zero.safetensors",
            "patch_embed.proj.weight",
            zeros(&[192, 3, 0, 0]),
            "not an EVA-X patch embedding",
        ),
        (
            "scalar_mlp.safetensors",
            "blocks.0.mlp.w12.weight",
            scalar.clone(),
            "zero width",
        ),
        (
            "zero_mlp.safetensors",
            "blocks.0.mlp.w12.weight",
            zeros(&[0, 192]),
            "zero width",
        ),
        (
            "scalar_head.safetensors",
            "head.weight",
            scalar,
            "head.weight has zero rows",
        ),
        (
            "zero_head.safetensors",
            "head.weight",
            zeros(&[0, 192]),
            "head.weight has zero rows",
        ),
        (
            "zero_qkv.safetensors",
            "blocks.1.attn.qkv.weight",
            zeros(&[0, 192]),
            "blocks.1.attn.qkv.weight has shape [0, 192]",
        ),
        (
            "scalar_pos.safetensors",
            "pos_embed",
            Tensor::new(0f32, &Device::Cpu).unwrap(),
            "pos_embed has shape []",
        ),
    ];
    let n = cases.len();
    let img = sh.join("data/nih/00000001_000.png");
    for (file, key, t, what) in cases {
        let path = dir.join(file);
        edited_checkpoint(&sh, &path, |ts| replace(ts, key, t));
        let out = dir.join("p.csv");
        expect_error(
            &["predict", "--weights", s(&path), "-o", s(&out), s(&img)],
            file,
            what,
        );
        expect_error(&["info", s(&path)], file, what);
    }
    assert_eq!(n, 9);
    // `convert --patch-size 0` and an input size that is not a multiple of the patch.
    let good = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let o = evax(&[
        "convert",
        s(&good),
        "-o",
        s(&dir.join("c.safetensors")),
        "--patch-size",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("patch size must be positive"),
        "{}",
        stderr(&o)
    );
    let o = evax(&[
        "predict",
        "--weights",
        s(&good),
        "--input-size",
        "100",
        "-o",
        s(&dir.join("p.csv")),
        s(&img),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a positive multiple of 16"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn finetune_refuses_wrong_family_and_wrong_shapes_before_training() {
    let Some(sh) = shared_or_skip("finetune_refuses_wrong_family_and_wrong_shapes_before_training")
    else {
        return;
    };
    let dir = scratch("ft-wrong");
    // A tiny ChestX-ray14 folder: two images listed for train, val and test.
    std::fs::create_dir_all(dir.join("data/images")).unwrap();
    for n in ["00000001_000.png", "00003440_000.png"] {
        std::fs::copy(sh.join("data/nih").join(n), dir.join("data/images").join(n)).unwrap();
    }
    let list = "00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n00003440_000.png 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
    for split in [
        "train_official.txt",
        "val_official.txt",
        "test_official.txt",
    ] {
        std::fs::write(dir.join("data").join(split), list).unwrap();
    }
    let misshapen = dir.join("misshapen.safetensors");
    edited_checkpoint(&sh, &misshapen, |ts| {
        replace(
            ts,
            "blocks.2.mlp.w3.weight",
            Tensor::zeros((192, 7), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
    });
    for (preset, file, what) in [
        (
            "cxr14-ti",
            sh.join("fixtures/resnet50_l1111_cxr14_ft.pth"),
            "these are ResNet weights, but the recipe (model = \"ti\") is for EVA-X",
        ),
        (
            "cxr14-r50",
            sh.join("fixtures/densenet121_b2222_cxr14_ft.pth"),
            "these are DenseNet weights, but the recipe (model = \"r50\") is for ResNet",
        ),
        (
            "cxr14-dn121",
            sh.join("fixtures/vit_s_d2_cxr14_ft.pth"),
            "these are ViT weights, but the recipe (model = \"dn121\") is for DenseNet",
        ),
        (
            "cxr14-ti",
            misshapen.clone(),
            "blocks.2.mlp.w3.weight has shape [192, 7]",
        ),
    ] {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let out = dir.join(format!("run-{name}"));
        expect_error(
            &[
                "finetune",
                "--preset",
                preset,
                "--weights",
                s(&file),
                "--data-dir",
                s(&dir.join("data")),
                "-o",
                s(&out),
                "--max-steps",
                "1",
            ],
            &name,
            what,
        );
        assert!(!out.join("checkpoint-last.safetensors").exists());
    }
}

/// A PNG chunk with its length and CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(&body);
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc.sum().to_be_bytes());
    out
}

/// A PNG whose IHDR claims `w x h` grey pixels (valid CRCs), with a few bytes of image data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    out.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// A JPEG with its frame header (SOF) rewritten to claim `w x h`.
fn jpeg_claiming(src: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut b = src.to_vec();
    let i = (0..b.len() - 1)
        .find(|&i| b[i] == 0xff && (0xc0..=0xc2).contains(&b[i + 1]))
        .expect("SOF marker");
    // FF Cn, length (2), precision (1), height (2), width (2).
    b[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
    b[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
    b
}

/// MR_small rewritten in explicit VR little endian with `edit` applied to its data set.
/// (LUT descriptors are 16-bit US / SS values: dicom-rs writes them so whatever VR is asked,
/// so entries and first values beyond 16 bits cannot be made this way; the reader refuses
/// them too.)
fn dicom_edited(sh: &Path, edit: impl FnOnce(&mut InMemDicomObject)) -> Vec<u8> {
    let mut obj = dicom_object::open_file(sh.join("data/dicom/MR_small.dcm")).unwrap();
    edit(&mut obj);
    obj.meta_mut().transfer_syntax = "1.2.840.10008.1.2.1".to_string();
    obj.meta_mut().update_information_group_length();
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

#[test]
fn huge_image_headers_are_refused_before_allocation() {
    let Some(sh) = shared_or_skip("huge_image_headers_are_refused_before_allocation") else {
        return;
    };
    let dir = scratch("huge");
    let jpg = std::fs::read(sh.join("fixtures/images/16747_3_1.jpg")).unwrap();
    let files: Vec<(PathBuf, Vec<u8>)> = vec![
        (dir.join("huge.png"), png_header(30_000, 30_000)),
        (dir.join("huge.jpg"), jpeg_claiming(&jpg, 30_000, 30_000)),
        (
            dir.join("huge_frames.dcm"),
            dicom_edited(&sh, |o| {
                o.put(DataElement::new(
                    tags::NUMBER_OF_FRAMES,
                    VR::IS,
                    PrimitiveValue::from("60000"),
                ));
            }),
        ),
        (
            dir.join("huge_rows.dcm"),
            dicom_edited(&sh, |o| {
                o.put(DataElement::new(
                    tags::ROWS,
                    VR::US,
                    PrimitiveValue::from(30_000u16),
                ));
                o.put(DataElement::new(
                    tags::COLUMNS,
                    VR::US,
                    PrimitiveValue::from(30_000u16),
                ));
            }),
        ),
    ];
    for (p, b) in &files {
        std::fs::write(p, b).unwrap();
    }
    let good = sh.join("data/nih/00000001_000.png");
    let weights = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let out = dir.join("p.csv");
    let mut args: Vec<&str> = vec!["predict", "--weights", s(&weights), "-o", s(&out), s(&good)];
    args.extend(files.iter().map(|(p, _)| s(p)));
    let o = evax(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (p, _) in &files {
        let name = p.file_name().unwrap().to_str().unwrap();
        let line = err
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not reported: {err}"));
        assert!(line.contains("over the limit of 100000000"), "{line}");
        eprintln!("{line}");
    }
    // The good image was still predicted.
    let csv = std::fs::read_to_string(&out).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.contains("00000001_000.png"));
    // The limit is configurable: the 512 x 512 radiograph over a 0.2-megapixel limit.
    let o = evax(&[
        "--max-pixels",
        "200000",
        "predict",
        "--weights",
        s(&weights),
        "-o",
        s(&out),
        s(&good),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("512 x 512 = 262144 pixels, over the limit of 200000"),
        "{}",
        stderr(&o)
    );
    // DICOM export checks the same limit.
    let dcm = &files[2].0;
    expect_error(
        &["dicom", "export", s(dcm), "-o", s(&dir.join("x.png"))],
        "huge_frames.dcm",
        "over the limit",
    );
}

/// A LUT sequence item with `descriptor` and `n` entries of data.
fn lut_item(descriptor: [i32; 3], n: usize) -> InMemDicomObject {
    let desc = DataElement::new(
        tags::LUT_DESCRIPTOR,
        VR::SS,
        dicom_value!(
            I16,
            [
                descriptor[0] as i16,
                descriptor[1] as i16,
                descriptor[2] as i16
            ]
        ),
    );
    let data: Vec<u16> = (0..n as u32).map(|i| (i % 4096) as u16).collect();
    InMemDicomObject::from_element_iter([
        desc,
        DataElement::new(tags::LUT_DATA, VR::OW, PrimitiveValue::U16(data.into())),
    ])
}

#[test]
fn negative_and_absurd_lut_descriptors_are_refused() {
    let Some(sh) = shared_or_skip("negative_and_absurd_lut_descriptors_are_refused") else {
        return;
    };
    let dir = scratch("lut");
    let cases: Vec<(&str, bool, [i32; 3], usize, &str)> = vec![
        // (file, modality LUT rather than VOI LUT, descriptor, entries of data, expected)
        (
            "modality_negative.dcm",
            true,
            [-1, -32768, 16],
            16,
            "holds 32 bytes for 65535 entries",
        ),
        (
            "modality_bits.dcm",
            true,
            [16, 0, 40],
            16,
            "declares 40 bits",
        ),
        (
            "voi_bits_negative.dcm",
            false,
            [16, 0, -3],
            16,
            "declares -3 bits",
        ),
        (
            "voi_short_data.dcm",
            false,
            [4000, 0, 16],
            16,
            "holds 32 bytes for 4000 entries",
        ),
        (
            "voi_ss_negative.dcm",
            false,
            [-5, 0, 16],
            16,
            "holds 32 bytes for 65531 entries",
        ),
        (
            "voi_zero_bits.dcm",
            false,
            [16, 0, 0],
            16,
            "declares 0 bits",
        ),
    ];
    let count = cases.len();
    let mut paths = Vec::new();
    for (file, modality, desc, n, _) in &cases {
        let bytes = dicom_edited(&sh, |o| {
            let seq = if *modality {
                tags::MODALITY_LUT_SEQUENCE
            } else {
                o.remove_element(tags::WINDOW_CENTER);
                o.remove_element(tags::WINDOW_WIDTH);
                tags::VOILUT_SEQUENCE
            };
            o.put(DataElement::new(
                seq,
                VR::SQ,
                DataSetSequence::from(vec![lut_item(*desc, *n)]),
            ));
        });
        let p = dir.join(file);
        std::fs::write(&p, bytes).unwrap();
        paths.push(p);
    }
    for ((file, _, _, _, what), p) in cases.iter().zip(&paths) {
        let o = evax(&["dicom", "export", s(p), "-o", s(&dir.join("x.png"))]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{file}: {err}");
        assert!(!err.contains("panicked"), "{file}: {err}");
        assert!(err.contains(file), "{file}: {err}");
        assert!(err.contains("LUT"), "{file}: {err}");
        assert!(err.contains(what), "{file}: expected '{what}': {err}");
        eprintln!("{file} ({what}): {}", err.trim());
    }
    assert_eq!(count, 6);
    // In a batch, the damaged files are listed and the good one is predicted.
    let good = sh.join("data/nih/00000001_000.png");
    let weights = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let out = dir.join("p.csv");
    let mut args: Vec<&str> = vec!["predict", "--weights", s(&weights), "-o", s(&out), s(&good)];
    args.extend(paths.iter().map(|p| s(p)));
    let o = evax(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("{count} of {} inputs failed", count + 1)),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
}

/// `finetune --gpus` names what it needs before touching any data: a build with NCCL for
/// several GPUs, and not also `--device`.
#[test]
fn finetune_gpus_says_what_it_needs() {
    let dir = scratch("ft-gpus");
    let base = [
        "finetune",
        "--preset",
        "cxr14-ti",
        "--data-dir",
        "no-such-dir",
        "-o",
    ];
    let out = dir.join("out");
    let mut args: Vec<&str> = base.to_vec();
    args.extend([s(&out), "--gpus", "0,1"]);
    if !cfg!(feature = "nccl") {
        expect_error(&args, "--gpus 0,1", "--features cuda,nccl");
    }
    args.extend(["--device", "cuda:1"]);
    expect_error(&args, "--gpus", "not both");
    assert!(!out.exists());
}
