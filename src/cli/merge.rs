//! `evax merge`: the parts of a sharded run joined as one run writes them.

use std::path::PathBuf;
use std::process::ExitCode;

/// Join the outputs of a run's shards (`--shard K/N`, Slurm arrays, Indexed Jobs): an
/// evaluation's folders into one (metrics recomputed on the union), Grad-CAM folders into one,
/// predictions or embeddings into one file.
#[derive(clap::Args)]
pub struct Args {
    /// Output: a folder for `eval` and `cam` shards, a file of the parts' type for `predict`
    /// (.csv, .json) and `embed` (.safetensors, .npy) shards.
    #[arg(short, long)]
    output: PathBuf,
    /// The shards' output folders (eval, cam) or files (predict, embed), in any order.
    #[arg(required = true)]
    parts: Vec<PathBuf>,
}

/// Merge and print what was joined (and the evaluation's report).
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let r = evax::merge::merge(&a.parts, &a.output)?;
    if let Some(e) = &r.eval {
        print!("{}", evax::eval::markdown(e));
    }
    eprintln!(
        "merged {} {} shards: {} rows -> {}",
        r.parts,
        r.command,
        r.rows,
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}
