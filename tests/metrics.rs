//! AUROC against scikit-learn (reference.safetensors `auc/*`).

use evax::checkpoint::Checkpoint;
use evax::fixtures::shared_or_skip;
use evax::metrics::auc_summary;

#[test]
fn auroc_matches_scikit_learn_to_1e12() {
    let Some(s) = shared_or_skip("auroc_matches_scikit_learn_to_1e12") else {
        return;
    };
    let r = Checkpoint::load(s.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors;
    // Stored as f32 in the fixture; widen exactly.
    let y: Vec<f64> = r["auc/y_true"].data.iter().map(|&v| v as f64).collect();
    let p: Vec<f64> = r["auc/y_score"].data.iter().map(|&v| v as f64).collect();
    let m = auc_summary(&y, &p, 14);
    // The references are f64 in the file but Param holds f32; read them exactly from bytes.
    let raw = std::fs::read(s.join("fixtures/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let f64s = |k: &str| -> Vec<f64> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let want = f64s("auc/per_class");
    assert_eq!(want.len(), 14);
    assert_eq!(m.per_class.len(), want.len());
    for (c, (a, b)) in m.per_class.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-12, "class {c}: {a} vs {b}");
    }
    assert_eq!(m.left_out, vec![13]);
    let mean = f64s("auc/mean")[0];
    assert!((m.mean - mean).abs() <= 1e-12, "{} vs {mean}", m.mean);
}
