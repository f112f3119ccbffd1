//! `evax cam` and `evax cam-eval`: Grad-CAM maps, and their scoring against the NIH boxes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use evax::explain::jobs::{self, CamEvalJob, CamEvalPreprocess, CamJob, ClassChoice};
use evax::infer;
use evax::model::registry;
use evax::predict::Predictor;

use super::{ModelArgs, finish};

/// Grad-CAM heatmaps: raw CAMs (.npy), overlays (.png) and an index (cams.json).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Classes to explain, by name (repeatable); default: the top class.
    #[arg(long = "class")]
    classes: Vec<String>,
    /// Explain the K highest-scoring classes of each image.
    #[arg(long, conflicts_with = "classes")]
    top: Option<usize>,
    /// Class names (as for predict).
    #[arg(long)]
    labels: Option<String>,
    /// Target layer: last (the original's: the last block's norm1), blocks.N.norm1 or blocks.N.
    #[arg(long)]
    layer: Option<String>,
    /// Skip the overlay PNGs.
    #[arg(long)]
    no_overlay: bool,
    /// For DICOM inputs, also write results a PACS can store: each overlay as a Secondary
    /// Capture image (`*_sc.dcm`) and the probabilities and findings as a Structured Report
    /// (`*_sr.dcm`), in the source's study.
    #[arg(long)]
    dicom_out: bool,
    /// Probability at or above which the report lists a class as a finding.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Images, folders or list files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    shard: super::ShardArgs,
}

/// Write CAMs for every input; exit 1 if any failed.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let shard = a.shard.resolve()?;
    let p = Predictor::load(&a.model.predictor_options(a.labels.clone())?)?;
    let labels = p.labels()?.clone();
    let n = labels.classes.len();
    let choice = if a.classes.is_empty() {
        ClassChoice::Top(a.top.unwrap_or(1).clamp(1, n))
    } else {
        ClassChoice::Fixed(
            a.classes
                .iter()
                .map(|c| labels.index_of(c))
                .collect::<Result<_, _>>()?,
        )
    };
    let layer = a.layer.unwrap_or_else(|| p.model.default_cam_layer());
    p.model.check_cam_layer(&layer)?;
    let settings = serde_json::json!({
        "weights": a.model.weights.display().to_string(),
        "labels": labels.classes,
        "classes": a.classes,
        "top": a.top,
        "layer": layer,
        "overlays": !a.no_overlay,
        "input_size": p.preprocess.size,
        "inputs": a.inputs.iter().map(|i| i.display().to_string()).collect::<Vec<_>>(),
    });
    let job = CamJob {
        preprocess: p.preprocess,
        layer,
        model: p.model.as_ref(),
        labels,
        classes: choice,
        batch: a.model.batch,
        overlays: !a.no_overlay,
        dicom_out: a.dicom_out.then(|| evax::dicom::results::Producer {
            model: p.model.name(),
            checkpoint: evax::io::checkpoint_label(&a.model.weights),
            threshold: a.threshold,
        }),
    };
    let (paths, failures) = infer::collect_inputs(&a.inputs);
    // Output names from the whole list, so that every shard names its files as one run does.
    let names = evax::io::output_names(&paths);
    let (paths, mut failures, part) = evax::shard::Part::take(shard, paths, failures);
    let (records, f) = job.run(&paths, &names[part.rows.clone()], &a.output)?;
    failures.extend(f);
    part.write_manifest("cam", &a.output, true, settings)?;
    eprintln!(
        "wrote {} CAMs -> {}",
        records.len(),
        a.output.join("cams.json").display()
    );
    Ok(finish(
        &failures,
        paths.len() - failures.len().min(paths.len()),
    ))
}

/// Preprocessing of `cam-eval`.
#[derive(Clone, Copy, ValueEnum)]
enum CamPreprocessArg {
    Original,
    Classification,
}

/// Score Grad-CAM localisation against the NIH boxes as the original's get_cams.py.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint (a CXR14 fine-tuned model).
    #[arg(long)]
    weights: PathBuf,
    /// NIH BBox_List_2017.csv.
    #[arg(long)]
    boxes: PathBuf,
    /// Folder holding the images (any layout; searched by file name).
    #[arg(long)]
    images: PathBuf,
    /// CAM threshold.
    #[arg(long, default_value_t = 0.5, conflicts_with = "search")]
    threshold: f32,
    /// Sweep t = 0.01..0.60 and report the best (the original's protocol), plus the honest
    /// variant tuned on one half of the images and scored on the other.
    #[arg(long)]
    search: bool,
    /// Seed of the honest variant's split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Preprocessing: get_cams.py's (original) or the classification transform.
    #[arg(long, value_enum, default_value = "original")]
    preprocess: CamPreprocessArg,
    /// Write overlays with the box drawn.
    #[arg(long)]
    overlays: bool,
    /// Input size.
    #[arg(long, default_value = "224", value_parser = super::parse_size)]
    input_size: (usize, usize),
    /// Target layer (as for cam).
    #[arg(long)]
    layer: Option<String>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Device and precision.
    #[command(flatten)]
    compute: super::ComputeArgs,
}

/// Score and print the localisation metrics; exit 1 if any image failed.
pub fn run_eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let (device, precision) = a.compute.resolve()?;
    let load = evax::model::LoadOptions {
        device,
        precision,
        ..Default::default()
    };
    let (model, _) = registry::load_file(&a.weights, None, &load)?;
    let layer = a.layer.unwrap_or_else(|| model.default_cam_layer());
    model.check_cam_layer(&layer)?;
    let job = CamEvalJob {
        layer,
        model: model.as_ref(),
        size: a.input_size,
        preprocess: match a.preprocess {
            CamPreprocessArg::Original => CamEvalPreprocess::Original,
            CamPreprocessArg::Classification => CamEvalPreprocess::Classification,
        },
        threshold: a.threshold,
        search: a.search,
        seed: a.seed,
        batch: a.batch,
        overlays: a.overlays,
    };
    let r = job.run(&a.weights, &a.boxes, &a.images, &a.output)?;
    for b in &r.bad_rows {
        eprintln!("skipped row {b}");
    }
    eprintln!(
        "scored {} of {} boxes; {} boxes on {} images not found in {} (listed in {})",
        r.boxes_scored,
        r.boxes_total,
        r.boxes_missing,
        r.images_missing,
        a.images.display(),
        a.output.join("missing.txt").display()
    );
    print!("{}", jobs::summary_text(&r));
    Ok(finish(&r.failures, r.boxes_scored))
}
