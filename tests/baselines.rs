//! The seed's comparison backbones against the original (baseline_reference.safetensors): the
//! ViT-S/16 family through the common model interface, both kernel paths.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use evax::checkpoint::{Checkpoint, Param};
use evax::explain::cam_maps;
use evax::fixtures::shared_or_skip;
use evax::kernels::Kernels;
use evax::model::registry::{self, Family};
use evax::model::{Classifier, LoadOptions, Trainable};
use evax::preprocess::{Image, Normalization, cam_eval_input};
use evax::train::bce_with_logits;
use evax::train::optim::AdamW;

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

/// Grad-CAM of `m` at its default layer for `classes` on get_cams.py's input of
/// 00003440_000.png, against the fixture `keys`, within `tol`.
fn check_cams(
    sh: &Path,
    r: &BTreeMap<String, Param>,
    m: &dyn Classifier,
    classes: &[usize],
    keys: &[&str],
    tol: f32,
) {
    let img = Image::open(sh.join("data/nih/00003440_000.png")).unwrap();
    let input = cam_eval_input(&img, (224, 224), Normalization::OTHERS);
    let x = Tensor::from_vec(input, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let layer = m.default_cam_layer();
    let batch = m
        .activation_grads(&x, &layer, &|_, _| classes.to_vec())
        .unwrap();
    assert_eq!(batch.rounds.len(), keys.len());
    for (round, key) in batch.rounds.iter().zip(keys) {
        let maps = cam_maps(round, (224, 224)).unwrap();
        assert_eq!(maps.len(), 1);
        let want = &r[*key];
        assert_eq!(maps[0].len(), want.data.len());
        let d = maps[0]
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("{key}: max abs diff {d:.2e}");
        assert!(d <= tol, "{key}: {d}");
    }
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

/// ViT-S/16 with `--precision bf16` on the CPU (the blocks' dense layers in bf16 products,
/// the rest f32) against the original's f32 logits, with the EVA-X test's tolerances (0.1 /
/// 0.02; `tests/parity.rs`). Skipped, with a message, without AVX512-BF16.
#[test]
fn vit_s_bf16_logits_agree_with_f32() {
    let Some(sh) = shared_or_skip("vit_s_bf16_logits_agree_with_f32") else {
        return;
    };
    if !evax::kernels::bf16::native() {
        eprintln!("SKIPPED ViT bf16 logits: needs a CPU with AVX512-BF16");
        return;
    }
    let r = reference(&sh);
    let ck = Checkpoint::load(sh.join("fixtures/vit_s_d2_cxr14_ft.pth")).unwrap();
    let opts = LoadOptions {
        precision: evax::compute::Precision::Bf16,
        ..Default::default()
    };
    let m = registry::load(&ck, &opts).unwrap().0;
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let got = m.logits(&x).unwrap();
    let want = &r["vit_s/logits"];
    let d = max_diff(&got, want);
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dp = common::max_probability_diff(&g, &want.data);
    eprintln!(
        "vit_s/logits (bf16): max |logit diff| {d:.3e}, max |probability diff| {dp:.3e} over {} \
         values",
        g.len()
    );
    common::assert_within("bf16", (d, 1e-1), (dp, 2e-2));
}

/// ViT-S/16's training step with `--precision bf16` on the CPU (every product of the blocks
/// in bf16, f32 sums and master weights) against the original's f32 step (see
/// [`train_step`], whose leftover Grad-CAM gradient it adds the same way): the loss within
/// 5e-3 and each of the 7 recorded gradients within 5e-2 of its largest value, as EVA-X's
/// bf16 step (`tests/train.rs`). Skipped, with a message, without AVX512-BF16.
#[test]
fn vit_s_train_step_in_bf16_products_agrees_with_the_original() {
    let Some(sh) = shared_or_skip("vit_s_train_step_bf16") else {
        return;
    };
    if !evax::kernels::bf16::native() {
        eprintln!("SKIPPED ViT bf16 training step: needs a CPU with AVX512-BF16");
        return;
    }
    let r = reference(&sh);
    let ck = Checkpoint::load(sh.join("fixtures/vit_s_d2_cxr14_ft.pth")).unwrap();
    let mut model = registry::load_trainable(&ck, 14, 0, &Device::Cpu, Kernels::Fused).unwrap();
    model.set_precision(evax::compute::Precision::Bf16).unwrap();
    let leftover = cam_leftover(&sh, model.as_mut());
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let y = r["targets"].to_tensor(&Device::Cpu).unwrap();
    let loss = bce_with_logits(&model.forward_train(&x, 0.0, None).unwrap(), &y).unwrap();
    let l = loss.to_scalar::<f32>().unwrap();
    let want = r["vit_s_train/loss"].data[0];
    eprintln!(
        "vit_s bf16 loss {l} (reference {want}): diff {:.2e}",
        (l - want).abs()
    );
    assert!((l - want).abs() <= 5e-3, "loss {l} vs {want}");
    let step = model.grads(&loss.backward().unwrap()).unwrap();
    let mut compared = 0;
    for (key, want) in r.iter() {
        let Some(name) = key.strip_prefix("vit_s_train/grad/") else {
            continue;
        };
        let got = (&step[name] + &leftover[name]).unwrap();
        let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&got, want) / scale;
        eprintln!("vit_s bf16 grad {name}: {d:.2e} of its largest value");
        assert!(d <= 5e-2, "{name}: {d:.2e}");
        compared += 1;
    }
    assert_eq!(compared, 7, "gradients compared");
}

#[test]
fn vit_s_gradcam_matches_pytorch_grad_cam() {
    let Some(sh) = shared_or_skip("vit_s_gradcam_matches_pytorch_grad_cam") else {
        return;
    };
    let r = reference(&sh);
    let m = load(&sh, "vit_s_d2_cxr14_ft.pth", Kernels::Fused);
    check_cams(
        &sh,
        &r,
        m.as_ref(),
        &[0, 1],
        &["vit_s/gradcam/class0", "vit_s/gradcam/class1"],
        1e-5,
    );
}

#[test]
fn vit_s_through_the_command_line() {
    let Some(sh) = shared_or_skip("vit_s_through_the_command_line") else {
        return;
    };
    let r = reference(&sh);
    let bin = env!("CARGO_BIN_EXE_evax");
    let dir = common::scratch("vit");
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

/// The gradients the fixture generator left in the parameters before its training step
/// (see [`train_step`]): Grad-CAM's last backward, the logit of class 13 for get_cams.py's
/// input of 00003440_000.png with the model in evaluation mode (left in training mode after).
fn cam_leftover(sh: &Path, model: &mut dyn Trainable) -> evax::train::optim::Grads {
    let img = Image::open(sh.join("data/nih/00003440_000.png")).unwrap();
    let cam_input = cam_eval_input(&img, (224, 224), Normalization::OTHERS);
    let cam_x = Tensor::from_vec(cam_input, (1, 3, 224, 224), &Device::Cpu).unwrap();
    model.set_training(false);
    let cam_logit = model
        .forward_train(&cam_x, 0.0, None)
        .unwrap()
        .get(0)
        .unwrap()
        .get(13)
        .unwrap();
    let leftover = model.grads(&cam_logit.backward().unwrap()).unwrap();
    model.set_training(true);
    leftover
}

/// One training step of the seed's recipes as the fixture generator ran it (`tag`: `r50`,
/// `dn121` or `vit_s`): BCE-with-logits on `input224_others` / `targets`, BatchNorm in training
/// mode, drop path 0, AdamW at 2.5e-4 (x the ViT's layer-decay scale), weight decay 0.05 except
/// 1-D parameters and biases (and the ViT's `pos_embed`, `cls_token`).
///
/// The generator did not zero the gradients between its Grad-CAM references and this step: the
/// parameters' `.grad` still held the backward of pytorch-grad-cam's last target, the logit of
/// class 13 for get_cams.py's input of 00003440_000.png with the model in evaluation mode, and
/// the step's loss was added to it. Every `*_train/grad/*` is therefore (train gradient) +
/// (that leftover), which is what is rebuilt here through the public API (`set_training(false)`
/// for the leftover) and compared, every key: the loss (1e-5), every gradient (1e-4 relative to
/// its largest value), every parameter after the step and every running mean (1e-6), but for
/// the few that float32 does not determine ([`undetermined`]).
fn train_step(file: &str, tag: &str, family: Family, kernels: Kernels) {
    let Some(sh) = shared_or_skip(&format!("{tag}_train_step")) else {
        return;
    };
    let r = reference(&sh);
    let ck = Checkpoint::load(sh.join("fixtures").join(file)).unwrap();
    assert_eq!(registry::recognise(&ck).unwrap(), family);
    let mut model = registry::load_trainable(&ck, 14, 0, &Device::Cpu, kernels).unwrap();
    let groups: evax::train::optim::Groups = model
        .vars()
        .keys()
        .map(|k| (k.clone(), model.param_group(k, 0.55, 0.05)))
        .collect();
    match family {
        Family::Vit => {
            // The models_vit groups: decay 0.55 per block from the head down; no weight decay
            // on 1-D parameters, pos_embed and cls_token.
            assert_eq!(groups["head.weight"], (1.0, 0.05));
            assert_eq!(groups["pos_embed"], (0.55f64.powi(3), 0.0));
            assert_eq!(groups["blocks.1.mlp.fc2.weight"], (0.55, 0.05));
            assert_eq!(groups["blocks.0.norm1.bias"], (0.55f64.powi(2), 0.0));
        }
        _ => {
            let head = if family == Family::ResNet {
                "fc"
            } else {
                "classifier"
            };
            assert_eq!(
                groups[&format!("{head}.weight")],
                (1.0, 0.05),
                "no layer decay"
            );
            assert_eq!(groups[&format!("{head}.bias")], (1.0, 0.0));
        }
    }
    let leftover = cam_leftover(&sh, model.as_mut());
    // The step itself.
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let y = r["targets"].to_tensor(&Device::Cpu).unwrap();
    let logits = model.forward_train(&x, 0.0, None).unwrap();
    let loss = bce_with_logits(&logits, &y).unwrap();
    let l = loss.to_scalar::<f32>().unwrap();
    let want = r[&format!("{tag}_train/loss")].data[0];
    eprintln!("{tag} loss {l} (reference {want}, {kernels:?})");
    assert!((l - want).abs() <= 1e-5, "{tag} loss {l} vs {want}");
    let step = model.grads(&loss.backward().unwrap()).unwrap();
    assert_eq!(
        step.len(),
        model.vars().len(),
        "every parameter has a gradient"
    );
    assert_eq!(leftover.len(), step.len());
    let grads: BTreeMap<String, Tensor> = step
        .iter()
        .map(|(k, g)| (k.clone(), (g + &leftover[k]).unwrap()))
        .collect();
    let (mut grads_compared, mut after_compared, mut counted) = (0, 0, 0);
    for (key, want) in r.iter() {
        let Some(name) = key.strip_prefix(&format!("{tag}_train/grad/")) else {
            continue;
        };
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("{tag}: no parameter {name}"));
        let d = relative_diff(got, want);
        eprintln!("{tag} grad {name}: {d:.2e} relative ({kernels:?})");
        if undetermined(tag, kernels).contains(&name) {
            counted += 1;
            continue;
        }
        assert!(d <= 1e-4, "{tag} grad {name}: {d:.2e} relative");
        grads_compared += 1;
    }
    let mut opt = AdamW::new();
    opt.update(model.vars(), &grads, 2.5e-4, &groups, 1.0)
        .unwrap();
    let buffers = model.buffers();
    for (key, want) in r.iter() {
        let Some(name) = key.strip_prefix(&format!("{tag}_train/after_step/")) else {
            continue;
        };
        if name.ends_with(".running_mean") {
            let d = max_diff(buffers[name].as_tensor(), want);
            eprintln!("{tag} after step {name}: {d:.2e} ({kernels:?})");
            assert!(d <= 1e-6, "{tag} after step {name}: {d}");
            after_compared += 1;
            continue;
        }
        let got = model.vars()[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got.len(), want.data.len(), "{tag} {name}");
        // The first AdamW step moves each value by about lr x sign(gradient): where the
        // reference gradient is within the gradient tolerance of zero its sign is not
        // determined by it, so those values are left out (and counted).
        let g = &r[&format!("{tag}_train/grad/{name}")].data;
        let sign_unsure = 1e-4 * g.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (mut worst, mut n) = (0f32, 0);
        for ((a, b), g) in got.iter().zip(&want.data).zip(g) {
            if g.abs() > sign_unsure {
                worst = worst.max((a - b).abs());
                n += 1;
            }
        }
        eprintln!(
            "{tag} after step {name}: {worst:.2e} over {n} of {} values ({kernels:?})",
            got.len()
        );
        assert!(
            n * 10 >= got.len() * 9,
            "{tag} {name}: only {n} of {} compared",
            got.len()
        );
        if undetermined(tag, kernels).contains(&name) {
            counted += 1;
            continue;
        }
        assert!(worst <= 1e-6, "{tag} after step {name}: {worst}");
        after_compared += 1;
    }
    // Per family: 7 gradients, the same 7 parameters after the step, and for the CNNs 2
    // running means; the undetermined ones counted instead.
    let skipped = undetermined(tag, kernels).len();
    let after = if family == Family::Vit { 7 } else { 9 };
    assert_eq!(
        (grads_compared, after_compared, counted),
        (7 - skipped, after - skipped, 2 * skipped),
        "{tag}: keys compared / counted"
    );
}

/// The fixture keys whose value float32 arithmetic does not determine to the fixture's
/// tolerance, so that no float32 implementation can be held to it: ResNet-50's early
/// gradients (a ReLU network, batch 3, random weights) move by 1.6e-3 to 4.1e-3 of their
/// largest value between PyTorch 2.15's own float32 and float64 runs of this step (and by
/// 1.4e-4 to 7.9e-4 between its float32 run and the fixture), and their first AdamW step
/// follows the gradient's sign. On the reference path, whose convolutions round differently,
/// `layer4.0.bn3.weight` too (1.2e-4; its logits agree with float64 to 2.2e-6, so one ReLU
/// input near zero changing side is enough). Printed and counted, not compared.
fn undetermined(tag: &str, kernels: Kernels) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if tag == "r50" {
        keys.extend([
            "conv1.weight",
            "bn1.weight",
            "layer1.0.conv2.weight",
            "layer2.0.downsample.0.weight",
        ]);
        if kernels == Kernels::Reference {
            keys.push("layer4.0.bn3.weight");
        }
    }
    keys
}

#[test]
fn vit_s_train_step_fused_kernels() {
    train_step(
        "vit_s_d2_cxr14_ft.pth",
        "vit_s",
        Family::Vit,
        Kernels::Fused,
    );
}

#[test]
fn vit_s_train_step_reference_path() {
    train_step(
        "vit_s_d2_cxr14_ft.pth",
        "vit_s",
        Family::Vit,
        Kernels::Reference,
    );
}

#[test]
fn resnet50_train_step_fused_kernels() {
    train_step(
        "resnet50_l1111_cxr14_ft.pth",
        "r50",
        Family::ResNet,
        Kernels::Fused,
    );
}

#[test]
fn resnet50_train_step_reference_path() {
    train_step(
        "resnet50_l1111_cxr14_ft.pth",
        "r50",
        Family::ResNet,
        Kernels::Reference,
    );
}

#[test]
fn densenet121_train_step_fused_kernels() {
    train_step(
        "densenet121_b2222_cxr14_ft.pth",
        "dn121",
        Family::DenseNet,
        Kernels::Fused,
    );
}

#[test]
fn densenet121_train_step_reference_path() {
    train_step(
        "densenet121_b2222_cxr14_ft.pth",
        "dn121",
        Family::DenseNet,
        Kernels::Reference,
    );
}
#[test]
fn vit_s_finetunes_from_mae_weights_through_the_same_engine() {
    let Some(sh) = shared_or_skip("vit_s_finetunes_from_mae_weights_through_the_same_engine")
    else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_evax");
    let dir = common::scratch("vit-ft");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    let list = "00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n00003440_000.png 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
    for n in ["00000001_000.png", "00003440_000.png"] {
        std::fs::copy(sh.join("data/nih").join(n), data.join("images").join(n)).unwrap();
    }
    for split in ["train", "val", "test"] {
        std::fs::write(data.join(format!("{split}_official.txt")), list).unwrap();
    }
    let out = dir.join("run");
    let o = std::process::Command::new(bin)
        .args(["finetune", "--preset", "cxr14-vit-s", "--weights"])
        .arg(sh.join("fixtures/vit_s_d2_mae_pt.pth"))
        .arg("--data-dir")
        .arg(&data)
        .arg("-o")
        .arg(&out)
        .args([
            "--set",
            "batch_size=2",
            "--set",
            "epochs=1",
            "--set",
            "warmup_epochs=0",
            "--set",
            "accum_iter=1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("fine-tuning ViT-S/16 on cxr14"), "{err}");
    // The report of what the original drops and initialises fresh.
    for said in [
        "pre-training keys (norm, decoder_*, mask_token) dropped",
        "no fc_norm: initialised fresh (weight 1, bias 0)",
        "no head: 14 classes initialised fresh",
    ] {
        assert!(err.contains(said), "{said}: {err}");
    }
    // The written weights load back as a 14-class ViT.
    let ck = Checkpoint::load(out.join("checkpoint-best.safetensors")).unwrap();
    assert_eq!(registry::recognise(&ck).unwrap(), Family::Vit);
    let (m, report) = registry::load(&ck, &LoadOptions::default()).unwrap();
    assert_eq!(m.num_classes(), Some(14));
    assert!(report.unused.is_empty(), "{:?}", report.unused);
}

/// Max |a - b| relative to the largest reference value, after checking shapes.
fn relative_diff(got: &Tensor, want: &Param) -> f32 {
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    max_diff(got, want) / scale
}

#[test]
fn resnet50_features_logits_and_gradcam() {
    let Some(sh) = shared_or_skip("resnet50_features_logits_and_gradcam") else {
        return;
    };
    let r = reference(&sh);
    let ck = Checkpoint::load(sh.join("fixtures/resnet50_l1111_cxr14_ft.pth")).unwrap();
    assert_eq!(registry::recognise(&ck).unwrap(), Family::ResNet);
    let (m, report) = registry::load(&ck, &LoadOptions::default()).unwrap();
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    assert_eq!(
        (m.name().as_str(), m.num_classes()),
        ("ResNet-50", Some(14))
    );
    assert_eq!(m.normalization(), Normalization::OTHERS);
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let e = m.embed(&x).unwrap();
    for (got, key) in [
        (&e.pooled, "r50/features"),
        (&m.logits(&x).unwrap(), "r50/logits"),
    ] {
        let d = relative_diff(got, &r[key]);
        eprintln!("{key}: max diff {d:.2e} of the largest value");
        assert!(d <= 1e-5, "{key}: {d}");
    }
    // Grad-CAM at layer4[-1].bn3. Measured 1.6e-6 and 1.1e-5: a 7 x 7 map upsampled to
    // 224 x 224 carries the rounding of 2048-channel sums further than a 14 x 14 one (fixture
    // tolerance 1e-3).
    check_cams(
        &sh,
        &r,
        m.as_ref(),
        &[3, 5],
        &["r50/gradcam/class3", "r50/gradcam/class5"],
        5e-5,
    );
}

#[test]
fn resnet50_through_the_command_line() {
    let Some(sh) = shared_or_skip("resnet50_through_the_command_line") else {
        return;
    };
    let r = reference(&sh);
    let bin = env!("CARGO_BIN_EXE_evax");
    let dir = common::scratch("r50");
    std::fs::create_dir_all(&dir).unwrap();
    let weights = sh.join("fixtures/resnet50_l1111_cxr14_ft.pth");
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
    let want = &r["r50/logits"].data;
    assert_eq!(want.len(), 3 * 14);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
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
        assert!(d <= 1e-5 * scale, "image {i}: {d}");
    }
    // cam-eval scores the two boxes of 00003440_000.png with layer4[-1].bn3.
    let o = std::process::Command::new(bin)
        .args(["cam-eval", "--weights"])
        .arg(&weights)
        .arg("--boxes")
        .arg(nih.join("BBox_List_2017.csv"))
        .arg("--images")
        .arg(&nih)
        .arg("-o")
        .arg(dir.join("cam-eval"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cam-eval/metrics.json")).unwrap()).unwrap();
    assert_eq!(m["boxes_scored"], 2, "{m}");
}

#[test]
fn densenet121_features_logits_gradcam_and_old_key_names() {
    let Some(sh) = shared_or_skip("densenet121_features_logits_gradcam_and_old_key_names") else {
        return;
    };
    let r = reference(&sh);
    let load_dn = |name: &str| {
        let ck = Checkpoint::load(sh.join("fixtures").join(name)).unwrap();
        assert_eq!(
            registry::recognise(&ck).unwrap(),
            Family::DenseNet,
            "{name}"
        );
        let (m, report) = registry::load(&ck, &LoadOptions::default()).unwrap();
        assert!(report.unused.is_empty(), "{name}: {:?}", report.unused);
        m
    };
    let m = load_dn("densenet121_b2222_cxr14_ft.pth");
    assert_eq!(
        (m.name().as_str(), m.num_classes()),
        ("DenseNet-121", Some(14))
    );
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let features = m.embed(&x).unwrap().pooled;
    for (got, key) in [
        (&features, "dn121/features"),
        (&m.logits(&x).unwrap(), "dn121/logits"),
    ] {
        let d = relative_diff(got, &r[key]);
        eprintln!("{key}: max diff {d:.2e} of the largest value");
        assert!(d <= 1e-5, "{key}: {d}");
    }
    // torchvision's release layout (legacy file, old names, 1000-class head) gives the same
    // features.
    let old = load_dn("densenet121_b2222_imagenet_oldkeys_legacy.pth");
    assert_eq!(old.num_classes(), Some(1000));
    let d = relative_diff(&old.embed(&x).unwrap().pooled, &r["dn121/features"]);
    eprintln!("dn121/features from the legacy file with old names: {d:.2e}");
    assert!(d <= 1e-5, "old names: {d}");
    // Grad-CAM at the last dense layer's norm1.
    check_cams(
        &sh,
        &r,
        m.as_ref(),
        &[0, 1],
        &["dn121/gradcam/class0", "dn121/gradcam/class1"],
        1e-5,
    );
}

/// The ResNet-50 fixture re-keyed into each layout the seed's table links to, written as a
/// file: recognised, reported, and giving the same features as the torchvision file.
#[test]
fn resnet_checkpoint_layouts_on_synthetic_files() {
    let Some(sh) = shared_or_skip("resnet_checkpoint_layouts_on_synthetic_files") else {
        return;
    };
    let ck = Checkpoint::load(sh.join("fixtures/resnet50_l1111_cxr14_ft.pth")).unwrap();
    let bare = registry::load(&ck, &LoadOptions::default()).unwrap().0;
    let r = reference(&sh);
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let want = bare.embed(&x).unwrap().pooled;
    let dir = common::scratch("layouts");
    std::fs::create_dir_all(&dir).unwrap();
    // (layout, how a torchvision key is written, keys of other modules, whether fc survives)
    type Rekey = fn(&str) -> Option<String>;
    let cases: [(&str, Rekey, &[&str], bool); 5] = [
        (
            "MGCA",
            |k| Some(format!("img_encoder_q.model.{k}")),
            &["text_encoder_q.model.embeddings.word_embeddings.weight"],
            true,
        ),
        (
            "MoCo v2",
            |k| Some(format!("module.encoder_q.{k}")),
            &["module.encoder_k.conv1.weight"],
            true,
        ),
        (
            "BioViL",
            |k| Some(format!("encoder.encoder.{k}")),
            &["projector.projector.0.weight"],
            false,
        ),
        (
            "segmentation-models encoder",
            |k| Some(format!("model.encoder.{k}")),
            &["model.decoder.blocks.0.conv1.0.weight"],
            true,
        ),
        (
            "torchvision (wrapped)",
            |k| Some(format!("backbone.{k}")),
            &[],
            true,
        ),
    ];
    let mut compared = 0;
    for (layout, rekey, others, has_fc) in cases {
        let mut ts: BTreeMap<String, Tensor> = BTreeMap::new();
        for (k, p) in &ck.tensors {
            ts.insert(rekey(k).unwrap(), p.to_tensor(&Device::Cpu).unwrap());
        }
        for o in others {
            ts.insert(
                o.to_string(),
                Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        }
        let path = dir.join(format!("{}.safetensors", layout.replace(' ', "_")));
        evax::checkpoint::save_safetensors(&ts, None, &path).unwrap();
        let (m, report) = registry::load_file(&path, None, &LoadOptions::default()).unwrap();
        assert_eq!(m.name(), "ResNet-50");
        assert_eq!(report.layout.as_deref(), Some(layout));
        assert_eq!(m.num_classes().is_some(), has_fc, "{layout}");
        if has_fc {
            assert!(report.dropped.is_empty());
        } else {
            assert_eq!(
                report.dropped,
                ["encoder.encoder.fc.bias", "encoder.encoder.fc.weight"]
            );
        }
        // Every other module's key is reported unused, nothing else.
        assert_eq!(
            report.unused.len(),
            others.len(),
            "{layout}: {:?}",
            report.unused
        );
        let got = m.embed(&x).unwrap().pooled;
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{layout}");
        compared += 1;
    }
    assert_eq!(compared, 5);

    // MedKLIP: res_features.0..6 = conv1, bn1, relu, maxpool, layer1..3; no layer4.
    let medklip = |k: &str| -> Option<String> {
        for (name, idx) in [
            ("conv1.", 0),
            ("bn1.", 1),
            ("layer1.", 4),
            ("layer2.", 5),
            ("layer3.", 6),
        ] {
            if let Some(rest) = k.strip_prefix(name) {
                return Some(format!("module.res_features.{idx}.{rest}"));
            }
        }
        None
    };
    let mut ts: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, p) in &ck.tensors {
        if let Some(nk) = medklip(k) {
            ts.insert(nk, p.to_tensor(&Device::Cpu).unwrap());
        }
    }
    assert!(ts.len() > 20);
    let path = dir.join("medklip.safetensors");
    evax::checkpoint::save_safetensors(&ts, None, &path).unwrap();
    let err = registry::load_file(&path, None, &LoadOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("MedKLIP weights: the ResNet-50 stops at layer3"),
        "{err}"
    );
    let mck = Checkpoint::load(&path).unwrap();
    assert_eq!(registry::recognise(&mck).unwrap(), Family::ResNet);
    let t = registry::load_trainable(&mck, 14, 0, &Device::Cpu, Kernels::Fused).unwrap();
    let notes = t.init_notes();
    assert!(notes[0].contains("layer4 initialised fresh"), "{notes:?}");
    assert!(
        notes[1].contains("no head fc: 14 classes initialised fresh"),
        "{notes:?}"
    );
    // The fresh layer4 is the full ResNet-50 stage: 3 blocks of width 512.
    assert_eq!(t.vars()["layer4.2.conv3.weight"].dims(), &[2048, 512, 1, 1]);
    let y = t.forward_train(&x, 0.0, None).unwrap();
    assert_eq!(y.dims(), &[3, 14]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// DenseNet layouts: MoCo v2 and a segmentation-models encoder over torchvision's old names.
#[test]
fn densenet_checkpoint_layouts_on_synthetic_files() {
    let Some(sh) = shared_or_skip("densenet_checkpoint_layouts_on_synthetic_files") else {
        return;
    };
    let legacy =
        Checkpoint::load(sh.join("fixtures/densenet121_b2222_imagenet_oldkeys_legacy.pth"))
            .unwrap();
    assert!(legacy.tensors.keys().any(|k| k.contains(".norm.1.")));
    let r = reference(&sh);
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let want = registry::load(&legacy, &LoadOptions::default())
        .unwrap()
        .0
        .embed(&x)
        .unwrap()
        .pooled;
    let dir = common::scratch("dn-layouts");
    std::fs::create_dir_all(&dir).unwrap();
    for (prefix, layout) in [
        ("module.encoder_q.", "MoCo v2"),
        ("model.encoder.", "segmentation-models encoder"),
    ] {
        let ts: BTreeMap<String, Tensor> = legacy
            .tensors
            .iter()
            .map(|(k, p)| (format!("{prefix}{k}"), p.to_tensor(&Device::Cpu).unwrap()))
            .collect();
        let path = dir.join(format!("{}.safetensors", layout.replace(' ', "_")));
        evax::checkpoint::save_safetensors(&ts, None, &path).unwrap();
        let (m, report) = registry::load_file(&path, None, &LoadOptions::default()).unwrap();
        assert_eq!(
            (m.name().as_str(), report.layout.as_deref()),
            ("DenseNet-121", Some(layout))
        );
        assert!(report.unused.is_empty(), "{:?}", report.unused);
        let got = m.embed(&x).unwrap().pooled;
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{layout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn densenet121_cam_eval_through_the_command_line() {
    let Some(sh) = shared_or_skip("densenet121_cam_eval_through_the_command_line") else {
        return;
    };
    let dir = common::scratch("dn121-cam");
    let nih = sh.join("data/nih");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_evax"))
        .args(["cam-eval", "--weights"])
        .arg(sh.join("fixtures/densenet121_b2222_cxr14_ft.pth"))
        .arg("--boxes")
        .arg(nih.join("BBox_List_2017.csv"))
        .arg("--images")
        .arg(&nih)
        .arg("-o")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
    // The two boxes of 00003440_000.png, explained at the last dense layer's norm1.
    assert_eq!(m["boxes_scored"], 2, "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Batches larger than the fixture's, which the CPU computes in slices of images side by side
/// (one per thread): every family's logits are the reference's for every copy of the input,
/// and exactly those of the fixture's own batch.
#[test]
fn sliced_batches_give_the_reference_logits() {
    let Some(sh) = shared_or_skip("sliced_batches_give_the_reference_logits") else {
        return;
    };
    let r = reference(&sh);
    let x = r["input224_others"].to_tensor(&Device::Cpu).unwrap();
    let n = x.dim(0).unwrap();
    let batch = Tensor::cat(&[&x, &x, &x, &x], 0).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut compared = 0;
    for (file, key) in [
        ("vit_s_d2_cxr14_ft.pth", "vit_s/logits"),
        ("resnet50_l1111_cxr14_ft.pth", "r50/logits"),
        ("densenet121_b2222_cxr14_ft.pth", "dn121/logits"),
    ] {
        let ck = Checkpoint::load(sh.join("fixtures").join(file)).unwrap();
        let m = registry::load(&ck, &LoadOptions::default()).unwrap().0;
        let own = flat(&m.logits(&x).unwrap());
        let got = m.logits(&batch).unwrap();
        assert_eq!(got.dims(), &[4 * n, r[key].shape[1]], "{key}: shape");
        for copy in 0..4 {
            let part = got.narrow(0, copy * n, n).unwrap();
            let d = relative_diff(&part, &r[key]);
            assert!(d <= 1e-5, "{key}, copy {copy}: {d}");
            let part = flat(&part);
            assert_eq!(part.len(), own.len(), "{key}: length");
            for (a, b) in part.iter().zip(&own) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{key}, copy {copy}: {a} against {b}"
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 3 * 4 * n * 14);
}
