//! Datasets and `evax eval`: the original's files, malformed inputs, and end-to-end runs on small
//! datasets the tests build in each layout.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use evax::checkpoint::{Checkpoint, save_safetensors};
use evax::data::{self, DatasetKind, LoadOptions, cxr14};
use evax::fixtures::shared_or_skip;

/// A synthetic radiograph-like PNG (grey, `bits` 8 or 16).
fn synth_png(path: &Path, w: u32, h: u32, seed: u32, bits: u8) {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(if bits == 16 {
            png::BitDepth::Sixteen
        } else {
            png::BitDepth::Eight
        });
        let mut wr = enc.write_header().unwrap();
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                let lung = (((x as f32 / w as f32 - 0.5).abs() * 4.0).sin() * 80.0) as i32;
                let v =
                    (100 + lung + (y * 60 / h) as i32 + (state >> 28) as i32).clamp(0, 255) as u16;
                if bits == 16 {
                    data.extend_from_slice(&(v * 257).to_be_bytes());
                } else {
                    data.push(v as u8);
                }
            }
        }
        wr.write_image_data(&data).unwrap();
    }
    std::fs::write(path, buf).unwrap();
}

#[test]
fn official_cxr14_lists_agree_with_data_entry() {
    let Some(sh) = shared_or_skip("official_cxr14_lists_agree_with_data_entry") else {
        return;
    };
    let (entry, problems) =
        cxr14::read_data_entry(&sh.join("data/nih/Data_Entry_2017_v2020.csv.gz")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(entry.len(), 112_120);
    let mut total = 0;
    for (split, n) in [("train", 75_312), ("val", 11_212), ("test", 25_596)] {
        let path = sh.join(format!("data/splits/cxr14/{split}_official.txt"));
        let text = std::fs::read_to_string(&path).unwrap();
        let (rows, problems) = cxr14::parse_list(&path, &text);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rows.len(), n);
        let agree = rows
            .iter()
            .filter(|(name, l, _)| entry.get(name) == l.as_ref())
            .count();
        eprintln!("{split}: {agree} of {n} list rows agree with Data_Entry_2017_v2020");
        assert_eq!(agree, n);
        total += agree;
    }
    assert_eq!(total, 112_120); // every image of the dataset, once
}

#[test]
fn malformed_lists_are_reported_with_file_and_line() {
    let dir = scratch("malformed");
    // ChestX-ray14 list: wrong column count, non-numeric label, missing image, then a good row.
    std::fs::create_dir_all(dir.join("cxr/images")).unwrap();
    synth_png(&dir.join("cxr/images/a.png"), 64, 64, 1, 8);
    std::fs::write(
        dir.join("cxr/test_official.txt"),
        "a.png 0 0 0\nb.png 0 0 0 0 0 0 0 0 0 0 0 0 0 x\n\nc.png 0 0 0 0 0 0 0 0 0 0 0 0 0 1\na.png 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
    )
    .unwrap();
    let split = data::load_split(
        DatasetKind::Cxr14,
        &dir.join("cxr"),
        "test",
        None,
        &LoadOptions::default(),
    )
    .unwrap();
    let msgs: Vec<String> = split.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0]
            .ends_with("test_official.txt:1: expected an image name and 14 labels, found 4 fields"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[1].ends_with("test_official.txt:2: label 'x' is not 0 or 1"),
        "{}",
        msgs[1]
    );
    assert_eq!(split.missing.len(), 1);
    assert_eq!(
        (split.missing[0].name.as_str(), split.missing[0].line),
        ("c.png", 4)
    );
    assert_eq!(split.samples.len(), 1);
    // --strict turns them into an error listing every one.
    let strict = LoadOptions {
        strict: true,
        ..Default::default()
    };
    let e = data::load_split(DatasetKind::Cxr14, &dir.join("cxr"), "test", None, &strict)
        .unwrap_err()
        .to_string();
    assert!(e.contains(":4: image c.png not found"), "{e}");
    // Empty list: nothing usable, a clear message from the CLI.
    std::fs::write(dir.join("cxr/test_official.txt"), "").unwrap();
    let o = evax(&[
        "data",
        "stats",
        "--dataset",
        "cxr14",
        "--data-dir",
        s(&dir.join("cxr")),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("test_official.txt: no usable images"));

    // CheXpert CSV: wrong field count and a bad value.
    std::fs::create_dir_all(dir.join("chex")).unwrap();
    let header = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices";
    std::fs::write(
        dir.join("chex/valid.csv"),
        format!("{header}\nCheXpert-v1.0-small/valid/p1/s1/view1_frontal.jpg,Male,60,Frontal\nCheXpert-v1.0-small/valid/p1/s1/view2_frontal.jpg,Male,60,Frontal,AP,,,yes,,,,,,,,,,,\n"),
    )
    .unwrap();
    let split = data::load_split(
        DatasetKind::Chexpert,
        &dir.join("chex"),
        "valid",
        None,
        &LoadOptions::default(),
    )
    .unwrap();
    let msgs: Vec<String> = split.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        msgs[0].ends_with("valid.csv:2: 4 fields, header has 19"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].ends_with("valid.csv:3: Cardiomegaly: 'yes' is not 1, 0, -1 or blank"),
        "{msgs:?}"
    );

    // COVIDx list: wrong column count and unknown label; Data_Entry with an unknown finding.
    std::fs::create_dir_all(dir.join("covid")).unwrap();
    std::fs::write(
        dir.join("covid/test.txt"),
        "1 a.png normal\n2 b.png flu src\n",
    )
    .unwrap();
    let split = data::load_split(
        DatasetKind::Covidx3,
        &dir.join("covid"),
        "test",
        None,
        &LoadOptions::default(),
    )
    .unwrap();
    let msgs: Vec<String> = split.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        msgs[0]
            .ends_with("test.txt:1: expected 'patient_id filename label source', found 3 fields"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].ends_with("test.txt:2: unknown label 'flu' (expected normal, pneumonia, COVID-19)"),
        "{msgs:?}"
    );
    let de = dir.join("Data_Entry.csv");
    std::fs::write(
        &de,
        "Image Index,Finding Labels,Follow-up #\nx.png,Mass|Cat,0\ny.png,No Finding,0\n",
    )
    .unwrap();
    let (map, problems) = cxr14::read_data_entry(&de).unwrap();
    assert_eq!(map.len(), 1);
    assert!(
        problems[0]
            .to_string()
            .ends_with("Data_Entry.csv:2: unknown finding 'Cat'")
    );
    // A missing list file names the file.
    let e = data::load_split(
        DatasetKind::Covidx3,
        &dir.join("covid"),
        "test",
        Some(&dir.join("nope.txt")),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope.txt"), "{e}");
}

/// Predict probabilities (in input order) through the CLI.
fn predict(weights: &Path, inputs: &[PathBuf], extra: &[&str], out: &Path) -> Vec<Vec<f32>> {
    let mut args = vec!["predict", "--weights", s(weights), "-o", s(out)];
    args.extend_from_slice(extra);
    let paths: Vec<&str> = inputs.iter().map(|p| s(p)).collect();
    args.extend(paths);
    let o = evax(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Run eval and check y_pred against predict and the metrics against y_pred / y_gt.
fn eval_and_compare(
    weights: &Path,
    dataset: &str,
    dir: &Path,
    images: &[PathBuf],
    extra: &[&str],
    out: &Path,
) -> serde_json::Value {
    let mut args = vec![
        "eval",
        "--weights",
        s(weights),
        "--dataset",
        dataset,
        "--data-dir",
        s(dir),
        "--bootstrap",
        "50",
        "-o",
        s(out),
    ];
    args.extend_from_slice(extra);
    let o = evax(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, y_pred) = read_npy(&out.join("y_pred.npy"));
    let (gshape, y_gt) = read_npy(&out.join("y_gt.npy"));
    assert_eq!(shape, gshape);
    assert_eq!(shape[0], images.len());
    let k = shape[1];
    let want = predict(
        weights,
        images,
        &["--activation", "sigmoid"],
        &out.join("p.json"),
    );
    for (i, row) in want.iter().enumerate() {
        for c in 0..k {
            assert!(
                (row[c] - y_pred[i * k + c]).abs() < 1e-6,
                "{dataset} row {i} class {c}"
            );
        }
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let t: Vec<f64> = y_gt.iter().map(|&v| v as f64).collect();
    let p: Vec<f64> = y_pred.iter().map(|&v| v as f64).collect();
    let summary = evax::metrics::auc_summary(&t, &p, k);
    assert_eq!(m["mauc"].as_f64().unwrap(), summary.mean);
    let classes: Vec<String> = m["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    for (c, name) in classes.iter().enumerate() {
        assert_eq!(
            m["auc_per_class"][name].as_f64().unwrap(),
            summary.per_class[c]
        );
    }
    assert!(out.join("report.md").is_file());
    m
}

#[test]
fn eval_end_to_end_in_each_layout() {
    let Some(sh) = shared_or_skip("eval_end_to_end_in_each_layout") else {
        return;
    };
    let root = scratch("e2e");
    let nih = sh.join("data/nih");
    let (cxr, images) = cxr14_layout(&root, &nih);
    let ti = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let m = eval_and_compare(&ti, "cxr14", &cxr, &images, &[], &root.join("out_cxr14"));
    assert_eq!(m["images"], 6);
    assert_eq!(m["skipped"].as_array().unwrap().len(), 1);

    // CheXpert: CSV with path prefixes, a lateral view (skipped), uncertain labels; a 5-class
    // head made from the Ti checkpoint's first five classes.
    let chex = root.join("chexpert");
    let header = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices";
    let mut csv = format!("{header}\n");
    let mut chex_images = Vec::new();
    for i in 0..5u32 {
        let rel = format!("valid/patient0000{i}/study1/view1_frontal.png");
        let p = chex.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        if i < 2 {
            std::fs::copy(
                nih.join(["00000001_000.png", "00027426_000.png"][i as usize]),
                &p,
            )
            .unwrap();
        } else {
            synth_png(&p, 320, 390, 10 + i, 8);
        }
        chex_images.push(p);
        let (card, edema, atel, eff) = [
            ("1.0", "", "-1.0", "0.0"),
            ("0.0", "-1.0", "", "1.0"),
            ("", "1.0", "0.0", "-1.0"),
            ("-1.0", "0.0", "1.0", ""),
            ("1.0", "", "", "1.0"),
        ][i as usize];
        csv.push_str(&format!("CheXpert-v1.0-small/{rel},Female,50,Frontal,AP,,,{card},,,{edema},{},,{atel},,{eff},,,\n", if i % 2 == 0 { "1.0" } else { "0.0" }));
    }
    csv.push_str("CheXpert-v1.0-small/valid/patient00000/study1/view2_lateral.png,Female,50,Lateral,,,,1.0,,,,,,,,,,,\n");
    std::fs::write(chex.join("valid.csv"), csv).unwrap();
    let five = root.join("ti5.safetensors");
    {
        let ck = Checkpoint::load(&ti).unwrap();
        let dev = candle_core::Device::Cpu;
        let mut out = std::collections::BTreeMap::new();
        for (k, p) in &ck.tensors {
            let t = p.to_tensor(&dev).unwrap();
            let t = if k.starts_with("head.") {
                // Rows for Atelectasis, Cardiomegaly, Consolidation, Edema, Effusion.
                let idx = candle_core::Tensor::new(&[0u32, 1, 8, 9, 2], &dev).unwrap();
                t.index_select(&idx, 0).unwrap()
            } else {
                t
            };
            out.insert(k.clone(), t);
        }
        save_safetensors(&out, None, &five).unwrap();
    }
    let m = eval_and_compare(
        &five,
        "chexpert",
        &chex,
        &chex_images,
        &[],
        &root.join("out_chexpert"),
    );
    assert_eq!(m["images"], 5);
    let (_, gt) = read_npy(&root.join("out_chexpert/y_gt.npy"));
    // Row 0: Atelectasis uncertain -> 1 (U-Ones), Cardiomegaly 1, Consolidation 1, Edema blank -> 0.
    assert_eq!(&gt[..5], &[1.0, 1.0, 1.0, 0.0, 0.0]);
    // Row 2: Pleural Effusion uncertain -> 0 (U-Zeros).
    assert_eq!(gt[2 * 5 + 4], 0.0);

    // COVIDx: `patient filename label source` lists, images in test/.
    let cov = root.join("covidx3");
    std::fs::create_dir_all(cov.join("test")).unwrap();
    let mut cov_images = Vec::new();
    let mut list = String::new();
    for (i, label) in ["normal", "pneumonia", "COVID-19", "COVID-19"]
        .iter()
        .enumerate()
    {
        let name = format!("img{i}.png");
        let p = cov.join("test").join(&name);
        if i == 0 {
            std::fs::copy(nih.join("00003440_000.png"), &p).unwrap();
        } else {
            synth_png(&p, 500, 520, 20 + i as u32, 8);
        }
        cov_images.push(p);
        list.push_str(&format!("{i} {name} {label} synthetic\n"));
    }
    std::fs::write(cov.join("test.txt"), list).unwrap();
    let s480 = sh.join("fixtures/eva_x_s_d2_covidx480_ft.pth");
    let m = eval_and_compare(
        &s480,
        "covidx3",
        &cov,
        &cov_images,
        &["--batch", "2"],
        &root.join("out_covidx3"),
    );
    let conf = m["classification"]["confusion"].as_array().unwrap();
    let total: u64 = conf
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 4);
    assert!(m["accuracy"].as_f64().is_some());
}

#[test]
fn three_shards_merge_into_the_single_run() {
    let Some(sh) = shared_or_skip("three_shards_merge_into_the_single_run") else {
        return;
    };
    let root = scratch("shards");
    let (cxr, images) = cxr14_layout(&root, &sh.join("data/nih"));
    let ti = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let eval = |out: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_evax"));
        c.args([
            "eval",
            "--weights",
            s(&ti),
            "--dataset",
            "cxr14",
            "--data-dir",
        ])
        .args([s(&cxr), "--bootstrap", "50", "-o", s(out)])
        .args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let whole = root.join("whole");
    eval(&whole, &[], &[]);
    // Shard 0 from --shard, 1 from a Slurm array (--array=1-3: task 2), 2 from an Indexed Job.
    let parts = [root.join("p0"), root.join("p1"), root.join("p2")];
    let said = eval(&parts[0], &["--shard", "0/3"], &[]);
    assert!(said.contains("shard 0/3 (from --shard)"), "{said}");
    let said = eval(
        &parts[1],
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
    );
    assert!(said.contains("shard 1/3 (from Slurm job array)"), "{said}");
    let said = eval(
        &parts[2],
        &[],
        &[("JOB_COMPLETION_INDEX", "2"), ("EVAX_SHARD_COUNT", "3")],
    );
    assert!(
        said.contains("shard 2/3 (from Kubernetes Indexed Job)"),
        "{said}"
    );
    let rows: Vec<usize> = parts
        .iter()
        .map(|p| read_npy(&p.join("y_pred.npy")).0[0])
        .collect();
    assert_eq!(images.len(), 6);
    assert_eq!(rows, vec![2, 2, 2], "6 images in three parts");
    // Given out of order; a part missing or repeated is refused.
    let merged = root.join("merged");
    merge_parts(&merged, [&parts[2], &parts[0], &parts[1]]);
    for f in [
        "y_pred.npy",
        "y_gt.npy",
        "metrics.json",
        "report.md",
        "skipped.txt",
    ] {
        let (a, b) = (
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(merged.join(f)).unwrap(),
        );
        assert!(!a.is_empty(), "{f} empty");
        assert!(
            a == b,
            "{f} differs between the single run and the merged shards"
        );
    }
    let o = evax(&[
        "merge",
        "-o",
        s(&root.join("bad")),
        s(&parts[0]),
        s(&parts[2]),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing 1/3"), "{}", stderr(&o));
    let o = evax(&[
        "merge",
        "-o",
        s(&root.join("bad")),
        s(&parts[0]),
        s(&parts[0]),
        s(&parts[2]),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("given twice"), "{}", stderr(&o));

    // Predictions: three shards of a folder merge into the single run's file, CSV and JSON.
    for ext in ["csv", "json"] {
        let one = root.join(format!("pred.{ext}"));
        let args = |out: &Path, shard: Option<&str>| {
            let mut v = vec!["predict", "--weights", s(&ti), "-o"];
            v.push(s(out));
            v.push(s(&cxr));
            if let Some(sh) = shard {
                v.extend(["--shard", sh]);
            }
            v.iter().map(|x| x.to_string()).collect::<Vec<_>>()
        };
        let run = |a: Vec<String>| {
            let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
            let o = evax(&a);
            assert!(o.status.success(), "{}", stderr(&o));
        };
        run(args(&one, None));
        let parts: Vec<PathBuf> = (0..3)
            .map(|k| root.join(format!("pred{k}.{ext}")))
            .collect();
        for (k, p) in parts.iter().enumerate() {
            run(args(p, Some(&format!("{k}/3"))));
        }
        let merged = root.join(format!("merged.{ext}"));
        merge_parts(&merged, [&parts[1], &parts[2], &parts[0]]);
        assert_eq!(
            std::fs::read(&one).unwrap(),
            std::fs::read(&merged).unwrap(),
            "merged .{ext} predictions"
        );
    }

    // Embeddings with tokens and a layer's maps, safetensors and npy (with their side files).
    for ext in ["safetensors", "npy"] {
        let embed = |out: &Path, shard: Option<&str>| {
            let mut v = vec![
                "embed",
                "--weights",
                s(&ti),
                "--tokens",
                "--layers",
                "blocks.5",
            ];
            v.extend(["-o", s(out), s(&cxr)]);
            if let Some(sh) = shard {
                v.extend(["--shard", sh]);
            }
            let o = evax(&v);
            assert!(o.status.success(), "{}", stderr(&o));
        };
        let one = root.join(format!("emb.{ext}"));
        embed(&one, None);
        let parts: Vec<PathBuf> = (0..3).map(|k| root.join(format!("emb{k}.{ext}"))).collect();
        for (k, p) in parts.iter().enumerate() {
            embed(p, Some(&format!("{k}/3")));
        }
        let merged = root.join(format!("emb-merged.{ext}"));
        merge_parts(&merged, [&parts[0], &parts[2], &parts[1]]);
        let files: Vec<(PathBuf, PathBuf)> = if ext == "npy" {
            ["npy", "tokens.npy", "blocks.5.npy", "inputs.txt"]
                .iter()
                .map(|e| (one.with_extension(e), merged.with_extension(e)))
                .collect()
        } else {
            vec![(one.clone(), merged.clone())]
        };
        assert_eq!(files.len(), if ext == "npy" { 4 } else { 1 });
        for (a, b) in files {
            let (a_bytes, b_bytes) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            assert!(!a_bytes.is_empty());
            assert!(
                a_bytes == b_bytes,
                "{} differs from {}",
                b.display(),
                a.display()
            );
        }
    }

    // Grad-CAM folders: the same maps, overlays and index.
    let cam = |out: &Path, shard: Option<&str>| {
        let mut v = vec![
            "cam",
            "--weights",
            s(&ti),
            "--top",
            "2",
            "-o",
            s(out),
            s(&cxr),
        ];
        if let Some(sh) = shard {
            v.extend(["--shard", sh]);
        }
        let o = evax(&v);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let one = root.join("cam-one");
    cam(&one, None);
    let parts: Vec<PathBuf> = (0..3).map(|k| root.join(format!("cam{k}"))).collect();
    for (k, p) in parts.iter().enumerate() {
        cam(p, Some(&format!("{k}/3")));
    }
    let merged = root.join("cam-merged");
    merge_parts(&merged, [&parts[1], &parts[0], &parts[2]]);
    let mut files: Vec<String> = std::fs::read_dir(&one)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    // 6 images x 2 classes x (map + overlay) + cams.json.
    assert_eq!(files.len(), 25, "{files:?}");
    for f in &files {
        let (a, b) = (
            std::fs::read(one.join(f)).unwrap(),
            std::fs::read(merged.join(f)),
        );
        assert!(
            b.is_ok_and(|b| b == a),
            "{f} differs or is missing after the merge"
        );
    }
}

/// `evax merge -o out` of three parts (given in any order), which must succeed.
fn merge_parts(out: &Path, parts: [&PathBuf; 3]) {
    let o = evax(&["merge", "-o", s(out), s(parts[0]), s(parts[1]), s(parts[2])]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A ChestX-ray14 folder as the NIH download lays it out (`images_00N/images/`): three real
/// and three synthetic images, one listed image missing; the list and the images' paths.
fn cxr14_layout(root: &Path, nih: &Path) -> (PathBuf, Vec<PathBuf>) {
    let cxr = root.join("cxr14");
    let mut images = Vec::new();
    let mut list = String::new();
    for (i, name) in ["00000001_000.png", "00003440_000.png", "00027426_000.png"]
        .iter()
        .enumerate()
    {
        let d = cxr.join(format!("images_00{}/images", i + 1));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(nih.join(name), d.join(name)).unwrap();
        images.push(d.join(name));
        list.push_str(&format!(
            "{name} {}\n",
            if i == 1 {
                "1 0 0 0 1 0 0 0 0 0 0 0 0 0"
            } else {
                "0 1 0 0 0 0 0 0 0 0 0 0 0 0"
            }
        ));
    }
    for i in 0..3 {
        let name = format!("9999{i:04}_000.png");
        let p = cxr.join("images_003/images").join(&name);
        synth_png(&p, 300 + 40 * i, 280, i, if i == 2 { 16 } else { 8 });
        images.push(p);
        list.push_str(&format!("{name} {} 0 0 0 0 0 0 0 0 0 0 0 0 0\n", i % 2));
    }
    list.push_str("00099999_000.png 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"); // listed, not on disk
    std::fs::write(cxr.join("test_official.txt"), list).unwrap();
    (cxr, images)
}

#[test]
fn interrupted_eval_resumes_with_the_same_result() {
    let Some(sh) = shared_or_skip("interrupted_eval_resumes_with_the_same_result") else {
        return;
    };
    let root = scratch("resume");
    let dir = root.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let mut list = String::new();
    for i in 0..24u32 {
        let name = format!("syn{i:03}.png");
        synth_png(&dir.join(&name), 256, 256, i, 8);
        list.push_str(&format!(
            "{name} {} 0 0 0 0 0 0 0 0 0 0 0 0 {}\n",
            i % 2,
            (i / 3) % 2
        ));
    }
    std::fs::write(dir.join("test_official.txt"), list).unwrap();
    let ti = sh.join("fixtures/eva_x_ti_cxr14_ft.pth");
    let args = |out: &Path| -> Vec<String> {
        [
            "eval",
            "--weights",
            s(&ti),
            "--dataset",
            "cxr14",
            "--data-dir",
            s(&dir),
            "--batch",
            "2",
            "--bootstrap",
            "20",
            "-o",
            s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    // Uninterrupted reference run.
    let clean = root.join("clean");
    assert!(
        Command::new(env!("CARGO_BIN_EXE_evax"))
            .args(args(&clean))
            .status()
            .unwrap()
            .success()
    );
    // Interrupted run: kill it once some predictions are journalled.
    let out = root.join("resumed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_evax"))
        .args(args(&out))
        .spawn()
        .unwrap();
    let journal = out.join("predictions.journal");
    let t0 = std::time::Instant::now();
    loop {
        // Stop it as soon as the first batch is journalled (the header line, then records).
        let len = std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
        let header = std::fs::read(&journal)
            .ok()
            .and_then(|b| b.iter().position(|&c| c == b'\n'))
            .map_or(u64::MAX, |p| p as u64 + 1);
        if len > header || t0.elapsed().as_secs() > 60 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        journal.exists() && !out.join("metrics.json").exists(),
        "the run finished before it was interrupted"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_evax"))
        .args(args(&out))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    // The resumed run reused part of the work, not all of it.
    let reused: usize = err
        .split("resumed: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line: {err}"));
    assert!(
        reused > 0 && reused < 24,
        "{reused} of 24 predictions reused"
    );
    assert_eq!(
        read_npy(&clean.join("y_pred.npy")),
        read_npy(&out.join("y_pred.npy"))
    );
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(clean.join("metrics.json")).unwrap()).unwrap();
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(a["mauc"], b["mauc"]);
    assert!(!journal.exists());
}

#[test]
fn compare_puts_every_family_in_one_table_and_reports_a_bad_model() {
    let Some(sh) = shared_or_skip("compare_puts_every_family_in_one_table_and_reports_a_bad_model")
    else {
        return;
    };
    let root = scratch("compare");
    let dir = root.join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let mut list = String::new();
    for i in 0..16u32 {
        let name = format!("syn{i:03}.png");
        synth_png(&dir.join(&name), 256, 256, i, 8);
        list.push_str(&format!(
            "{name} {} 0 0 0 0 0 0 0 0 0 0 0 0 {}\n",
            i % 2,
            (i / 3) % 2
        ));
    }
    std::fs::write(dir.join("test_official.txt"), list).unwrap();
    let fx = sh.join("fixtures");
    let models = [
        fx.join("eva_x_ti_cxr14_ft.pth"),
        fx.join("resnet50_l1111_cxr14_ft.pth"),
        fx.join("densenet121_b2222_cxr14_ft.pth"),
        fx.join("vit_s_d2_cxr14_ft.pth"),
        root.join("no-such-model.pth"),
    ];
    let out = root.join("cmp");
    let mut args = vec![
        "compare",
        "--dataset",
        "cxr14",
        "--data-dir",
        s(&dir),
        "--bootstrap",
        "200",
        "--batch",
        "4",
        "-o",
        s(&out),
    ];
    args.extend(models.iter().map(|m| s(m)));
    let o = evax(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no-such-model.pth: no such file or folder"),
        "{err}"
    );
    assert!(err.contains("1 of 5 models failed"), "{err}");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    let rows = c["models"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(c["images"], 16);
    assert_eq!(c["failures"].as_array().unwrap().len(), 1);
    let names: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(names, ["EVA-X-Ti", "ResNet-50", "DenseNet-121", "ViT-S/16"]);
    assert!(rows[0]["vs_first"].is_null());
    for r in &rows[1..] {
        let v = &r["vs_first"];
        let p = v["p_value"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{v}");
        assert_eq!(v["resamples"], 200);
        // The difference is this model's mAUC minus the reference's, on the same rows.
        let d = r["mauc"].as_f64().unwrap() - rows[0]["mauc"].as_f64().unwrap();
        assert!((v["delta"].as_f64().unwrap() - d).abs() < 1e-12, "{v}");
        let [lo, hi] = [
            v["interval"][0].as_f64().unwrap(),
            v["interval"][1].as_f64().unwrap(),
        ];
        assert!(lo <= hi);
    }
    // Each model's row equals its own `evax eval` on the split (same protocol, same resamples).
    let alone = root.join("alone");
    let o = evax(&[
        "eval",
        "--weights",
        s(&models[1]),
        "--dataset",
        "cxr14",
        "--data-dir",
        s(&dir),
        "--bootstrap",
        "200",
        "--batch",
        "4",
        "-o",
        s(&alone),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(alone.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(rows[1]["mauc"], m["mauc"]);
    assert_eq!(rows[1]["mauc_interval"], m["bootstrap"]["mauc"]);
    assert_eq!(rows[1]["auc_per_class"], m["auc_per_class"]);
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.contains("| eva_x_ti_cxr14_ft | EVA-X-Ti |"), "{md}");
    assert!(md.contains("(reference)") && md.contains("## AUROC per class"));
    assert!(md.contains("no-such-model.pth"));
    let svg = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<circle").count() == 4);
}
