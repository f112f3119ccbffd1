//! What a checkpoint holds, for `evax info`: format, dtypes, architecture, keys used and missed.

use crate::checkpoint::Checkpoint;

use super::adapt;
use super::eva_x::{EvaX, EvaXConfig, LoadOptions};
use super::registry::{self, Family};
use super::vit::{Vit, VitConfig};

/// A checkpoint described for people and tools.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// The file.
    pub path: String,
    /// Container format.
    pub format: &'static str,
    /// Stored dtypes with tensor counts.
    pub dtypes: Vec<(String, usize)>,
    /// Top-level key of the state dict, if nested.
    pub nesting: Option<String>,
    /// Other top-level entries and their types.
    pub extras: Vec<(String, String)>,
    /// Number of tensors in the state dict.
    pub tensors: usize,
    /// The model family recognised (`EVA-X`, `ViT`, `ResNet`, `DenseNet`).
    pub family: Option<&'static str>,
    /// The checkpoint layout the keys were read in (`MoCo v2`, `MGCA`, ...; CNNs).
    pub layout: Option<String>,
    /// The prefix the backbone was found under.
    pub prefix: Option<String>,
    /// Backbone keys dropped as the original drops them.
    pub dropped_keys: Vec<String>,
    /// The inferred EVA-X architecture, when the weights describe one.
    pub config: Option<EvaXConfig>,
    /// The inferred plain-ViT architecture, when the weights describe one.
    pub vit: Option<VitConfig>,
    /// Size name (EVA-X-Ti / S / B).
    pub variant: Option<String>,
    /// Classes of the head (`None` without one).
    pub classes: Option<usize>,
    /// Input size the `pos_embed` was trained for (pixels, height x width).
    pub input_size: Option<(usize, usize)>,
    /// Learned parameters the model uses.
    pub parameters: Option<usize>,
    /// Keys the model does not use.
    pub unused_keys: Vec<String>,
    /// Problems that stop the model from being built (missing keys, wrong shapes).
    pub problems: Vec<String>,
}

/// Describe a loaded checkpoint: always succeeds, recording problems instead of failing.
pub fn inspect(ck: &Checkpoint, opts: &LoadOptions) -> Inspection {
    let mut out = Inspection {
        path: ck.path.display().to_string(),
        format: ck.format.name(),
        dtypes: ck
            .dtypes()
            .into_iter()
            .map(|(d, n)| (d.name().to_string(), n))
            .collect(),
        nesting: ck.nesting.clone(),
        extras: ck.extras.clone(),
        tensors: ck.tensors.len(),
        family: None,
        layout: None,
        prefix: None,
        dropped_keys: Vec::new(),
        config: None,
        vit: None,
        variant: None,
        classes: None,
        input_size: None,
        parameters: None,
        unused_keys: Vec::new(),
        problems: Vec::new(),
    };
    if let Ok(Family::Vit) = registry::recognise(ck) {
        out.family = Some(Family::Vit.name());
        match Vit::from_checkpoint(ck, opts) {
            Ok((m, report)) => {
                let c = &m.config;
                out.variant = Some(c.variant());
                out.input_size =
                    Some((c.train_grid.0 * c.patch_size, c.train_grid.1 * c.patch_size));
                out.classes = c.num_classes;
                out.vit = Some(c.clone());
                out.parameters = Some(report.parameters);
                out.unused_keys = report.unused;
            }
            Err(e) => out.problems.push(e.to_string()),
        }
        return out;
    }
    if let Ok(family @ (Family::ResNet | Family::DenseNet)) = registry::recognise(ck) {
        out.family = Some(family.name());
        if let Some(k) = super::layouts::cnn_keys(&ck.tensors) {
            out.layout = Some(if k.old_names {
                format!("{}, old DenseNet names (norm.1, conv.2) renamed", k.layout)
            } else {
                k.layout.to_string()
            });
            out.prefix = Some(k.prefix.clone());
            out.dropped_keys = k.dropped.clone();
        }
        match registry::load(ck, opts) {
            Ok((m, report)) => {
                out.variant = Some(m.name());
                out.input_size = Some(m.default_input_size());
                out.classes = m.num_classes();
                out.parameters = Some(report.parameters);
                out.unused_keys = report.unused;
            }
            Err(e) => out.problems.push(e.to_string()),
        }
        return out;
    }
    out.family = Some(Family::EvaX.name());
    let sd = match adapt::to_eva_layout(&ck.tensors) {
        Ok(sd) => sd,
        Err(e) => {
            out.problems.push(e.to_string());
            return out;
        }
    };
    match super::eva_x::infer_config(&sd.tensors, opts) {
        Ok(cfg) => {
            out.variant = Some(cfg.variant());
            out.input_size = Some((
                cfg.train_grid.0 * cfg.patch_size,
                cfg.train_grid.1 * cfg.patch_size,
            ));
            out.classes = cfg.num_classes;
            out.config = Some(cfg);
        }
        Err(e) => {
            out.problems.push(e.to_string());
            return out;
        }
    }
    match EvaX::from_eva_state_dict(&sd, opts) {
        Ok((_, report)) => {
            out.parameters = Some(report.parameters);
            out.unused_keys = report.unused;
        }
        Err(e) => out.problems.push(e.to_string()),
    }
    out
}

/// The description as text, one field a line (what `evax info` prints).
pub fn render_text(i: &Inspection) -> String {
    let mut out = String::new();
    let dtypes: Vec<String> = i
        .dtypes
        .iter()
        .map(|(d, n)| format!("{d} ({n} tensors)"))
        .collect();
    w!(out, "file         {}", i.path);
    w!(out, "format       {}", i.format);
    w!(out, "dtype        {}", dtypes.join(", "));
    w!(
        out,
        "state dict   {} ({} tensors)",
        i.nesting
            .as_deref()
            .map_or("top level".into(), |k| format!("under '{k}'")),
        i.tensors
    );
    if !i.extras.is_empty() {
        let e: Vec<String> = i.extras.iter().map(|(k, t)| format!("{k}: {t}")).collect();
        w!(out, "also holds   {}", e.join(", "));
    }
    if let Some(layout) = &i.layout {
        let prefix = i.prefix.as_deref().unwrap_or("");
        if prefix.is_empty() {
            w!(out, "layout       {layout}");
        } else {
            w!(out, "layout       {layout} (keys under '{prefix}')");
        }
    }
    if !i.dropped_keys.is_empty() {
        w!(
            out,
            "dropped      {} (as the original does)",
            i.dropped_keys.join(", ")
        );
    }
    if i.config.is_none() && i.vit.is_none() && i.variant.is_some() {
        w!(
            out,
            "model        {}",
            i.variant.clone().unwrap_or_default()
        );
        let (h, w) = i.input_size.unwrap_or_default();
        w!(out, "input        {h}x{w} (default)");
        w!(
            out,
            "classes      {}",
            i.classes.map_or("none".into(), |n| n.to_string())
        );
    }
    if let Some(c) = &i.vit {
        w!(out, "model        {} (plain ViT, timm layout)", c.variant());
        w!(
            out,
            "architecture dim {}, depth {}, heads {}, MLP hidden {} (GELU), patch {}",
            c.dim,
            c.depth,
            c.heads,
            c.mlp_hidden,
            c.patch_size
        );
        w!(out, "pooling      mean of the patch tokens, fc_norm");
        let (h, w) = i.input_size.unwrap_or_default();
        w!(
            out,
            "input        {h}x{w} (grid {}x{})",
            c.train_grid.0,
            c.train_grid.1
        );
        w!(
            out,
            "classes      {}",
            c.num_classes.map_or("none".into(), |n| n.to_string())
        );
    }
    if let Some(c) = &i.config {
        w!(
            out,
            "model        {} ({:?})",
            i.variant.clone().unwrap_or_default(),
            c.kind
        );
        w!(
            out,
            "architecture dim {}, depth {}, heads {}, MLP hidden {}, patch {}",
            c.dim,
            c.depth,
            c.heads,
            c.mlp_hidden,
            c.patch_size
        );
        w!(
            out,
            "attention    {}",
            if c.fused_qkv {
                "fused qkv + q_bias, v_bias"
            } else {
                "separate q/k/v projections + q_bias, v_bias"
            }
        );
        w!(
            out,
            "MLP          {}",
            if c.sub_ln {
                "SwiGLU with sub-LN (w1, w2, ffn_ln, w3)"
            } else {
                "packed SwiGLU (w12, w3)"
            }
        );
        let (h, w) = i.input_size.unwrap_or_default();
        w!(
            out,
            "input        {h}x{w} (grid {}x{})",
            c.train_grid.0,
            c.train_grid.1
        );
        w!(
            out,
            "RoPE r       {} (from {})",
            c.rope_grid,
            c.rope_grid_source
        );
        w!(
            out,
            "classes      {}",
            c.num_classes.map_or("none".into(), |n| n.to_string())
        );
    }
    if let Some(p) = i.parameters {
        w!(out, "parameters   {p} ({:.2} M)", p as f64 / 1e6);
    }
    w!(
        out,
        "unused keys  {}",
        if i.unused_keys.is_empty() {
            "none".into()
        } else {
            i.unused_keys.join(", ")
        }
    );
    if i.problems.is_empty() {
        w!(out, "missing keys none");
    } else {
        w!(out, "problems     {}", i.problems.join("\n             "));
    }

    out
}
