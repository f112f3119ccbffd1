//! `evax predict`: class probabilities and findings.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use evax::infer;
use evax::labels::Activation;
use evax::predict::{Predictor, check_extension, write_predictions};

use super::{ModelArgs, finish};

/// How logits become probabilities.
#[derive(Clone, Copy, ValueEnum)]
enum ActivationArg {
    Sigmoid,
    Softmax,
}

/// Classify images: logits, probabilities and findings above a threshold.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Class names: cxr14, chexpert, covidx3, covidx2 or a file (one a line); default from the
    /// head's size.
    #[arg(long)]
    labels: Option<String>,
    /// Override how logits become probabilities.
    #[arg(long, value_enum)]
    activation: Option<ActivationArg>,
    /// Probability at or above which a class is reported as a finding.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Output: .csv or .json.
    #[arg(short, long)]
    output: PathBuf,
    /// Images, folders (walked for .png/.jpg/.jpeg/.dcm) or list files (.txt/.lst).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    shard: super::ShardArgs,
}

/// Predict every input; exit 1 if any failed.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    check_extension(&a.output, &["csv", "json"])?;
    let shard = a.shard.resolve()?;
    let mut o = a.model.predictor_options(a.labels.clone())?;
    o.activation = a.activation.map(|a| match a {
        ActivationArg::Sigmoid => Activation::Sigmoid,
        ActivationArg::Softmax => Activation::Softmax,
    });
    let p = Predictor::load(&o)?;
    let labels = p.labels()?.clone();
    let (paths, failures) = infer::collect_inputs(&a.inputs);
    let (paths, mut failures, part) = evax::shard::Part::take(shard, paths, failures);
    let pb = infer::progress(paths.len(), "predict");
    let (preds, f) = p.predict_files(&paths, a.threshold, &pb)?;
    failures.extend(f);
    write_predictions(&a.output, &labels, &preds)?;
    let settings = serde_json::json!({
        "weights": a.model.weights.display().to_string(),
        "labels": labels.classes,
        "threshold": a.threshold,
        "input_size": p.preprocess.size,
        "inputs": a.inputs.iter().map(|i| i.display().to_string()).collect::<Vec<_>>(),
    });
    part.write_manifest("predict", &a.output, false, settings)?;
    eprintln!("predicted {} images -> {}", preds.len(), a.output.display());
    Ok(finish(&failures, preds.len()))
}
