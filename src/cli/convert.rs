//! `evax convert`: a checkpoint to safetensors in the EVA-X layout.

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::DType;
use clap::ValueEnum;

/// Stored dtype.
#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
}

/// Convert a checkpoint to safetensors in the EVA-X (models_eva) layout.
#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint.
    ckpt: PathBuf,
    /// Output file (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// Resample the patch-embedding kernel to this patch size (EVA-02's 14 -> 16).
    #[arg(long)]
    patch_size: Option<usize>,
    /// Stored dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// RoPE reference grid r to record (default: the checkpoint's).
    #[arg(long)]
    rope_grid: Option<f64>,
    /// Top-level checkpoint entry holding the state dict.
    #[arg(long)]
    state_key: Option<String>,
}

/// Convert and report what was written.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dtype = match a.dtype {
        DtypeArg::F32 => DType::F32,
        DtypeArg::F16 => DType::F16,
    };
    let c = evax::model::convert::convert(
        &a.ckpt,
        &a.output,
        a.patch_size,
        dtype,
        a.rope_grid,
        a.state_key.as_deref(),
    )?;
    eprintln!(
        "wrote {} ({} tensors, {}, {} parameters{})",
        a.output.display(),
        c.tensors,
        c.dtype,
        c.parameters,
        if c.unused == 0 {
            String::new()
        } else {
            format!("; {} unused keys kept", c.unused)
        }
    );
    Ok(ExitCode::SUCCESS)
}
