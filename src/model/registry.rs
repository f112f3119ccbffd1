//! Recognising a checkpoint's model family and building it behind the common interface.

use std::path::Path;

use super::{Classifier, EvaX, LoadOptions, LoadReport, ModelError, adapt};
use crate::checkpoint::Checkpoint;
use crate::error::{Result, ResultExt};

/// The model families evax can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// EVA-X Ti / S / B (and EVA-02-style ViTs in the same layout).
    EvaX,
}

impl Family {
    /// The family's name as `evax info` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Family::EvaX => "EVA-X",
        }
    }
}

/// The family of a checkpoint's weights, or an error saying why none fits.
pub fn recognise(ck: &Checkpoint) -> Result<Family, ModelError> {
    let sd = adapt::to_eva_layout(&ck.tensors)?;
    super::eva_x::infer_config(&sd.tensors, &LoadOptions::default())?;
    Ok(Family::EvaX)
}

/// Build the classifier a checkpoint describes (any supported format, layout and family).
pub fn load(
    ck: &Checkpoint,
    opts: &LoadOptions,
) -> Result<(Box<dyn Classifier>, LoadReport), ModelError> {
    match recognise(ck)? {
        Family::EvaX => {
            let (m, report) = EvaX::from_checkpoint(ck, opts)?;
            Ok((Box::new(m), report))
        }
    }
}

/// Read a checkpoint file (`state_key`: the entry holding the state dict, if not the usual
/// ones) and build its classifier; errors name the file.
pub fn load_file(
    path: &Path,
    state_key: Option<&str>,
    opts: &LoadOptions,
) -> Result<(Box<dyn Classifier>, LoadReport)> {
    let ck = Checkpoint::load_with(path, state_key)?;
    load(&ck, opts).context(path.display())
}
