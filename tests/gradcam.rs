//! Grad-CAM against pytorch-grad-cam (reference.safetensors `gradcam/*`).

use candle_core::Device;
use evax::checkpoint::Checkpoint;
use evax::explain::{CamLayer, CamSource, cam_maps};
use evax::fixtures::shared_or_skip;
use evax::model::{EvaX, LoadOptions};

#[test]
fn gradcam_matches_pytorch_grad_cam() {
    let Some(s) = shared_or_skip("gradcam_matches_pytorch_grad_cam") else { return };
    let r = Checkpoint::load(s.join("fixtures/reference.safetensors")).unwrap().tensors;
    let ck = Checkpoint::load(s.join("fixtures/eva_x_ti_cxr14_ft.pth")).unwrap();
    let (m, _) = EvaX::from_checkpoint(&ck, &LoadOptions::default()).unwrap();
    let x = r["input224"].to_tensor(&Device::Cpu).unwrap().narrow(0, 0, 1).unwrap();
    let layer = CamLayer::parse("last", m.config.depth).unwrap();
    let (logits, rounds) = m.activation_grads(&x, layer, &[vec![1, 7]]).unwrap();
    let want_logits = &r["ti_ft/logits"].data[..14];
    let got_logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dl = got_logits.iter().zip(want_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(dl < 1e-4, "logits through the differentiable path differ by {dl}");
    for (round, key) in rounds.iter().zip(["gradcam/class1", "gradcam/class7"]) {
        let map = &cam_maps(round, (224, 224)).unwrap()[0];
        let want = &r[key].data;
        let d = map.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        eprintln!("{key}: max abs diff {d:.3e}");
        assert!(d <= 1e-3, "{key}: max abs diff {d}");
    }
}
