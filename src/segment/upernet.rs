//! EVA-X + ViTDet pyramid + UperNet, read from an mmsegmentation checkpoint (`state_dict` with
//! `backbone.*` and `decode_head.*`; the stored RoPE tables used at the checkpoint's grid, as
//! mmsegmentation's loading does). Inference: every BatchNorm folded into its convolution
//! (or applied as a per-channel affine in the pyramid), convolutions on the shared kernels,
//! resizing and adaptive pooling as matrix products ([`crate::model::interp::resample`]).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::checkpoint::{Checkpoint, Param};
use crate::kernels::{self, Kernels};
use crate::model::cnn::{Folded, Ops, Origin, Unit, Weights};
use crate::model::interp::{adaptive_avg_matrix, bilinear_matrix, resample};
use crate::model::{EvaX, LoadOptions, ModelError, adapt};

type Result<T> = std::result::Result<T, ModelError>;

/// mmsegmentation's pyramid pooling scales (the only ones the original uses).
const POOL_SCALES: [usize; 4] = [1, 2, 3, 6];

/// What loading a segmentation checkpoint found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegLoadReport {
    /// Keys present but not used.
    pub unused: Vec<String>,
    /// Learned parameters (backbone, pyramid and head).
    pub parameters: usize,
    /// Width of the head's convolutions.
    pub channels: usize,
    /// Output channels of the classifier (1: sigmoid foreground).
    pub classes: usize,
}

/// A 2x2, stride-2 transposed convolution as a matrix `[in, out * 4]` and a bias `[out]`.
struct Upsample2x {
    weight: Tensor,
    bias: Tensor,
    out: usize,
}

impl Upsample2x {
    fn load(sd: &BTreeMap<String, Param>, key: &str, opts: &LoadOptions) -> Result<Self> {
        let bad = |m: String| ModelError::Weights(m);
        let w = sd
            .get(&format!("{key}.weight"))
            .ok_or_else(|| bad(format!("missing {key}.weight")))?;
        let [cin, out, 2, 2] = w.shape[..] else {
            return Err(bad(format!(
                "{key}.weight has shape {:?}, expected [in, out, 2, 2]",
                w.shape
            )));
        };
        let b = sd
            .get(&format!("{key}.bias"))
            .filter(|b| b.shape == [out])
            .ok_or_else(|| bad(format!("{key}.bias missing or not [{out}]")))?;
        Ok(Upsample2x {
            weight: w.to_tensor(&opts.device)?.reshape((cin, out * 4))?,
            bias: b.to_tensor(&opts.device)?.reshape((1, out, 1, 1))?,
            out,
        })
    }

    /// `[B, C, H, W]` to `[B, out, 2H, 2W]`: each input pixel writes its own 2x2 block.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let rows = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        let y = rows.matmul(&self.weight)?;
        y.reshape((b, h, w, self.out, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((b, self.out, 2 * h, 2 * w))?
            .broadcast_add(&self.bias)
    }
}

/// The EVA-X segmentation model.
pub struct UperNet {
    backbone: EvaX,
    fpn1_up: Upsample2x,
    fpn1_out: Upsample2x,
    fpn2: Upsample2x,
    head: Folded,
    laterals: usize,
    kernels: Kernels,
    /// Width of the head's convolutions.
    pub channels: usize,
    /// Output channels of the classifier.
    pub classes: usize,
}

impl UperNet {
    /// Load an mmsegmentation checkpoint (`backbone.*`, `decode_head.*`).
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, SegLoadReport)> {
        let is_neck = |k: &str| k.starts_with("backbone.fpn");
        let is_head = |k: &str| k.starts_with("decode_head.") || k.starts_with("auxiliary_head.");
        let backbone_sd: BTreeMap<String, Param> = ck
            .tensors
            .iter()
            .filter(|(k, _)| !is_neck(k) && !is_head(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !ck.tensors.keys().any(|k| k.starts_with("decode_head.")) {
            return Err(ModelError::Weights(
                "not a segmentation checkpoint: no decode_head.* keys".into(),
            ));
        }
        let eva = adapt::to_eva_layout(&backbone_sd)?;
        let (backbone, report) = EvaX::from_eva_state_dict(&eva, opts)?;
        // mmsegmentation loads the RoPE buffers with the weights and computes with them.
        if let (Some(cos), Some(sin)) = (
            eva.tensors.get("rope.freqs_cos"),
            eva.tensors.get("rope.freqs_sin"),
        ) {
            let grid = backbone.config.train_grid;
            if cos.shape == [grid.0 * grid.1, 64] {
                backbone.use_rope_tables(grid, &cos.data, &sin.data)?;
            }
        }
        // Pyramid and head, prefixes removed.
        let sub = |prefix: &str| -> BTreeMap<String, Param> {
            ck.tensors
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect()
        };
        let neck = sub("backbone.");
        let fpn1_up = Upsample2x::load(&neck, "fpn1.0", opts)?;
        let fpn1_out = Upsample2x::load(&neck, "fpn1.3", opts)?;
        let fpn2 = Upsample2x::load(&neck, "fpn2.0", opts)?;
        let head_sd = sub("decode_head.");
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| head_sd.contains_key(&format!("{prefix}.{i}.conv.weight")))
                .count()
        };
        let laterals = count("lateral_convs");
        let psp = (0..)
            .take_while(|i| head_sd.contains_key(&format!("psp_modules.{i}.1.conv.weight")))
            .count();
        let cls = head_sd
            .get("conv_seg.weight")
            .ok_or_else(|| ModelError::Weights("missing decode_head.conv_seg.weight".into()))?;
        let [classes, channels, 1, 1] = cls.shape[..] else {
            return Err(ModelError::Weights(format!(
                "decode_head.conv_seg.weight has shape {:?}, expected [classes, channels, 1, 1]",
                cls.shape
            )));
        };
        if psp != POOL_SCALES.len() || laterals != 3 || count("fpn_convs") != 3 || channels == 0 {
            return Err(ModelError::Weights(format!(
                "an UperNet head with {psp} pooling branches, {laterals} laterals and {} FPN \
                 convolutions; expected 4, 3 and 3 (mmsegmentation's UPerHead over 4 levels)",
                count("fpn_convs")
            )));
        }
        let conv_bn = |name: String| Unit::ConvBn {
            conv: format!("{name}.conv"),
            bn: format!("{name}.bn"),
        };
        let mut units: Vec<Unit> = (0..psp)
            .map(|i| conv_bn(format!("psp_modules.{i}.1")))
            .collect();
        units.push(conv_bn("bottleneck".into()));
        for i in 0..laterals {
            units.push(conv_bn(format!("lateral_convs.{i}")));
            units.push(conv_bn(format!("fpn_convs.{i}")));
        }
        units.push(conv_bn("fpn_bottleneck".into()));
        units.push(Unit::Conv("conv_seg".into()));
        let mut ws = Weights::new(&head_sd, &opts.device);
        let head = ws.folded(&units, opts.kernels)?;
        let head_report = ws.finish("UperNet head", Origin::default())?;
        // The pyramid's BatchNorm, applied as a per-channel affine.
        let mut ws = Weights::new(&neck, &opts.device);
        let bn = ws.folded(
            &[Unit::Bn {
                bn: "fpn1.1".into(),
                channels: fpn1_up.out,
            }],
            opts.kernels,
        )?;
        let head = head.merged(bn);
        let neck_params: usize = neck
            .iter()
            .filter(|(k, _)| k.starts_with("fpn") && (k.ends_with("weight") || k.ends_with("bias")))
            .map(|(_, p)| p.numel())
            .sum();
        let mut unused: Vec<String> = report.unused.into_iter().filter(|k| !is_neck(k)).collect();
        unused.extend(
            head_report
                .unused
                .iter()
                .map(|k| format!("decode_head.{k}")),
        );
        let model = UperNet {
            backbone,
            fpn1_up,
            fpn1_out,
            fpn2,
            head,
            laterals,
            kernels: opts.kernels,
            channels,
            classes,
        };
        let parameters = report.parameters + neck_params + head_report.parameters;
        Ok((
            model,
            SegLoadReport {
                unused,
                parameters,
                channels,
                classes,
            },
        ))
    }

    /// The backbone.
    pub fn backbone(&self) -> &EvaX {
        &self.backbone
    }

    /// The four pyramid levels of a batch `[B, 3, H, W]`: 4x, 2x, 1x and 1/2x the patch grid.
    pub fn pyramid(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let (gh, gw) = self.backbone.grid_of(x)?;
        let tokens = self.backbone.forward_features(x)?;
        let (b, t, c) = tokens.dims3()?;
        let map = tokens
            .narrow(1, 1, t - 1)?
            .transpose(1, 2)?
            .reshape((b, c, gh, gw))?;
        let up = self.fpn1_up.forward(&map)?;
        let up = self.head.bn(&up, "fpn1.1")?;
        let up = kernels::gelu(self.kernels, &up, false)?;
        let p0 = self.fpn1_out.forward(&up)?;
        let p1 = self.fpn2.forward(&map)?;
        let p3 = kernels::max_pool(self.kernels, &map, 2, 2, 0)?;
        Ok([p0, p1, map, p3])
    }

    /// UperNet's logits at the finest pyramid level (1/4 of the input), `[B, classes, H/4, W/4]`.
    pub fn decode(&self, levels: &[Tensor; 4]) -> Result<Tensor> {
        let h = &self.head;
        let bilinear = |x: &Tensor, like: &Tensor| -> candle_core::Result<Tensor> {
            let (_, _, oh, ow) = like.dims4()?;
            resample(x, (oh, ow), bilinear_matrix)
        };
        // Pyramid pooling on the coarsest level: pool, 1x1 conv, back up, concatenate.
        let top = &levels[3];
        let (_, _, th, tw) = top.dims4()?;
        let mut psp = vec![top.clone()];
        for (i, s) in POOL_SCALES.into_iter().enumerate() {
            let pooled = resample(top, (s, s), adaptive_avg_matrix)?;
            let name = format!("psp_modules.{i}.1");
            let y = h.conv_bn(&pooled, &format!("{name}.conv"), "", 1, true)?;
            psp.push(resample(&y, (th, tw), bilinear_matrix)?);
        }
        let psp = Tensor::cat(&psp, 1)?;
        let mut laterals = Vec::with_capacity(self.laterals + 1);
        for (i, level) in levels.iter().take(self.laterals).enumerate() {
            laterals.push(h.conv_bn(level, &format!("lateral_convs.{i}.conv"), "", 1, true)?);
        }
        laterals.push(h.conv_bn(&psp, "bottleneck.conv", "", 1, true)?);
        // Top-down: each level plus the coarser one resized to it.
        for i in (1..laterals.len()).rev() {
            let coarser = bilinear(&laterals[i], &laterals[i - 1])?;
            laterals[i - 1] = (&laterals[i - 1] + coarser)?;
        }
        let mut outs = Vec::with_capacity(laterals.len());
        for (i, l) in laterals.iter().take(self.laterals).enumerate() {
            outs.push(h.conv_bn(l, &format!("fpn_convs.{i}.conv"), "", 1, true)?);
        }
        outs.push(laterals[self.laterals].clone());
        let finest = outs[0].clone();
        for o in outs.iter_mut().skip(1) {
            *o = bilinear(o, &finest)?;
        }
        let fused = h.conv_bn(&Tensor::cat(&outs, 1)?, "fpn_bottleneck.conv", "", 1, true)?;
        Ok(h.conv(&fused, "conv_seg", 1)?)
    }

    /// Logits resized bilinearly to the input's size, `[B, classes, H, W]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, ih, iw) = x.dims4()?;
        let low = self.decode(&self.pyramid(x)?)?;
        Ok(resample(&low, (ih, iw), bilinear_matrix)?)
    }
}
