//! The seed's comparison backbones against the original (baseline_reference.safetensors): the
//! ViT-S/16 family through the common model interface, both kernel paths.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use evax::checkpoint::{Checkpoint, Param};
use evax::explain::cam_maps;
use evax::fixtures::shared_or_skip;
use evax::kernels::Kernels;
use evax::model::registry::{self, Family};
use evax::model::{Classifier, LoadOptions};
use evax::preprocess::{Image, Normalization, cam_eval_input};

fn reference(sh: &Path) -> BTreeMap<String, Param> {
    Checkpoint::load(sh.join("fixtures/baseline_reference.safetensors"))
        .unwrap()
        .tensors
}

fn load(sh: &Path, name: &str, kernels: Kernels) -> Box<dyn Classifier> {
    let ck = Checkpoint::load(sh.join("fixtures").join(name)).unwrap();
    assert_eq!(registry::recognise(&ck).unwrap(), Family::Vit, "{name}");
    let opts = LoadOptions {
        kernels,
        ..Default::default()
    };
    registry::load(&ck, &opts).unwrap().0
}

/// Max |a - b| after checking shapes and lengths.
fn max_diff(got: &Tensor, want: &Param) -> f32 {
    assert_eq!(got.dims(), want.shape.as_slice(), "shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g.len(), want.data.len());
    g.iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn vit_s_prelogits_logits_and_mae_initialisation() {
    let Some(sh) = shared_or_skip("vit_s_prelogits_logits_and_mae_initialisation") else {
        return;
    };
    let r = reference(&sh);
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    for k in [Kernels::Fused, Kernels::Reference] {
        let m = load(&sh, "vit_s_d2_cxr14_ft.pth", k);
        assert_eq!(m.name(), "ViT-S/16");
        assert_eq!(m.normalization(), Normalization::OTHERS);
        assert_eq!(m.num_classes(), Some(14));
        let e = m.embed(&x).unwrap();
        for (got, key) in [
            (&e.pooled, "vit_s/prelogits"),
            (&m.logits(&x).unwrap(), "vit_s/logits"),
        ] {
            let d = max_diff(got, &r[key]);
            eprintln!("{key} ({k:?}): max abs diff {d:.2e}");
            assert!(d <= 1e-5, "{key} ({k:?}): {d}");
        }
        let mae = load(&sh, "vit_s_d2_mae_pt.pth", k);
        assert_eq!(mae.num_classes(), None);
        let d = max_diff(
            &mae.embed(&x).unwrap().pooled,
            &r["vit_s_mae_init/prelogits"],
        );
        eprintln!("vit_s_mae_init/prelogits ({k:?}): max abs diff {d:.2e}");
        assert!(d <= 1e-5, "mae init ({k:?}): {d}");
        assert!(mae.logits(&x).is_err());
    }
}

#[test]
fn vit_s_gradcam_matches_pytorch_grad_cam() {
    let Some(sh) = shared_or_skip("vit_s_gradcam_matches_pytorch_grad_cam") else {
        return;
    };
    let r = reference(&sh);
    let img = Image::open(sh.join("data/nih/00003440_000.png")).unwrap();
    let input = cam_eval_input(&img, (224, 224), Normalization::OTHERS);
    let x = Tensor::from_vec(input, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let m = load(&sh, "vit_s_d2_cxr14_ft.pth", Kernels::Fused);
    let layer = m.default_cam_layer();
    let batch = m.activation_grads(&x, &layer, &|_, _| vec![0, 1]).unwrap();
    assert_eq!(batch.rounds.len(), 2);
    for (round, key) in batch
        .rounds
        .iter()
        .zip(["vit_s/gradcam/class0", "vit_s/gradcam/class1"])
    {
        let maps = cam_maps(round, (224, 224)).unwrap();
        assert_eq!(maps.len(), 1);
        let want = &r[key];
        assert_eq!(maps[0].len(), want.data.len());
        let d = maps[0]
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("{key}: max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{key}: {d}");
    }
}

#[test]
fn vit_s_through_the_command_line() {
    let Some(sh) = shared_or_skip("vit_s_through_the_command_line") else {
        return;
    };
    let r = reference(&sh);
    let bin = env!("CARGO_BIN_EXE_evax");
    let dir = std::env::temp_dir().join(format!("evax-test-{}-vit", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = sh.join("fixtures/vit_s_d2_cxr14_ft.pth");
    let nih = sh.join("data/nih");
    let out = dir.join("p.json");
    let o = std::process::Command::new(bin)
        .args(["predict", "--weights"])
        .arg(&weights)
        .arg("-o")
        .arg(&out)
        .args(["00000001_000.png", "00003440_000.png", "00027426_000.png"].map(|n| nih.join(n)))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 3);
    let want = &r["vit_s/logits"].data;
    assert_eq!(want.len(), 3 * 14);
    for (i, p) in preds.iter().enumerate() {
        let got: Vec<f32> = p["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), 14);
        let d = got
            .iter()
            .zip(&want[i * 14..(i + 1) * 14])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-5, "image {i}: {d}");
    }
    let o = std::process::Command::new(bin)
        .args(["info", "--json"])
        .arg(sh.join("fixtures/vit_s_d2_mae_pt.pth"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let i: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(i["family"], "ViT");
    assert_eq!(i["vit"]["depth"], 2);
    assert_eq!(i["unused_keys"].as_array().unwrap().len(), 5);
}
