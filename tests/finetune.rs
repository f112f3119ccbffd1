//! Fine-tuning runs on small synthetic data: an interrupted and resumed run ends with the same
//! weights as an uninterrupted one, and its checkpoints load for inference.

mod common;

use common::*;

use std::path::Path;

use candle_core::{Device, Tensor};
use evax::checkpoint::Checkpoint;
use evax::demo;
use evax::model::Trainable;
use evax::model::eva_x::train::init_state_dict;
use evax::model::{EvaX, EvaXConfig, EvaXTrainable, LoadOptions};
use evax::train::config::TrainConfig;
use evax::train::engine::Run;
use evax::train::parallel::{DataParallel, HostCollective};

fn model(seed: u64) -> EvaXTrainable {
    let mut cfg = EvaXConfig::preset("ti").unwrap();
    cfg.depth = 2;
    cfg.train_grid = (2, 2);
    cfg.num_classes = Some(3);
    EvaXTrainable::from_state_dict(&init_state_dict(&cfg, seed), 3, seed).unwrap()
}

fn run(
    dir: &Path,
    data: &Path,
    out: &str,
    max_steps: Option<u64>,
) -> evax::train::engine::RunSummary {
    run_with_model(dir, data, out, max_steps).0
}

fn run_with_model(
    dir: &Path,
    data: &Path,
    out: &str,
    max_steps: Option<u64>,
) -> (evax::train::engine::RunSummary, EvaXTrainable) {
    run_on(dir, data, out, max_steps, 0)
}

/// The test run, on the main model and `replicas` data-parallel CPU replicas (each made
/// from other random weights, which the run must replace by the main model's).
fn run_on(
    dir: &Path,
    data: &Path,
    out: &str,
    max_steps: Option<u64>,
    replicas: usize,
) -> (evax::train::engine::RunSummary, EvaXTrainable) {
    let cfg = TrainConfig::build(
        None,
        Some(
            "dataset = 'synthetic'\ninput_size = 32\nbatch_size = 6\naccum_iter = 2\nepochs = 3\nwarmup_epochs = 1\n\
             lr = 1e-3\nlayer_decay = 0.75\ndrop_path = 0.1\naugment = 'timm'\neval_every = 1\nsave_every_steps = 1\n\
             eval_split = 'test'\nclip_grad = 1.0\nseed = 3",
        ),
        &[],
    )
    .unwrap();
    let train = demo::as_data(
        &data.join("train"),
        &demo::generate(&data.join("train"), 30, 48, 1).unwrap(),
    );
    let eval = demo::as_data(
        &data.join("test"),
        &demo::generate(&data.join("test"), 12, 48, 2).unwrap(),
    );
    let r = Run {
        cfg,
        out_dir: dir.join(out),
        train,
        eval,
        max_steps,
        progress: false,
    };
    let mut m = model(3);
    if replicas == 0 {
        return (r.run(&mut m).unwrap(), m);
    }
    let devices = vec![Device::Cpu; replicas];
    let collective = Box::new(HostCollective::new(replicas + 1));
    let make = |_: &Device| -> evax::Result<Box<dyn Trainable>> { Ok(Box::new(model(77))) };
    let mut dp = DataParallel::new(&m, &devices, collective, &make).unwrap();
    (r.run_data_parallel(&mut m, &mut dp).unwrap(), m)
}

fn weights(p: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = Checkpoint::load(p).unwrap();
    ck.tensors
        .into_iter()
        .filter(|(k, _)| k.starts_with("model."))
        .map(|(k, v)| (k, v.data))
        .collect()
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = scratch("resume");
    let data = dir.join("data");
    let full = run(&dir, &data, "full", None);
    assert!(!full.interrupted);
    assert_eq!(full.epochs, 3);
    // Interrupted twice (mid-epoch: 3 batches of 6 per epoch, a step every 2), then finished.
    let a = run(&dir, &data, "resumed", Some(1));
    assert!(a.interrupted);
    let b = run(&dir, &data, "resumed", Some(2));
    assert!(b.interrupted);
    assert_eq!(b.resumed_at_step, 1);
    let c = run(&dir, &data, "resumed", None);
    assert_eq!(c.steps, full.steps);
    let (w1, w2) = (
        weights(&dir.join("full/checkpoint-last.safetensors")),
        weights(&dir.join("resumed/checkpoint-last.safetensors")),
    );
    assert_eq!(w1.len(), w2.len());
    for ((k1, a), (k2, b)) in w1.iter().zip(&w2) {
        assert_eq!(k1, k2);
        assert_eq!(a, b, "{k1} differs after resuming");
    }
    assert_eq!(full.last.unwrap().mauc, c.last.unwrap().mauc);
    // The best checkpoint loads for inference and gives finite logits.
    let ck = Checkpoint::load(dir.join("full/checkpoint-best.safetensors")).unwrap();
    let (m, report) = EvaX::from_checkpoint(&ck, &LoadOptions::default()).unwrap();
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    let x = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let l = m
        .logits(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(l.iter().all(|v| v.is_finite()) && l.len() == 3);
    let log = std::fs::read_to_string(dir.join("full/train_log.jsonl")).unwrap();
    assert!(log.lines().count() > full.steps as usize);
    assert!(
        std::fs::read_to_string(dir.join("full/curves.svg"))
            .unwrap()
            .starts_with("<svg")
    );
}

#[test]
fn non_finite_loss_stops_with_a_clear_message() {
    let dir = scratch("nan");
    let data = dir.join("data");
    let cfg = TrainConfig::build(None, Some("dataset='synthetic'\ninput_size=32\nbatch_size=6\nepochs=1\nlr=1e30\nwarmup_epochs=0\nlayer_decay=1.0\neval_split='test'"), &[]).unwrap();
    let train = demo::as_data(
        &data.join("train"),
        &demo::generate(&data.join("train"), 30, 48, 1).unwrap(),
    );
    let eval = demo::as_data(
        &data.join("test"),
        &demo::generate(&data.join("test"), 6, 48, 2).unwrap(),
    );
    let r = Run {
        cfg,
        out_dir: dir.join("out"),
        train,
        eval,
        max_steps: None,
        progress: false,
    };
    let e = r.run(&mut model(1)).unwrap_err().to_string();
    assert!(e.contains("loss is") && e.contains("stopping"), "{e}");
}

#[test]
fn written_checkpoints_give_the_trained_model_outputs() {
    let dir = scratch("outputs");
    let (_, trained) = run_with_model(&dir, &dir.join("data"), "run", None);
    let x = Tensor::randn(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let want = trained
        .to_inference()
        .unwrap()
        .logits(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // checkpoint-last (weights under `model.`, optimiser state beside) loads for inference.
    let ck = Checkpoint::load(dir.join("run/checkpoint-last.safetensors")).unwrap();
    let (m, _) = EvaX::from_checkpoint(&ck, &LoadOptions::default()).unwrap();
    let got = m
        .logits(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
}

/// A ResNet (BatchNorm in training mode) interrupted twice and resumed ends bit-exactly as
/// the uninterrupted run, running statistics included; its best checkpoint loads for inference.
#[test]
fn resnet_resumed_run_equals_uninterrupted_run_running_statistics_included() {
    let Some(sh) = evax::fixtures::shared_or_skip(
        "resnet_resumed_run_equals_uninterrupted_run_running_statistics_included",
    ) else {
        return;
    };
    let dir = scratch("resume-r50");
    let data = dir.join("data");
    let ck = Checkpoint::load(sh.join("fixtures/resnet50_l1111_cxr14_ft.pth")).unwrap();
    let cfg = TrainConfig::build(
        Some("cxr14-r50"),
        Some("dataset = 'synthetic'\ninput_size = 64\nbatch_size = 4\naccum_iter = 2\nepochs = 2\nwarmup_epochs = 1\neval_every = 1\nsave_every_steps = 1\neval_split = 'test'\nseed = 5"),
        &[],
    )
    .unwrap();
    let train = demo::as_data(
        &data.join("train"),
        &demo::generate(&data.join("train"), 16, 48, 1).unwrap(),
    );
    let eval = demo::as_data(
        &data.join("test"),
        &demo::generate(&data.join("test"), 8, 48, 2).unwrap(),
    );
    let go = |out: &str, max_steps: Option<u64>| {
        let r = Run {
            cfg: cfg.clone(),
            out_dir: dir.join(out),
            train: train.clone(),
            eval: eval.clone(),
            max_steps,
            progress: false,
        };
        let mut m =
            evax::model::registry::load_trainable(&ck, 3, 5, &Device::Cpu, Default::default())
                .unwrap();
        assert!(
            m.init_notes()
                .iter()
                .any(|n| n.contains("head fc has 14 classes"))
        );
        r.run(m.as_mut()).unwrap()
    };
    let full = go("full", None);
    assert!(!full.interrupted);
    assert!(go("resumed", Some(1)).interrupted);
    let b = go("resumed", Some(2));
    assert_eq!(b.resumed_at_step, 1);
    let c = go("resumed", None);
    assert_eq!(c.steps, full.steps);
    let (w1, w2) = (
        weights(&dir.join("full/checkpoint-last.safetensors")),
        weights(&dir.join("resumed/checkpoint-last.safetensors")),
    );
    assert_eq!(w1.len(), w2.len());
    let stats = w1
        .iter()
        .filter(|(k, _)| k.ends_with(".running_var"))
        .count();
    assert_eq!(
        stats, 17,
        "every BatchNorm's running statistics are saved (bn1, 4 x (bn1-3, downsample))"
    );
    for ((k1, a), (k2, b)) in w1.iter().zip(&w2) {
        assert_eq!(k1, k2);
        assert_eq!(a, b, "{k1} differs after resuming");
    }
    // The statistics moved from the fixture's.
    let moved = w1
        .iter()
        .find(|(k, _)| k == "model.bn1.running_mean")
        .unwrap();
    assert_ne!(moved.1, ck.tensors["bn1.running_mean"].data);
    assert_eq!(full.last.unwrap().mauc, c.last.unwrap().mauc);
    let best = Checkpoint::load(dir.join("full/checkpoint-best.safetensors")).unwrap();
    let (m, report) = evax::model::registry::load(&best, &LoadOptions::default()).unwrap();
    assert_eq!((m.name().as_str(), m.num_classes()), ("ResNet-50", Some(3)));
    assert!(report.unused.is_empty(), "{:?}", report.unused);
}

/// Data-parallel training: the batch of 6 split over the model and two replicas (2 rows
/// each, drop path on, gradient accumulation over 2 batches, clipping) takes the steps of
/// one model given the whole batch. The only difference is the order of float sums (each
/// rank sums its own rows' gradients, rank 0 adds the three), so after the whole run (9
/// steps) the weights agree to 1e-5 of each tensor's largest value (2.1e-6 seen); the
/// gradients themselves are compared in `train::parallel`'s tests.
#[test]
fn data_parallel_run_takes_the_single_model_steps() {
    let dir = scratch("data-parallel");
    let data = dir.join("data");
    let compare = |a: &str, b: &str, tol: f32| {
        let (w1, w2) = (
            weights(&dir.join(a).join("checkpoint-last.safetensors")),
            weights(&dir.join(b).join("checkpoint-last.safetensors")),
        );
        assert_eq!(w1.len(), w2.len());
        assert!(w1.len() > 30, "{} tensors", w1.len());
        let (mut moved, mut worst) = (0, 0f32);
        for ((k1, a), (k2, b)) in w1.iter().zip(&w2) {
            assert_eq!(k1, k2);
            assert_eq!(a.len(), b.len(), "{k1}");
            let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d <= tol * scale, "{k1}: {d:e} of {scale:e}");
            moved += usize::from(d > 0.0);
            worst = worst.max(d / scale);
        }
        eprintln!(
            "{a} vs {b}: {moved} of {} tensors differ, at most {worst:.1e}",
            w1.len()
        );
    };
    let full = run_on(&dir, &data, "full", None, 0).0;
    let split = run_on(&dir, &data, "full-split", None, 2).0;
    assert_eq!((full.steps, split.steps), (9, 9));
    compare("full", "full-split", 1e-5);
    let (a, b) = (full.last.unwrap(), split.last.unwrap());
    assert!((a.mauc - b.mauc).abs() < 1e-3, "{} vs {}", a.mauc, b.mauc);
}
