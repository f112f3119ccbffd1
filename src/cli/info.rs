//! `evax info`: describe a checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::checkpoint::Checkpoint;
use evax::model::{LoadOptions, inspect};

/// Describe a checkpoint: format, dtype, architecture, input grid, RoPE r, classes, keys.
#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint.
    ckpt: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// RoPE reference grid r to assume.
    #[arg(long)]
    rope_grid: Option<f64>,
    /// Top-level checkpoint entry holding the state dict.
    #[arg(long)]
    state_key: Option<String>,
}

/// Print the description; exit 1 when the weights do not build a model.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let ck = Checkpoint::load_with(&a.ckpt, a.state_key.as_deref())?;
    let i = inspect::inspect(&ck, &LoadOptions::with_rope_grid(a.rope_grid));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print!("{}", inspect::render_text(&i));
    }
    for p in &i.problems {
        eprintln!("error: {}: {p}", a.ckpt.display());
    }
    Ok(if i.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
