//! The compute kernels of the models, in three layers:
//!
//! - [`cpu`]: the fused CPU fast paths on plain slices (no candle types);
//! - [`candle_ops`]: candle custom ops that adapt those to CPU tensors, with a backward;
//! - [`reference`]: the same operations from candle's own primitives, on any device.
//!
//! The functions here pick one by [`Kernels`] and the tensor's device and type: the fused
//! kernels for f32 tensors on the CPU, the reference path everywhere else (and on request, so
//! the two can be checked against each other).

pub mod bf16;
pub mod block_train;
pub mod candle_ops;
pub mod conv;
pub mod cpu;
pub mod dense_train;
pub mod dispatch;
pub mod prepacked;
pub mod reference;
pub mod residual_train;
pub mod sgemm;

/// A buffer of `n` values for an output that the caller overwrites entirely before anything
/// reads it: zeroing it first would be one more pass over memory, which for a training step's
/// large activations is a few per cent of the step.
///
/// # Safety
/// Every value must be written before it is read (by the caller or whoever it hands the
/// vector to).
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn unfilled<T: Copy>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`; plain values need no drop, and the caller writes every
    // value before any is read.
    unsafe { v.set_len(n) };
    v
}

/// Random test inputs shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    /// A variable of `shape` with values uniform in `offset ± scale`, drawn from `seed`.
    pub(crate) fn var(shape: &[usize], seed: u64, scale: f32, offset: f32) -> Var {
        let mut r = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| (r.unit() as f32 * 2.0 - 1.0) * scale + offset)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// The gradients of `sum(y * cot)`: a backward pass with `cot` as the output gradient.
    pub(crate) fn backward_with(y: &Tensor, cot: &Tensor) -> candle_core::backprop::GradStore {
        (y * cot).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// A tensor's values, flattened.
    pub(crate) fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }
}

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::model::rope::RopeTables;

/// A dense layer's weight packed once for the CPU's fast inference products.
#[derive(Debug)]
pub enum PreparedWeight {
    /// For bf16 products (`--precision bf16`; [`bf16`]).
    Bf16(bf16::Bf16Weight),
    /// For f32 products on AVX-512 ([`prepacked`]).
    F32(prepacked::PackedWeight),
}

impl PreparedWeight {
    /// Outputs of the layer.
    pub fn n(&self) -> usize {
        match self {
            PreparedWeight::Bf16(w) => w.n(),
            PreparedWeight::F32(w) => w.n(),
        }
    }

    /// `x W^T + b (+ residual)` for `x` `[m, k]`; with `swiglu` (no residual), `silu(y1) * y2`
    /// of the two halves instead (`n / 2` wide).
    pub fn linear(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        swiglu: bool,
    ) -> std::result::Result<Vec<f32>, String> {
        match (self, swiglu) {
            (PreparedWeight::Bf16(w), false) => bf16::linear(x, w, bias, residual),
            (PreparedWeight::Bf16(w), true) => bf16::linear_swiglu(x, w, bias),
            (PreparedWeight::F32(w), false) => {
                prepacked::check(x, w, bias, residual)?;
                Ok(prepacked::linear(x, w, bias, residual))
            }
            (PreparedWeight::F32(w), true) => {
                prepacked::check(x, w, bias, None)?;
                Ok(prepacked::linear_swiglu(x, w, bias))
            }
        }
    }
}

/// Which implementation of the fused operations a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels where they apply (f32 on the CPU), the reference path elsewhere.
    #[default]
    Fused,
    /// Always the reference path built from candle primitives.
    Reference,
}

impl Kernels {
    /// Whether the fused CPU kernels handle `x`.
    pub fn fused_for(self, x: &Tensor) -> bool {
        self == Kernels::Fused && x.device().is_cpu() && x.dtype() == DType::F32
    }
}

/// LayerNorm over the last axis. On the CPU in f32 the fused path uses ours (vectorised, with
/// a backward); elsewhere inference uses candle's fused LayerNorm (no backward).
pub fn layer_norm(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    grad: bool,
) -> Result<Tensor> {
    // Reduced-precision activations are normalised in the weights' f32, as autocast does.
    let x = &x.to_dtype(w.dtype())?;
    match (k, grad) {
        (Kernels::Fused, _) if k.fused_for(x) => candle_ops::layer_norm(x, w, b, eps),
        (Kernels::Fused, false) => candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps),
        _ => reference::layer_norm(x, w, b, eps),
    }
}

/// Multi-head attention with RoPE over `qkv` `[B, T, 3C]`; returns `[B, T, C]`.
pub fn attention(
    k: Kernels,
    qkv: &Tensor,
    heads: usize,
    rope: &Arc<RopeTables>,
    grad: bool,
) -> Result<Tensor> {
    if k.fused_for(qkv) {
        candle_ops::attention(qkv, heads, rope, grad)
    } else {
        // Inference on another device uses candle's fused softmax and RoPE (no backward).
        let fast = k == Kernels::Fused && !grad;
        reference::attention(qkv, heads, rope, fast)
    }
}

/// `silu(x1) * x2` over a packed `[x1 | x2]` activation.
pub fn swiglu(k: Kernels, x: &Tensor, grad: bool) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::swiglu(x, grad)
    } else {
        reference::swiglu(x)
    }
}

/// GELU (the erf form, as torch's default).
pub fn gelu(k: Kernels, x: &Tensor, grad: bool) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::gelu(x, grad)
    } else {
        reference::gelu(x)
    }
}

/// `relu(a + b)` (a residual block's end), differentiable on both paths.
pub fn add_relu(k: Kernels, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if k.fused_for(a) && k.fused_for(b) {
        candle_ops::add_relu(a, b)
    } else {
        (a + b)?.relu()
    }
}

/// Inference `x Wt + b (+ residual)` with `Wt` = `W^T` `[K, N]`.
pub fn linear(
    k: Kernels,
    x: &Tensor,
    wt: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if k.fused_for(x) && k.fused_for(wt) && wt.is_contiguous() {
        candle_ops::linear(x, wt, b, residual)
    } else {
        reference::linear(x, wt, b, residual)
    }
}

/// The non-overlapping `p x p` patches of images `x` `[B, C, gh * p, gw * p]` as rows
/// `[B * gh * gw, C * p * p]` (channel, then row, then column within a patch): the input of
/// a stride-`p` convolution as a matrix product. On the CPU, in f32 and for an input no
/// gradient flows to (images), [`cpu::patch_rows`]; elsewhere candle's permutation.
pub fn patch_rows(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, ch, h, w) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
        let rows = candle_ops::read(x, |v| {
            cpu::patch_rows(v, (b, ch, h, w), p).map_err(candle_core::Error::Msg)
        })?;
        return Tensor::from_vec(rows, (b * (h / p) * (w / p), ch * p * p), x.device());
    }
    reference::patch_rows(x, p)
}

/// Differentiable `x W^T + b` with `W` `[N, K]` as stored.
pub fn linear_train(k: Kernels, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if k.fused_for(x) && k.fused_for(w) {
        candle_ops::linear_train(x, w, b)
    } else {
        reference::linear(x, &w.t()?, Some(b), None)
    }
}

/// Convolution (NCHW) of `x` by `w` `[Cout, Cin, kh, kw]` with an optional bias `[Cout]`, then
/// ReLU if asked; differentiable on both paths.
pub fn conv2d(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    relu: bool,
) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::conv2d(x, w, bias, stride, pad, relu)
    } else {
        reference::conv2d(x, w, bias, stride, pad, relu)
    }
}

/// A 2 x 2, stride-2 transposed convolution (weight `[C, out, 2, 2]`, bias `[out]`) of
/// `[B, C, H, W]` to `[B, out, 2H, 2W]`, differentiable on both paths.
pub fn upsample2x(k: Kernels, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::upsample2x(x, w, bias)
    } else {
        reference::upsample2x(x, w, bias)
    }
}

/// BatchNorm in training mode over `[B, C, H, W]` (then ReLU if asked): the output
/// (differentiable) and the batch mean and biased variance `[C]` (for the running statistics).
pub fn batch_norm_train(
    k: Kernels,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if k.fused_for(x) {
        candle_ops::batch_norm_train(x, gamma, beta, eps, relu)
    } else {
        reference::batch_norm_train(x, gamma, beta, eps, relu)
    }
}

/// `x * scale + shift` per channel of `[B, C, H, W]` (`scale`, `shift` `[C]`), then ReLU if
/// asked: a BatchNorm in evaluation mode.
pub fn channel_affine(
    k: Kernels,
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    relu: bool,
) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::channel_affine(x, scale, shift, relu)
    } else {
        reference::channel_affine(x, scale, shift, relu)
    }
}

/// Max pooling of `[B, C, H, W]` with a `size x size` window (padding never wins),
/// differentiable.
pub fn max_pool(k: Kernels, x: &Tensor, size: usize, stride: usize, pad: usize) -> Result<Tensor> {
    if k.fused_for(x) {
        candle_ops::max_pool(x, size, stride, pad)
    } else {
        reference::max_pool(x, size, stride, pad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.unit() as f32 * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Value and input gradient of `f` (weighted by a fixed random cotangent) on both paths.
    fn both(
        x: &Tensor,
        mut f: impl FnMut(Kernels, &Tensor) -> Result<Tensor>,
    ) -> [(Tensor, Tensor); 2] {
        [Kernels::Fused, Kernels::Reference].map(|k| {
            let v = Var::from_tensor(x).unwrap();
            let y = f(k, v.as_tensor()).unwrap();
            let w = rand(y.dims(), 99);
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(v.as_tensor()).expect("gradient").clone();
            (y, dx)
        })
    }

    #[test]
    fn fused_kernels_agree_with_the_reference_path() {
        // Two images, a 2 x 3 grid (t = 7 with the class token), two heads of 64.
        let rope = Arc::new(RopeTables::new((2, 3), 14.0, 64));
        let qkv = rand(&[2, 7, 3 * 128], 1);
        let [(yf, gf), (yr, gr)] = both(&qkv, |k, x| attention(k, x, 2, &rope, true));
        assert_eq!(yf.dims(), &[2, 7, 128]);
        // The other devices' inference path: candle's fused softmax and RoPE.
        let yc = reference::attention(&qkv, 2, &rope, true).unwrap();
        assert!(max_diff(&yc, &yr) < 1e-5, "candle-fused attention");
        assert!(
            max_diff(&yf, &yr) < 1e-5,
            "attention {}",
            max_diff(&yf, &yr)
        );
        assert!(
            max_diff(&gf, &gr) < 1e-5,
            "attention grad {}",
            max_diff(&gf, &gr)
        );

        let (w, b) = (rand(&[48], 2), rand(&[48], 3));
        let x = rand(&[3, 5, 48], 4);
        let [(yf, gf), (yr, gr)] = both(&x, |k, x| layer_norm(k, x, &w, &b, 1e-6, true));
        assert!(max_diff(&yf, &yr) < 1e-5 && max_diff(&gf, &gr) < 1e-4);

        let x = (rand(&[4, 50], 12) * 4.0).unwrap();
        let [(yf, gf), (yr, gr)] = both(&x, |k, x| gelu(k, x, true));
        assert!(
            max_diff(&yf, &yr) < 1e-6 && max_diff(&gf, &gr) < 1e-5,
            "gelu"
        );

        let x = rand(&[4, 2 * 40], 5);
        let [(yf, gf), (yr, gr)] = both(&x, |k, x| swiglu(k, x, true));
        assert_eq!(yf.dims(), &[4, 40]);
        assert!(max_diff(&yf, &yr) < 1e-6 && max_diff(&gf, &gr) < 1e-6);

        let (w, b) = (rand(&[24, 48], 6), rand(&[24], 7));
        let x = rand(&[2, 3, 48], 8);
        let [(yf, gf), (yr, gr)] = both(&x, |k, x| linear_train(k, x, &w, &b));
        assert_eq!(yf.dims(), &[2, 3, 24]);
        assert!(max_diff(&yf, &yr) < 1e-5 && max_diff(&gf, &gr) < 1e-5);
        // The inference linear with a residual, W^T given contiguous.
        let wt = w.t().unwrap().contiguous().unwrap();
        let r = rand(&[2, 3, 24], 9);
        let f = linear(Kernels::Fused, &x, &wt, Some(&b), Some(&r)).unwrap();
        let g = linear(Kernels::Reference, &x, &wt, Some(&b), Some(&r)).unwrap();
        assert!(max_diff(&f, &g) < 1e-5);
    }

    #[test]
    fn attention_without_rope_agrees_on_both_paths() {
        let none = Arc::new(RopeTables::none(64));
        let qkv = rand(&[2, 5, 3 * 128], 11);
        let [(yf, gf), (yr, gr)] = both(&qkv, |k, x| attention(k, x, 2, &none, true));
        let yc = reference::attention(&qkv, 2, &none, true).unwrap();
        assert!(
            max_diff(&yc, &yr) < 1e-5,
            "candle-fused attention without RoPE"
        );
        assert!(max_diff(&yf, &yr) < 1e-5 && max_diff(&gf, &gr) < 1e-5);
    }

    #[test]
    fn fused_residual_add_relu_agrees_with_the_reference_path() {
        let (x, other) = (rand(&[2, 3, 5, 4], 31), rand(&[2, 3, 5, 4], 32));
        for first in [true, false] {
            let [(yf, gf), (yr, gr)] = both(&x, |k, x| {
                if first {
                    add_relu(k, x, &other)
                } else {
                    add_relu(k, &other, x)
                }
            });
            assert_eq!(yf.dims(), &[2, 3, 5, 4]);
            assert!(max_diff(&yf, &yr) == 0.0 && max_diff(&gf, &gr) == 0.0);
        }
    }

    #[test]
    fn upsample2x_agrees_with_the_reference_path() {
        let (w, b) = (rand(&[4, 3, 2, 2], 41), rand(&[3], 42));
        let x = rand(&[2, 4, 3, 5], 43);
        let [(yf, gf), (yr, gr)] = both(&x, |k, x| upsample2x(k, x, &w, &b));
        assert_eq!(yf.dims(), &[2, 3, 6, 10]);
        assert!(max_diff(&yf, &yr) < 1e-6 && max_diff(&gf, &gr) < 1e-6);
    }

    #[test]
    fn cnn_kernels_agree_with_the_reference_path() {
        // Weight and bias gradients too: the weight as a variable inside the closure.
        let x = rand(&[3, 4, 9, 7], 21);
        for (i, (k, stride, pad, relu)) in [(3, 2, 1, true), (1, 1, 0, false), (7, 2, 3, false)]
            .into_iter()
            .enumerate()
        {
            let w = Var::from_tensor(&rand(&[5, 4, k, k], 22 + i as u64)).unwrap();
            let b = Var::from_tensor(&rand(&[5], 30 + i as u64)).unwrap();
            let mut grads = Vec::new();
            let [(yf, gf), (yr, gr)] = both(&x, |kern, x| {
                let y = conv2d(
                    kern,
                    x,
                    w.as_tensor(),
                    Some(b.as_tensor()),
                    stride,
                    pad,
                    relu,
                )?;
                let cot = rand(y.dims(), 99);
                let g = (&y * &cot)?.sum_all()?.backward()?;
                grads.push((
                    g.get(w.as_tensor()).unwrap().clone(),
                    g.get(b.as_tensor()).unwrap().clone(),
                ));
                Ok(y)
            });
            assert!(max_diff(&yf, &yr) < 1e-5, "conv {i} {}", max_diff(&yf, &yr));
            assert!(
                max_diff(&gf, &gr) < 1e-5,
                "conv {i} dx {}",
                max_diff(&gf, &gr)
            );
            assert_eq!(grads.len(), 2);
            assert!(max_diff(&grads[0].0, &grads[1].0) < 1e-4, "conv {i} dW");
            assert!(max_diff(&grads[0].1, &grads[1].1) < 1e-4, "conv {i} db");
        }

        let (g, b) = (rand(&[4], 40), rand(&[4], 41));
        for relu in [false, true] {
            let [(yf, gf), (yr, gr)] =
                both(&x, |k, x| Ok(batch_norm_train(k, x, &g, &b, 1e-5, relu)?.0));
            assert!(
                max_diff(&yf, &yr) < 1e-5 && max_diff(&gf, &gr) < 1e-4,
                "bn {relu}"
            );
        }
        let (_, mf, vf) = batch_norm_train(Kernels::Fused, &x, &g, &b, 1e-5, false).unwrap();
        let (_, mr, vr) = batch_norm_train(Kernels::Reference, &x, &g, &b, 1e-5, false).unwrap();
        assert_eq!(mf.dims(), &[4]);
        assert!(max_diff(&mf, &mr) < 1e-6 && max_diff(&vf, &vr) < 1e-6);

        for relu in [false, true] {
            let [(yf, gf), (yr, gr)] = both(&x, |k, x| channel_affine(k, x, &g, &b, relu));
            assert!(
                max_diff(&yf, &yr) < 1e-6 && max_diff(&gf, &gr) < 1e-6,
                "affine {relu}"
            );
            // Learnt scale and shift (a BatchNorm in evaluation mode being trained).
            let (gv, bv) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&b).unwrap());
            let cot = rand(x.dims(), 98);
            let [(ga, gb), (ra, rb)] = [Kernels::Fused, Kernels::Reference].map(|k| {
                let y = channel_affine(k, &x, gv.as_tensor(), bv.as_tensor(), relu).unwrap();
                let gr = (&y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |v: &Var| gr.get(v.as_tensor()).expect("gradient").clone();
                (get(&gv), get(&bv))
            });
            assert_eq!(ga.dims(), &[4]);
            assert!(
                max_diff(&ga, &ra) < 1e-5 && max_diff(&gb, &rb) < 1e-5,
                "affine parameters {relu}"
            );
        }

        // Random values: no ties, so both paths route gradients alike.
        let [(yf, gf), (yr, gr)] = both(&x, |k, x| max_pool(k, x, 3, 2, 1));
        assert_eq!(yf.dims(), &[3, 4, 5, 4]);
        assert!(max_diff(&yf, &yr) == 0.0 && max_diff(&gf, &gr) < 1e-6);
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let rope = Arc::new(RopeTables::new((2, 2), 14.0, 64));
        // Width 3 x 100 does not split into heads of 64; tables for 4 tokens, input has 6.
        assert!(attention(Kernels::Fused, &rand(&[1, 5, 300], 1), 2, &rope, false).is_err());
        assert!(attention(Kernels::Fused, &rand(&[1, 7, 384], 1), 2, &rope, false).is_err());
        assert!(attention(Kernels::Reference, &rand(&[1, 7, 384], 1), 2, &rope, false).is_err());
        assert!(swiglu(Kernels::Fused, &rand(&[2, 7], 1), false).is_err());
    }
}
