//! Grad-CAM against pytorch-grad-cam (reference.safetensors `gradcam/*`).

use candle_core::Device;
use evax::checkpoint::Checkpoint;
use evax::explain::{CamSource, cam_maps};
use evax::fixtures::shared_or_skip;
use evax::model::{EvaX, LoadOptions};

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
    let dl = got_logits
        .iter()
        .zip(want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        dl < 1e-4,
        "logits through the differentiable path differ by {dl}"
    );
    for (round, key) in rounds.iter().zip(["gradcam/class1", "gradcam/class7"]) {
        let map = &cam_maps(round, (224, 224)).unwrap()[0];
        let want = &r[key].data;
        let d = map
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("{key}: max abs diff {d:.3e}");
        assert!(d <= 1e-3, "{key}: max abs diff {d}");
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
    let d = input
        .iter()
        .zip(&r["cam_eval/input"].data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
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
        let want = &r[&format!("cam_eval/{finding}/cam")].data;
        let d = cam
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("cam_eval/{finding}/cam: max abs diff {d:.3e}");
        assert!(d <= 1e-3);
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
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        eprintln!("cam_eval/{finding}/iou_by_threshold: max abs diff {d:.3e}");
        assert!(d <= 1e-3, "{finding}: {got:?}");
    }
}
