//! Where and in what precision the models compute: the `--device` and `--precision` settings.
//!
//! The CPU is always there. NVIDIA GPUs come through candle's CUDA backend when evax is built
//! with the `cuda` feature; without it `cuda` names a clear error. Reduced precision keeps the
//! weights' master copy in f32 (training) and computes matrix products, attention and MLPs in
//! bf16 or f16, as PyTorch's autocast does; LayerNorm statistics and the outputs stay f32.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Parse `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        _ => match s.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| Error::Invalid(format!("device '{spec}': expected cuda:N")))?,
            None => {
                return Err(Error::Invalid(format!(
                    "device '{spec}': expected cpu, cuda or cuda:N"
                )));
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Invalid(format!(
            "device '{spec}': this evax was built without GPU support; rebuild with \
             `cargo build --release --features cuda` (README: GPU build)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Invalid(format!("device '{spec}': {e}")))
}

/// The arithmetic a model computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Single precision everywhere (the reference).
    #[default]
    F32,
    /// bfloat16 activations and matrix products (f32 master weights in training).
    Bf16,
    /// float16 activations and matrix products (training scales the loss).
    F16,
}

impl Precision {
    /// The candle type the activations use.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Parse `f32`, `bf16` or `f16` (also `fp32`, `fp16`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            _ => Err(Error::Invalid(format!(
                "precision '{s}': expected f32, bf16 or f16"
            ))),
        }
    }

    /// The name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// A short name of a device for reports (`cpu`, `cuda:0`).
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_precisions_parse_or_name_the_problem() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bf16);
        assert_eq!(Precision::parse("fp16").unwrap().dtype(), DType::F16);
        assert_eq!(Precision::parse("f32").unwrap().name(), "f32");
        assert!(Precision::parse("int8").is_err());
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }
}
