//! Data-parallel training on several devices of one machine (`evax finetune --gpus 0,1,...`):
//! the main model (rank 0) and its replicas each take a contiguous part of every batch, with
//! the drop-path draws one model given the whole batch would make for those rows; the
//! gradients of each part's share of the batch's mean loss are summed on rank 0 (one flat
//! reduction), the optimiser steps there, and the new weights (with BatchNorm buffers, as
//! PyTorch DDP broadcasts them) go back to the replicas in one broadcast. The result is the
//! step of one device with the same global batch, up to the order of float sums; BatchNorm
//! layers normalise over each replica's rows, as DDP without SyncBatchNorm.
//!
//! Unlike DDP, the reduction follows the backward rather than overlapping it: candle computes
//! all gradients in one `backward` call, with no per-parameter hook to start a bucket early.
//! The NCCL transport is [`Nccl`] (`cuda` builds); [`HostCollective`] does the same through
//! host memory, for CPU replicas and the tests.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Barrier, Mutex};

use candle_core::{Device, Result, Tensor, Var};

use super::optim::Grads;
use crate::model::Trainable;
use crate::rng::Rng;

/// How the ranks (0 = the main model, then the replicas) combine flat f32 vectors. Every rank
/// must make the same calls in the same order, each from its own thread.
pub trait Collective: Send + Sync {
    /// Number of ranks.
    fn ranks(&self) -> usize;
    /// The sum of every rank's `flat` (`[len]`, on the rank's device), on rank 0; `None` on the
    /// others.
    fn reduce_sum(&self, rank: usize, flat: &Tensor) -> Result<Option<Tensor>>;
    /// Rank 0's `flat` on every rank (the others' `flat` gives the length and device only).
    fn broadcast(&self, rank: usize, flat: &Tensor) -> Result<Tensor>;
}

/// A [`Collective`] through host memory: the ranks meet at a barrier and rank 0 sums (or
/// publishes) the vectors in rank order.
pub struct HostCollective {
    ranks: usize,
    slots: Mutex<Vec<Option<Vec<f32>>>>,
    barrier: Barrier,
}

impl HostCollective {
    /// A collective of `ranks` ranks.
    pub fn new(ranks: usize) -> Self {
        HostCollective {
            ranks,
            slots: Mutex::new(vec![None; ranks]),
            barrier: Barrier::new(ranks.max(1)),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<Vec<f32>>>> {
        // A rank that panicked holding the lock leaves plain data behind: keep using it.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collective for HostCollective {
    fn ranks(&self) -> usize {
        self.ranks
    }

    fn reduce_sum(&self, rank: usize, flat: &Tensor) -> Result<Option<Tensor>> {
        // Every rank reaches both barriers, whatever its own vector held.
        let mine = flat.to_vec1::<f32>();
        self.slots()[rank] = Some(mine.as_ref().cloned().unwrap_or_default());
        self.barrier.wait();
        let out = if rank == 0 {
            let mut slots = self.slots();
            let mut sum = slots[0].take().unwrap_or_default();
            for s in slots.iter_mut().skip(1) {
                let s = s.take().unwrap_or_default();
                if s.len() == sum.len() {
                    sum.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
                } else {
                    sum.clear();
                }
            }
            Some(sum)
        } else {
            None
        };
        self.barrier.wait();
        mine?;
        match out {
            Some(sum) if sum.len() == flat.elem_count() => Ok(Some(Tensor::from_vec(
                sum,
                flat.elem_count(),
                flat.device(),
            )?)),
            Some(_) => candle_core::bail!("data-parallel replicas sent vectors of other lengths"),
            None => Ok(None),
        }
    }

    fn broadcast(&self, rank: usize, flat: &Tensor) -> Result<Tensor> {
        let mine = if rank == 0 {
            flat.to_vec1::<f32>().map(Some)
        } else {
            Ok(None)
        };
        if let Ok(Some(v)) = &mine {
            self.slots()[0] = Some(v.clone());
        }
        self.barrier.wait();
        let got = self.slots()[0].clone().unwrap_or_default();
        self.barrier.wait();
        if rank == 0 {
            self.slots()[0] = None;
        }
        mine?;
        if got.len() != flat.elem_count() {
            candle_core::bail!("data-parallel broadcast of another length");
        }
        Tensor::from_vec(got, flat.elem_count(), flat.device())
    }
}

/// The collective for ranks on `devices` (rank i on devices[i]): NCCL when all are CUDA
/// GPUs (each once), host memory when all are the CPU.
pub fn collective_for(devices: &[Device]) -> crate::Result<Box<dyn Collective>> {
    if devices.iter().all(|d| d.is_cpu()) {
        return Ok(Box::new(HostCollective::new(devices.len())));
    }
    let names: Vec<String> = devices.iter().map(crate::compute::device_name).collect();
    if !devices.iter().all(|d| d.is_cuda()) {
        return Err(crate::Error::Invalid(format!(
            "data-parallel training on {} mixes CPU and GPU",
            names.join(", ")
        )));
    }
    if let Some(twice) = names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
    {
        return Err(crate::Error::Invalid(format!(
            "data-parallel training lists {} twice (one rank per GPU)",
            twice.1
        )));
    }
    #[cfg(feature = "nccl")]
    {
        Ok(Box::new(Nccl::new(devices)?))
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(crate::Error::Invalid(
            "data-parallel GPU training needs a build with --features cuda,nccl".into(),
        ))
    }
}

/// The replicas of a model (ranks 1..) and the collective that joins them to the main model.
pub struct DataParallel {
    /// Copies of the main model, each on its own device.
    pub replicas: Vec<Box<dyn Trainable>>,
    /// The transport, for `replicas.len() + 1` ranks.
    pub collective: Box<dyn Collective>,
}

/// One batch as the training loop holds it: `n` images `[n, 3, s, s]` and targets `[n, k]`,
/// row-major on the host.
pub struct HostBatch<'a> {
    /// Pixels.
    pub x: &'a [f32],
    /// Targets.
    pub y: &'a [f32],
    /// Images.
    pub n: usize,
    /// Side of each (square) image.
    pub side: usize,
    /// Targets per image.
    pub classes: usize,
}

/// A loss of logits and targets (mean over the rows it is given).
pub type LossFn = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Sync;

/// `n` rows over `ranks` ranks in order, as equal as possible (the first ranks take one more).
pub fn split_rows(n: usize, ranks: usize) -> Vec<Range<usize>> {
    let ranks = ranks.max(1);
    let (base, extra) = (n / ranks, n % ranks);
    let mut start = 0;
    (0..ranks)
        .map(|r| {
            let len = base + usize::from(r < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Calls the collective `meet` with `flat`, or with zeros of the same length when `flat`
/// could not be made: every rank must reach every collective call, or the others wait for
/// ever (the caller reports `flat`'s error afterwards).
fn meet<R>(
    flat: &Result<Tensor>,
    vars: &BTreeMap<String, Var>,
    device: &Device,
    meet: impl FnOnce(&Tensor) -> Result<R>,
) -> Result<R> {
    match flat {
        Ok(f) => meet(f),
        Err(_) => {
            let len = vars.values().map(|v| v.elem_count()).sum::<usize>();
            meet(&Tensor::zeros(len, candle_core::DType::F32, device)?)
        }
    }
}

/// The forward and backward of one rank's rows: its part of the mean loss (weighted by its
/// share of the rows) and the gradients of that part times `scale`, by name.
#[allow(clippy::too_many_arguments)]
fn part_grads(
    model: &dyn Trainable,
    batch: &HostBatch,
    rows: Range<usize>,
    loss: &LossFn,
    drop_path: f64,
    seed: u64,
    scale: f64,
) -> Result<(f32, Option<Grads>)> {
    let nr = rows.len();
    if nr == 0 {
        return Ok((0.0, None));
    }
    let (s, k, dev) = (batch.side, batch.classes, model.device());
    let per = 3 * s * s;
    let x = Tensor::from_slice(
        &batch.x[rows.start * per..rows.end * per],
        (nr, 3, s, s),
        dev,
    )?;
    let y = Tensor::from_slice(&batch.y[rows.start * k..rows.end * k], (nr, k), dev)?;
    let mut rng = Rng::new(seed).for_rows(rows.start, batch.n);
    let logits = model.forward_train(&x, drop_path, Some(&mut rng))?;
    let l = loss(&logits, &y)?;
    let lv = l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    let share = nr as f64 / batch.n as f64;
    let weighted = if share == 1.0 { l } else { (l * share)? };
    let store = (weighted * scale)?.backward()?;
    Ok((lv * share as f32, Some(model.grads(&store)?)))
}

/// Every parameter's gradient in name order as one `[len]` vector (zeros where a parameter
/// has none), on `device`.
fn flatten(vars: &BTreeMap<String, Var>, grads: Option<&Grads>, device: &Device) -> Result<Tensor> {
    let parts = vars
        .iter()
        .map(|(name, v)| match grads.and_then(|g| g.get(name)) {
            Some(g) => g.to_dtype(candle_core::DType::F32)?.flatten_all(),
            None => Tensor::zeros(v.elem_count(), candle_core::DType::F32, device),
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// The inverse of [`flatten`]: `flat` cut into the parameters' shapes, by name.
fn unflatten(vars: &BTreeMap<String, Var>, flat: &Tensor) -> Result<Grads> {
    let mut at = 0;
    vars.iter()
        .map(|(name, v)| {
            let n = v.elem_count();
            let g = flat.narrow(0, at, n)?.reshape(v.shape())?;
            at += n;
            Ok((name.clone(), g))
        })
        .collect()
}

/// The main model's mean loss over the whole batch and its gradients times `scale` (summed
/// over the replicas' rows when there are any), with the drop-path draws of `seed`. Without
/// replicas this is the plain step: the same draws, the same arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn batch_grads(
    main: &dyn Trainable,
    parallel: Option<&mut DataParallel>,
    batch: &HostBatch,
    loss: &LossFn,
    drop_path: f64,
    seed: u64,
    scale: f64,
) -> Result<(f32, Grads)> {
    let Some(dp) = parallel.filter(|dp| !dp.replicas.is_empty()) else {
        let (lv, grads) = part_grads(main, batch, 0..batch.n, loss, drop_path, seed, scale)?;
        return Ok((lv, grads.unwrap_or_default()));
    };
    let rows = split_rows(batch.n, dp.replicas.len() + 1);
    let collective = dp.collective.as_ref();
    std::thread::scope(|scope| {
        let workers: Vec<_> = dp
            .replicas
            .iter_mut()
            .zip(rows.iter().skip(1))
            .enumerate()
            .map(|(i, (replica, r))| {
                let r = r.clone();
                scope.spawn(move || -> Result<f32> {
                    let m = replica.as_ref();
                    let part = part_grads(m, batch, r, loss, drop_path, seed, scale);
                    let (lv, grads) = match &part {
                        Ok((lv, g)) => (*lv, g.as_ref()),
                        Err(_) => (0.0, None),
                    };
                    let flat = flatten(m.vars(), grads, m.device());
                    let sent = meet(&flat, m.vars(), m.device(), |f| {
                        collective.reduce_sum(i + 1, f)
                    });
                    part?;
                    flat?;
                    sent?;
                    Ok(lv)
                })
            })
            .collect();
        let part = part_grads(main, batch, rows[0].clone(), loss, drop_path, seed, scale);
        let grads = part.as_ref().ok().and_then(|(_, g)| g.as_ref());
        let flat = flatten(main.vars(), grads, main.device());
        let reduced = meet(&flat, main.vars(), main.device(), |f| {
            collective.reduce_sum(0, f)
        });
        let mut lv = 0.0;
        for w in workers {
            lv += w.join().map_err(|_| {
                candle_core::Error::Msg("a data-parallel replica panicked".into())
            })??;
        }
        let (mine, _) = part?;
        flat?;
        let Some(sum) = reduced? else {
            candle_core::bail!("rank 0 received no gradient sum");
        };
        Ok((mine + lv, unflatten(main.vars(), &sum)?))
    })
}

impl DataParallel {
    /// Replicas of `main` on `devices`, through `collective` (for `devices.len() + 1` ranks):
    /// each made by `make` on its device, then given the main model's weights.
    pub fn new(
        main: &dyn Trainable,
        devices: &[Device],
        collective: Box<dyn Collective>,
        make: &dyn Fn(&Device) -> crate::Result<Box<dyn Trainable>>,
    ) -> crate::Result<Self> {
        if collective.ranks() != devices.len() + 1 {
            return Err(crate::Error::Invalid(format!(
                "a collective of {} ranks for {} devices",
                collective.ranks(),
                devices.len() + 1
            )));
        }
        let replicas = devices
            .iter()
            .map(make)
            .collect::<crate::Result<Vec<_>>>()?;
        let mut dp = DataParallel {
            replicas,
            collective,
        };
        dp.sync(main)?;
        Ok(dp)
    }

    /// Copy the main model's parameters and buffers to every replica (after each optimiser
    /// step, and once at the start or on resuming).
    pub fn sync(&mut self, main: &dyn Trainable) -> Result<()> {
        let state = |m: &dyn Trainable| -> BTreeMap<String, Var> {
            let mut all = m.vars().clone();
            all.extend(m.buffers());
            all
        };
        let main_state = state(main);
        for r in &self.replicas {
            let theirs = state(r.as_ref());
            if theirs.len() != main_state.len()
                || theirs
                    .iter()
                    .zip(&main_state)
                    .any(|((a, va), (b, vb))| a != b || va.shape() != vb.shape())
            {
                candle_core::bail!("a data-parallel replica has other parameters than the model");
            }
        }
        let as_flat = |vars: &BTreeMap<String, Var>| -> Result<Tensor> {
            let parts = vars
                .values()
                .map(|v| {
                    v.as_tensor()
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        let collective = self.collective.as_ref();
        std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .replicas
                .iter_mut()
                .enumerate()
                .map(|(i, replica)| {
                    scope.spawn(move || -> Result<()> {
                        let vars = state(replica.as_ref());
                        let len = vars.values().map(|v| v.elem_count()).sum::<usize>();
                        let dev = replica.device();
                        let room = Tensor::zeros(len, candle_core::DType::F32, dev)?;
                        let got = collective.broadcast(i + 1, &room)?;
                        for (v, t) in vars.values().zip(unflatten(&vars, &got)?.into_values()) {
                            v.set(&t.to_dtype(v.dtype())?)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            let flat = as_flat(&main_state);
            let sent = meet(&flat, &main_state, main.device(), |f| {
                collective.broadcast(0, f)
            });
            for w in workers {
                w.join().map_err(|_| {
                    candle_core::Error::Msg("a data-parallel replica panicked".into())
                })??;
            }
            flat?;
            sent.map(|_| ())
        })
    }
}

#[cfg(feature = "nccl")]
pub use nccl::Nccl;

#[cfg(feature = "nccl")]
mod nccl {
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Device, Result, Storage, Tensor};

    use super::Collective;

    /// A [`Collective`] over NCCL: one communicator per rank, all in this process
    /// (`ncclCommInitAll`), each working on its device's candle stream.
    pub struct Nccl {
        comms: Vec<RankComm>,
    }

    struct RankComm(Comm);
    // SAFETY: each rank's communicator is used only by the thread that runs that rank, one
    // call at a time (the data-parallel loop gives every rank its own thread).
    unsafe impl Send for RankComm {}
    // SAFETY: as above: shared references reach other threads, but only rank r's thread
    // touches communicator r.
    unsafe impl Sync for RankComm {}

    fn nccl_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("NCCL {what}: {e:?}"))
    }

    impl Nccl {
        /// Communicators for `devices` (rank i on devices[i]; all CUDA, distinct GPUs).
        pub fn new(devices: &[Device]) -> Result<Self> {
            let streams = devices
                .iter()
                .map(|d| Ok(d.as_cuda_device()?.cuda_stream()))
                .collect::<Result<Vec<_>>>()?;
            let comms = Comm::from_devices(streams).map_err(|e| nccl_err("init", e))?;
            Ok(Nccl {
                comms: comms.into_iter().map(RankComm).collect(),
            })
        }
    }

    /// A new `[len]` f32 tensor on `device` holding `slice`.
    fn wrap(slice: CudaSlice<f32>, device: &Device) -> Result<Tensor> {
        let len = slice.len();
        let dev = device.as_cuda_device()?.clone();
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev));
        Ok(Tensor::from_storage(
            storage,
            len,
            BackpropOp::none(),
            false,
        ))
    }

    /// Runs `f` on `flat`'s device memory (made contiguous f32 first).
    fn with_slice<R>(
        flat: &Tensor,
        f: impl FnOnce(&candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>) -> Result<R>,
    ) -> Result<R> {
        let flat = flat.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let (storage, layout) = flat.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("NCCL needs tensors on a CUDA device");
        };
        let start = layout.start_offset();
        let view = cs
            .as_cuda_slice::<f32>()?
            .slice(start..start + flat.elem_count());
        f(&view)
    }

    impl Collective for Nccl {
        fn ranks(&self) -> usize {
            self.comms.len()
        }

        fn reduce_sum(&self, rank: usize, flat: &Tensor) -> Result<Option<Tensor>> {
            let comm = &self.comms[rank].0;
            let n = flat.elem_count();
            with_slice(flat, |src| {
                if rank == 0 {
                    let mut out = comm
                        .stream()
                        .alloc_zeros::<f32>(n)
                        .map_err(|e| nccl_err("alloc", e))?;
                    comm.reduce(src, Some(&mut out), &ReduceOp::Sum, 0)
                        .map_err(|e| nccl_err("reduce", e))?;
                    Ok(Some(wrap(out, flat.device())?))
                } else {
                    comm.reduce(src, None::<&mut CudaSlice<f32>>, &ReduceOp::Sum, 0)
                        .map_err(|e| nccl_err("reduce", e))?;
                    Ok(None)
                }
            })
        }

        fn broadcast(&self, rank: usize, flat: &Tensor) -> Result<Tensor> {
            let comm = &self.comms[rank].0;
            let mut out = comm
                .stream()
                .alloc_zeros::<f32>(flat.elem_count())
                .map_err(|e| nccl_err("alloc", e))?;
            if rank == 0 {
                with_slice(flat, |src| {
                    comm.broadcast(Some(src), &mut out, 0)
                        .map_err(|e| nccl_err("broadcast", e))
                })?;
            } else {
                comm.broadcast(None::<&CudaSlice<f32>>, &mut out, 0)
                    .map_err(|e| nccl_err("broadcast", e))?;
            }
            wrap(out, flat.device())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EvaXConfig;
    use crate::model::eva_x::train::{EvaXTrainable, init_state_dict};

    fn model(seed: u64) -> Box<dyn Trainable> {
        let mut cfg = EvaXConfig::preset("ti").unwrap();
        cfg.depth = 3;
        cfg.train_grid = (2, 2);
        cfg.num_classes = Some(4);
        Box::new(EvaXTrainable::from_state_dict(&init_state_dict(&cfg, seed), 4, seed).unwrap())
    }

    fn batch_data(n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(11);
        let x = (0..n * 3 * 32 * 32)
            .map(|_| rng.unit() as f32 * 2.0 - 1.0)
            .collect();
        let y = (0..n * 4)
            .map(|i| ((i * 7) % 3 == 0) as u8 as f32)
            .collect();
        (x, y)
    }

    #[test]
    fn rows_are_split_in_order_and_evenly() {
        assert_eq!(split_rows(5, 3), vec![0..2, 2..4, 4..5]);
        assert_eq!(split_rows(2, 3), vec![0..1, 1..2, 2..2]);
        assert_eq!(split_rows(6, 1), vec![0..6]);
    }

    /// A batch of 5 over 3 ranks (2, 2 and 1 rows) with drop path 0.5 on every block but the
    /// first: the loss and every gradient are those of the one model given the whole batch,
    /// up to the order of float sums (1e-5 of each gradient's largest value; the loss 1e-6).
    /// Without the replicas drawing the whole batch's drop-path masks the step differs.
    #[test]
    fn split_batch_gives_the_whole_batch_gradients() {
        let (x, y) = batch_data(5);
        let batch = HostBatch {
            x: &x,
            y: &y,
            n: 5,
            side: 32,
            classes: 4,
        };
        let loss: &LossFn = &|l, t| crate::train::bce_with_logits(l, t);
        let main = model(1);
        let (want_loss, want) =
            batch_grads(main.as_ref(), None, &batch, loss, 0.5, 9, 2.0).unwrap();
        let make = |_: &Device| -> crate::Result<Box<dyn Trainable>> { Ok(model(2)) };
        let devices = [Device::Cpu, Device::Cpu];
        let mut dp = DataParallel::new(
            main.as_ref(),
            &devices,
            Box::new(HostCollective::new(3)),
            &make,
        )
        .unwrap();
        let (got_loss, got) =
            batch_grads(main.as_ref(), Some(&mut dp), &batch, loss, 0.5, 9, 2.0).unwrap();
        assert!(
            (got_loss - want_loss).abs() <= 1e-6,
            "{got_loss} vs {want_loss}"
        );
        assert_eq!(got.len(), want.len());
        assert_eq!(got.len(), main.vars().len());
        let mut worst = 0f32;
        for (name, w) in &want {
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = got[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(g.len(), w.len(), "{name}");
            let scale = w.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            let d = g
                .iter()
                .zip(&w)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(d <= 1e-5, "{name}: {d:e}");
            worst = worst.max(d);
        }
        eprintln!("{} gradients, at most {worst:.1e} apart", want.len());
        // The parts' logits with the whole batch's draws are the whole batch's; with draws of
        // their own rows only, they are not.
        let logits = |rows: Range<usize>, windowed: bool| {
            let per = 3 * 32 * 32;
            let (r0, r1) = (rows.start, rows.end);
            let xt = Tensor::from_slice(&x[r0 * per..r1 * per], (r1 - r0, 3, 32, 32), &Device::Cpu);
            let mut rng = Rng::new(9);
            if windowed {
                rng = rng.for_rows(r0, 5);
            }
            let l = main
                .forward_train(&xt.unwrap(), 0.5, Some(&mut rng))
                .unwrap();
            l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let whole = logits(0..5, false);
        let parts = |windowed| -> Vec<f32> {
            split_rows(5, 3)
                .into_iter()
                .flat_map(|r| logits(r, windowed))
                .collect()
        };
        let (same, own) = (parts(true), parts(false));
        assert_eq!((same.len(), own.len()), (whole.len(), whole.len()));
        assert!(same.iter().zip(&whole).all(|(a, b)| (a - b).abs() <= 1e-6));
        assert!(own.iter().zip(&whole).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    /// Replicas made from other weights get the main model's parameters on creation and
    /// after it changes.
    #[test]
    fn sync_gives_replicas_the_main_weights() {
        let main = model(1);
        let make = |_: &Device| -> crate::Result<Box<dyn Trainable>> { Ok(model(5)) };
        let mut dp = DataParallel::new(
            main.as_ref(),
            &[Device::Cpu],
            Box::new(HostCollective::new(2)),
            &make,
        )
        .unwrap();
        let same = |dp: &DataParallel| {
            main.vars().iter().all(|(k, v)| {
                let a = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = dp.replicas[0].vars()[k]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                a == b
            })
        };
        assert!(same(&dp));
        let w = &main.vars()["head.weight"];
        w.set(&(w.as_tensor() + 1.0).unwrap()).unwrap();
        assert!(!same(&dp));
        dp.sync(main.as_ref()).unwrap();
        assert!(same(&dp));
        // A collective of the wrong size is refused.
        let err = DataParallel::new(
            main.as_ref(),
            &[Device::Cpu],
            Box::new(HostCollective::new(3)),
            &make,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("3 ranks for 2 devices"), "{err}");
    }
}
