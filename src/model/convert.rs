//! `evax convert`: any supported checkpoint to safetensors in the EVA-X (models_eva) layout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::adapt;
use super::eva_x::{EvaX, LoadOptions};
use super::rope::RopeTables;
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result, ResultExt};

/// What [`convert`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Converted {
    /// Tensors written.
    pub tensors: usize,
    /// Learned parameters of the model.
    pub parameters: usize,
    /// Keys of the source the model does not use (kept in the output).
    pub unused: usize,
    /// `f32` or `f16`.
    pub dtype: &'static str,
}

/// Convert `path` (state dict under `state_key`, if not a usual entry) to `output`, with the
/// patch kernel resampled to `patch_size` if given, stored as `dtype` (F32 or F16), RoPE tables
/// recomputed in f32 for the stored grid. The weights are checked to build a model first.
pub fn convert(
    path: &Path,
    output: &Path,
    patch_size: Option<usize>,
    dtype: DType,
    rope_grid: Option<f64>,
    state_key: Option<&str>,
) -> Result<Converted> {
    let dtype_name = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        other => {
            return Err(Error::Invalid(format!(
                "cannot store {other:?}; use f32 or f16"
            )));
        }
    };
    let ck = Checkpoint::load_with(path, state_key)?;
    let mut sd = adapt::to_eva_layout(&ck.tensors).context(path.display())?;
    let (model, report) = EvaX::from_eva_state_dict(&sd, &LoadOptions::with_rope_grid(rope_grid))
        .context(path.display())?;
    let cfg = model.config.clone();
    if let Some(q) = patch_size {
        let w = &sd.tensors["patch_embed.proj.weight"];
        let resized = adapt::resample_patch_kernel(w, q).context(path.display())?;
        sd.tensors.insert("patch_embed.proj.weight".into(), resized);
    }
    let rope = RopeTables::new(cfg.train_grid, cfg.rope_grid, 64);
    let n = cfg.train_grid.0 * cfg.train_grid.1;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, p) in &sd.tensors {
        if k.ends_with("rope.freqs_cos") || k.ends_with("rope.freqs_sin") {
            continue;
        }
        out.insert(k.clone(), p.to_tensor(&Device::Cpu)?.to_dtype(dtype)?);
    }
    for (name, table) in [("rope.freqs_cos", &rope.cos), ("rope.freqs_sin", &rope.sin)] {
        out.insert(
            name.into(),
            Tensor::from_slice(table, (n, 64), &Device::Cpu)?,
        );
    }
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("evax.source".to_string(), path.display().to_string()),
        ("evax.rope_grid".to_string(), cfg.rope_grid.to_string()),
        ("evax.variant".to_string(), cfg.variant()),
    ]);
    checkpoint::save_safetensors(&out, Some(meta), output)?;
    Ok(Converted {
        tensors: out.len(),
        parameters: report.parameters,
        unused: report.unused.len(),
        dtype: dtype_name,
    })
}
