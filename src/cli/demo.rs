//! `evax demo`: the end-to-end demo on synthetic chest phantoms.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::demo::{self, DemoOptions};

use super::note;

/// The end-to-end demo on synthetic chest phantoms: generate, fine-tune EVA-X-Ti, evaluate,
/// report. A few minutes of CPU.
#[derive(clap::Args)]
pub struct Args {
    /// Output folder.
    #[arg(short, long, default_value = "evax-demo")]
    output: PathBuf,
    /// Start from these weights instead of a random initialisation.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Training images (default 800; 240 for --task seg).
    #[arg(long)]
    train_images: Option<usize>,
    /// Held-out images (default 300; 60 for --task seg).
    #[arg(long)]
    test_images: Option<usize>,
    /// Epochs (default 12; 10 for --task seg).
    #[arg(long)]
    epochs: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Which demo: classification (findings) or seg (lung fields).
    #[arg(long, default_value = "classification")]
    task: String,
    /// Device and precision (the seg demo trains on the CPU, with bf16 the backbone's blocks in
    /// bf16 products).
    #[command(flatten)]
    compute: super::ComputeArgs,
}

/// Run the demo and print the held-out mAUC (or foreground Dice).
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let seg = a.task == "seg";
    let pick = |v: Option<usize>, classification: usize, seg_default: usize| {
        v.unwrap_or(if seg { seg_default } else { classification })
    };
    let (device, precision) = a.compute.resolve_training()?;
    if seg && !device.is_cpu() {
        anyhow::bail!("the segmentation demo runs on the CPU only so far");
    }
    let o = DemoOptions {
        output: a.output,
        weights: a.weights,
        train_images: pick(a.train_images, 800, 240),
        test_images: pick(a.test_images, 300, 60),
        epochs: pick(a.epochs, 12, 10),
        seed: a.seed,
        device,
        precision,
    };
    match a.task.as_str() {
        "classification" => {}
        "seg" => {
            let r = demo::run_seg(&o, &mut |s| note(s))?;
            println!(
                "held-out lung Dice {:.4} on synthetic phantoms (every pixel lung: {:.4}; {:.0} s); report: {}",
                r.fg_dice,
                r.chance_dice,
                r.seconds,
                r.report.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        t => anyhow::bail!("unknown task '{t}' (classification, seg)"),
    }
    let r = demo::run(&o, &mut |s| note(s))?;
    println!(
        "held-out mAUC {:.2} on synthetic phantoms ({:.0} s); report: {}",
        r.mauc * 100.0,
        r.seconds,
        r.report.display()
    );
    Ok(ExitCode::SUCCESS)
}
