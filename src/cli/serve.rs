//! `evax serve`: the HTTP inference server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use evax::model::LoadOptions;
use evax::predict::PredictorOptions;
use evax::serve::{ModelSpec, ServeOptions, Server};

use super::{ComputeArgs, KernelsArg, NormArg};

/// Serve models over HTTP: predict, Grad-CAM and embed endpoints with dynamic batching,
/// Prometheus metrics and an OpenAPI document; SIGTERM finishes the accepted requests.
#[derive(clap::Args)]
pub struct Args {
    /// A model to serve, as NAME=CHECKPOINT or CHECKPOINT (named after the file); repeat for
    /// several.
    #[arg(long = "weights", required = true, value_name = "[NAME=]CKPT")]
    weights: Vec<String>,
    /// Address to listen on (the default answers this machine only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// File holding the bearer token required on /v1/* and /metrics (first line).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Largest batch gathered from concurrent requests.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Longest wait (ms) for more requests once one is waiting.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Requests admitted at once (decoding, queued or computing); beyond it: 503 + Retry-After.
    #[arg(long, default_value_t = 256)]
    queue: usize,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 64)]
    max_body_mib: usize,
    /// Time limit of one request in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Threads decoding images at once (default: the number of cores).
    #[arg(long)]
    decode_threads: Option<usize>,
    /// Probability at or above which a class is a finding (requests may override it).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Class names: cxr14, chexpert, covidx3, covidx2 or a file (default from the head's size).
    #[arg(long)]
    labels: Option<String>,
    /// Input size in pixels, N or HxW (default: each checkpoint's own).
    #[arg(long, value_parser = super::parse_size)]
    input_size: Option<(usize, usize)>,
    /// Normalisation statistics.
    #[arg(long, value_enum, default_value = "auto")]
    norm: NormArg,
    /// Kernel implementation.
    #[arg(long, value_enum, default_value = "fused")]
    kernels: KernelsArg,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Load the models and serve until SIGTERM / SIGINT.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let (device, precision) = a.compute.resolve()?;
    let options = PredictorOptions {
        load: LoadOptions {
            rope_grid: None,
            kernels: a.kernels.into(),
            device,
            precision,
        },
        input_size: a.input_size,
        normalization: super::normalization(a.norm),
        labels: a.labels.clone(),
        batch: a.max_batch,
        ..PredictorOptions::default()
    };
    let models = a
        .weights
        .iter()
        .map(|w| ModelSpec::parse(w, options.clone()))
        .collect::<evax::Result<Vec<_>>>()?;
    let token = match &a.token_file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let t = text.lines().next().unwrap_or("").trim().to_string();
            if t.is_empty() {
                anyhow::bail!("{}: the token file is empty", f.display());
            }
            Some(t)
        }
        None => None,
    };
    if token.is_none() && !a.addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {} without a token (--token-file): anyone who can reach it \
             can use it",
            a.addr
        );
    }
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let server = Server::start(ServeOptions {
        models,
        addr: a.addr,
        token,
        max_batch: a.max_batch,
        max_wait: Duration::from_millis(a.max_wait_ms),
        queue: a.queue,
        body_limit: a.max_body_mib << 20,
        timeout: Duration::from_secs(a.timeout_s),
        decode_threads: a
            .decode_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        threshold: a.threshold,
        handle_signals: true,
    })?;
    eprintln!(
        "serving {} on http://{} (POST /v1/models/NAME/predict; GET /openapi.json)",
        names.join(", "),
        server.addr()
    );
    server.wait()?;
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}
