//! `evax`: the command line. Parses arguments and calls the library (through the per-command
//! modules in `cli/`); nothing else lives here.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "evax",
    version,
    about = "EVA-X chest X-ray vision transformers: load, embed, predict, explain, evaluate, fine-tune"
)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Largest image accepted, in pixels (rows x columns x frames, read from the header before
    /// anything is decoded).
    #[arg(long, global = true, default_value_t = evax::preprocess::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a checkpoint: format, dtype, architecture, input grid, RoPE r, classes, keys.
    Info(cli::info::Args),
    /// Convert a checkpoint to safetensors in the EVA-X (models_eva) layout.
    Convert(cli::convert::Args),
    /// Embed images: `pooled` [N, C] (and `tokens` [N, T, C]) in input order.
    Embed(cli::embed::Args),
    /// Classify images: logits, probabilities and findings above a threshold.
    Predict(cli::predict::Args),
    /// Grad-CAM heatmaps: raw CAMs (.npy), overlays (.png) and an index (cams.json).
    Cam(cli::cam::Args),
    /// Score Grad-CAM localisation against the NIH boxes as the original's get_cams.py.
    CamEval(cli::cam::EvalArgs),
    /// Evaluate on a dataset split with the original's protocol; resumable.
    Eval(cli::eval::Args),
    /// Join the outputs of a sharded run (--shard K/N) as one run writes them.
    Merge(cli::merge::Args),
    /// Evaluate several models on one split: one table, bootstrap intervals, paired tests.
    Compare(cli::compare::Args),
    /// Dataset tools: check a layout, prepare it, label statistics.
    Data {
        #[command(subcommand)]
        command: cli::data::Command,
    },
    /// Fine-tune on a dataset with one of the original's recipes (presets/), resumable.
    Finetune(cli::finetune::Args),
    /// The end-to-end demo on synthetic chest phantoms (a few minutes of CPU).
    Demo(cli::demo::Args),
    /// DICOM tools: header summary, export to PNG / NPY.
    Dicom {
        #[command(subcommand)]
        command: cli::dicom::Command,
    },
    /// Speed and peak memory with random weights.
    Bench(cli::bench::Args),
    /// Serve models over HTTP: predict, Grad-CAM, embed; dynamic batching, metrics.
    Serve(cli::serve::Args),
    /// Segmentation with the original's EVA-X + UperNet model.
    Seg {
        #[command(subcommand)]
        command: cli::seg::Command,
    },
}

/// Keep freed activation buffers in the heap instead of returning them to the OS: every forward
/// pass allocates the same large tensors, and re-faulting their pages costs about a tenth of the
/// run time (glibc only).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; called before any threads start.
    unsafe {
        // 32 MiB is the largest threshold glibc accepts; larger buffers (a segmentation
        // model's feature maps) would still be mapped and unmapped on every use, so mapping is
        // turned off: everything comes from the heap and stays there.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    evax::guard::install_panic_hook();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // The pool is built once, before any work; an error means it already exists.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    evax::preprocess::set_max_pixels(cli.max_pixels);
    let result = match cli.command {
        Command::Info(a) => cli::info::run(a),
        Command::Convert(a) => cli::convert::run(a),
        Command::Embed(a) => cli::embed::run(a),
        Command::Predict(a) => cli::predict::run(a),
        Command::Cam(a) => cli::cam::run(a),
        Command::CamEval(a) => cli::cam::run_eval(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Compare(a) => cli::compare::run(a),
        Command::Merge(a) => cli::merge::run(a),
        Command::Data { command } => cli::data::run(command),
        Command::Finetune(a) => cli::finetune::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Dicom { command } => cli::dicom::run(command),
        Command::Bench(a) => cli::bench::run(a),
        Command::Seg { command } => cli::seg::run(command),
        Command::Serve(a) => cli::serve::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Library errors carry their causes in their own message (and as `source()` for
            // programs); printing the chain would repeat them.
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
