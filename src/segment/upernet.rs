//! EVA-X + ViTDet pyramid + UperNet, read from an mmsegmentation checkpoint (`state_dict` with
//! `backbone.*` and `decode_head.*`; the stored RoPE tables used at the checkpoint's grid, as
//! mmsegmentation's loading does). Inference: every BatchNorm folded into its convolution
//! (or applied as a per-channel affine in the pyramid), convolutions on the shared kernels,
//! resizing and adaptive pooling as matrix products ([`crate::model::interp::resample`]).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::checkpoint::{Checkpoint, Param};
use crate::compute::Precision;
use crate::kernels;
use crate::model::cnn::{Folded, Ops, Origin, Unit, Weights};
use crate::model::interp::{adaptive_avg_matrix, bilinear_matrix, resample};
use crate::model::rope::RopeTables;
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

/// The pyramid's 2x2, stride-2 transposed convolutions (weight `[in, out, 2, 2]`, bias).
pub(crate) const UPSAMPLES: [&str; 3] = ["backbone.fpn1.0", "backbone.fpn1.3", "backbone.fpn2.0"];

/// The pyramid's BatchNorm.
pub(crate) const PYRAMID_BN: &str = "backbone.fpn1.1";

/// The convolutions and BatchNorms of the pyramid and head, by mmsegmentation key.
pub(crate) fn units(laterals: usize) -> Vec<Unit> {
    let conv_bn = |name: String| Unit::ConvBn {
        conv: format!("decode_head.{name}.conv"),
        bn: format!("decode_head.{name}.bn"),
    };
    let mut units: Vec<Unit> = (0..POOL_SCALES.len())
        .map(|i| conv_bn(format!("psp_modules.{i}.1")))
        .collect();
    units.push(conv_bn("bottleneck".into()));
    for i in 0..laterals {
        units.push(conv_bn(format!("lateral_convs.{i}")));
        units.push(conv_bn(format!("fpn_convs.{i}")));
    }
    units.push(conv_bn("fpn_bottleneck".into()));
    units.push(Unit::Conv("decode_head.conv_seg".into()));
    units
}

/// The pyramid of the last block's feature map `[B, C, gh, gw]`: 4x (transposed conv, BN,
/// GELU, transposed conv), 2x (transposed conv), 1x, 1/2x (2x2 max pool). `upsample` gives a
/// transposed convolution's weight and bias by key.
pub(crate) fn pyramid(
    ops: &dyn Ops,
    upsample: &dyn Fn(&str) -> candle_core::Result<(Tensor, Tensor)>,
    map: &Tensor,
) -> candle_core::Result<[Tensor; 4]> {
    let up = |key: &str, x: &Tensor| {
        let (w, b) = upsample(key)?;
        kernels::upsample2x(ops.kernels(), x, &w, &b)
    };
    let h = up(UPSAMPLES[0], map)?;
    let h = ops.bn(&h, PYRAMID_BN)?;
    let h = kernels::gelu(ops.kernels(), &h, true)?;
    let p0 = up(UPSAMPLES[1], &h)?;
    let p1 = up(UPSAMPLES[2], map)?;
    let p3 = kernels::max_pool(ops.kernels(), map, 2, 2, 0)?;
    Ok([p0, p1, map.clone(), p3])
}

/// mmsegmentation's UPerHead over the four levels: logits at the finest level's size.
pub(crate) fn decode(
    ops: &dyn Ops,
    laterals: usize,
    levels: &[Tensor; 4],
) -> candle_core::Result<Tensor> {
    let conv_bn_relu = |x: &Tensor, name: &str| {
        ops.conv_bn(
            x,
            &format!("decode_head.{name}.conv"),
            &format!("decode_head.{name}.bn"),
            1,
            true,
        )
    };
    let bilinear = |x: &Tensor, like: &Tensor| -> candle_core::Result<Tensor> {
        let (_, _, oh, ow) = like.dims4()?;
        resample(x, (oh, ow), bilinear_matrix)
    };
    // Pyramid pooling on the coarsest level: pool, 1x1 conv, back up, concatenate.
    let top = &levels[3];
    let mut psp = vec![top.clone()];
    for (i, s) in POOL_SCALES.into_iter().enumerate() {
        let pooled = resample(top, (s, s), adaptive_avg_matrix)?;
        let y = conv_bn_relu(&pooled, &format!("psp_modules.{i}.1"))?;
        psp.push(bilinear(&y, top)?);
    }
    let psp = Tensor::cat(&psp, 1)?;
    let mut lateral = Vec::with_capacity(laterals + 1);
    for (i, level) in levels.iter().take(laterals).enumerate() {
        lateral.push(conv_bn_relu(level, &format!("lateral_convs.{i}"))?);
    }
    lateral.push(conv_bn_relu(&psp, "bottleneck")?);
    // Top-down: each level plus the coarser one resized to it.
    for i in (1..lateral.len()).rev() {
        let coarser = bilinear(&lateral[i], &lateral[i - 1])?;
        lateral[i - 1] = (&lateral[i - 1] + coarser)?;
    }
    let mut outs = Vec::with_capacity(lateral.len());
    for (i, l) in lateral.iter().take(laterals).enumerate() {
        outs.push(conv_bn_relu(l, &format!("fpn_convs.{i}"))?);
    }
    outs.push(lateral[laterals].clone());
    let finest = outs[0].clone();
    for o in outs.iter_mut().skip(1) {
        *o = bilinear(o, &finest)?;
    }
    let fused = conv_bn_relu(&Tensor::cat(&outs, 1)?, "fpn_bottleneck")?;
    ops.conv(&fused, "decode_head.conv_seg", 1)
}

/// The last block's patch tokens `[B, 1 + gh * gw, C]` as a map `[B, C, gh, gw]`.
pub(crate) fn token_map(tokens: &Tensor, (gh, gw): (usize, usize)) -> candle_core::Result<Tensor> {
    let (b, t, c) = tokens.dims3()?;
    tokens
        .narrow(1, 1, t - 1)?
        .transpose(1, 2)?
        .reshape((b, c, gh, gw))
}

/// What an mmsegmentation checkpoint says about the head: lateral count, channels, classes
/// (an error unless it is the UPerHead the original builds).
pub(crate) fn head_shape(tensors: &BTreeMap<String, Param>) -> Result<(usize, usize, usize)> {
    if !tensors.keys().any(|k| k.starts_with("decode_head.")) {
        return Err(ModelError::Weights(
            "not a segmentation checkpoint: no decode_head.* keys".into(),
        ));
    }
    let count =
        |f: &dyn Fn(usize) -> String| (0..).take_while(|&i| tensors.contains_key(&f(i))).count();
    let laterals = count(&|i| format!("decode_head.lateral_convs.{i}.conv.weight"));
    let fpn = count(&|i| format!("decode_head.fpn_convs.{i}.conv.weight"));
    let psp = count(&|i| format!("decode_head.psp_modules.{i}.1.conv.weight"));
    let cls = tensors
        .get("decode_head.conv_seg.weight")
        .ok_or_else(|| ModelError::Weights("missing decode_head.conv_seg.weight".into()))?;
    let [classes, channels, 1, 1] = cls.shape[..] else {
        return Err(ModelError::Weights(format!(
            "decode_head.conv_seg.weight has shape {:?}, expected [classes, channels, 1, 1]",
            cls.shape
        )));
    };
    if psp != POOL_SCALES.len() || laterals != 3 || fpn != 3 || channels == 0 || classes == 0 {
        return Err(ModelError::Weights(format!(
            "an UperNet head with {psp} pooling branches, {laterals} laterals and {fpn} FPN \
             convolutions; expected 4, 3 and 3 (mmsegmentation's UPerHead over 4 levels)"
        )));
    }
    Ok((laterals, channels, classes))
}

/// The keys of the backbone proper (not the pyramid, not a head).
pub(crate) fn is_backbone_key(k: &str) -> bool {
    !k.starts_with("backbone.fpn")
        && !k.starts_with("decode_head.")
        && !k.starts_with("auxiliary_head.")
}

/// The EVA-X segmentation model, for inference.
pub struct UperNet {
    backbone: EvaX,
    upsamples: BTreeMap<String, (Tensor, Tensor)>,
    ops: Folded,
    laterals: usize,
    /// Width of the head's convolutions.
    pub channels: usize,
    /// Output channels of the classifier.
    pub classes: usize,
}

impl UperNet {
    /// Load an mmsegmentation checkpoint (`backbone.*`, `decode_head.*`).
    pub fn from_checkpoint(ck: &Checkpoint, opts: &LoadOptions) -> Result<(Self, SegLoadReport)> {
        Self::from_state_dict(&ck.tensors, opts)
    }

    /// [`UperNet::from_checkpoint`] from the state dict.
    pub fn from_state_dict(
        tensors: &BTreeMap<String, Param>,
        opts: &LoadOptions,
    ) -> Result<(Self, SegLoadReport)> {
        let (laterals, channels, classes) = head_shape(tensors)?;
        let (backbone_sd, rest): (BTreeMap<_, _>, BTreeMap<_, _>) = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| is_backbone_key(k));
        let eva = adapt::to_eva_layout(&backbone_sd)?;
        let (backbone, report) = EvaX::from_eva_state_dict(&eva, opts)?;
        // mmsegmentation loads the RoPE buffers with the weights and computes with them.
        let grid = backbone.config.train_grid;
        if let Some(tables) = stored_rope(&eva.tensors, grid) {
            backbone.use_rope_tables(grid, tables)?;
        }
        let mut upsamples = BTreeMap::new();
        for key in UPSAMPLES {
            upsamples.insert(key.to_string(), upsample_weights(&rest, key, opts)?);
        }
        let mut units = units(laterals);
        units.push(Unit::Bn {
            bn: PYRAMID_BN.into(),
            channels: upsamples[UPSAMPLES[0]].0.dim(1)?,
        });
        let mut ws = Weights::new(&rest, &opts.device);
        let mut ops = ws.folded(&units, opts.kernels)?;
        if opts.precision == Precision::Bf16 {
            ops = ops.with_bf16_products()?;
        }
        let head_report = ws.finish("UperNet head", Origin::default())?;
        let neck_params: usize = UPSAMPLES
            .iter()
            .flat_map(|k| [format!("{k}.weight"), format!("{k}.bias")])
            .filter_map(|k| rest.get(&k))
            .map(|p| p.numel())
            .sum();
        let mut unused = report.unused;
        unused.extend(
            head_report
                .unused
                .into_iter()
                .filter(|k| !UPSAMPLES.iter().any(|u| k.starts_with(&format!("{u}.")))),
        );
        let model = UperNet {
            backbone,
            upsamples,
            ops,
            laterals,
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

    /// The input size `(h, w)` the checkpoint was made for (its `pos_embed` grid).
    pub fn default_input_size(&self) -> (usize, usize) {
        let (gh, gw) = self.backbone.config.train_grid;
        let p = self.backbone.config.patch_size;
        (gh * p, gw * p)
    }

    /// The backbone.
    pub fn backbone(&self) -> &EvaX {
        &self.backbone
    }

    /// The four pyramid levels of a batch `[B, 3, H, W]`: 4x, 2x, 1x and 1/2x the patch grid.
    pub fn pyramid(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let grid = self.backbone.grid_of(x)?;
        let map = token_map(&self.backbone.forward_features(x)?, grid)?;
        let upsample = |k: &str| {
            self.upsamples
                .get(k)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("no {k}")))
        };
        Ok(pyramid(&self.ops, &upsample, &map)?)
    }

    /// UperNet's logits at the finest pyramid level (1/4 of the input), `[B, classes, H/4, W/4]`.
    pub fn decode(&self, levels: &[Tensor; 4]) -> Result<Tensor> {
        Ok(decode(&self.ops, self.laterals, levels)?)
    }

    /// Logits resized bilinearly to the input's size, `[B, classes, H, W]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, ih, iw) = x.dims4()?;
        let low = self.decode(&self.pyramid(x)?)?;
        Ok(resample(&low, (ih, iw), bilinear_matrix)?)
    }
}

/// The RoPE tables a checkpoint stores for its own `grid`, if it stores them whole.
pub(crate) fn stored_rope(
    sd: &BTreeMap<String, Param>,
    grid: (usize, usize),
) -> Option<RopeTables> {
    let (cos, sin) = (sd.get("rope.freqs_cos")?, sd.get("rope.freqs_sin")?);
    let shape = [grid.0 * grid.1, 64];
    (cos.shape == shape && sin.shape == shape)
        .then(|| RopeTables::from_parts(cos.data.clone(), sin.data.clone(), 64))
}

/// A transposed convolution's weight `[in, out, 2, 2]` and bias `[out]`, checked.
fn upsample_weights(
    sd: &BTreeMap<String, Param>,
    key: &str,
    opts: &LoadOptions,
) -> Result<(Tensor, Tensor)> {
    let bad = |m: String| ModelError::Weights(m);
    let w = sd
        .get(&format!("{key}.weight"))
        .ok_or_else(|| bad(format!("missing {key}.weight")))?;
    let [_, out, 2, 2] = w.shape[..] else {
        return Err(bad(format!(
            "{key}.weight has shape {:?}, expected [in, out, 2, 2]",
            w.shape
        )));
    };
    let b = sd
        .get(&format!("{key}.bias"))
        .filter(|b| b.shape == [out])
        .ok_or_else(|| bad(format!("{key}.bias missing or not [{out}]")))?;
    Ok((w.to_tensor(&opts.device)?, b.to_tensor(&opts.device)?))
}

/// Random weights of the original's segmentation model (seeded; He-scaled convolutions,
/// BatchNorms with identity statistics): an EVA-X backbone of `config` at its `train_grid`,
/// the pyramid, and an UperNet head of `channels` channels with one output channel.
pub fn random_state_dict(
    config: &crate::model::EvaXConfig,
    channels: usize,
    seed: u64,
) -> BTreeMap<String, Param> {
    use crate::checkpoint::StorageDtype;
    let mut sd: BTreeMap<String, Param> = crate::model::eva_x::random_state_dict(config, seed)
        .tensors
        .into_iter()
        .map(|(k, v)| (format!("backbone.{k}"), v))
        .collect();
    let mut rng = crate::rng::Rng::new(seed ^ 0x7365_6768);
    let mut put = |key: String, shape: Vec<usize>, std: f64| {
        let n = shape.iter().product();
        let half = std * 3f64.sqrt();
        let data = (0..n)
            .map(|_| ((rng.unit() * 2.0 - 1.0) * half) as f32)
            .collect();
        sd.insert(
            key,
            Param {
                dtype: StorageDtype::F32,
                shape,
                data,
            },
        );
    };
    let c = config.dim;
    for key in UPSAMPLES {
        put(
            format!("{key}.weight"),
            vec![c, c, 2, 2],
            (1.0 / c as f64).sqrt(),
        );
        put(format!("{key}.bias"), vec![c], 0.0);
    }
    let mut conv = |name: &str, cin: usize, k: usize| {
        put(
            format!("{name}.conv.weight"),
            vec![channels, cin, k, k],
            (2.0 / (cin * k * k) as f64).sqrt(),
        );
    };
    for i in 0..POOL_SCALES.len() {
        conv(&format!("decode_head.psp_modules.{i}.1"), c, 1);
    }
    conv(
        "decode_head.bottleneck",
        c + POOL_SCALES.len() * channels,
        3,
    );
    for i in 0..3 {
        conv(&format!("decode_head.lateral_convs.{i}"), c, 1);
        conv(&format!("decode_head.fpn_convs.{i}"), channels, 3);
    }
    conv("decode_head.fpn_bottleneck", 4 * channels, 3);
    put(
        "decode_head.conv_seg.weight".into(),
        vec![1, channels, 1, 1],
        0.01,
    );
    put("decode_head.conv_seg.bias".into(), vec![1], 0.0);
    // BatchNorms with identity statistics: the head's (width `channels`) and the pyramid's.
    let bns = units(3).into_iter().filter_map(|u| match u {
        Unit::ConvBn { bn, .. } => Some((bn, channels)),
        _ => None,
    });
    for (bn, n) in bns.chain([(PYRAMID_BN.to_string(), c)]) {
        for (stat, v) in [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            let data = vec![v; n];
            let p = Param {
                dtype: StorageDtype::F32,
                shape: vec![n],
                data,
            };
            sd.insert(format!("{bn}.{stat}"), p);
        }
    }
    sd
}

/// Forward FLOPs of the pyramid and head for one image of `grid` patches (width `dim`, head
/// `channels`): the convolutions' and transposed convolutions' multiply-adds x 2.
pub fn head_flops((gh, gw): (usize, usize), dim: usize, channels: usize) -> f64 {
    let (c, ch) = (dim as f64, channels as f64);
    let px = |s: usize| (gh * s * gw * s) as f64;
    let up = 2.0 * c * c * 4.0 * (px(1) + px(2) + px(1));
    let psp: f64 = POOL_SCALES
        .iter()
        .map(|&s| 2.0 * (s * s) as f64 * c * ch)
        .sum();
    let quarter = (gh * gw) as f64 / 4.0;
    let bottleneck = 2.0 * quarter * (c + 4.0 * ch) * ch * 9.0;
    let levels = [px(4), px(2), px(1)];
    let laterals: f64 = levels.iter().map(|p| 2.0 * p * c * ch).sum();
    let fpn: f64 = levels.iter().map(|p| 2.0 * p * ch * ch * 9.0).sum();
    let fuse = 2.0 * px(4) * 4.0 * ch * ch * 9.0;
    up + psp + bottleneck + laterals + fpn + fuse
}
