//! `evax embed`: image representations.

use std::path::PathBuf;
use std::process::ExitCode;

use evax::infer;
use evax::predict::{Predictor, check_extension, write_embeddings};

use super::{ModelArgs, finish};

/// Embed images: `pooled` [N, C] (and `tokens` [N, T, C]) in input order.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Also write every token's representation.
    #[arg(long)]
    tokens: bool,
    /// Also write these layers' feature maps [N, C, h, w] (e.g. blocks.5; `patch_embed`,
    /// `blocks.0` .. `blocks.{depth-1}` for EVA-X), comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    layers: Vec<String>,
    /// Output: .safetensors (tensors `pooled`, `tokens`) or .npy (pooled; tokens beside).
    #[arg(short, long)]
    output: PathBuf,
    /// Images, folders (walked for .png/.jpg/.jpeg/.dcm) or list files (.txt/.lst).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    shard: super::ShardArgs,
}

/// Embed every input; exit 1 if any failed.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    check_extension(&a.output, &["safetensors", "npy"])?;
    let shard = a.shard.resolve()?;
    let p = Predictor::load(&a.model.predictor_options(None)?)?;
    let (paths, failures) = infer::collect_inputs(&a.inputs);
    let (paths, mut failures, part) = evax::shard::Part::take(shard, paths, failures);
    let pb = infer::progress(paths.len(), "embed");
    let (emb, f) = p.embed_files(&paths, a.tokens, &a.layers, &pb)?;
    failures.extend(f);
    let Some(emb) = emb else {
        finish(&failures, 0);
        anyhow::bail!("no input could be embedded");
    };
    write_embeddings(&a.output, &emb)?;
    let settings = serde_json::json!({
        "weights": a.model.weights.display().to_string(),
        "tokens": a.tokens,
        "layers": a.layers,
        "input_size": p.preprocess.size,
        "inputs": a.inputs.iter().map(|i| i.display().to_string()).collect::<Vec<_>>(),
    });
    part.write_manifest("embed", &a.output, false, settings)?;
    eprintln!(
        "embedded {} images -> {}",
        emb.inputs.len(),
        a.output.display()
    );
    Ok(finish(&failures, emb.inputs.len()))
}
