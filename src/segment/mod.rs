//! Segmentation as the original does it (REFERENCE.md 8): the EVA-X backbone's last block as a
//! feature map, a ViTDet-style pyramid and mmsegmentation's UperNet head ([`UperNet`]).

pub mod engine;
pub mod eval;
pub mod metrics;
pub mod predict;
pub mod prepare;
mod train;
mod upernet;

pub use eval::{SegEvalJob, SegEvalReport, SegSample, read_mask, read_split};
pub use metrics::{IouTotals, SegScores};
pub use predict::{SegPredictJob, SegRecord, seg_input};
pub use train::SegTrainable;
pub use upernet::{SegLoadReport, UperNet, head_flops, random_state_dict};
