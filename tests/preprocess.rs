//! The original's evaluation preprocessing, against preprocess.safetensors and input224/480.

use evax::checkpoint::Checkpoint;
use evax::fixtures::shared_or_skip;
use evax::preprocess::{Normalization, Preprocess};

const IMAGES: [&str; 7] = [
    "00000001_000.png",
    "00003440_000.png",
    "16747_3_1.jpg",
    "synth_gray_1024.png",
    "synth_gray_320x390.jpg",
    "synth_rgb_1200x900.png",
    "synth_rgba_1024.png",
];

/// (max abs difference, share of values differing by more than 1e-6).
fn compare(got: &[f32], want: &[f32]) -> (f32, f64) {
    assert_eq!(got.len(), want.len());
    let mut max = 0f32;
    let mut off = 0usize;
    for (a, b) in got.iter().zip(want) {
        let d = (a - b).abs();
        max = max.max(d);
        off += (d > 1e-6) as usize;
    }
    (max, off as f64 / got.len() as f64)
}

#[test]
fn every_fixture_image_matches_pil() {
    let Some(s) = shared_or_skip("every_fixture_image_matches_pil") else {
        return;
    };
    let refs = Checkpoint::load(s.join("fixtures/preprocess.safetensors"))
        .unwrap()
        .tensors;
    let mut compared = 0;
    for (size, prefix) in [(224, "pre224"), (480, "pre480")] {
        let pre = Preprocess::eval((size, size), Normalization::EVAX);
        for name in IMAGES {
            let Some(want) = refs.get(&format!("{prefix}/{name}")) else {
                continue;
            };
            compared += 1;
            assert_eq!(want.shape, vec![3, size, size]);
            let got = pre.load(s.join("fixtures/images").join(name)).unwrap();
            let (max, share) = compare(&got, &want.data);
            eprintln!(
                "{prefix}/{name}: max abs diff {max:.3e}, {:.3}% of values differ",
                share * 100.0
            );
            if name.ends_with(".png") {
                assert!(max <= 1e-6, "{name}: PNG must be exact, max diff {max}");
            } else {
                // JPEG: zune-jpeg's IDCT differs from libjpeg-turbo's by one level at most
                // (1 / 255 / 0.28509309 = 0.0138 after normalisation), as the README says.
                assert!(
                    max <= 0.0138 + 1e-6,
                    "{name}: max diff {max} is more than one level"
                );
            }
        }
    }
    // Every image the fixture holds was compared.
    let in_fixture = refs
        .keys()
        .filter(|k| k.starts_with("pre224/") || k.starts_with("pre480/"))
        .count();
    assert!(compared > 0);
    assert_eq!(compared, in_fixture, "fixture images compared");
}

#[test]
fn nih_images_give_the_reference_batches() {
    let Some(s) = shared_or_skip("nih_images_give_the_reference_batches") else {
        return;
    };
    let r = Checkpoint::load(s.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    for (size, key) in [(224, "input224"), (480, "input480")] {
        let pre = Preprocess::eval((size, size), Normalization::EVAX);
        let mut batch = Vec::new();
        for name in ["00000001_000.png", "00003440_000.png"] {
            batch.extend(pre.load(s.join("data/nih").join(name)).unwrap());
        }
        assert_eq!(batch.len(), 2 * 3 * size * size);
        let (max, _) = compare(&batch, &r[key].data);
        assert!(max <= 1e-6, "{key}: max diff {max}");
    }
}
