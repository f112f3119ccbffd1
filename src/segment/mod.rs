//! Segmentation as the original does it (REFERENCE.md 8): the EVA-X backbone's last block as a
//! feature map, a ViTDet-style pyramid and mmsegmentation's UperNet head ([`UperNet`]).

mod upernet;

pub use upernet::{SegLoadReport, UperNet};
