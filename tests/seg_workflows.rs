//! Segmentation workflows end to end: `evax seg prepare` on small synthetic downloads laid out
//! as the public ones are, with the original's quirks (SIIM's last run-length row, column-major
//! relative runs and positives only; RSNA's last box per patient, filled corners included;
//! lung's folders; Shenzhen's merged left / right masks); `seg train` resuming bit for bit;
//! the segmentation demo.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use evax::fixtures::shared_or_skip;
use evax::preprocess::Image;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("evax-test-{}-prep-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An 8-bit, 4 x 6 MONOCHROME2 DICOM (pixel i has value 10 + i) for `patient`, written from
/// the shared MR_small file with its pixel module replaced.
fn dicom_4x6(sh: &Path, path: &Path, patient: &str) {
    let mut obj = dicom_object::open_file(sh.join("data/dicom/MR_small.dcm")).unwrap();
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    obj.put(us(tags::ROWS, 4));
    obj.put(us(tags::COLUMNS, 6));
    obj.put(us(tags::BITS_ALLOCATED, 8));
    obj.put(us(tags::BITS_STORED, 8));
    obj.put(us(tags::HIGH_BIT, 7));
    obj.put(us(tags::PIXEL_REPRESENTATION, 0));
    obj.put(us(tags::SAMPLES_PER_PIXEL, 1));
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("MONOCHROME2"),
    ));
    obj.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from(patient),
    ));
    let pixels: Vec<u8> = (0..24).map(|i| 10 + i as u8).collect();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(pixels),
    ));
    obj.meta_mut().transfer_syntax = "1.2.840.10008.1.2.1".to_string();
    obj.meta_mut().update_information_group_length();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    std::fs::write(path, out).unwrap();
}

fn prepare(raw: &Path, out: &Path, dataset: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_evax"))
        .args(["seg", "prepare", "--dataset", dataset, "--data-dir"])
        .arg(raw)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn mask(out: &Path, name: &str) -> Vec<u8> {
    let m = Image::open(out.join("masks").join(format!("{name}.png"))).unwrap();
    assert_eq!(m.channels, 1);
    m.data
}

fn list(out: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(out.join(name))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A 4 x 6 mask with ones at (row, col) `cells`.
fn cells(cells: &[(usize, usize)]) -> Vec<u8> {
    let mut m = vec![0u8; 24];
    for &(r, c) in cells {
        m[r * 6 + c] = 1;
    }
    m
}

#[test]
fn siim_keeps_the_last_row_of_positive_images() {
    let Some(sh) = shared_or_skip("siim_keeps_the_last_row_of_positive_images") else {
        return;
    };
    let raw = scratch("siim-raw");
    for (id, sub) in [
        ("img1", "s1/a"),
        ("img2", "s2"),
        ("img3", "s3"),
        ("img4", "s4"),
    ] {
        dicom_4x6(
            &sh,
            &raw.join(format!("dicom-images-train/{sub}/{id}.dcm")),
            id,
        );
    }
    // Positions count down the columns of the 4-row image: position p is (p % 4, p / 4).
    // img1: "0 2" (positions 0, 1) then, last, "5 1 2 2" (positions 5, 8, 9).
    // img2: negative. img3: positive, then "-1" last. img4: not listed.
    std::fs::write(
        raw.join("train-rle.csv"),
        "ImageId, EncodedPixels\nimg1, 0 2\nimg2, -1\nimg1, 5 1 2 2\nimg3, 3 1\nimg3, -1\n",
    )
    .unwrap();
    let out = raw.join("out");
    let o = prepare(&raw, &out, "siim", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = [list(&out, "train.txt"), list(&out, "test.txt")].concat();
    assert_eq!(
        names,
        vec!["img1".to_string()],
        "only img1's last row is a mask"
    );
    assert_eq!(mask(&out, "img1"), cells(&[(1, 1), (0, 2), (1, 2)]));
    // The image: the stored values as 8 bits.
    let img = Image::open(out.join("images/img1.png")).unwrap();
    assert_eq!((img.width, img.height), (6, 4));
    assert_eq!(img.data[..3], [10, 11, 12]);
    // --all-parts: every row of every listed image, negatives kept with empty masks.
    let all = raw.join("all");
    let o = prepare(&raw, &all, "siim", &["--all-parts"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> = [list(&all, "train.txt"), list(&all, "test.txt")].concat();
    names.sort();
    assert_eq!(names, ["img1", "img2", "img3"]);
    assert_eq!(
        mask(&all, "img1"),
        cells(&[(0, 0), (1, 0), (1, 1), (0, 2), (1, 2)])
    );
    assert_eq!(mask(&all, "img2"), vec![0; 24]);
    assert_eq!(mask(&all, "img3"), cells(&[(3, 0)]));
    // The original's split lists: names not prepared are reported.
    let splits = raw.join("splits");
    std::fs::create_dir_all(&splits).unwrap();
    std::fs::write(splits.join("train.txt"), "img1\nimg9\n").unwrap();
    std::fs::write(splits.join("test.txt"), "img3\n").unwrap();
    let split_out = raw.join("split");
    let o = prepare(
        &raw,
        &split_out,
        "siim",
        &["--all-parts", "--splits", splits.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("img9: in the split list but not prepared"),
        "{err}"
    );
    assert_eq!(list(&split_out, "train.txt"), ["img1"]);
    assert_eq!(list(&split_out, "test.txt"), ["img3"]);
    // A run past the image is an error naming the csv line; the other images go on.
    std::fs::write(
        raw.join("train-rle.csv"),
        "ImageId, EncodedPixels\nimg1, 20 10\nimg3, 3 1\n",
    )
    .unwrap();
    let o = prepare(&raw, &raw.join("bad"), "siim", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("train-rle.csv line 2: a run ends at 30"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&raw);
}

#[test]
fn rsna_fills_the_last_box_of_each_patient() {
    let Some(sh) = shared_or_skip("rsna_fills_the_last_box_of_each_patient") else {
        return;
    };
    let raw = scratch("rsna-raw");
    // File names need not be the patient: the DICOM's Patient ID is.
    for (file, patient) in [("f1", "p1"), ("f2", "p2")] {
        dicom_4x6(
            &sh,
            &raw.join(format!("stage_2_train_images/{file}.dcm")),
            patient,
        );
    }
    std::fs::write(
        raw.join("stage_2_train_labels.csv"),
        "patientId,x,y,width,height,Target\np1,0.0,0.0,1.0,1.0,1\np1,3.7,1.2,1.5,5.0,1\np2,,,,,0\n",
    )
    .unwrap();
    let out = raw.join("out");
    let o = prepare(&raw, &out, "rsna", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = [list(&out, "train.txt"), list(&out, "test.txt")].concat();
    assert_eq!(names, ["f1"]);
    // The last box: (int(3.7), int(1.2)) to (int(5.2), int(6.2)), corners included, clipped.
    let want = cells(&[
        (1, 3),
        (1, 4),
        (1, 5),
        (2, 3),
        (2, 4),
        (2, 5),
        (3, 3),
        (3, 4),
        (3, 5),
    ]);
    assert_eq!(mask(&out, "f1"), want);
    let all = raw.join("all");
    let o = prepare(&raw, &all, "rsna", &["--all-parts"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut both = want.clone();
    for (r, c) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        both[r * 6 + c] = 1;
    }
    assert_eq!(mask(&all, "f1"), both);
    let _ = std::fs::remove_dir_all(&raw);
}

fn grey_png(path: &Path, w: usize, h: usize, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    evax::explain::overlay::Rgb {
        width: w,
        height: h,
        data: data.iter().flat_map(|&v| [v; 3]).collect(),
    }
    .save_png_grey_or_rgb(path, true)
    .unwrap();
}

#[test]
fn lung_and_shenzhen_layouts() {
    let raw = scratch("lung-raw");
    let img: Vec<u8> = (0..12).collect();
    let m255 = [0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 255];
    grey_png(&raw.join("Train/Images/a.png"), 4, 3, &img);
    grey_png(&raw.join("Train/Masks/a.png"), 4, 3, &m255);
    grey_png(&raw.join("Test/Images/b.png"), 4, 3, &img);
    grey_png(&raw.join("Test/Masks/b.png"), 4, 3, &m255);
    grey_png(&raw.join("Test/Images/c.png"), 4, 3, &img); // no mask
    let out = raw.join("out");
    let o = prepare(&raw, &out, "lung", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("c.png"), "{err}");
    assert_eq!(list(&out, "train.txt"), ["a"]);
    assert_eq!(list(&out, "test.txt"), ["b"]);
    assert_eq!(
        Image::open(out.join("masks/a.png")).unwrap().data,
        m255.iter().map(|&v| (v == 255) as u8).collect::<Vec<_>>()
    );

    let raw = scratch("shenzhen-raw");
    for i in 0..10 {
        let name = format!("CHNCXR_{i:04}_0");
        grey_png(&raw.join(format!("CXR_png/{name}.png")), 4, 3, &img);
        let mut left = [0u8; 12];
        left[0] = 255;
        let mut right = [0u8; 12];
        right[11] = 255;
        grey_png(
            &raw.join(format!("Annotations/masks/{name}_mask_left.png")),
            4,
            3,
            &left,
        );
        grey_png(
            &raw.join(format!("Annotations/masks/{name}_mask_right.png")),
            4,
            3,
            &right,
        );
    }
    let out = raw.join("out");
    let o = prepare(&raw, &out, "shenzhen", &["--seed", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (train, test) = (list(&out, "train.txt"), list(&out, "test.txt"));
    assert_eq!((train.len(), test.len()), (7, 3));
    let mut merged = [0u8; 12];
    merged[0] = 1;
    merged[11] = 1;
    assert_eq!(mask(&out, "CHNCXR_0003_0"), merged);
    // The same seed, the same split.
    let again = raw.join("again");
    assert!(
        prepare(&raw, &again, "shenzhen", &["--seed", "3"])
            .status
            .success()
    );
    assert_eq!(list(&again, "train.txt"), train);
    let _ = std::fs::remove_dir_all(
        raw.parent()
            .unwrap()
            .join(format!("evax-test-{}-prep-lung-raw", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&raw);
}

/// `evax seg train` on a tiny synthetic set (bright squares to find) with a tiny model: an
/// interrupted and resumed run ends with the same weights, bit for bit, as an uninterrupted
/// one, and its best checkpoint segments with `seg predict`.
#[test]
fn seg_train_resumes_bit_exactly_and_its_best_checkpoint_predicts() {
    let dir = scratch("segtrain");
    // The data: 64 x 64 grey images, a bright square, its mask.
    for (i, split) in [
        (0, "train"),
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (4, "test"),
        (5, "test"),
    ] {
        let (x0, y0) = (4 + 6 * i, 8 + 5 * i);
        let mut img = vec![40u8; 64 * 64];
        let mut mask = vec![0u8; 64 * 64];
        for y in y0..y0 + 20 {
            for x in x0..x0 + 20 {
                img[y * 64 + x] = 200;
                mask[y * 64 + x] = 1;
            }
        }
        grey_png(&dir.join(format!("data/images/s{i}.png")), 64, 64, &img);
        grey_png(&dir.join(format!("data/masks/s{i}.png")), 64, 64, &mask);
        let list = dir.join(format!("data/{split}.txt"));
        let mut text = std::fs::read_to_string(&list).unwrap_or_default();
        text.push_str(&format!("s{i}\n"));
        std::fs::write(&list, text).unwrap();
    }
    // The model: EVA-X-Ti with one block at 64 px, a 16-channel head.
    let mut cfg = evax::model::EvaXConfig::preset("ti").unwrap();
    cfg.depth = 1;
    cfg.train_grid = (4, 4);
    let sd = evax::segment::random_state_dict(&cfg, 16, 1);
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = sd
        .iter()
        .map(|(k, p)| (k.clone(), p.to_tensor(&candle_core::Device::Cpu).unwrap()))
        .collect();
    let weights = dir.join("tiny.safetensors");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let train = |out: &str, extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_evax"))
            .args(["seg", "train", "--preset", "lung", "--weights"])
            .arg(&weights)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("-o")
            .arg(dir.join(out))
            .args([
                "--set",
                "input_size=64",
                "--set",
                "epochs=2",
                "--set",
                "batch_size=2",
            ])
            .args([
                "--set",
                "eval_every=1",
                "--set",
                "warmup_iters=2",
                "--set",
                "lr=1e-3",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let whole = train("whole", &[]);
    assert!(whole.contains("best: epoch"), "{whole}");
    train("parts", &["--max-steps", "1"]);
    train("parts", &["--max-steps", "2"]);
    train("parts", &[]);
    let load = |out: &str| {
        evax::checkpoint::Checkpoint::load(dir.join(out).join("checkpoint-last.safetensors"))
            .unwrap()
            .tensors
    };
    let (a, b) = (load("whole"), load("parts"));
    let model_keys: Vec<&String> = a.keys().filter(|k| k.starts_with("model.")).collect();
    assert!(model_keys.len() > 20, "{}", model_keys.len());
    assert_eq!(a.len(), b.len());
    for k in &model_keys {
        assert_eq!(a[*k].data, b[*k].data, "{k} differs after resuming");
    }
    // 4 steps in all (2 epochs of 2 batches); the running statistics moved.
    let log = std::fs::read_to_string(dir.join("parts/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"step\"")).count(), 4);
    // The best checkpoint is an mmseg state dict `seg predict` reads.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_evax"))
        .args(["seg", "predict", "--weights"])
        .arg(dir.join("whole/checkpoint-best.safetensors"))
        .arg("-o")
        .arg(dir.join("pred"))
        .arg(dir.join("data/images/s4.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.join("pred/s4_mask.png").exists());
    assert!(dir.join("whole/curves.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `evax demo --task seg` end to end on a handful of phantoms: it trains, scores the held-out
/// ones and writes its report, metrics and an overlay.
#[test]
fn seg_demo_runs_end_to_end() {
    let dir = scratch("segdemo");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_evax"))
        .args([
            "demo",
            "--task",
            "seg",
            "--train-images",
            "16",
            "--test-images",
            "4",
        ])
        .args(["--epochs", "1", "-o"])
        .arg(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("held-out lung Dice"), "{out}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("seg/metrics.json")).unwrap()).unwrap();
    let dice = m["fg_dice"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&dice), "{m}");
    assert_eq!(m["test_images"], 4);
    assert!(dir.join("seg/report.md").exists());
    assert!(dir.join("seg/example/phantom_0016_overlay.png").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
