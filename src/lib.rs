//! evax: EVA-X chest X-ray Vision Transformers in Rust.
//!
//! Loads the released EVA-X checkpoints ([`checkpoint`]), builds the Ti/S/B backbones
//! ([`model`]), preprocesses radiographs exactly as the original ([`preprocess`]) and runs them
//! over batches of files ([`infer`]).

#![warn(missing_docs)]

/// Append one formatted line to a `String` (the text renderers of reports).
macro_rules! w {
    ($out:ident, $($t:tt)*) => {{
        $out.push_str(&format!($($t)*));
        $out.push('\n');
    }};
}

pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod compute;
pub mod data;
pub mod demo;
pub mod dicom;
pub mod error;
pub mod eval;
pub mod explain;
pub mod fixtures;
pub mod guard;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod labels;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod preprocess;
pub mod rng;
pub mod segment;
pub mod serve;
pub mod shard;
pub mod train;

pub use error::{Error, Result, ResultExt};
