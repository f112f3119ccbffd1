//! The checkpoint layouts the seed's comparison representations come in, rewritten to
//! torchvision's key names: release files (bare, wrapped in `module.` / `model.` /
//! `backbone.`), MoCo v2 (`encoder_q.`), MGCA (`img_encoder_q.model.`), MedKLIP
//! (`res_features.0..6` = conv1, bn1, relu, maxpool, layer1..3), BioViL (`encoder.encoder.`,
//! its `fc` dropped) and segmentation-models encoders (`model.encoder.`). DenseNet's old
//! names (`norm.1`, `conv.2`) are renamed too.

use std::collections::BTreeMap;

use crate::checkpoint::Param;

/// A CNN checkpoint's keys in torchvision's layout, and where they came from.
#[derive(Debug, Clone)]
pub struct CnnKeys {
    /// The layout recognised (`torchvision`, `MoCo v2`, `MGCA`, ...).
    pub layout: &'static str,
    /// The prefix the backbone was found under.
    pub prefix: String,
    /// The state dict with torchvision's names.
    pub sd: BTreeMap<String, Param>,
    /// Keys outside the backbone (left unused).
    pub outside: Vec<String>,
    /// Keys of the backbone dropped as the original drops them (BioViL's `fc`).
    pub dropped: Vec<String>,
    /// Whether DenseNet keys had torchvision's old names (`norm.1`, `conv.2`), now renamed.
    pub old_names: bool,
    /// Whether ResNet `layer4` is absent by design (MedKLIP's encoder stops at `layer3`;
    /// fine-tuning initialises it fresh, as the original does).
    pub lacks_layer4: bool,
}

/// Prefixes tried in order, with the layout each means.
const PREFIXES: [(&str, &str); 10] = [
    ("img_encoder_q.model.", "MGCA"),
    ("encoder.encoder.", "BioViL"),
    ("module.encoder_q.", "MoCo v2"),
    ("encoder_q.", "MoCo v2"),
    ("model.encoder.", "segmentation-models encoder"),
    ("encoder.", "segmentation-models encoder"),
    ("module.", "torchvision (wrapped)"),
    ("model.", "torchvision (wrapped)"),
    ("backbone.", "torchvision (wrapped)"),
    ("", "torchvision"),
];

/// MedKLIP's `res_features` indices and the torchvision modules they hold.
const MEDKLIP: [(&str, &str); 5] = [
    ("0.", "conv1."),
    ("1.", "bn1."),
    ("4.", "layer1."),
    ("5.", "layer2."),
    ("6.", "layer3."),
];

/// torchvision's old DenseNet layer names and the current ones.
const DENSENET_OLD_NAMES: [(&str, &str); 4] = [
    (".norm.1.", ".norm1."),
    (".conv.1.", ".conv1."),
    (".norm.2.", ".norm2."),
    (".conv.2.", ".conv2."),
];

/// Whether a state dict in torchvision's names holds a ResNet stem and first block.
pub fn is_resnet(sd: &BTreeMap<String, Param>) -> bool {
    sd.contains_key("conv1.weight")
        && sd.contains_key("bn1.running_mean")
        && sd.contains_key("layer1.0.conv3.weight")
}

/// Whether a state dict in torchvision's names holds a DenseNet stem.
pub fn is_densenet(sd: &BTreeMap<String, Param>) -> bool {
    sd.contains_key("features.conv0.weight") && sd.contains_key("features.norm0.running_mean")
}

/// The keys under `prefix` (renamed by `rename`) and those outside it.
fn split(
    tensors: &BTreeMap<String, Param>,
    prefix: &str,
    rename: impl Fn(&str) -> Option<String>,
) -> (BTreeMap<String, Param>, Vec<String>) {
    let mut outside = Vec::new();
    let mut sd = BTreeMap::new();
    for (k, v) in tensors {
        match k.strip_prefix(prefix).and_then(&rename) {
            Some(name) => {
                sd.insert(name, v.clone());
            }
            None => outside.push(k.clone()),
        }
    }
    (sd, outside)
}

/// A ResNet-50 or DenseNet-121 in any of the layouts above, in torchvision's names; `None`
/// when the keys hold neither.
pub fn cnn_keys(tensors: &BTreeMap<String, Param>) -> Option<CnnKeys> {
    for prefix in ["module.res_features.", "res_features."] {
        let (sd, outside) = split(tensors, prefix, |rest| {
            MEDKLIP
                .iter()
                .find_map(|(idx, name)| rest.strip_prefix(idx).map(|r| format!("{name}{r}")))
        });
        if is_resnet(&sd) {
            return Some(CnnKeys {
                layout: "MedKLIP",
                prefix: prefix.into(),
                old_names: false,
                lacks_layer4: !sd.keys().any(|k| k.starts_with("layer4.")),
                sd,
                outside,
                dropped: Vec::new(),
            });
        }
    }
    for (prefix, layout) in PREFIXES {
        let (mut sd, outside) = split(tensors, prefix, |rest| {
            let mut name = rest.to_string();
            if name.starts_with("features.denseblock") {
                for (old, new) in DENSENET_OLD_NAMES {
                    name = name.replace(old, new);
                }
            }
            Some(name)
        });
        if !is_resnet(&sd) && !is_densenet(&sd) {
            continue;
        }
        // BioViL's fc, and projection heads (MoCo v2's MLP `fc.0` / `fc.2`), are dropped as
        // the original drops them; a linear `fc` is the head and stays.
        let linear_head = sd.contains_key("fc.weight");
        let head = |k: &str| k.starts_with("fc.") && (layout == "BioViL" || !linear_head);
        let dropped: Vec<String> = sd.keys().filter(|k| head(k)).cloned().collect();
        sd.retain(|k, _| !head(k));
        let old_names = tensors.keys().any(|k| {
            k.starts_with(prefix)
                && k.contains("denseblock")
                && DENSENET_OLD_NAMES.iter().any(|(old, _)| k.contains(old))
        });
        return Some(CnnKeys {
            layout,
            prefix: prefix.into(),
            old_names,
            lacks_layer4: false,
            sd,
            outside,
            dropped: dropped.iter().map(|k| format!("{prefix}{k}")).collect(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::StorageDtype;

    fn param() -> Param {
        Param {
            dtype: StorageDtype::F32,
            shape: vec![1],
            data: vec![0.0],
        }
    }

    /// A state dict with `keys` under `prefix`, plus keys of other modules.
    fn dict(prefix: &str, keys: &[&str], others: &[&str]) -> BTreeMap<String, Param> {
        keys.iter()
            .map(|k| format!("{prefix}{k}"))
            .chain(others.iter().map(|k| k.to_string()))
            .map(|k| (k, param()))
            .collect()
    }

    const RESNET: [&str; 5] = [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv3.weight",
        "layer4.2.conv3.weight",
        "fc.weight",
    ];

    #[test]
    fn every_layout_of_the_comparison_is_rewritten_to_torchvision() {
        let cases = [
            ("", "torchvision", &[][..]),
            ("module.", "torchvision (wrapped)", &[][..]),
            (
                "img_encoder_q.model.",
                "MGCA",
                &["text_encoder_q.x", "img_encoder_q.global_embed.weight"][..],
            ),
            (
                "module.encoder_q.",
                "MoCo v2",
                &["module.encoder_k.conv1.weight", "queue"][..],
            ),
            ("encoder.encoder.", "BioViL", &["projector.0.weight"][..]),
            (
                "model.encoder.",
                "segmentation-models encoder",
                &["model.decoder.x", "model.segmentation_head.0.weight"][..],
            ),
        ];
        for (prefix, layout, others) in cases {
            let keys = cnn_keys(&dict(prefix, &RESNET, others)).unwrap();
            assert_eq!((keys.layout, keys.prefix.as_str()), (layout, prefix));
            assert_eq!(keys.outside.len(), others.len(), "{layout}");
            let mut want: Vec<&str> = RESNET.to_vec();
            want.sort_unstable();
            if layout == "BioViL" {
                want.retain(|k| !k.starts_with("fc."));
                assert_eq!(keys.dropped, vec![format!("{prefix}fc.weight")]);
            } else {
                assert!(keys.dropped.is_empty());
            }
            assert_eq!(keys.sd.keys().collect::<Vec<_>>(), want, "{layout}");
            assert!(!keys.lacks_layer4);
        }
    }

    #[test]
    fn medklip_indices_become_torchvision_modules_and_layer4_is_missing() {
        let keys = [
            "0.weight",
            "1.running_mean",
            "4.0.conv3.weight",
            "5.0.conv1.weight",
            "6.5.bn3.weight",
        ];
        let sd = dict(
            "module.res_features.",
            &keys,
            &["module.res_l1.weight", "module.ent_embedding.weight"],
        );
        let k = cnn_keys(&sd).unwrap();
        assert_eq!(k.layout, "MedKLIP");
        assert_eq!(
            k.sd.keys().collect::<Vec<_>>(),
            [
                "bn1.running_mean",
                "conv1.weight",
                "layer1.0.conv3.weight",
                "layer2.0.conv1.weight",
                "layer3.5.bn3.weight"
            ]
        );
        assert_eq!(k.outside.len(), 2);
        assert!(k.lacks_layer4);
    }

    #[test]
    fn densenets_keep_features_and_lose_old_names() {
        let keys = [
            "features.conv0.weight",
            "features.norm0.running_mean",
            "features.denseblock1.denselayer1.norm.1.weight",
            "features.denseblock1.denselayer1.conv.2.weight",
            "classifier.weight",
        ];
        for (prefix, layout) in [
            ("", "torchvision"),
            ("module.encoder_q.", "MoCo v2"),
            ("model.encoder.", "segmentation-models encoder"),
        ] {
            let k = cnn_keys(&dict(prefix, &keys, &[])).unwrap();
            assert_eq!(k.layout, layout);
            assert!(k.sd.contains_key("features.denseblock1.denselayer1.norm1.weight"));
            assert!(k.sd.contains_key("features.denseblock1.denselayer1.conv2.weight"));
            assert_eq!(k.sd.len(), 5);
        }
    }

    #[test]
    fn projection_heads_are_dropped_and_old_names_noted() {
        let mut keys: Vec<&str> = RESNET
            .iter()
            .copied()
            .filter(|k| !k.starts_with("fc."))
            .collect();
        keys.extend(["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]);
        let k = cnn_keys(&dict("module.encoder_q.", &keys, &[])).unwrap();
        assert_eq!(k.layout, "MoCo v2");
        assert_eq!(k.dropped.len(), 4);
        assert!(
            k.dropped
                .iter()
                .all(|d| d.starts_with("module.encoder_q.fc."))
        );
        assert!(!k.sd.keys().any(|s| s.starts_with("fc.")));
        assert!(!k.old_names);
        let dn = [
            "features.conv0.weight",
            "features.norm0.running_mean",
            "features.denseblock1.denselayer1.norm.1.weight",
        ];
        assert!(cnn_keys(&dict("", &dn, &[])).unwrap().old_names);
    }

    #[test]
    fn other_keys_are_no_cnn() {
        assert!(
            cnn_keys(&dict(
                "",
                &["blocks.0.attn.qkv.weight", "conv1.weight"],
                &[]
            ))
            .is_none()
        );
    }
}
