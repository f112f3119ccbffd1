//! `evax eval`: the original's evaluation on a dataset split.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::eval::{EvalJob, NOT_FOUND, markdown};
use evax::infer::Failure;
use evax::predict::Predictor;

use super::data::DataArgs;
use super::{ModelArgs, finish};

/// Evaluate on a dataset split with the original's protocol (AUROC, mAUC, bootstrap CI;
/// accuracy and confusion for COVIDx); resumable.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Bootstrap resamples for the confidence intervals (0: none).
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (y_pred.npy, y_gt.npy, metrics.json, report.md).
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    shard: super::ShardArgs,
}

/// Evaluate and print the report; exit 1 if any listed image could not be read.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let shard = a.shard.resolve()?;
    let p = Predictor::load(&a.model.predictor_options(None)?)?;
    let split = a.data.load()?;
    let job = EvalJob {
        model: p.model.as_ref(),
        weights: a.model.weights.clone(),
        split: &split,
        preprocess: p.preprocess,
        batch: a.model.batch,
        bootstrap: a.bootstrap,
        seed: a.seed,
        shard,
    };
    let r = job.run(&a.output)?;
    print!("{}", markdown(&r));
    if r.resumed > 0 {
        eprintln!(
            "resumed: {} predictions reused from the interrupted run",
            r.resumed
        );
    }
    eprintln!("wrote {}", a.output.join("metrics.json").display());
    // Missing images were listed when the split was read; unreadable ones fail the run.
    let unreadable: Vec<Failure> = r
        .skipped
        .iter()
        .filter(|f| f.error != NOT_FOUND)
        .cloned()
        .collect();
    Ok(finish(&unreadable, r.images))
}
