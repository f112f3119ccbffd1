//! End-to-end tests of the `evax` binary: reference values through `predict` and `embed`, and
//! clear errors (never a panic) on damaged inputs.

mod common;

use common::*;

use std::io::Write;
use std::path::Path;

use evax::checkpoint::{Checkpoint, Param, save_safetensors};
use evax::fixtures::shared_or_skip;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference(shared: &Path, key: &str) -> Param {
    Checkpoint::load(shared.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors
        .remove(key)
        .unwrap()
}

#[test]
fn predict_on_nih_images_gives_reference_logits() {
    let Some(sh) = shared_or_skip("predict_on_nih_images_gives_reference_logits") else {
        return;
    };
    let dir = scratch("predict");
    let out = dir.join("pred.json");
    let nih = sh.join("data/nih");
    let o = evax(&[
        "predict",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "-o",
        s(&out),
        s(&nih.join("00000001_000.png")),
        s(&nih.join("00003440_000.png")),
        s(&nih.join("00027426_000.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let preds: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 3);
    let want = reference(&sh, "ti_ft/logits");
    for (i, p) in preds.iter().take(2).enumerate() {
        assert!(
            p["input"]
                .as_str()
                .unwrap()
                .ends_with(["00000001_000.png", "00003440_000.png"][i])
        );
        let logits: Vec<f32> = p["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let d = max_diff(&logits, &want.data[i * 14..(i + 1) * 14]);
        assert!(d <= 1e-5, "image {i}: logits differ by {d}");
        let probs = p["probabilities"].as_array().unwrap();
        let p0 = probs[0].as_f64().unwrap() as f32;
        assert!((p0 - 1.0 / (1.0 + (-logits[0]).exp())).abs() < 1e-6);
    }
}

#[test]
fn embed_on_nih_images_gives_reference_features() {
    let Some(sh) = shared_or_skip("embed_on_nih_images_gives_reference_features") else {
        return;
    };
    let dir = scratch("embed");
    let nih = sh.join("data/nih");
    let imgs = [nih.join("00000001_000.png"), nih.join("00003440_000.png")];
    for (ckpt, size, pooled_key, tokens_key) in [
        (
            "eva_x_ti_mim_fp16.pt",
            "224",
            "ti_mim/pooled",
            Some("ti_mim/tokens"),
        ),
        (
            "eva_x_b_d1_mim_fp16.pt",
            "224",
            "b_mim/pooled",
            Some("b_mim/tokens"),
        ),
        ("eva_x_ti_cxr14_ft.pth", "224", "ti_ft/prelogits", None),
        ("eva_x_s_d2_mim_fp16.pt", "480", "s_mim_to480/pooled", None),
    ] {
        let out = dir.join(format!("{ckpt}.safetensors"));
        let o = evax(&[
            "embed",
            "--weights",
            s(&sh.join("fixtures").join(ckpt)),
            "--input-size",
            size,
            "--tokens",
            "-o",
            s(&out),
            s(&imgs[0]),
            s(&imgs[1]),
        ]);
        assert!(o.status.success(), "{ckpt}: {}", stderr(&o));
        let got = Checkpoint::load(&out).unwrap().tensors;
        let want = reference(&sh, pooled_key);
        assert_eq!(got["pooled"].shape, want.shape);
        let d = max_diff(&got["pooled"].data, &want.data);
        assert!(d <= 1e-5, "{ckpt}: pooled differs by {d}");
        if let Some(k) = tokens_key {
            let want = reference(&sh, k);
            assert_eq!(got["tokens"].shape, want.shape);
            let d = max_diff(&got["tokens"].data, &want.data);
            assert!(d <= 1e-5, "{ckpt}: tokens differ by {d}");
        }
    }
    // .npy output: the pooled rows in input order.
    let npy = dir.join("pooled.npy");
    let o = evax(&[
        "embed",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_mim_fp16.pt")),
        "-o",
        s(&npy),
        s(&imgs[0]),
        s(&imgs[1]),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&npy).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let vals: Vec<f32> = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(max_diff(&vals, &reference(&sh, "ti_mim/pooled").data) <= 1e-5);
}

/// Runs `args`, expecting failure with a message naming `name` and no panic.
fn expect_clear_error(args: &[&str], name: &str, what: &str) {
    let o = evax(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{what}: succeeded");
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    assert!(
        err.contains(name),
        "{what}: error does not name {name}: {err}"
    );
    eprintln!("{what}: {}", err.trim());
}

#[test]
fn damaged_checkpoints_give_clear_errors() {
    let Some(sh) = shared_or_skip("damaged_checkpoints_give_clear_errors") else {
        return;
    };
    let dir = scratch("damaged");
    let zip_bytes = std::fs::read(sh.join("fixtures/eva_x_ti_mim_fp16.pt")).unwrap();
    let legacy_bytes = std::fs::read(sh.join("fixtures/eva_x_ti_mim_fp16_legacy.pt")).unwrap();

    let truncated = dir.join("truncated.pt");
    std::fs::write(&truncated, &zip_bytes[..zip_bytes.len() / 2]).unwrap();
    let truncated_legacy = dir.join("truncated_legacy.pt");
    std::fs::write(
        &truncated_legacy,
        &legacy_bytes[..legacy_bytes.len() - 1000],
    )
    .unwrap();

    let no_pkl = dir.join("no_pkl.pth");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&no_pkl).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data/0", opts).unwrap();
        z.write_all(&[0u8; 64]).unwrap();
        z.start_file("archive/version", opts).unwrap();
        z.write_all(b"3\n").unwrap();
        z.finish().unwrap();
    }

    let text = dir.join("notes.pth");
    std::fs::write(&text, "These are my notes, not a checkpoint.\n").unwrap();

    let missing_block = dir.join("missing_block.safetensors");
    {
        let ck = Checkpoint::load(sh.join("fixtures/eva_x_ti_cxr14_ft.pth")).unwrap();
        let kept = ck
            .tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("blocks.3."))
            .map(|(k, p)| (k.clone(), p.to_tensor(&candle_core::Device::Cpu).unwrap()))
            .collect();
        save_safetensors(&kept, None, &missing_block).unwrap();
    }

    let img = sh.join("data/nih/00000001_000.png");
    for (file, what) in [
        (&truncated, "truncated zip checkpoint"),
        (&truncated_legacy, "truncated legacy checkpoint"),
        (&no_pkl, "zip without data.pkl"),
        (&text, "text file renamed .pth"),
        (&missing_block, "checkpoint missing block 3"),
    ] {
        let name = file.file_name().unwrap().to_str().unwrap();
        expect_clear_error(&["info", s(file)], name, what);
        let out = dir.join("p.json");
        expect_clear_error(
            &["predict", "--weights", s(file), "-o", s(&out), s(&img)],
            name,
            what,
        );
    }
    let o = evax(&["info", s(&missing_block)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("missing blocks.3.attn.qkv.weight"));
}

#[test]
fn damaged_images_are_listed_and_the_rest_processed() {
    let Some(sh) = shared_or_skip("damaged_images_are_listed_and_the_rest_processed") else {
        return;
    };
    let dir = scratch("images");
    let good = sh.join("data/nih/00000001_000.png");
    let png = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 3]).unwrap();
    let empty = dir.join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.join("does_not_exist.png");
    let out = dir.join("pred.csv");
    let o = evax(&[
        "predict",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "-o",
        s(&out),
        s(&truncated),
        s(&good),
        s(&empty),
        s(&missing),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for (name, why) in [
        ("truncated.png", "PNG"),
        ("empty.jpg", "file is empty"),
        ("does_not_exist.png", "No such file"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not listed: {err}"));
        assert!(line.contains(why), "{line}");
    }
    assert!(err.contains("3 of 4 inputs failed"), "{err}");
    let csv = std::fs::read_to_string(&out).unwrap();
    assert_eq!(csv.lines().count(), 2, "header + the good image: {csv}");
    assert!(csv.lines().nth(1).unwrap().contains("00000001_000.png"));
}

#[test]
fn list_files_and_folders_are_expanded_in_order() {
    let Some(sh) = shared_or_skip("list_files_and_folders_are_expanded_in_order") else {
        return;
    };
    let dir = scratch("lists");
    let nih = sh.join("data/nih");
    let list = dir.join("images.txt");
    std::fs::write(
        &list,
        format!(
            "{} 0 1\n\n{}\n",
            nih.join("00003440_000.png").display(),
            nih.join("00000001_000.png").display()
        ),
    )
    .unwrap();
    let out = dir.join("p.json");
    let o = evax(&[
        "predict",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "-o",
        s(&out),
        s(&list),
        s(&nih),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            Path::new(p["input"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "00003440_000.png",
            "00000001_000.png",
            "00000001_000.png",
            "00003440_000.png",
            "00027426_000.png"
        ]
    );
}

#[test]
fn bench_json_has_the_contract_fields() {
    let o = evax(&[
        "bench", "--model", "ti", "--batch", "1", "--iters", "1", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["img_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_mb"].as_f64().unwrap() > 0.0);
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["precision"], "f32");
    let o = evax(&["bench", "--model", "xl"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown model 'xl'"));
}

#[test]
fn device_and_precision_settings_are_checked() {
    // bf16 on the CPU: bf16 products where the CPU has AMX, or AVX512-BF16 faster than its
    // f32; elsewhere, and f16 anywhere on the CPU, a note that it computes in f32, and it does.
    for precision in ["bf16", "f16"] {
        let o = evax(&[
            "bench",
            "--model",
            "ti",
            "--batch",
            "1",
            "--iters",
            "1",
            "--json",
            "--precision",
            precision,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if precision == "bf16" && evax::kernels::bf16::faster_than_f32() {
            assert_eq!(v["precision"], "bf16");
            continue;
        }
        let note = format!("--precision {precision} computes in f32 on");
        assert!(stderr(&o).contains(&note), "{}", stderr(&o));
        assert_eq!(v["precision"], "f32");
    }
    expect_clear_error(
        &["bench", "--device", "tpu:0"],
        "expected cpu, cuda or cuda:N",
        "unknown device",
    );
    expect_clear_error(&["bench", "--batch", "0"], "--batch 0", "an empty batch");
    expect_clear_error(
        &["bench", "--iters", "0"],
        "--iters 0",
        "no timed iteration",
    );
    expect_clear_error(
        &["bench", "--precision", "int8"],
        "int8",
        "unknown precision",
    );
    if !cfg!(feature = "cuda") {
        expect_clear_error(
            &["bench", "--device", "cuda"],
            "--features cuda",
            "cuda without the cuda build",
        );
        expect_clear_error(
            &[
                "compare",
                "--device",
                "cuda",
                "--dataset",
                "cxr14",
                "--data-dir",
                ".",
                "-o",
                "out",
                "a.pth",
            ],
            "--features cuda",
            "compare on cuda without the cuda build",
        );
    }
    // Every command that computes takes the device and the precision.
    let computing: [&[&str]; 13] = [
        &["predict"],
        &["embed"],
        &["eval"],
        &["cam"],
        &["cam-eval"],
        &["compare"],
        &["finetune"],
        &["bench"],
        &["serve"],
        &["demo"],
        &["seg", "train"],
        &["seg", "eval"],
        &["seg", "predict"],
    ];
    for cmd in computing {
        let o = evax(&[cmd, &["--help"]].concat());
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        let help = String::from_utf8_lossy(&o.stdout);
        for flag in ["--device", "--precision"] {
            assert!(help.contains(flag), "{cmd:?} --help lacks {flag}");
        }
    }
}

#[test]
fn info_json_describes_the_architecture() {
    let Some(sh) = shared_or_skip("info_json_describes_the_architecture") else {
        return;
    };
    let o = evax(&[
        "info",
        "--json",
        s(&sh.join("fixtures/eva_x_s_d2_covidx480_ft.pth")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["config"]["dim"], 384);
    assert_eq!(v["config"]["depth"], 2);
    assert_eq!(v["config"]["num_classes"], 3);
    assert_eq!(v["config"]["rope_grid"], 14.0);
    assert_eq!(v["input_size"], serde_json::json!([480, 480]));
    assert_eq!(v["dtypes"][0][0], "f16");
}

#[test]
fn convert_round_trips_through_safetensors() {
    let Some(sh) = shared_or_skip("convert_round_trips_through_safetensors") else {
        return;
    };
    let dir = scratch("convert");
    let out = dir.join("b.safetensors");
    let src = sh.join("fixtures/eva_x_b_d1_cxr14_ft_rope16.pth");
    let o = evax(&["convert", s(&src), "-o", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // r = 16 survives the conversion (recomputed tables), so the logits still match.
    let pred = dir.join("p.json");
    let nih = sh.join("data/nih");
    let o = evax(&[
        "predict",
        "--weights",
        s(&out),
        "-o",
        s(&pred),
        s(&nih.join("00000001_000.png")),
        s(&nih.join("00003440_000.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let preds: serde_json::Value = serde_json::from_slice(&std::fs::read(&pred).unwrap()).unwrap();
    let want = reference(&sh, "b_ft_rope16/logits");
    for i in 0..2 {
        let got: Vec<f32> = preds[i]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert!(max_diff(&got, &want.data[i * 14..(i + 1) * 14]) <= 1e-5);
    }
    // Patch-kernel resampling changes the kernel size and nothing else.
    let out14 = dir.join("p14.safetensors");
    let o = evax(&[
        "convert",
        s(&src),
        "--patch-size",
        "14",
        "--dtype",
        "f16",
        "-o",
        s(&out14),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = Checkpoint::load(&out14).unwrap();
    assert_eq!(
        ck.tensors["patch_embed.proj.weight"].shape,
        vec![768, 3, 14, 14]
    );
    assert_eq!(
        ck.tensors["patch_embed.proj.weight"].dtype,
        evax::checkpoint::StorageDtype::F16
    );
}

#[test]
fn cam_eval_scores_the_two_boxes_and_lists_the_rest() {
    let Some(sh) = shared_or_skip("cam_eval_scores_the_two_boxes_and_lists_the_rest") else {
        return;
    };
    let dir = scratch("cam-eval");
    let o = evax(&[
        "cam-eval",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "--boxes",
        s(&sh.join("data/nih/BBox_List_2017.csv")),
        "--images",
        s(&sh.join("data/nih")),
        "--search",
        "--overlays",
        "-o",
        s(&dir),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("scored 2 of 984 boxes; 982 boxes"),
        "{}",
        stderr(&o)
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["boxes_scored"], 2);
    assert_eq!(m["boxes_missing"], 982);
    let t = m["result"]["threshold"].as_f64().unwrap();
    let ti = (t * 100.0).round() as usize - 1;
    let csv = std::fs::read_to_string(dir.join("per_box.csv")).unwrap();
    let refs = Checkpoint::load(sh.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], "00003440_000.png");
        let iou: f64 = f[7].parse().unwrap();
        let want = refs[&format!("cam_eval/{}/iou_by_threshold", f[1])].data[ti] as f64;
        assert!((iou - want).abs() <= 1e-5, "{line}: want {want}");
    }
    assert_eq!(csv.lines().count(), 3);
    let missing = std::fs::read_to_string(dir.join("missing.txt")).unwrap();
    assert!(!missing.contains("00003440_000.png"));
    assert!(dir.join("overlays/00003440_000_Mass.png").is_file());
}

#[test]
fn cam_writes_maps_overlays_and_index() {
    let Some(sh) = shared_or_skip("cam_writes_maps_overlays_and_index") else {
        return;
    };
    let dir = scratch("cam");
    let o = evax(&[
        "cam",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "--class",
        "cardiomegaly",
        "--class",
        "Pneumothorax",
        "-o",
        s(&dir),
        s(&sh.join("data/nih/00000001_000.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cams.json")).unwrap()).unwrap();
    let idx = idx.as_array().unwrap();
    assert_eq!(idx.len(), 2);
    assert_eq!(idx[0]["class_index"], 1);
    // The map equals pytorch-grad-cam's (gradcam/class1 is image 0, class 1).
    let bytes = std::fs::read(dir.join(idx[0]["cam"].as_str().unwrap())).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let got: Vec<f32> = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(max_diff(&got, &reference(&sh, "gradcam/class1").data) <= 1e-5);
    assert!(dir.join(idx[1]["overlay"].as_str().unwrap()).is_file());
    let o = evax(&[
        "cam",
        "--weights",
        s(&sh.join("fixtures/eva_x_ti_cxr14_ft.pth")),
        "--class",
        "Cat",
        "-o",
        s(&dir),
        s(&sh.join("data/nih/00000001_000.png")),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown class 'Cat'"));
}
