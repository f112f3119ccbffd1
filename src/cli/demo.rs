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
    /// Training images.
    #[arg(long, default_value_t = 800)]
    train_images: usize,
    /// Held-out images.
    #[arg(long, default_value_t = 300)]
    test_images: usize,
    /// Epochs.
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Run the demo and print the held-out mAUC.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let r = demo::run(
        &DemoOptions {
            output: a.output,
            weights: a.weights,
            train_images: a.train_images,
            test_images: a.test_images,
            epochs: a.epochs,
            seed: a.seed,
        },
        &mut |s| note(s),
    )?;
    println!(
        "held-out mAUC {:.2} on synthetic phantoms ({:.0} s); report: {}",
        r.mauc * 100.0,
        r.seconds,
        r.report.display()
    );
    Ok(ExitCode::SUCCESS)
}
