//! `evax seg ...`: the segmentation model (EVA-X + pyramid + UperNet).

use std::path::PathBuf;
use std::process::ExitCode;

use evax::checkpoint::Checkpoint;
use evax::infer;
use evax::model::LoadOptions;
use evax::segment::{SegPredictJob, UperNet};

use super::{KernelsArg, finish, parse_size};

/// Segmentation commands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Masks (0/255 PNG at each image's size), overlays and optionally logits for images.
    Predict(PredictArgs),
}

/// `evax seg predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// An mmsegmentation checkpoint of the original's model (`backbone.*`, `decode_head.*`).
    #[arg(long)]
    weights: PathBuf,
    /// Model input size: N or HxW (default: the checkpoint's, from its pos_embed grid).
    #[arg(long, value_parser = parse_size)]
    input_size: Option<(usize, usize)>,
    /// Foreground where sigmoid(logit) exceeds this (the original: 0.3).
    #[arg(long, default_value_t = 0.3)]
    threshold: f32,
    /// Also write `<stem>_logits.npy` (float32 [classes, H, W] at the model's input size).
    #[arg(long)]
    logits: bool,
    /// Skip the overlay PNGs.
    #[arg(long)]
    no_overlay: bool,
    /// Kernel implementation.
    #[arg(long, value_enum, default_value = "fused")]
    kernels: KernelsArg,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Images, folders or list files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// Run a segmentation command.
pub fn run(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Predict(a) => predict(a),
    }
}

fn predict(a: PredictArgs) -> anyhow::Result<ExitCode> {
    let ck = Checkpoint::load(&a.weights)?;
    let opts = LoadOptions {
        kernels: a.kernels.into(),
        ..Default::default()
    };
    let (model, report) = UperNet::from_checkpoint(&ck, &opts)?;
    if !report.unused.is_empty() {
        eprintln!("unused keys: {}", report.unused.join(", "));
    }
    let job = SegPredictJob {
        model: &model,
        size: a.input_size.unwrap_or_else(|| model.default_input_size()),
        threshold: a.threshold,
        logits: a.logits,
        overlays: !a.no_overlay,
    };
    let (paths, mut failures) = infer::collect_inputs(&a.inputs);
    let (records, f) = job.run(&paths, &a.output)?;
    failures.extend(f);
    eprintln!(
        "segmented {} images -> {}",
        records.len(),
        a.output.join("predictions.json").display()
    );
    Ok(finish(&failures, records.len()))
}
