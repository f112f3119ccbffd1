//! What a checkpoint holds, for `evax info`: format, dtypes, architecture, keys used and missed.

use crate::checkpoint::Checkpoint;

use super::adapt;
use super::eva_x::{EvaX, EvaXConfig, LoadOptions};

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
    /// The inferred architecture, when the weights describe one.
    pub config: Option<EvaXConfig>,
    /// Size name (EVA-X-Ti / S / B).
    pub variant: Option<String>,
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
        config: None,
        variant: None,
        input_size: None,
        parameters: None,
        unused_keys: Vec::new(),
        problems: Vec::new(),
    };
    let sd = match adapt::to_eva_layout(&ck.tensors) {
        Ok(sd) => sd,
        Err(e) => {
            out.problems.push(e);
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
