//! EVA-X models: architecture, RoPE and checkpoint adaptation (kernels: [`crate::kernels`]).

pub mod adapt;
pub mod eva_x;
pub mod grad;
pub mod inspect;
pub mod interp;
pub mod rope;

pub use eva_x::{EvaX, EvaXConfig, Kind, LoadOptions, LoadReport, ModelError};
