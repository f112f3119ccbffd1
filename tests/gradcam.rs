//! Grad-CAM against pytorch-grad-cam (reference.safetensors `gradcam/*`).

use candle_core::Device;
use evax::checkpoint::Checkpoint;
use evax::explain::{CamSource, cam_maps};
use evax::fixtures::shared_or_skip;
use evax::model::{EvaX, LoadOptions};

/// Max |a - b|, after checking the lengths agree (a short output must fail).
fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    assert!(!got.is_empty(), "empty output");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn gradcam_matches_pytorch_grad_cam() {
    let Some(s) = shared_or_skip("gradcam_matches_pytorch_grad_cam") else {
        return;
    };
    let r = Checkpoint::load(s.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    let ck = Checkpoint::load(s.join("fixtures/eva_x_ti_cxr14_ft.pth")).unwrap();
    let (m, _) = EvaX::from_checkpoint(&ck, &LoadOptions::default()).unwrap();
    let x = r["input224"]
        .to_tensor(&Device::Cpu)
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap();
    let batch = m.activation_grads(&x, "last", &|_, _| vec![1, 7]).unwrap();
    let rounds = batch.rounds;
    let want_logits = &r["ti_ft/logits"].data[..14];
    let got_logits = &batch.logits[0];
    let dl = max_diff(got_logits, want_logits);
    assert!(
        dl <= 1e-5,
        "logits through the differentiable path differ by {dl}"
    );
    assert_eq!(rounds.len(), 2, "one round per requested class");
    for (round, key) in rounds.iter().zip(["gradcam/class1", "gradcam/class7"]) {
        let maps = cam_maps(round, (224, 224)).unwrap();
        assert_eq!(maps.len(), 1);
        let d = max_diff(&maps[0], &r[key].data);
        eprintln!("{key}: max abs diff {d:.3e}");
        assert!(d <= 1e-5, "{key}: max abs diff {d}");
    }
}

#[test]
fn cam_eval_input_and_ious_match_get_cams() {
    use evax::explain::localize::{BoxMapping, iou, read_boxes, thresholds};
    use evax::preprocess::{Image, Normalization, cam_eval_input};
    let Some(s) = shared_or_skip("cam_eval_input_and_ious_match_get_cams") else {
        return;
    };
    let r = Checkpoint::load(s.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    let img = Image::open(s.join("data/nih/00003440_000.png")).unwrap();
    let input = cam_eval_input(&img, (224, 224), Normalization::OTHERS);
    let d = max_diff(&input, &r["cam_eval/input"].data);
    eprintln!("cam_eval/input: max abs diff {d:.3e}");
    assert!(d <= 1e-5, "cam_eval/input differs by {d}");

    let ck = Checkpoint::load(s.join("fixtures/eva_x_ti_cxr14_ft.pth")).unwrap();
    let (m, _) = EvaX::from_checkpoint(&ck, &LoadOptions::default()).unwrap();
    let x = candle_core::Tensor::from_vec(input, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let (boxes, bad) = read_boxes(&s.join("data/nih/BBox_List_2017.csv")).unwrap();
    assert!(bad.is_empty());
    assert_eq!(boxes.len(), 984);
    let mapping = BoxMapping {
        scale: 224.0 / 1024.0,
        offset: (0, 0),
    };
    for (finding, class) in [("Atelectasis", 0), ("Mass", 4)] {
        let rounds = m
            .activation_grads(&x, "last", &|_, _| vec![class])
            .unwrap()
            .rounds;
        let cam = &cam_maps(&rounds[0], (224, 224)).unwrap()[0];
        let d = max_diff(cam, &r[&format!("cam_eval/{finding}/cam")].data);
        eprintln!("cam_eval/{finding}/cam: max abs diff {d:.3e}");
        assert!(d <= 1e-5, "{finding}: the CAM differs by {d}");
        let b = boxes
            .iter()
            .find(|b| b.image == "00003440_000.png" && b.finding == finding)
            .unwrap();
        let pixels = mapping.map(&b.bbox);
        let want = &r[&format!("cam_eval/{finding}/iou_by_threshold")].data;
        let got: Vec<f64> = thresholds()
            .iter()
            .map(|&t| iou(cam, (224, 224), &pixels, t))
            .collect();
        assert_eq!(got.len(), want.len(), "thresholds");
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        eprintln!("cam_eval/{finding}/iou_by_threshold: max abs diff {d:.3e}");
        assert!(d <= 1e-5, "{finding}: {got:?}");
    }
}
