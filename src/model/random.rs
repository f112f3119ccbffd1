//! Random weights for the standard architectures of the seed's comparison (torchvision's
//! ResNet-50 and DenseNet-121, the original's ViT-S/16), with their forward FLOPs: what
//! `evax bench --model r50|dn121|vit-s` runs.

use std::collections::BTreeMap;

use crate::checkpoint::{Checkpoint, Param, StorageDtype};
use crate::rng::Rng;

/// A state dict under construction with seeded uniform values.
struct Builder {
    sd: BTreeMap<String, Param>,
    rng: Rng,
}

impl Builder {
    fn new(seed: u64) -> Self {
        Builder {
            sd: BTreeMap::new(),
            rng: Rng::new(seed),
        }
    }

    fn put(&mut self, key: String, shape: Vec<usize>, data: Vec<f32>) {
        let dtype = StorageDtype::F32;
        self.sd.insert(key, Param { dtype, shape, data });
    }

    /// Uniform values of standard deviation `std`.
    fn random(&mut self, key: String, shape: Vec<usize>, std: f64) {
        let n = shape.iter().product();
        let half = std * 3f64.sqrt();
        let data = (0..n)
            .map(|_| ((self.rng.unit() * 2.0 - 1.0) * half) as f32)
            .collect();
        self.put(key, shape, data);
    }

    fn constant(&mut self, key: String, n: usize, v: f32) {
        self.put(key, vec![n], vec![v; n]);
    }

    /// A bias-free convolution with He-scaled weights.
    fn conv(&mut self, key: &str, cout: usize, cin: usize, k: usize) {
        let std = (2.0 / (cin * k * k) as f64).sqrt();
        self.random(format!("{key}.weight"), vec![cout, cin, k, k], std);
    }

    /// torchvision's convolution initialisation: normal, std sqrt(2 / (cout * k * k)).
    fn he_normal(&mut self, key: &str, cout: usize, cin: usize, k: usize) {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let n = cout * cin * k * k;
        let data = (0..n)
            .map(|_| {
                // Box-Muller.
                let (u, v) = (1.0 - self.rng.unit(), self.rng.unit());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * std) as f32
            })
            .collect();
        self.put(format!("{key}.weight"), vec![cout, cin, k, k], data);
    }

    /// A BatchNorm with identity statistics.
    fn bn(&mut self, key: &str, c: usize) {
        self.constant(format!("{key}.weight"), c, 1.0);
        self.constant(format!("{key}.bias"), c, 0.0);
        self.constant(format!("{key}.running_mean"), c, 0.0);
        self.constant(format!("{key}.running_var"), c, 1.0);
    }

    fn linear(&mut self, key: &str, out: usize, inp: usize) {
        self.random(format!("{key}.weight"), vec![out, inp], 0.02);
        self.constant(format!("{key}.bias"), out, 0.0);
    }

    fn layer_norm(&mut self, key: &str, c: usize) {
        self.constant(format!("{key}.weight"), c, 1.0);
        self.constant(format!("{key}.bias"), c, 0.0);
    }
}

/// Add ResNet stage `stage` (`blocks` Bottlenecks of width `width`, `cin` input channels,
/// the first with a stride-2 downsample) to `sd`, initialised as torchvision does: He-normal
/// convolutions (fan out), BatchNorm 1 / 0 with identity statistics.
pub(crate) fn resnet_stage(
    sd: &mut BTreeMap<String, Param>,
    stage: usize,
    blocks: usize,
    width: usize,
    cin: usize,
    seed: u64,
) {
    let mut b = Builder::new(seed ^ 0x7265_736e);
    b.resnet_stage(stage, blocks, width, cin, Builder::he_normal);
    sd.extend(b.sd);
}

impl Builder {
    /// ResNet stage `stage` as [`resnet_stage`] describes it, the convolutions drawn by
    /// `conv`; returns its output channels.
    fn resnet_stage(
        &mut self,
        stage: usize,
        blocks: usize,
        width: usize,
        cin: usize,
        conv: fn(&mut Self, &str, usize, usize, usize),
    ) -> usize {
        let mut cin = cin;
        for i in 0..blocks {
            let p = format!("layer{stage}.{i}");
            conv(self, &format!("{p}.conv1"), width, cin, 1);
            self.bn(&format!("{p}.bn1"), width);
            conv(self, &format!("{p}.conv2"), width, width, 3);
            self.bn(&format!("{p}.bn2"), width);
            conv(self, &format!("{p}.conv3"), 4 * width, width, 1);
            self.bn(&format!("{p}.bn3"), 4 * width);
            if i == 0 {
                conv(self, &format!("{p}.downsample.0"), 4 * width, cin, 1);
                self.bn(&format!("{p}.downsample.1"), 4 * width);
            }
            cin = 4 * width;
        }
        cin
    }
}

/// The architectures `evax bench` can time besides EVA-X.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// torchvision ResNet-50.
    ResNet50,
    /// torchvision DenseNet-121.
    DenseNet121,
    /// The original's ViT-S/16 (global pooling, `fc_norm`).
    VitS,
}

impl Baseline {
    /// By its bench name (`r50`, `dn121`, `vit-s`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "r50" | "resnet50" => Some(Baseline::ResNet50),
            "dn121" | "densenet121" => Some(Baseline::DenseNet121),
            "vit-s" | "vits" => Some(Baseline::VitS),
            _ => None,
        }
    }

    /// Forward FLOPs of one square image of `input` pixels (multiply-adds x 2 of the
    /// convolutions and matrix products, the usual count: 8.2 / 5.7 / 9.2 GFLOP at 224).
    pub fn flops_per_image(self, input: usize) -> f64 {
        let scale = (input as f64 / 224.0).powi(2);
        match self {
            Baseline::ResNet50 => 8.18e9 * scale,
            Baseline::DenseNet121 => 5.72e9 * scale,
            Baseline::VitS => {
                let cfg = crate::model::EvaXConfig::preset("s").expect("preset");
                // Same matrix products as EVA-X-S but a GELU MLP of 1536 instead of SwiGLU.
                let g = input / 16;
                let t = (g * g + 1) as f64;
                let c = 384.0;
                let block = 2.0 * t * c * 3.0 * c
                    + 4.0 * t * t * c
                    + 2.0 * t * c * c
                    + 2.0 * 2.0 * t * c * 1536.0;
                2.0 * (g * g) as f64 * c * 768.0 + cfg.depth as f64 * block
            }
        }
    }

    /// Random weights with a 14-class head.
    pub fn random_checkpoint(self, seed: u64) -> Checkpoint {
        let mut b = Builder::new(seed);
        match self {
            Baseline::ResNet50 => {
                b.conv("conv1", 64, 3, 7);
                b.bn("bn1", 64);
                let mut cin = 64;
                for (s, (&n, &w)) in [3, 4, 6, 3].iter().zip(&[64, 128, 256, 512]).enumerate() {
                    cin = b.resnet_stage(s + 1, n, w, cin, Builder::conv);
                }
                b.linear("fc", 14, 2048);
            }
            Baseline::DenseNet121 => {
                b.conv("features.conv0", 64, 3, 7);
                b.bn("features.norm0", 64);
                let mut c = 64;
                for (bi, &n) in [6, 12, 24, 16].iter().enumerate() {
                    for l in 1..=n {
                        let p = format!("features.denseblock{}.denselayer{l}", bi + 1);
                        b.bn(&format!("{p}.norm1"), c);
                        b.conv(&format!("{p}.conv1"), 128, c, 1);
                        b.bn(&format!("{p}.norm2"), 128);
                        b.conv(&format!("{p}.conv2"), 32, 128, 3);
                        c += 32;
                    }
                    if bi < 3 {
                        let p = format!("features.transition{}", bi + 1);
                        b.bn(&format!("{p}.norm"), c);
                        b.conv(&format!("{p}.conv"), c / 2, c, 1);
                        c /= 2;
                    }
                }
                b.bn("features.norm5", c);
                b.linear("classifier", 14, c);
            }
            Baseline::VitS => {
                let (c, depth) = (384, 12);
                b.random("patch_embed.proj.weight".into(), vec![c, 3, 16, 16], 0.02);
                b.constant("patch_embed.proj.bias".into(), c, 0.0);
                b.random("cls_token".into(), vec![1, 1, c], 0.02);
                b.random("pos_embed".into(), vec![1, 197, c], 0.02);
                for i in 0..depth {
                    let p = format!("blocks.{i}");
                    b.layer_norm(&format!("{p}.norm1"), c);
                    b.linear(&format!("{p}.attn.qkv"), 3 * c, c);
                    b.linear(&format!("{p}.attn.proj"), c, c);
                    b.layer_norm(&format!("{p}.norm2"), c);
                    b.linear(&format!("{p}.mlp.fc1"), 4 * c, c);
                    b.linear(&format!("{p}.mlp.fc2"), c, 4 * c);
                }
                b.layer_norm("fc_norm", c);
                b.linear("head", 14, c);
            }
        }
        Checkpoint::in_memory(b.sd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::registry::{self, Family};

    #[test]
    fn random_baselines_are_recognised_as_their_families() {
        for (b, family, params) in [
            (Baseline::ResNet50, Family::ResNet, 23_536_718),
            (Baseline::DenseNet121, Family::DenseNet, 6_968_206),
            (Baseline::VitS, Family::Vit, 21_671_054),
        ] {
            let ck = b.random_checkpoint(0);
            assert_eq!(registry::recognise(&ck).unwrap(), family);
            let (m, report) = registry::load(&ck, &Default::default()).unwrap();
            assert_eq!(m.num_classes(), Some(14));
            assert!(report.unused.is_empty(), "{:?}", report.unused);
            assert_eq!(report.parameters, params, "{b:?}");
        }
    }
}
