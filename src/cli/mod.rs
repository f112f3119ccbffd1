//! The command line's pieces: one module per command (arguments and a `run` that calls the
//! library and prints its summary), and the arguments they share.

pub mod bench;
pub mod cam;
pub mod compare;
pub mod convert;
pub mod data;
pub mod demo;
pub mod dicom;
pub mod embed;
pub mod eval;
pub mod finetune;
pub mod info;
pub mod merge;
pub mod predict;
pub mod seg;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
use clap::ValueEnum;
use evax::compute::{self, Precision};
use evax::infer::Failure;
use evax::kernels::Kernels;
use evax::model::LoadOptions;
use evax::predict::PredictorOptions;
use evax::preprocess::Normalization;

/// Normalisation statistics.
#[derive(Clone, Copy, ValueEnum)]
pub enum NormArg {
    /// The family's own (EVA-X: 0.49185 / 0.28509).
    Auto,
    /// EVA-X's 0.49185243 / 0.28509309.
    Evax,
    /// The other models' 0.5056 / 0.252.
    Others,
}

/// Kernel implementation.
#[derive(Clone, Copy, ValueEnum)]
pub enum KernelsArg {
    /// Fused CPU kernels where they apply.
    Fused,
    /// candle primitives everywhere (slower; for checking).
    Reference,
}

impl From<KernelsArg> for Kernels {
    fn from(k: KernelsArg) -> Self {
        match k {
            KernelsArg::Fused => Kernels::Fused,
            KernelsArg::Reference => Kernels::Reference,
        }
    }
}

/// Where and in what precision a command computes.
#[derive(clap::Args, Clone)]
pub struct ComputeArgs {
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Arithmetic of matrix products and attention: f32, bf16 or f16 (EVA-X models, and ViT
    /// in bf16 on the CPU; norms, residuals and outputs stay f32). On the CPU, bf16 runs the
    /// dense layers' products in bf16 where the CPU has AMX, or AVX512-BF16 faster than its
    /// f32; elsewhere (and for f16) it falls back to f32.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: Precision,
}

impl ComputeArgs {
    /// The device and the precision to use on it (a note on stderr where it falls back).
    pub fn resolve(&self) -> evax::Result<(Device, Precision)> {
        let device = compute::parse_device(&self.device)?;
        let precision = match self.precision {
            Precision::Bf16 if device.is_cpu() && !evax::kernels::bf16::native() => {
                eprintln!(
                    "note: --precision bf16 computes in f32 on this CPU (bf16 products need \
                     AVX512-BF16, which it lacks; emulating them would be slower than f32)"
                );
                Precision::F32
            }
            Precision::Bf16 if device.is_cpu() && !evax::kernels::bf16::faster_than_f32() => {
                let (f32_rate, bf16_rate) = evax::kernels::bf16::measured_rates();
                eprintln!(
                    "note: --precision bf16 computes in f32 on this CPU: it runs without AMX, and its \
                     AVX512-BF16 products measured {bf16_rate:.0} GFLOP/s a core against \
                     {f32_rate:.0} for f32 (EVAX_BF16=1 uses them anyway)"
                );
                Precision::F32
            }
            Precision::F16 if device.is_cpu() => {
                eprintln!("note: --precision f16 computes in f32 on the CPU (no f16 CPU kernels)");
                Precision::F32
            }
            p => p,
        };
        Ok((device, precision))
    }
}

impl ComputeArgs {
    /// [`ComputeArgs::resolve`] for a command that trains. On the CPU, bf16 training runs the
    /// EVA-X and ViT blocks' products in bf16 (weights kept f32); the CNNs, and everything
    /// else, compute in f32 (a note says so).
    pub fn resolve_training(&self) -> evax::Result<(Device, Precision)> {
        let (device, precision) = self.resolve()?;
        if device.is_cpu() && precision == Precision::Bf16 {
            eprintln!(
                "note: --precision bf16 on the CPU trains EVA-X's and ViT's transformer blocks \
                 in bf16 products (f32 sums and master weights); ResNet and DenseNet, and the \
                 rest of each step, compute in f32"
            );
        }
        Ok((device, precision))
    }
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).map_err(|e| e.to_string())
}

/// Which part of a batch run this is.
#[derive(clap::Args, Clone)]
pub struct ShardArgs {
    /// Process the K-th of N contiguous parts of the inputs (0 <= K < N) and write a manifest
    /// for `evax merge`; default: from a Slurm job array or a Kubernetes Indexed Job
    /// (`JOB_COMPLETION_INDEX` with `EVAX_SHARD_COUNT`), else everything; `none` processes
    /// everything even inside a job array.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
}

impl ShardArgs {
    /// The shard to run (announced on stderr), or `None`.
    pub fn resolve(&self) -> evax::Result<Option<evax::shard::Shard>> {
        let r = evax::shard::Shard::resolve(self.shard.as_deref())?;
        if let Some((s, from)) = r {
            eprintln!("shard {}/{} (from {from})", s.index, s.count);
        }
        Ok(r.map(|(s, _)| s))
    }
}

/// How a command loads and feeds a model.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Checkpoint (.pt/.pth, zip or legacy, or .safetensors).
    #[arg(long)]
    pub weights: PathBuf,
    /// Input size in pixels: N for N x N, or HxW (multiples of the patch size); default: the
    /// size the checkpoint was trained at (from its pos_embed grid).
    #[arg(long, value_parser = parse_size)]
    pub input_size: Option<(usize, usize)>,
    /// RoPE reference grid r (default: read from the checkpoint's tables, else 14).
    #[arg(long)]
    pub rope_grid: Option<f64>,
    /// Top-level checkpoint entry holding the state dict (default: model, state_dict, ...).
    #[arg(long)]
    pub state_key: Option<String>,
    /// Normalisation statistics (default: the model family's, as the original uses them).
    #[arg(long, value_enum, default_value = "auto")]
    pub norm: NormArg,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Kernel implementation.
    #[arg(long, value_enum, default_value = "fused")]
    pub kernels: KernelsArg,
    /// Device and precision.
    #[command(flatten)]
    pub compute: ComputeArgs,
}

impl ModelArgs {
    /// The library's options for loading this model.
    pub fn predictor_options(&self, labels: Option<String>) -> evax::Result<PredictorOptions> {
        let (device, precision) = self.compute.resolve()?;
        Ok(PredictorOptions {
            weights: self.weights.clone(),
            state_key: self.state_key.clone(),
            load: LoadOptions {
                rope_grid: self.rope_grid,
                kernels: self.kernels.into(),
                device,
                precision,
            },
            input_size: self.input_size,
            normalization: normalization(self.norm),
            labels,
            activation: None,
            batch: self.batch,
        })
    }
}

/// The statistics `--norm` asks for (`None`: the family's own).
pub fn normalization(n: NormArg) -> Option<Normalization> {
    match n {
        NormArg::Auto => None,
        NormArg::Evax => Some(Normalization::EVAX),
        NormArg::Others => Some(Normalization::OTHERS),
    }
}

/// Parse `N` or `HxW`.
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("bad size '{s}'"))
    };
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h)?, parse(w)?),
        None => {
            let n = parse(s)?;
            (n, n)
        }
    };
    if h == 0 || w == 0 {
        return Err(format!("input size {s} must be positive"));
    }
    Ok((h, w))
}

/// Print failures and turn them into the exit status (1 if any input failed).
pub fn finish(failures: &[Failure], done: usize) -> ExitCode {
    for f in failures {
        eprintln!("failed: {}: {}", f.input.display(), f.error);
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} of {} inputs failed",
            failures.len(),
            failures.len() + done
        );
        ExitCode::from(1)
    }
}

/// Print a progress note on stderr.
pub fn note(s: &str) {
    eprintln!("{s}");
}
