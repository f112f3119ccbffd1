//! Segmentation as the original does it (REFERENCE.md 8): the EVA-X backbone's last block as a
//! feature map, a ViTDet-style pyramid and mmsegmentation's UperNet head ([`UperNet`]).

pub mod metrics;
mod train;
mod upernet;

pub use metrics::{IouTotals, SegScores};
pub use train::SegTrainable;
pub use upernet::{SegLoadReport, UperNet};
