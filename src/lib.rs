//! evax: EVA-X chest X-ray Vision Transformers in Rust.
//!
//! Loads the released EVA-X checkpoints ([`checkpoint`]), builds the Ti/S/B backbones
//! ([`model`]), preprocesses radiographs exactly as the original ([`preprocess`]) and runs them.

pub mod checkpoint;
pub mod fixtures;
pub mod io;
pub mod model;
pub mod preprocess;
