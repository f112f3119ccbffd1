//! Whole workflows through the command line on small data: the demo, fine-tuning with a preset,
//! dataset check / prepare / stats, and intermediate feature maps.

mod common;
use common::*;

use std::path::Path;

use candle_core::Device;
use evax::checkpoint::Checkpoint;
use evax::fixtures::shared_or_skip;
use evax::model::{LoadOptions, layer_index, registry};

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

#[test]
fn a_short_demo_writes_its_report() {
    let dir = scratch("demo");
    let out = dir.join("demo");
    let o = evax(&[
        "demo",
        "-o",
        s(&out),
        "--train-images",
        "24",
        "--test-images",
        "12",
        "--epochs",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("held-out mAUC"), "{stdout}");
    let m = json(&out.join("metrics.json"));
    assert_eq!(m["synthetic"], true);
    assert_eq!(m["train_images"], 24);
    assert_eq!(m["test_images"], 12);
    let auc = m["auc_per_class"].as_object().unwrap();
    assert_eq!(auc.len(), 3);
    let mauc = m["mauc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mauc), "{mauc}");
    // 24 images at batch 32: one optimiser step an epoch.
    assert_eq!(m["steps"], 2);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("SYNTHETIC") && report.contains("held-out mAUC"));
    let examples = report.matches("![example_").count();
    assert!(examples >= 1, "{report}");
    for f in [
        "run/checkpoint-best.safetensors",
        "run/checkpoint-last.safetensors",
        "run/curves.svg",
        "run/train_log.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The phantoms and their labels.csv (header + one row each).
    for (split, n) in [("train", 24), ("test", 12)] {
        let d = out.join("data").join(split);
        let pngs = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "png")
            })
            .count();
        assert_eq!(pngs, n);
        let labels = std::fs::read_to_string(d.join("labels.csv")).unwrap();
        assert_eq!(labels.lines().count(), n + 1);
    }
}

/// A ChestX-ray14 download in miniature: `images_001/images`, `images_002/images`, the three
/// official lists and a Data_Entry file (one label in the lists disagrees with it).
fn tiny_cxr14(sh: &Path, root: &Path) -> Vec<String> {
    let names = ["00000001_000.png", "00003440_000.png", "00027426_000.png"];
    for (i, n) in names.iter().enumerate() {
        let d = root.join(format!("images_00{}/images", 1 + i / 2));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(sh.join("data/nih").join(n), d.join(n)).unwrap();
    }
    let row = |n: &str, l: [u8; 14]| {
        format!(
            "{n} {}\n",
            l.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let mut cardio = [0u8; 14];
    cardio[1] = 1;
    let none = [0u8; 14];
    std::fs::write(
        root.join("train_official.txt"),
        row(names[0], cardio) + &row(names[1], none),
    )
    .unwrap();
    // Disagrees with Data_Entry (which says No Finding for the third image).
    std::fs::write(root.join("val_official.txt"), row(names[2], cardio)).unwrap();
    std::fs::write(
        root.join("test_official.txt"),
        row(names[2], none) + &row("00099999_000.png", none),
    )
    .unwrap();
    std::fs::write(
        root.join("Data_Entry_2017_v2020.csv"),
        "Image Index,Finding Labels,Follow-up #,Patient ID\n\
         00000001_000.png,Cardiomegaly,0,1\n00003440_000.png,No Finding,0,3440\n\
         00027426_000.png,No Finding,0,27426\n",
    )
    .unwrap();
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn data_check_prepare_and_stats_on_a_miniature_download() {
    let Some(sh) = shared_or_skip("data_check_prepare_and_stats_on_a_miniature_download") else {
        return;
    };
    let dir = scratch("datacheck");
    let raw = dir.join("raw");
    tiny_cxr14(&sh, &raw);
    let check = |d: &Path| {
        let o = evax(&[
            "data",
            "check",
            "--dataset",
            "cxr14",
            "--data-dir",
            s(d),
            "--json",
        ]);
        // Far fewer images than the original's 112,120: not OK, exit 1, but a full report.
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let r = check(&raw);
    assert_eq!(r["ok"], false);
    assert_eq!(r["images"], 3);
    assert_eq!(r["images_expected"], 112_120);
    let splits = r["splits"].as_array().unwrap();
    assert_eq!(splits.len(), 3);
    let by = |name: &str| splits.iter().find(|s| s["split"] == name).unwrap().clone();
    let (train, val, test) = (by("train"), by("val"), by("test"));
    assert_eq!(
        (
            train["rows"].as_u64(),
            train["found"].as_u64(),
            train["missing_count"].as_u64()
        ),
        (Some(2), Some(2), Some(0))
    );
    assert_eq!(train["expected"], 75_312);
    assert_eq!(val["data_entry"], serde_json::json!([0, 1, 0]));
    assert_eq!(train["data_entry"], serde_json::json!([2, 0, 0]));
    assert_eq!(
        (
            test["rows"].as_u64(),
            test["found"].as_u64(),
            test["missing_count"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(
        test["missing"][0]
            .as_str()
            .map(|m| m.contains("00099999_000.png")),
        Some(true)
    );
    assert_eq!(test["data_entry"], serde_json::json!([1, 0, 1]));
    // The text report says the same.
    let o = evax(&["data", "check", "--dataset", "cxr14", "--data-dir", s(&raw)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("images: 3 (the original expects 112120)  MISMATCH"),
        "{text}"
    );
    assert!(text.contains("NOT OK"), "{text}");
    // Prepare links the images into one folder and the lists beside it.
    let prepared = dir.join("prepared");
    let o = evax(&[
        "data",
        "prepare",
        "--dataset",
        "cxr14",
        "--data-dir",
        s(&raw),
        "-o",
        s(&prepared),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("linked 3 images"), "{}", stderr(&o));
    let linked: Vec<_> = std::fs::read_dir(prepared.join("images"))
        .unwrap()
        .collect();
    assert_eq!(linked.len(), 3);
    for f in [
        "train_official.txt",
        "val_official.txt",
        "test_official.txt",
        "Data_Entry_2017_v2020.csv",
    ] {
        assert!(prepared.join(f).is_file(), "{f} not beside the images");
    }
    let again = check(&prepared);
    assert_eq!(again["images"], 3);
    assert_eq!(
        again["splits"],
        r["splits"]
            .clone()
            .as_array()
            .map(|a| {
                // Only the list paths differ.
                let mut a = a.clone();
                for (s, p) in a.iter_mut().zip(again["splits"].as_array().unwrap()) {
                    s["list"] = p["list"].clone();
                    s["missing"] = p["missing"].clone();
                }
                serde_json::Value::Array(a)
            })
            .unwrap()
    );
    // Stats: prevalence of the train split.
    let o = evax(&[
        "data",
        "stats",
        "--dataset",
        "cxr14",
        "--data-dir",
        s(&prepared),
        "--split",
        "train",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("| Cardiomegaly | 1 | 2 | 50.00 % |"),
        "{text}"
    );
    assert!(text.contains("| Atelectasis | 0 | 2 | 0.00 % |"), "{text}");
}

#[test]
fn finetune_with_a_preset_from_mim_weights() {
    let Some(sh) = shared_or_skip("finetune_with_a_preset_from_mim_weights") else {
        return;
    };
    let dir = scratch("ft-preset");
    let data = dir.join("data");
    tiny_cxr14(&sh, &data);
    let out = dir.join("run");
    let args = |steps: &str| -> Vec<String> {
        [
            "finetune",
            "--preset",
            "cxr14-ti",
            "--weights",
            s(&sh.join("fixtures/eva_x_ti_mim_fp16.pt")),
            "--data-dir",
            s(&data),
            "-o",
            s(&out),
            "--set",
            "batch_size=2",
            "--set",
            "accum_iter=1",
            "--set",
            "epochs=2",
            "--set",
            "warmup_epochs=1",
            "--max-steps",
            steps,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run = |steps: &str| {
        let a = args(steps);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        evax(&a)
    };
    // One step, then stopped: resumable.
    let o = run("1");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("fine-tuning EVA-X-Ti on cxr14 (2 training images"),
        "{}",
        stderr(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("stopped after 1 optimiser steps"));
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    // The preset's recipe with the overrides.
    assert!(
        cfg.contains("layer_decay = 0.55") && cfg.contains("batch_size = 2"),
        "{cfg}"
    );
    // Then to the end: two epochs of one step each, evaluated on val.
    let o = run("100");
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["steps"], 2);
    assert_eq!(summary["resumed_at_step"], 1);
    assert_eq!(summary["selected_on"], "val");
    assert!(summary["last"]["mauc"].is_number() || summary["last"]["mauc"].is_null());
    // The best weights load for inference as a fine-tuned 14-class model.
    let ck = Checkpoint::load(out.join("checkpoint-best.safetensors")).unwrap();
    let (m, _) = registry::load(&ck, &LoadOptions::default()).unwrap();
    assert_eq!(m.num_classes(), Some(14));
    assert_eq!(m.default_input_size(), (224, 224));
}

#[test]
fn intermediate_feature_maps_match_the_reference_block_outputs() {
    let Some(sh) = shared_or_skip("intermediate_feature_maps_match_the_reference_block_outputs")
    else {
        return;
    };
    let r = Checkpoint::load(sh.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    let ck = Checkpoint::load(sh.join("fixtures/eva_x_ti_cxr14_ft.pth")).unwrap();
    let (m, _) = registry::load(&ck, &LoadOptions::default()).unwrap();
    let layers = m.layer_names();
    assert_eq!(layers.len(), 13);
    let idx = [
        layer_index(&layers, "patch_embed").unwrap(),
        layer_index(&layers, "blocks.0").unwrap(),
    ];
    assert!(layer_index(&layers, "blocks.12").is_err());
    let x = r["input224"].to_tensor(&Device::Cpu).unwrap();
    let maps = m.forward_intermediates(&x, &idx).unwrap();
    assert_eq!(maps.len(), 2);
    for (map, key) in maps.iter().zip(["ti_ft/embed_out", "ti_ft/block0_out"]) {
        // [B, C, 14, 14] maps are the patch tokens of [B, 1 + 196, C].
        let want = &r[key];
        assert_eq!(map.dims(), &[want.shape[0], want.shape[2], 14, 14]);
        let got = map
            .flatten(2, 3)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = want.shape[2];
        let mut worst = 0f32;
        let mut n = 0;
        for b in 0..want.shape[0] {
            let rows = &want.data[(b * 197 + 1) * c..(b + 1) * 197 * c];
            let got = &got[b * 196 * c..(b + 1) * 196 * c];
            assert_eq!(rows.len(), got.len());
            for (a, w) in got.iter().zip(rows) {
                worst = worst.max((a - w).abs());
                n += 1;
            }
        }
        assert_eq!(n, want.shape[0] * 196 * c);
        eprintln!("{key} as a feature map: max abs diff {worst:.2e}");
        assert!(worst <= 1e-5, "{key}: {worst}");
    }
    // The same through `evax embed --layers` on the two images of `input224`.
    let dir = scratch("layers");
    let out = dir.join("e.safetensors");
    let nih = sh.join("data/nih");
    let o = evax(&[
        "embed",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "--layers",
        "blocks.0",
        "-o",
        s(&out),
        s(&nih.join("00000001_000.png")),
        s(&nih.join("00003440_000.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = Checkpoint::load(&out).unwrap().tensors;
    let got = &e["layer.blocks.0"];
    let want = &r["ti_ft/block0_out"];
    assert_eq!(got.shape, vec![2, 192, 14, 14]);
    let c = 192;
    let mut worst = 0f32;
    for b in 0..2 {
        for t in 0..196 {
            for ch in 0..c {
                let g = got.data[(b * c + ch) * 196 + t];
                let w = want.data[(b * 197 + 1 + t) * c + ch];
                worst = worst.max((g - w).abs());
            }
        }
    }
    assert!(worst <= 1e-5, "embed --layers blocks.0: {worst}");
    let o = evax(&[
        "embed",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "--layers",
        "blocks.12",
        "-o",
        s(&out),
        s(&nih.join("00000001_000.png")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no layer 'blocks.12'"),
        "{}",
        stderr(&o)
    );
}
