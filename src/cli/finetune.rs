//! `evax finetune`: fine-tuning with the original's recipes.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::train::config::TrainConfig;
use evax::train::setup::{Finetune, summary_text};

use super::{KernelsArg, note};

/// Fine-tune on a dataset with one of the original's recipes (presets/), resumable.
#[derive(clap::Args)]
pub struct Args {
    /// Preset: cxr14-ti, cxr14-s, cxr14-b, chexpert-ti, chexpert-s, covidx{3,4}-s-{100,10,1}pct.
    #[arg(long)]
    preset: Option<String>,
    /// A TOML file of settings (applied after the preset).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one setting, e.g. --set epochs=3 (repeatable; applied last).
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Initial weights (MIM or fine-tuned EVA-X); default: random initialisation of `model`.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The dataset's folder.
    #[arg(long)]
    data_dir: PathBuf,
    /// Output folder (checkpoints, train_log.jsonl, curves.svg); a run there is resumed.
    #[arg(short, long)]
    output: PathBuf,
    /// Stop after this many optimiser steps (the run stays resumable).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Kernel implementation.
    #[arg(long, value_enum, default_value = "fused")]
    kernels: KernelsArg,
    /// Device and precision.
    #[command(flatten)]
    compute: super::ComputeArgs,
    /// Data-parallel training on these GPUs of this machine, e.g. --gpus 0,1,2,3 (each batch
    /// split between them, gradients summed over NCCL; replaces --device).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    gpus: Vec<usize>,
}

/// Train and print the best and last evaluations.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let text = match &a.config {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    let cfg = TrainConfig::build(a.preset.as_deref(), text.as_deref(), &a.overrides)?;
    let metric = cfg.select_metric.clone();
    let (device, precision, replicas) = if a.gpus.is_empty() {
        let (device, precision) = a.compute.resolve_training()?;
        (device, precision, Vec::new())
    } else {
        if a.compute.device != "cpu" {
            anyhow::bail!(
                "give --gpus or --device, not both (--gpus 0,1 trains on cuda:0 and cuda:1)"
            );
        }
        if a.gpus.len() > 1 && !cfg!(feature = "nccl") {
            anyhow::bail!(
                "--gpus {}: training on several GPUs needs a build with `--features cuda,nccl` \
                 (README: several GPUs of one machine)",
                a.gpus
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        let devices = a
            .gpus
            .iter()
            .map(|g| evax::compute::parse_device(&format!("cuda:{g}")))
            .collect::<evax::Result<Vec<_>>>()?;
        (
            devices[0].clone(),
            a.compute.precision,
            devices[1..].to_vec(),
        )
    };
    let s = Finetune {
        cfg,
        weights: a.weights,
        data_dir: a.data_dir,
        out_dir: a.output,
        max_steps: a.max_steps,
        device,
        precision,
        kernels: a.kernels.into(),
        replicas,
    }
    .run(&mut |s| note(s))?;
    print!("{}", summary_text(&s, &metric));
    Ok(ExitCode::SUCCESS)
}
