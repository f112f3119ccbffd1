//! Adapting checkpoints from the wild to the EVA-X (models_eva) key layout, apart from the model
//! itself: locating the backbone under a prefix, timm renames, and resampling learned grids for
//! another input or patch size.

use std::collections::BTreeMap;

use super::ModelError;
use super::interp::resize_grid_bicubic;
use crate::checkpoint::Param;

/// Prefixes under which a backbone may sit in a larger checkpoint, tried in order.
const BACKBONE_PREFIXES: [&str; 6] = ["", "module.", "visual.", "backbone.", "encoder.", "model."];

/// timm `Eva` names -> models_eva names (suffix after `blocks.N.`).
const TIMM_RENAMES: [(&str, &str); 7] = [
    ("mlp.fc1_g.", "mlp.w1."),
    ("mlp.fc1_x.", "mlp.w2."),
    ("mlp.fc1.", "mlp.w12."),
    ("mlp.fc2.", "mlp.w3."),
    ("mlp.norm.", "mlp.ffn_ln."),
    ("attn.q_proj.bias", "attn.q_bias"),
    ("attn.v_proj.bias", "attn.v_bias"),
];

/// A state dict in the models_eva layout, with the keys that were set aside.
#[derive(Debug, Clone)]
pub struct EvaStateDict {
    /// Tensors by models_eva key.
    pub tensors: BTreeMap<String, Param>,
    /// The prefix the backbone was found under (empty for none).
    pub prefix: String,
    /// Whether timm names were translated.
    pub from_timm: bool,
    /// Keys outside the backbone prefix (not used by the backbone).
    pub outside: Vec<String>,
}

/// Find the EVA-X backbone in a flat state dict and bring it to the models_eva layout.
pub fn to_eva_layout(tensors: &BTreeMap<String, Param>) -> Result<EvaStateDict, ModelError> {
    let prefix = BACKBONE_PREFIXES
        .iter()
        .find(|p| tensors.contains_key(&format!("{p}patch_embed.proj.weight")))
        .ok_or_else(|| {
            ModelError::Weights(
                "no EVA-X backbone: no patch_embed.proj.weight key (under any of the prefixes \
                 '', module., visual., backbone., encoder., model.)"
                    .to_string(),
            )
        })?;
    let mut out = BTreeMap::new();
    let mut outside = Vec::new();
    let mut from_timm = false;
    for (k, v) in tensors {
        let Some(rest) = k.strip_prefix(prefix) else {
            outside.push(k.clone());
            continue;
        };
        let mut name = rest.to_owned();
        if let Some(after) = name.strip_prefix("blocks.")
            && let Some((n, suffix)) = after.split_once('.')
        {
            for (timm, eva) in TIMM_RENAMES {
                if let Some(tail) = suffix.strip_prefix(timm) {
                    name = format!("blocks.{n}.{eva}{tail}");
                    from_timm = true;
                    break;
                }
            }
        }
        out.insert(name, v.clone());
    }
    Ok(EvaStateDict {
        tensors: out,
        prefix: prefix.to_string(),
        from_timm,
        outside,
    })
}

/// Resample a `pos_embed` `[1, 1 + g*g, C]` (class entry first) to a `gh x gw` grid, bicubically
/// as the original does; the class entry is kept.
pub fn resample_pos_embed(pos: &Param, (gh, gw): (usize, usize)) -> Result<Param, ModelError> {
    let [1, n, c] = pos.shape[..] else {
        return Err(ModelError::Weights(format!(
            "pos_embed has shape {:?}, expected [1, 1 + g*g, C]",
            pos.shape
        )));
    };
    let g = (n.saturating_sub(1) as f64).sqrt().round() as usize;
    if n == 0 || c == 0 || g * g + 1 != n {
        return Err(ModelError::Weights(format!(
            "pos_embed has {n} entries: not 1 + a square grid"
        )));
    }
    if (g, g) == (gh, gw) {
        return Ok(pos.clone());
    }
    let grid = resize_grid_bicubic(&pos.data[c..], (g, g), c, (gh, gw));
    let mut data = pos.data[..c].to_vec();
    data.extend_from_slice(&grid);
    Ok(Param {
        dtype: pos.dtype,
        shape: vec![1, 1 + gh * gw, c],
        data,
    })
}

/// Resample a patch-embedding kernel `[C, 3, p, p]` to `[C, 3, q, q]` bicubically (EVA-02's
/// 14 -> 16), as the original's conversion does.
pub fn resample_patch_kernel(w: &Param, q: usize) -> Result<Param, ModelError> {
    let [c, ch, p, p2] = w.shape[..] else {
        return Err(ModelError::Weights(format!(
            "patch kernel has shape {:?}",
            w.shape
        )));
    };
    if p != p2 || p == 0 {
        return Err(ModelError::Weights(format!(
            "patch kernel {p}x{p2} is not a square of positive size"
        )));
    }
    if q == 0 {
        return Err(ModelError::Weights("patch size must be positive".into()));
    }
    if p == q {
        return Ok(w.clone());
    }
    // Planes are channel-first; go through a channel-last grid of C*ch planes.
    let planes = c * ch;
    let mut hwc = vec![0f32; p * p * planes];
    for pl in 0..planes {
        for i in 0..p * p {
            hwc[i * planes + pl] = w.data[pl * p * p + i];
        }
    }
    let r = resize_grid_bicubic(&hwc, (p, p), planes, (q, q));
    let mut data = vec![0f32; planes * q * q];
    for pl in 0..planes {
        for i in 0..q * q {
            data[pl * q * q + i] = r[i * planes + pl];
        }
    }
    Ok(Param {
        dtype: w.dtype,
        shape: vec![c, ch, q, q],
        data,
    })
}
