//! Dynamic batching: one compute thread per model gathers the decoded requests waiting for it
//! (up to a maximum batch, waiting at most a short time for more) and runs them as one forward
//! pass, so that a loaded server computes at batch throughput.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::explain::cam_maps;
use crate::predict::Predictor;

/// What a request wants computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Logits.
    Predict,
    /// The pooled representation.
    Embed,
    /// Logits and the Grad-CAM of one class (`None`: the highest-scoring one).
    Cam(Option<usize>),
}

/// A computed result.
#[derive(Debug, Clone)]
pub enum Output {
    /// Class logits.
    Logits(Vec<f32>),
    /// The pooled representation.
    Pooled(Vec<f32>),
    /// Logits, the explained class and its CAM `[H, W]` (row-major, the model's input size).
    Cam {
        /// Class logits.
        logits: Vec<f32>,
        /// The class explained.
        class: usize,
        /// The map in [0, 1].
        map: Vec<f32>,
    },
}

/// One preprocessed request waiting for the model.
pub struct Job {
    /// The model input `[3, H, W]`, normalised.
    pub input: Vec<f32>,
    /// What to compute.
    pub work: Work,
    /// Where the answer goes (a dropped receiver means the client has gone: the job is
    /// skipped).
    pub reply: oneshot::Sender<Result<Output, String>>,
}

/// The sending side of a model's compute thread.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    model: String,
    metrics: Arc<Metrics>,
}

/// How the compute thread gathers batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait for more requests once one is there.
    pub max_wait: Duration,
    /// Jobs that may wait (a bound; admission normally stops requests before it).
    pub capacity: usize,
}

impl Batcher {
    /// Start the compute thread of `predictor` (named `model` in metrics); it ends when every
    /// [`Batcher`] clone is dropped and the queued jobs are done.
    pub fn start(
        model: &str,
        predictor: Arc<Predictor>,
        policy: BatchPolicy,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel(policy.capacity.max(1));
        let name = model.to_string();
        let m = metrics.clone();
        let handle = std::thread::Builder::new()
            .name(format!("evax-compute-{model}"))
            .spawn(move || compute_loop(&name, &predictor, policy, &rx, &m))?;
        Ok((
            Batcher {
                tx,
                model: model.to_string(),
                metrics,
            },
            handle,
        ))
    }

    /// Queue a job; an error when the queue is full or the thread has stopped.
    pub fn submit(&self, job: Job) -> Result<(), &'static str> {
        self.metrics.queue(&self.model, 1);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue(&self.model, -1);
                Err(match e {
                    TrySendError::Full(_) => "queue_full",
                    TrySendError::Disconnected(_) => "shutting_down",
                })
            }
        }
    }
}

fn compute_loop(
    model: &str,
    p: &Predictor,
    policy: BatchPolicy,
    rx: &Receiver<Job>,
    metrics: &Metrics,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + policy.max_wait;
        while jobs.len() < policy.max_batch.max(1) {
            let now = Instant::now();
            let next = if now >= deadline {
                rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                rx.recv_timeout(deadline - now)
            };
            match next {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        metrics.queue(model, -(jobs.len() as i64));
        // Requests whose client has gone (timed out, disconnected) are not computed.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        metrics.batch(model, jobs.len());
        for kind in [Work::Predict, Work::Embed, Work::Cam(None)] {
            let (group, rest): (Vec<Job>, Vec<Job>) = jobs
                .into_iter()
                .partition(|j| std::mem::discriminant(&j.work) == std::mem::discriminant(&kind));
            jobs = rest;
            if group.is_empty() {
                continue;
            }
            let inputs: Vec<&[f32]> = group.iter().map(|j| j.input.as_slice()).collect();
            let works: Vec<Work> = group.iter().map(|j| j.work).collect();
            let result = crate::guard::guarded("the model failed", || {
                run_group(p, &inputs, &works).map_err(|e| e.to_string())
            });
            match result {
                Ok(outputs) => {
                    for (job, out) in group.into_iter().zip(outputs) {
                        let _ = job.reply.send(Ok(out));
                    }
                }
                Err(e) => {
                    for job in group {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// Run one batch of requests of the same kind.
fn run_group(p: &Predictor, inputs: &[&[f32]], works: &[Work]) -> crate::Result<Vec<Output>> {
    let (h, w) = p.preprocess.size;
    let data: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
    let x = Tensor::from_vec(data, (inputs.len(), 3, h, w), p.model.device())?;
    Ok(match works[0] {
        Work::Predict => p
            .model
            .logits(&x)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(Output::Logits)
            .collect(),
        Work::Embed => p
            .model
            .embed(&x)?
            .pooled
            .to_vec2::<f32>()?
            .into_iter()
            .map(Output::Pooled)
            .collect(),
        Work::Cam(_) => {
            let choose = |i: usize, logits: &[f32]| match works[i] {
                Work::Cam(Some(c)) => vec![c],
                _ => vec![top_class(logits)],
            };
            let layer = p.model.default_cam_layer();
            let batch = p.model.activation_grads(&x, &layer, &choose)?;
            let round = batch.rounds.first().ok_or_else(|| {
                crate::Error::Invalid("Grad-CAM produced no gradient round".into())
            })?;
            let maps = cam_maps(round, (h, w))?;
            batch
                .logits
                .into_iter()
                .zip(batch.targets)
                .zip(maps)
                .map(|((logits, targets), map)| Output::Cam {
                    logits,
                    class: targets.first().copied().unwrap_or(0),
                    map,
                })
                .collect()
        }
    })
}

/// The index of the largest logit.
pub fn top_class(logits: &[f32]) -> usize {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}
