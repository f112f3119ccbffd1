//! EVA-X models: architecture, RoPE, fused kernels and checkpoint adaptation.

pub mod adapt;
pub mod eva_x;
pub mod grad;
pub mod inspect;
pub mod interp;
pub mod ops;
pub mod rope;

pub use eva_x::{EvaX, EvaXConfig, Kind, LoadOptions, LoadReport, ModelError};
