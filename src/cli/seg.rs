//! `evax seg ...`: the segmentation model (EVA-X + pyramid + UperNet).

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
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
    /// Score a split as the original does (mmseg IoU / Dice over the set); resumable.
    Eval(EvalArgs),
    /// Turn a public download (SIIM, RSNA, lung, Shenzhen) into image / mask pairs and splits.
    Prepare(PrepareArgs),
    /// Train with the original's recipe (siim, rsna, lung, shenzhen); resumable.
    Train(TrainArgs),
}

/// `evax seg train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// The recipe: siim, rsna, lung or shenzhen.
    #[arg(long)]
    preset: String,
    /// Starting weights: an EVA-X checkpoint (MIM or fine-tuned; the pyramid and head start
    /// fresh) or an mmsegmentation checkpoint of the whole model.
    #[arg(long)]
    weights: PathBuf,
    /// A folder as `seg prepare` writes it (images/, masks/, train.txt, test.txt).
    #[arg(long)]
    data_dir: PathBuf,
    /// Change a setting of the recipe (repeatable), e.g. `--set epochs=2`.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Width of a freshly initialised head.
    #[arg(long, default_value_t = 256)]
    channels: usize,
    /// Stop after N steps (resumable: run the same command again).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Kernels and device.
    #[command(flatten)]
    run: SegCompute,
    /// Output folder: checkpoints, train_log.jsonl, curves.svg, eval/.
    #[arg(short, long)]
    output: PathBuf,
}

/// The datasets `seg prepare` knows.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DatasetArg {
    Siim,
    Rsna,
    Lung,
    Shenzhen,
}

/// `evax seg prepare`.
#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Which dataset.
    #[arg(long, value_enum)]
    dataset: DatasetArg,
    /// The download as published (SIIM: dicom-images-train/, train-rle.csv; RSNA:
    /// stage_2_train_images/, stage_2_train_labels.csv; lung: Train/, Test/; Shenzhen:
    /// CXR_png/, Annotations/masks/).
    #[arg(long)]
    data_dir: PathBuf,
    /// A folder with train.txt and test.txt (the original's data_splits); default: a seeded
    /// 70 / 30 split.
    #[arg(long)]
    splits: Option<PathBuf>,
    /// SIIM: every run-length row and the negative images; RSNA: every box of a patient (the
    /// original keeps the last row only).
    #[arg(long)]
    all_parts: bool,
    /// Seed of the random split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: images/, masks/, train.txt, test.txt.
    #[arg(short, long)]
    output: PathBuf,
}

/// `evax seg eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// An mmsegmentation checkpoint of the original's model.
    #[arg(long)]
    weights: PathBuf,
    /// Folder with `images/<name>.{png,jpg,dcm}` and `masks/<name>.png` (0/1 or 0/255).
    #[arg(long)]
    data_dir: PathBuf,
    /// Split list: one name a line (as the original's split files).
    #[arg(long)]
    list: PathBuf,
    /// Model input size: N or HxW (default: the checkpoint's).
    #[arg(long, value_parser = parse_size)]
    input_size: Option<(usize, usize)>,
    /// Foreground where sigmoid(logit) exceeds this (the original: 0.3).
    #[arg(long, default_value_t = 0.3)]
    threshold: f32,
    /// Kernels and device.
    #[command(flatten)]
    run: SegCompute,
    /// Output folder: metrics.json, per_image.csv, report.md.
    #[arg(short, long)]
    output: PathBuf,
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
    /// Kernels and device.
    #[command(flatten)]
    run: SegCompute,
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
        Command::Eval(a) => eval(a),
        Command::Prepare(a) => prepare(a),
        Command::Train(a) => train(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<ExitCode> {
    use evax::segment::engine::{SegRun, SegTrainConfig, initial_state_dict};
    let mut cfg = SegTrainConfig::preset(&a.preset).ok_or_else(|| {
        anyhow::anyhow!("unknown preset '{}' (siim, rsna, lung, shenzhen)", a.preset)
    })?;
    for kv in &a.sets {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {kv}: expected key=value"))?;
        cfg.set(k.trim(), v.trim())?;
    }
    let ck = Checkpoint::load(&a.weights)?;
    let (sd, notes) = initial_state_dict(&ck, cfg.input_size, a.channels, cfg.seed)?;
    for n in notes {
        eprintln!("{n}");
    }
    let (device, precision) = a.run.training()?;
    let mut model =
        evax::segment::SegTrainable::from_state_dict(&sd, &device, a.run.kernels.into())?;
    evax::model::Trainable::set_precision(&mut model, precision)?;
    let split = |name: &str| evax::segment::read_split(&a.data_dir, &a.data_dir.join(name));
    let (train, mut failures) = split("train.txt")?;
    let (eval, f) = split("test.txt")?;
    failures.extend(f);
    if !failures.is_empty() {
        finish(&failures, 0);
        anyhow::bail!("{} pairs of the lists are missing files", failures.len());
    }
    eprintln!(
        "training {} on {} pairs ({} to evaluate), {} epochs",
        evax::model::Trainable::name(&model),
        train.len(),
        eval.len(),
        cfg.epochs
    );
    let run = SegRun {
        cfg,
        out_dir: a.output.clone(),
        train,
        eval,
        max_steps: a.max_steps,
        progress: true,
    };
    let s = run.run(&mut model)?;
    if s.interrupted {
        eprintln!(
            "stopped after {} steps; run the same command to continue",
            s.steps
        );
    }
    if let Some(b) = &s.best {
        println!(
            "best: epoch {} foreground Dice {:.4} IoU {:.4} -> {}",
            b.epoch,
            b.fg_dice,
            b.fg_iou,
            a.output.join("checkpoint-best.safetensors").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn prepare(a: PrepareArgs) -> anyhow::Result<ExitCode> {
    use evax::segment::prepare::{PrepareOptions, SegDataset};
    let o = PrepareOptions {
        dataset: match a.dataset {
            DatasetArg::Siim => SegDataset::Siim,
            DatasetArg::Rsna => SegDataset::Rsna,
            DatasetArg::Lung => SegDataset::Lung,
            DatasetArg::Shenzhen => SegDataset::Shenzhen,
        },
        raw: a.data_dir,
        out: a.output,
        splits: a.splits,
        all_parts: a.all_parts,
        seed: a.seed,
    };
    let r = evax::segment::prepare::prepare(&o)?;
    eprintln!(
        "{} pairs ({} train, {} test) -> {}",
        r.pairs,
        r.train,
        r.test,
        o.out.display()
    );
    Ok(finish(&r.skipped, r.pairs))
}

fn load(weights: &std::path::Path, run: &SegCompute) -> anyhow::Result<UperNet> {
    let ck = Checkpoint::load(weights)?;
    let (device, precision) = run.inference()?;
    let opts = LoadOptions {
        kernels: run.kernels.into(),
        device,
        precision,
        ..Default::default()
    };
    let (model, report) = UperNet::from_checkpoint(&ck, &opts)?;
    if !report.unused.is_empty() {
        eprintln!("unused keys: {}", report.unused.join(", "));
    }
    Ok(model)
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let model = load(&a.weights, &a.run)?;
    let (samples, mut failures) = evax::segment::read_split(&a.data_dir, &a.list)?;
    let job = evax::segment::SegEvalJob {
        model: &model,
        weights: &a.weights,
        size: a.input_size.unwrap_or_else(|| model.default_input_size()),
        threshold: a.threshold,
    };
    let (report, f) = job.run(&samples, &a.output)?;
    failures.extend(f);
    print!("{}", evax::segment::eval::summary_text(&report));
    eprintln!("-> {}", a.output.join("metrics.json").display());
    Ok(finish(&failures, report.images))
}

fn predict(a: PredictArgs) -> anyhow::Result<ExitCode> {
    let model = load(&a.weights, &a.run)?;
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

/// How a segmentation command computes: kernels, device and precision.
#[derive(clap::Args)]
pub struct SegCompute {
    /// Kernel implementation.
    #[arg(long, value_enum, default_value = "fused")]
    kernels: KernelsArg,
    /// Device and precision (reduced precision, for inference: the backbone's products, and
    /// on CPUs with AVX512-BF16 the head's convolutions; for training, bf16 on the CPU: the
    /// backbone's blocks; the rest computes in f32).
    #[command(flatten)]
    compute: super::ComputeArgs,
}

impl SegCompute {
    /// Device and precision for inference (`predict`, `eval`).
    fn inference(&self) -> anyhow::Result<(Device, evax::compute::Precision)> {
        Ok(self.compute.resolve()?)
    }

    /// The device and precision for training: f32, or on the CPU bf16 for the backbone's
    /// transformer blocks (a note says so; f16 on the CPU falls back to f32 with a note, as
    /// for `finetune`); reduced precision on a GPU is refused.
    fn training(&self) -> anyhow::Result<(Device, evax::compute::Precision)> {
        use evax::compute::Precision;
        let (device, precision) = self.compute.resolve()?;
        match precision {
            Precision::Bf16 if device.is_cpu() => eprintln!(
                "note: --precision bf16: segmentation training computes the backbone's \
                 transformer blocks in bf16 products (f32 sums and master weights), the \
                 pyramid and the head in f32"
            ),
            Precision::F32 => {}
            p => anyhow::bail!(
                "--precision {}: segmentation training computes in f32 only so far on a GPU \
                 (reduced precision is for seg predict and seg eval)",
                p.name()
            ),
        }
        Ok((device, precision))
    }
}
