//! `evax compare`: several models on one split, one table.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::compare::{CompareJob, markdown};
use evax::model::LoadOptions;

use super::data::DataArgs;
use super::{ComputeArgs, KernelsArg, note};

/// Evaluate run folders or checkpoints (any family) on the same split: per-class AUROC, mAUC
/// with bootstrap intervals, a paired bootstrap test of each against the first; writes
/// compare.md, compare.json, compare.svg.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    /// Run folders of `evax finetune` (their best checkpoint) or checkpoint files; the first
    /// is the reference of the paired tests.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Output folder (the table, and each model's evaluation under models/NAME/, resumable).
    #[arg(short, long)]
    output: PathBuf,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Bootstrap seed (the same resamples for every model).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Kernel implementation.
    #[arg(long, value_enum, default_value = "fused")]
    kernels: KernelsArg,
    /// Device and precision.
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Compare and print the table; exit 1 if a model could not be evaluated.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let (device, precision) = a.compute.resolve()?;
    let split = a.data.load()?;
    let job = CompareJob {
        models: a.models,
        split: &split,
        load: LoadOptions {
            kernels: a.kernels.into(),
            device,
            precision,
            ..Default::default()
        },
        batch: a.batch,
        bootstrap: a.bootstrap,
        seed: a.seed,
    };
    let c = job.run(&a.output, &mut |s| note(s))?;
    print!("{}", markdown(&c));
    eprintln!("wrote {}", a.output.join("compare.md").display());
    Ok(if c.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} of {} models failed",
            c.failures.len(),
            c.failures.len() + c.models.len()
        );
        ExitCode::from(1)
    })
}
