//! Fine-tuning settings: the presets shipped in `presets/` (the seed's `train_files`), a config
//! file, and `key=value` overrides, in that order.

use serde::{Deserialize, Serialize};

/// Every setting of a fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Dataset: cxr14, chexpert, covidx3, covidx4 (or "synthetic" for the demo).
    pub dataset: String,
    /// The model the recipe is for: an EVA-X size (ti, s, b) or a baseline (r50, dn121,
    /// vit-s); initialised at random when no weights are given, and weights of another family
    /// are refused.
    pub model: String,
    /// Input side in pixels.
    pub input_size: usize,
    /// Images per forward/backward pass.
    pub batch_size: usize,
    /// Passes accumulated per optimiser step.
    pub accum_iter: usize,
    /// Epochs.
    pub epochs: usize,
    /// Linear warm-up, in epochs (fractional allowed).
    pub warmup_epochs: f64,
    /// Base learning rate (not scaled by the batch size, as the original).
    pub lr: f64,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
    /// Constant learning rate after warm-up.
    pub fixed_lr: bool,
    /// Layer-wise learning-rate decay.
    pub layer_decay: f64,
    /// Weight decay (not on 1-D parameters, pos_embed, cls_token).
    pub weight_decay: f64,
    /// Stochastic depth of the last block (linear from 0).
    pub drop_path: f64,
    /// Label smoothing (cross-entropy datasets only).
    pub smoothing: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip_grad: f64,
    /// "timm" (RandomResizedCrop + flip + RandAugment) or "plain" (the evaluation transform).
    pub augment: String,
    /// RandAugment policy of the timm path.
    pub rand_augment: String,
    /// Share of the training list used (seeded subset, repeated to the full length).
    pub data_pct: f64,
    /// CheXpert's "fake epochs": each epoch draws len / N images, image i of the epoch taken
    /// from a random one of the N segments of the list (1: ordinary epochs).
    pub fake_epoch_div: usize,
    /// Segments a fake epoch draws from, the first ones (0: all N). The original draws
    /// `randint(0, 9)` of 20 segments, so its CheXpert presets set 10.
    pub fake_epoch_segments: usize,
    /// Evaluate every N epochs (and after the last).
    pub eval_every: usize,
    /// Split trained on.
    pub train_split: String,
    /// Split evaluated and used to choose `best`.
    pub eval_split: String,
    /// Metric choosing `best`: mauc or accuracy.
    pub select_metric: String,
    /// Seed of data order, augmentation, drop path and head initialisation.
    pub seed: u64,
    /// Save a resumable checkpoint every N optimiser steps (0: at epoch ends only).
    pub save_every_steps: usize,
    /// CheXpert uncertainty policy.
    pub uncertainty: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: "cxr14".into(),
            model: "s".into(),
            input_size: 224,
            batch_size: 32,
            accum_iter: 1,
            epochs: 10,
            warmup_epochs: 1.0,
            lr: 1e-3,
            min_lr: 1e-6,
            fixed_lr: false,
            layer_decay: 0.55,
            weight_decay: 0.05,
            drop_path: 0.2,
            smoothing: 0.0,
            clip_grad: 0.0,
            augment: "plain".into(),
            rand_augment: "rand-m6-mstd0.5-inc1".into(),
            data_pct: 1.0,
            fake_epoch_div: 1,
            fake_epoch_segments: 0,
            eval_every: 1,
            train_split: "train".into(),
            eval_split: "val".into(),
            select_metric: "mauc".into(),
            seed: 0,
            save_every_steps: 50,
            uncertainty: "original".into(),
        }
    }
}

/// The presets shipped with evax, by name.
pub const PRESETS: [(&str, &str); 14] = [
    ("cxr14-ti", include_str!("../../presets/cxr14-ti.toml")),
    ("cxr14-s", include_str!("../../presets/cxr14-s.toml")),
    ("cxr14-b", include_str!("../../presets/cxr14-b.toml")),
    ("cxr14-r50", include_str!("../../presets/cxr14-r50.toml")),
    (
        "cxr14-dn121",
        include_str!("../../presets/cxr14-dn121.toml"),
    ),
    (
        "cxr14-vit-s",
        include_str!("../../presets/cxr14-vit-s.toml"),
    ),
    (
        "chexpert-ti",
        include_str!("../../presets/chexpert-ti.toml"),
    ),
    ("chexpert-s", include_str!("../../presets/chexpert-s.toml")),
    (
        "covidx3-s-100pct",
        include_str!("../../presets/covidx3-s-100pct.toml"),
    ),
    (
        "covidx3-s-10pct",
        include_str!("../../presets/covidx3-s-10pct.toml"),
    ),
    (
        "covidx3-s-1pct",
        include_str!("../../presets/covidx3-s-1pct.toml"),
    ),
    (
        "covidx4-s-100pct",
        include_str!("../../presets/covidx4-s-100pct.toml"),
    ),
    (
        "covidx4-s-10pct",
        include_str!("../../presets/covidx4-s-10pct.toml"),
    ),
    (
        "covidx4-s-1pct",
        include_str!("../../presets/covidx4-s-1pct.toml"),
    ),
];

impl TrainConfig {
    /// Build from an optional preset, an optional config file's text, and `key=value` overrides.
    pub fn build(
        preset: Option<&str>,
        file: Option<&str>,
        overrides: &[String],
    ) -> crate::Result<Self> {
        let mut table = toml::Table::new();
        if let Some(p) = preset {
            let text = PRESETS
                .iter()
                .find(|(n, _)| *n == p)
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                    format!("unknown preset '{p}' (presets: {})", names.join(", "))
                })?;
            table.extend(
                text.parse::<toml::Table>()
                    .map_err(|e| format!("preset {p}: {e}"))?,
            );
        }
        if let Some(text) = file {
            table.extend(
                text.parse::<toml::Table>()
                    .map_err(|e| format!("config file: {e}"))?,
            );
        }
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| format!("--set '{o}': expected key=value"))?;
            let value = format!("v = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|t| t.get("v").cloned())
                .unwrap_or_else(|| toml::Value::String(v.trim().to_string()));
            table.insert(k.trim().to_string(), value);
        }
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| format!("settings: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> crate::Result<()> {
        if self.batch_size == 0 || self.accum_iter == 0 || self.epochs == 0 {
            return Err("batch_size, accum_iter and epochs must be positive".into());
        }
        if !self.input_size.is_multiple_of(16) || self.input_size == 0 {
            return Err(crate::Error::Invalid(format!(
                "input_size {} is not a positive multiple of 16",
                self.input_size
            )));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(crate::Error::Invalid(format!(
                "drop_path {} is not in [0, 1)",
                self.drop_path
            )));
        }
        if !matches!(self.augment.as_str(), "timm" | "plain") {
            return Err(crate::Error::Invalid(format!(
                "augment '{}': timm or plain",
                self.augment
            )));
        }
        if !matches!(self.select_metric.as_str(), "mauc" | "accuracy") {
            return Err(crate::Error::Invalid(format!(
                "select_metric '{}': mauc or accuracy",
                self.select_metric
            )));
        }
        if self.fake_epoch_div == 0 {
            return Err("fake_epoch_div must be at least 1".into());
        }
        if !(self.data_pct > 0.0 && self.data_pct <= 1.0) {
            return Err(crate::Error::Invalid(format!(
                "data_pct {} is not in (0, 1]",
                self.data_pct
            )));
        }
        Ok(())
    }

    /// As TOML, for the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_overrides_apply() {
        for (name, _) in PRESETS {
            TrainConfig::build(Some(name), None, &[]).unwrap();
        }
        let c = TrainConfig::build(
            Some("cxr14-s"),
            Some("epochs = 3\nlr = 5e-4"),
            &["batch_size=8".into(), "eval_split=test".into()],
        )
        .unwrap();
        assert_eq!(
            (c.epochs, c.lr, c.batch_size, c.eval_split.as_str()),
            (3, 5e-4, 8, "test")
        );
        assert_eq!(c.layer_decay, 0.55);
        assert!(
            TrainConfig::build(None, None, &["epochz=3".into()])
                .unwrap_err()
                .to_string()
                .contains("epochz")
        );
        assert!(TrainConfig::build(Some("nope"), None, &[]).is_err());
    }

    #[test]
    fn presets_have_the_seeds_effective_batch_four_gpus_times_per_gpu() {
        let effective = |p: &str| {
            let c = TrainConfig::build(Some(p), None, &[]).unwrap();
            c.batch_size * c.accum_iter
        };
        let want = [
            ("cxr14-ti", 1024),
            ("cxr14-s", 1024),
            ("cxr14-b", 512),
            ("chexpert-ti", 1024),
            ("chexpert-s", 1024),
            ("covidx3-s-100pct", 512),
            ("covidx3-s-10pct", 512),
            ("covidx3-s-1pct", 512),
            ("covidx4-s-100pct", 512),
            ("covidx4-s-10pct", 512),
            ("covidx4-s-1pct", 512),
            ("cxr14-r50", 1024),
            ("cxr14-dn121", 1024),
            ("cxr14-vit-s", 1024),
        ];
        assert_eq!(want.len(), PRESETS.len());
        for (p, b) in want {
            assert_eq!(effective(p), b, "{p}");
        }
        for p in ["chexpert-ti", "chexpert-s"] {
            let c = TrainConfig::build(Some(p), None, &[]).unwrap();
            assert_eq!((c.fake_epoch_div, c.fake_epoch_segments), (20, 10), "{p}");
        }
        let c = TrainConfig::build(Some("cxr14-r50"), None, &[]).unwrap();
        assert_eq!(
            (c.epochs, c.lr, c.min_lr, c.layer_decay),
            (75, 2.5e-4, 1e-5, 1.0)
        );
        let c = TrainConfig::build(Some("cxr14-vit-s"), None, &[]).unwrap();
        assert_eq!(
            (c.layer_decay, c.drop_path, c.model.as_str()),
            (0.55, 0.2, "vit-s")
        );
    }
}
