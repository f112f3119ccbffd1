//! `evax bench`: speed and peak memory.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::bench::{self, Workload};

/// Forward-pass (or Grad-CAM, training step, input pipeline) speed and peak memory with
/// random weights.
#[derive(clap::Args)]
pub struct Args {
    /// Model: an EVA-X size (ti, s, b), a comparison baseline (r50, dn121, vit-s) or the
    /// segmentation model on an EVA-X size (seg-ti, seg-s, seg-b; use --input-size 512).
    #[arg(long, default_value = "s")]
    model: String,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Input side in pixels.
    #[arg(long, default_value_t = 224)]
    input_size: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Time Grad-CAM (forward + partial backward + map) instead of the forward pass.
    #[arg(long)]
    cam: bool,
    /// Time one training step (forward, loss, backward, AdamW) instead.
    #[arg(long, conflicts_with = "cam")]
    train: bool,
    /// Time the input pipeline (decode + preprocessing) on this image instead.
    #[arg(long, conflicts_with = "cam")]
    pipeline: Option<PathBuf>,
    /// Device and precision.
    #[command(flatten)]
    compute: super::ComputeArgs,
}

/// Run the benchmark and print its line (or JSON).
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if let Some(image) = a.pipeline {
        let r = bench::pipeline(&image, a.input_size, a.iters.max(1) * 100)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("{}", bench::pipeline_text(&r, a.input_size));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let work = if a.cam {
        Workload::Cam
    } else if a.train {
        Workload::Train
    } else {
        Workload::Forward
    };
    let (device, precision) = if a.train {
        a.compute.resolve_training()?
    } else {
        a.compute.resolve()?
    };
    let target = bench::Target { device, precision };
    let r = bench::run(&a.model, a.batch, a.input_size, a.iters, work, &target)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", bench::render_text(&r, work));
    }
    Ok(ExitCode::SUCCESS)
}
