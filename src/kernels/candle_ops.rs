//! Candle adapters for the fused CPU kernels: custom ops that borrow the CPU storage, call
//! [`super::cpu`] and wrap the result. They run on CPU f32 tensors only; [`super`] sends
//! everything else to the reference path.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::block_train::{self, BlockParts, BlockShape, Mlp, Saved};
use super::conv::{self, ConvShape, PoolShape};
use super::cpu::{self, AttentionShape, WeightLayout};
use super::dense_train::{self, DenseLayerParts, LayerStats, SavedLayer};
use super::residual_train::{self, Bottleneck};
use crate::model::rope::RopeTables;

/// The f32 values of a contiguous CPU storage.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// One dense layer's inference weights (see [`conv::DenseLayer`]): `norm1`'s scale and shift
/// `[C]`, `conv1`'s weight `[mid, C, 1, 1]` and bias `[mid]` (`norm2` folded in), `conv2`'s
/// weight `[growth, mid, k, k]`; contiguous CPU f32 tensors.
#[derive(Debug, Clone)]
pub struct DenseLayerWeights {
    /// `norm1`'s scale and shift.
    pub norm1: (Tensor, Tensor),
    /// `conv1`'s weight and bias.
    pub conv1: (Tensor, Tensor),
    /// `conv2`'s weight.
    pub conv2: Tensor,
}

/// Dense layers for inference, one output buffer for the block (no backward: an inference
/// model's weights are constants).
struct DenseLayersOp {
    layers: Vec<DenseLayerWeights>,
}

impl CustomOp1 for DenseLayersOp {
    fn name(&self) -> &'static str {
        "evax-dense-layers"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "dense layers input")?;
        let &[b, c, h, w] = l.dims() else {
            candle_core::bail!("dense layers: expected [B, C, H, W], got {:?}", l.dims());
        };
        let tensors: Vec<&Tensor> = self
            .layers
            .iter()
            .flat_map(|d| [&d.norm1.0, &d.norm1.1, &d.conv1.0, &d.conv1.1, &d.conv2])
            .collect();
        let (y, width) = with_values(&tensors, "dense layer weight", |values| {
            let layers: Vec<conv::DenseLayer> = values
                .chunks_exact(5)
                .zip(&self.layers)
                .map(|(v, d)| conv::DenseLayer {
                    norm1: (v[0], v[1]),
                    conv1: (v[2], v[3]),
                    conv2: v[4],
                    k: d.conv2.dims().last().copied().unwrap_or(0),
                })
                .collect();
            conv::dense_layers_forward(x, (b, c, h, w), &layers).map_err(candle_core::Error::Msg)
        })?;
        Ok((CpuStorage::F32(y), Shape::from((b, width, h, w))))
    }
}

/// Runs `f` on the values of contiguous CPU f32 tensors (an op's constant operands).
fn with_values<R>(
    tensors: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(s) => contiguous_f32(s, layout, what),
            _ => candle_core::bail!("{what}: expected a CPU tensor"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&values)
}

/// A 1x1 convolution (no bias) whose input channels pass through a BatchNorm in evaluation
/// mode + ReLU as it reads them, for inference (the constants: scale, shift, weight).
struct PreActivatedConv {
    scale: Tensor,
    shift: Tensor,
    weight: Tensor,
}

impl CustomOp1 for PreActivatedConv {
    fn name(&self) -> &'static str {
        "evax-pre-activated-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "convolution input")?;
        let shape = conv_shape(l.dims(), self.weight.dims(), 1, 0)?;
        let tensors = [&self.scale, &self.shift, &self.weight];
        let y = with_values(&tensors, "convolution weight", |v| {
            conv::conv_forward(x, v[2], None, false, Some((v[0], v[1])), &shape)
                .map_err(candle_core::Error::Msg)
        })?;
        let (ho, wo) = shape.out().expect("checked");
        Ok((
            CpuStorage::F32(y),
            Shape::from((shape.b, shape.cout, ho, wo)),
        ))
    }
}

/// `conv1x1(relu(x * scale + shift))` over CPU f32 `x` `[B, C, H, W]` (`scale`, `shift` `[C]`,
/// `weight` `[Cout, C, 1, 1]`) in one pass, for inference.
pub fn pre_activated_conv(
    x: &Tensor,
    (scale, shift): (&Tensor, &Tensor),
    weight: &Tensor,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1(PreActivatedConv {
        scale: scale.contiguous()?,
        shift: shift.contiguous()?,
        weight: weight.contiguous()?,
    })
}

/// DenseNet layers over CPU f32 `x` `[B, C, H, W]` for inference: each one's `norm1` + ReLU
/// applied as `conv1` reads its input, its new features written straight after it.
pub fn dense_layers(x: &Tensor, layers: &[DenseLayerWeights]) -> Result<Tensor> {
    let layers = layers
        .iter()
        .map(|d| {
            Ok(DenseLayerWeights {
                norm1: (d.norm1.0.contiguous()?, d.norm1.1.contiguous()?),
                conv1: (d.conv1.0.contiguous()?, d.conv1.1.contiguous()?),
                conv2: d.conv2.contiguous()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    x.contiguous()?.apply_op1(DenseLayersOp { layers })
}

/// Borrow a CPU tensor's f32 values (copying only when it is not contiguous).
pub(super) fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(contiguous_f32(s, layout, "fused kernel")?),
        _ => candle_core::bail!("fused kernels run on the CPU only"),
    }
}

/// [`read`] of three tensors at once (a backward's input, weight and output gradient).
fn read3<R>(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> Result<R>,
) -> Result<R> {
    read(a, |av| read(b, |bv| read(c, |cv| f(av, bv, cv))))
}

/// A three-input op's gradients as tensors shaped like its inputs `x`, `w` and `b`.
fn grads3(
    (x, w, b): (&Tensor, &Tensor, &Tensor),
    (dx, dw, db): (Vec<f32>, Vec<f32>, Vec<f32>),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    Ok((
        Some(Tensor::from_vec(dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        Some(Tensor::from_vec(db, b.shape(), b.device())?),
    ))
}

/// [`read`] of an optional tensor (`None` passes `None`).
fn read_optional<R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    match t {
        Some(t) => read(t, |v| f(Some(v))),
        None => f(None),
    }
}

/// The last dimension of a shape (0 for a scalar).
fn last(dims: &[usize]) -> usize {
    dims.last().copied().unwrap_or(0)
}

/// Fused attention with RoPE over `qkv` `[B, T, 3C]`.
struct Attention {
    heads: usize,
    rope: Arc<RopeTables>,
    /// q and k already rotated, q scaled (inference only; see [`linear_qkv_roped`]).
    roped: bool,
}

impl Attention {
    fn shape(&self, b: usize, t: usize, c3: usize) -> AttentionShape<'_> {
        AttentionShape {
            b,
            t,
            c: c3 / 3,
            heads: self.heads,
            cos: &self.rope.cos,
            sin: &self.rope.sin,
            roped: self.roped,
        }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "evax-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, c3) = l.shape().dims3()?;
        let qkv = contiguous_f32(s, l, "attention")?;
        let shape = self.shape(b, t, c3);
        if !c3.is_multiple_of(3) {
            candle_core::bail!("attention: qkv width {c3} is not 3C");
        }
        let out = cpu::attention_forward(qkv, &shape).map_err(candle_core::Error::Msg)?;
        Ok((CpuStorage::F32(out), Shape::from((b, t, c3 / 3))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, c3) = qkv.dims3()?;
        let shape = self.shape(b, t, c3);
        let dq = read(qkv, |x| {
            read(dy, |g| {
                cpu::attention_backward(x, g, &shape, None).map_err(candle_core::Error::Msg)
            })
        })?;
        Ok(Some(Tensor::from_vec(dq, (b, t, c3), qkv.device())?))
    }
}

/// Fused attention (with a backward) over a CPU f32 `qkv` `[B, T, 3C]`; returns `[B, T, C]`.
pub fn attention(qkv: &Tensor, heads: usize, rope: &Arc<RopeTables>, grad: bool) -> Result<Tensor> {
    let op = Attention {
        heads,
        rope: rope.clone(),
        roped: false,
    };
    let qkv = qkv.contiguous()?;
    if grad {
        qkv.apply_op1(op)
    } else {
        qkv.apply_op1_no_bwd(&op)
    }
}

/// Attention (inference) over a CPU f32 `qkv` `[B, T, 3C]` from [`linear_qkv_roped`]: q and k
/// already rotated, q scaled.
pub fn attention_roped(qkv: &Tensor, heads: usize, rope: &Arc<RopeTables>) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&Attention {
        heads,
        rope: rope.clone(),
        roped: true,
    })
}

/// `[q | k | v] = x W^T + b` for attention with heads of 64, q and k rotated by `rope` and q
/// scaled in the product's epilogue ([`super::prepacked::linear_qkv_roped`]), for CPU f32 `x`
/// `[B, T, K]`; `None` where that does not apply (no f32 panels, other head widths).
pub fn linear_qkv_roped(
    x: &Tensor,
    w: &super::PreparedWeight,
    b: Option<&Tensor>,
    heads: usize,
    rope: &RopeTables,
) -> Result<Option<Tensor>> {
    let super::PreparedWeight::F32(w) = w else {
        return Ok(None);
    };
    let (bsz, t, _) = x.dims3()?;
    let tables = rope.cos.len() == (t - 1) * 64 && rope.sin.len() == rope.cos.len();
    if w.n() != 3 * 64 * heads || t == 0 || !(tables || rope.cos.is_empty()) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let y = read(&x, |xv| {
        read_optional(b, |bias| {
            super::prepacked::check(xv, w, bias, None).map_err(candle_core::Error::Msg)?;
            let r = super::prepacked::QkvRope {
                t,
                heads,
                cos: &rope.cos,
                sin: &rope.sin,
            };
            Ok(super::prepacked::linear_qkv_roped(xv, w, bias, &r))
        })
    })?;
    Ok(Some(Tensor::from_vec(y, (bsz, t, w.n()), x.device())?))
}

/// Attention (inference) with both products in bf16 on AMX tiles over a CPU f32 `qkv` `[B,
/// T, 3C]` (see [`super::bf16::attention`]); `None` where that does not apply here.
pub fn attention_bf16(
    qkv: &Tensor,
    heads: usize,
    rope: &Arc<RopeTables>,
) -> Result<Option<Tensor>> {
    let (b, t, c3) = qkv.dims3()?;
    if !c3.is_multiple_of(3) {
        candle_core::bail!("attention: qkv width {c3} is not 3C");
    }
    let op = Attention {
        heads,
        rope: rope.clone(),
        roped: false,
    };
    let shape = op.shape(b, t, c3);
    let out = read(qkv, |x| {
        super::bf16::attention(x, &shape).map_err(candle_core::Error::Msg)
    })?;
    out.map(|o| Tensor::from_vec(o, (b, t, c3 / 3), qkv.device()))
        .transpose()
}

/// `silu(x1) * x2` over `[x1 | x2]`.
struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "evax-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "swiglu")?;
        let dims = l.shape().dims();
        let w = last(dims);
        if w == 0 || !w.is_multiple_of(2) {
            candle_core::bail!("swiglu: width {w} is not 2h");
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-scalar") = w / 2;
        Ok((
            CpuStorage::F32(cpu::swiglu_forward(x, w / 2)),
            Shape::from(shape),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let h = last(x.dims()) / 2;
        let dx = read(x, |xv| read(dy, |g| Ok(cpu::swiglu_backward(xv, g, h))))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fused SwiGLU over a CPU f32 packed activation.
pub fn swiglu(x: &Tensor, grad: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    if grad {
        x.apply_op1(SwiGlu)
    } else {
        x.apply_op1_no_bwd(&SwiGlu)
    }
}

/// LayerNorm over the last axis with weight and bias.
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "evax-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm")?;
        let w = contiguous_f32(s2, l2, "layer norm weight")?;
        let b = contiguous_f32(s3, l3, "layer norm bias")?;
        let c = w.len();
        if c == 0 || !x.len().is_multiple_of(c) || b.len() != c || last(l1.dims()) != c {
            candle_core::bail!("layer norm: width {c} does not fit the input");
        }
        let y = cpu::layer_norm_forward(x, w, b, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = read3((x, w, dy), |xv, wv, g| {
            Ok(cpu::layer_norm_backward(xv, wv, g, self.eps))
        })?;
        grads3((x, w, w), grads)
    }
}

/// Fused LayerNorm (with a backward) over CPU f32 tensors.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
}

/// `y = x W^T + b` reading `W` `[N, K]` in place, with a backward.
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "evax-linear-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "linear input")?;
        let w = contiguous_f32(s2, l2, "linear weight")?;
        let b = contiguous_f32(s3, l3, "linear bias")?;
        let (n, k) = l2.shape().dims2()?;
        if b.len() != n || k == 0 || n == 0 || last(l1.dims()) != k {
            candle_core::bail!(
                "linear: shapes do not fit ({:?} x {:?})",
                l1.shape(),
                l2.shape()
            );
        }
        let y = cpu::linear_forward(x, k, w, WeightLayout::AsStored, n, Some(b), None);
        let mut shape = l1.shape().dims().to_vec();
        *shape.last_mut().expect("non-scalar") = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let grads = read3((x, w, dy), |xv, wv, g| {
            Ok(cpu::linear_backward(xv, wv, g, n, k))
        })?;
        grads3((x, w, b), grads)
    }
}

/// Differentiable fused `x W^T + b` for CPU f32 `x` `[..., K]`, `W` `[N, K]`, `b` `[N]`.
pub fn linear_train(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
}

/// `y = x Wt (+ b) (+ residual)` (inference; `Wt` = `W^T` `[K, N]` contiguous) with the bias
/// and residual folded into the GEMM's accumulator.
struct FusedLinear<'a> {
    w: &'a [f32],
    out: usize,
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
}

impl CustomOp1 for FusedLinear<'_> {
    fn name(&self) -> &'static str {
        "evax-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "linear")?;
        let dims = l.shape().dims();
        let k = last(dims);
        let n = self.out;
        if k == 0 || n == 0 || self.w.len() != n * k {
            candle_core::bail!(
                "linear: input width {k} does not fit a weight of {} values",
                self.w.len()
            );
        }
        let m = x.len() / k;
        if self.residual.is_some_and(|r| r.len() != m * n)
            || self.bias.is_some_and(|b| b.len() != n)
        {
            candle_core::bail!("linear: residual or bias does not match the {m}x{n} output");
        }
        let y = cpu::linear_forward(
            x,
            k,
            self.w,
            WeightLayout::Transposed,
            n,
            self.bias,
            self.residual,
        );
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-scalar") = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

/// `x Wt + b (+ residual)` for CPU f32 `x` `[..., K]`, `wt` `[K, N]`, `b` `[N]`, residual
/// `[..., N]` (inference: no backward).
pub fn linear(
    x: &Tensor,
    wt: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let out = wt.dim(1)?;
    read(wt, |w| {
        read_optional(b, |bias| {
            read_optional(residual, |residual| {
                x.apply_op1_no_bwd(&FusedLinear {
                    w,
                    out,
                    bias,
                    residual,
                })
            })
        })
    })
}

/// `x W^T + b (+ residual)` (or SwiGLU after it) from a prepared weight, inference only.
struct PreparedLinear<'a> {
    w: &'a super::PreparedWeight,
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    /// SwiGLU after the product (no residual; half the width).
    swiglu: bool,
}

impl CustomOp1 for PreparedLinear<'_> {
    fn name(&self) -> &'static str {
        "evax-linear-prepared"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "prepared linear")?;
        let y = self
            .w
            .linear(x, self.bias, self.residual, self.swiglu)
            .map_err(candle_core::Error::Msg)?;
        let mut shape = l.shape().dims().to_vec();
        *shape.last_mut().expect("non-scalar") = self.w.n() / if self.swiglu { 2 } else { 1 };
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

/// `x W^T + b (+ residual)` for CPU f32 `x` `[..., K]` with a prepared weight (bf16 products,
/// or f32 on prepacked panels), `b` `[N]`, residual `[..., N]` (inference: no backward).
pub fn linear_prepared(
    x: &Tensor,
    w: &super::PreparedWeight,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    read_optional(b, |bias| {
        read_optional(residual, |residual| {
            x.apply_op1_no_bwd(&PreparedLinear {
                w,
                bias,
                residual,
                swiglu: false,
            })
        })
    })
}

/// SwiGLU after the product: `silu(y1) * y2` for `[y1 | y2] = x W^T + b`, for CPU f32 `x`
/// `[..., K]` with a prepared weight (inference: no backward).
pub fn linear_prepared_swiglu(
    x: &Tensor,
    w: &super::PreparedWeight,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    read_optional(b, |bias| {
        x.apply_op1_no_bwd(&PreparedLinear {
            w,
            bias,
            residual: None,
            swiglu: true,
        })
    })
}

/// Shape of a convolution of `x` `[B, Cin, H, W]` by `w` `[Cout, Cin, kh, kw]`.
fn conv_shape(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<ConvShape> {
    match (x, w) {
        (&[b, cin, h, ww], &[cout, cin2, kh, kw]) if cin == cin2 => {
            let s = ConvShape {
                b,
                cin,
                h,
                w: ww,
                cout,
                kh,
                kw,
                stride,
                pad,
            };
            s.out()
                .map(|_| s)
                .ok_or_else(|| candle_core::Error::Msg(format!("convolution: {s:?} has no output")))
        }
        _ => candle_core::bail!("convolution: input {x:?} and weight {w:?} do not fit"),
    }
}

/// Convolution (NCHW) with an optional bias and ReLU, with a backward.
struct ConvOp {
    stride: usize,
    pad: usize,
    bias: bool,
    relu: bool,
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "evax-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "convolution input")?;
        let w = contiguous_f32(s2, l2, "convolution weight")?;
        let b = contiguous_f32(s3, l3, "convolution bias")?;
        let s = conv_shape(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let y = conv::conv_forward(x, w, self.bias.then_some(b), self.relu, None, &s)
            .map_err(candle_core::Error::Msg)?;
        let (ho, wo) = s.out().expect("checked");
        Ok((CpuStorage::F32(y), Shape::from((s.b, s.cout, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = conv_shape(x.dims(), w.dims(), self.stride, self.pad)?;
        let dy = if self.relu {
            (dy * y.gt(0f32)?.to_dtype(dy.dtype())?)?
        } else {
            dy.clone()
        };
        let (dx, dw, db) = read3((x, w, &dy), |xv, wv, g| {
            conv::conv_backward(xv, wv, g, &s, true, self.bias).map_err(candle_core::Error::Msg)
        })?;
        Ok((
            dx.map(|d| Tensor::from_vec(d, x.shape(), x.device()))
                .transpose()?,
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            db.map(|d| Tensor::from_vec(d, b.shape(), b.device()))
                .transpose()?,
        ))
    }
}

/// Convolution of CPU f32 `x` `[B, Cin, H, W]` by `w` `[Cout, Cin, kh, kw]` (+ `bias`
/// `[Cout]`) (then ReLU), differentiable in all three.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    relu: bool,
) -> Result<Tensor> {
    let op = ConvOp {
        stride,
        pad,
        bias: bias.is_some(),
        relu,
    };
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, op)
}

/// The 2 x 2, stride-2 transposed convolution with its bias, with a backward (it keeps only
/// its input and weight; the step-by-step graph kept three output-sized tensors).
struct Upsample2xOp;

fn upsample2x_shape(x: &[usize], w: &[usize]) -> Result<conv::Upsample2x> {
    match (x, w) {
        (&[b, c, h, ww], &[c2, o, 2, 2]) if c == c2 => Ok(conv::Upsample2x { b, c, h, w: ww, o }),
        _ => candle_core::bail!(
            "2x2 transposed convolution: input {x:?} and weight {w:?} do not fit"
        ),
    }
}

impl CustomOp3 for Upsample2xOp {
    fn name(&self) -> &'static str {
        "evax-upsample2x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "transposed convolution input")?;
        let w = contiguous_f32(s2, l2, "transposed convolution weight")?;
        let b = contiguous_f32(s3, l3, "transposed convolution bias")?;
        let s = upsample2x_shape(l1.dims(), l2.dims())?;
        let y = conv::upsample2x_forward(x, w, b, &s).map_err(candle_core::Error::Msg)?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((s.b, s.o, 2 * s.h, 2 * s.w)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = upsample2x_shape(x.dims(), w.dims())?;
        let grads = read3((x, w, dy), |xv, wv, g| {
            conv::upsample2x_backward(xv, wv, g, &s).map_err(candle_core::Error::Msg)
        })?;
        grads3((x, w, b), grads)
    }
}

/// A 2 x 2, stride-2 transposed convolution of CPU f32 `x` `[B, C, H, W]` by `w`
/// `[C, out, 2, 2]` plus `bias` `[out]`, differentiable in all three.
pub fn upsample2x(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias.contiguous()?, Upsample2xOp)
}

/// A convolution with its products in bf16 (inference only; see [`super::bf16::conv_forward`]).
struct Bf16Conv<'a> {
    w: &'a super::bf16::Bf16Weight,
    bias: Option<&'a [f32]>,
    kernel: (usize, usize),
    stride: usize,
    pad: usize,
    relu: bool,
}

impl CustomOp1 for Bf16Conv<'_> {
    fn name(&self) -> &'static str {
        "evax-conv2d-bf16"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "bf16 convolution input")?;
        let &[b, cin, h, w] = l.dims() else {
            candle_core::bail!("bf16 convolution: input {:?} is not [B, C, H, W]", l.dims());
        };
        let s = ConvShape {
            b,
            cin,
            h,
            w,
            cout: self.w.n(),
            kh: self.kernel.0,
            kw: self.kernel.1,
            stride: self.stride,
            pad: self.pad,
        };
        let y = super::bf16::conv_forward(x, self.w, self.bias, self.relu, &s)
            .map_err(candle_core::Error::Msg)?;
        let (ho, wo) = s.out().expect("checked by conv_forward");
        Ok((CpuStorage::F32(y), Shape::from((b, s.cout, ho, wo))))
    }
}

/// Convolution of CPU f32 `x` `[B, Cin, H, W]` by a weight prepared with
/// [`super::bf16::conv_weight`] (kernel `kh x kw`), plus `bias`, then ReLU: products in bf16,
/// summed in f32 (inference: no backward).
pub fn conv2d_bf16(
    x: &Tensor,
    w: &super::bf16::Bf16Weight,
    bias: Option<&[f32]>,
    kernel: (usize, usize),
    (stride, pad): (usize, usize),
    relu: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Bf16Conv {
        w,
        bias,
        kernel,
        stride,
        pad,
        relu,
    })
}

/// BatchNorm in training mode with the batch statistics computed before the op.
struct BatchNormOp {
    mean: Vec<f32>,
    var: Vec<f32>,
    eps: f32,
    relu: bool,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "evax-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, b, plane) = per_channel_args((s1, l1), (s2, l2), (s3, l3), "batch norm")?;
        if self.mean.len() != g.len() {
            candle_core::bail!("batch norm: {} channels, statistics do not fit", g.len());
        }
        let y = conv::batch_norm_forward(
            conv::Planes::whole(x, g.len(), plane),
            (&self.mean, &self.var),
            (g, b),
            self.eps,
            self.relu,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, plane) = bn_dims(x.dims())?;
        let grads = read3((x, g, dy), |xv, gv, d| {
            let stats = (&self.mean[..], &self.var[..]);
            let run = |yv: Option<&[f32]>| {
                conv::batch_norm_backward(xv, d, gv, stats, plane, self.eps, yv)
                    .map_err(candle_core::Error::Msg)
            };
            if self.relu {
                read(y, |yv| run(Some(yv)))
            } else {
                run(None)
            }
        })?;
        grads3((x, g, g), grads)
    }
}

/// `(B, C, H * W)` of an NCHW shape.
fn bn_dims(d: &[usize]) -> Result<(usize, usize, usize)> {
    match d {
        &[b, c, h, w] if b * c * h * w > 0 => Ok((b, c, h * w)),
        _ => candle_core::bail!("batch norm: expected a non-empty [B, C, H, W], got {d:?}"),
    }
}

/// A per-channel op's input, its two `[C]` vectors and the plane size.
type PerChannel<'a> = (&'a [f32], &'a [f32], &'a [f32], usize);

/// The arguments of a per-channel op: input `[B, C, H, W]` and two `[C]` vectors, with the
/// plane size.
fn per_channel_args<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
    op: &str,
) -> Result<PerChannel<'a>> {
    let x = contiguous_f32(s1, l1, op)?;
    let a = contiguous_f32(s2, l2, op)?;
    let b = contiguous_f32(s3, l3, op)?;
    let (_, c, plane) = bn_dims(l1.dims())?;
    if a.len() != c || b.len() != c {
        candle_core::bail!("{op}: {c} channels, per-channel parameters do not fit");
    }
    Ok((x, a, b, plane))
}

/// BatchNorm in training mode over CPU f32 `x` `[B, C, H, W]` (then ReLU if asked): the
/// output (differentiable in `x`, `gamma`, `beta`) and the batch mean and biased variance `[C]`.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, c, plane) = bn_dims(x.dims())?;
    let x = x.contiguous()?;
    let (mean, var) = read(&x, |v| {
        Ok(conv::channel_stats(conv::Planes::whole(v, c, plane)))
    })?;
    let (m, v) = (
        Tensor::new(mean.as_slice(), x.device())?,
        Tensor::new(var.as_slice(), x.device())?,
    );
    let y = x.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNormOp {
            mean,
            var,
            eps,
            relu,
        },
    )?;
    Ok((y, m, v))
}

/// Max pooling with a square window (padding never wins), with a backward.
struct MaxPoolOp {
    k: usize,
    stride: usize,
    pad: usize,
}

impl MaxPoolOp {
    fn shape(&self, d: &[usize]) -> Result<(PoolShape, [usize; 4])> {
        let &[b, c, h, w] = d else {
            candle_core::bail!("max pool: expected [B, C, H, W], got {d:?}")
        };
        let s = PoolShape {
            planes: b * c,
            h,
            w,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
        };
        let (ho, wo) = s
            .out()
            .ok_or_else(|| candle_core::Error::Msg(format!("max pool: {s:?} has no output")))?;
        Ok((s, [b, c, ho, wo]))
    }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "evax-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "max pool")?;
        let (shape, out) = self.shape(l.dims())?;
        let y = conv::max_pool_forward(x, &shape).map_err(candle_core::Error::Msg)?;
        Ok((CpuStorage::F32(y), Shape::from(out.to_vec())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (shape, _) = self.shape(x.dims())?;
        let dx = read(x, |xv| {
            read(dy, |g| {
                conv::max_pool_backward(xv, g, &shape).map_err(candle_core::Error::Msg)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Max pooling of CPU f32 `x` `[B, C, H, W]` with a `k x k` window, differentiable.
pub fn max_pool(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPoolOp { k, stride, pad })
}

/// A per-channel scale and shift (then ReLU) over `[B, C, H, W]`. The backward gives the
/// input's gradient, and the scale's and shift's when they are learnt (`param_grads`: a
/// BatchNorm in evaluation mode being trained); in an inference model they are constants.
struct ChannelAffine {
    relu: bool,
    param_grads: bool,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "evax-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b, plane) = per_channel_args((s1, l1), (s2, l2), (s3, l3), "channel affine")?;
        let y = conv::channel_affine(conv::Planes::whole(x, a.len(), plane), a, b, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = if self.relu {
            (dy * y.gt(0f32)?.to_dtype(dy.dtype())?)?
        } else {
            dy.clone()
        };
        let dx = dy.broadcast_mul(&a.reshape((1, (), 1, 1))?)?;
        if !self.param_grads {
            return Ok((Some(dx), None, None));
        }
        let da = (&dy * x)?.sum((0, 2, 3))?;
        let db = dy.sum((0, 2, 3))?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x * scale + shift` per channel of CPU f32 `x` `[B, C, H, W]` (then ReLU), in one pass.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    let param_grads = scale.track_op() || shift.track_op();
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        ChannelAffine { relu, param_grads },
    )
}

/// `relu(a + b)` with a backward: one pass forward, one backward, one graph node.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "evax-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("add + relu: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let a = contiguous_f32(s1, l1, "add + relu")?;
        let b = contiguous_f32(s2, l2, "add + relu")?;
        Ok((
            CpuStorage::F32(cpu::add_relu_forward(a, b)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = read(y, |yv| read(dy, |g| Ok(cpu::relu_backward(yv, g))))?;
        let d = Tensor::from_vec(d, a.shape(), a.device())?;
        Ok((Some(d.clone()), Some(d)))
    }
}

/// `relu(a + b)` of two CPU f32 tensors of one shape, differentiable.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// GELU (erf form) with a backward.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "evax-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "gelu")?;
        Ok((CpuStorage::F32(cpu::gelu_forward(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let d = read(x, |xv| read(dy, |g| Ok(cpu::gelu_backward(xv, g))))?;
        Ok(Some(Tensor::from_vec(d, x.shape(), x.device())?))
    }
}

/// GELU of a CPU f32 tensor (with a backward when `grad`).
pub fn gelu(x: &Tensor, grad: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    if grad {
        x.apply_op1(Gelu)
    } else {
        x.apply_op1_no_bwd(&Gelu)
    }
}

/// Parameter gradients that training blocks run as single ops leave for their model: the
/// parameters are the ops' constants, not graph inputs, so candle's backward does not see them
/// and the model collects them from here after it.
#[derive(Debug)]
pub struct GradSink<T>(Arc<Mutex<Vec<T>>>);

impl<T> Default for GradSink<T> {
    fn default() -> Self {
        GradSink(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T> Clone for GradSink<T> {
    fn clone(&self) -> Self {
        GradSink(self.0.clone())
    }
}

impl<T> GradSink<T> {
    /// Everything left since the last call, emptying the sink.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn extend(&self, grads: impl IntoIterator<Item = T>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(grads);
    }
}

/// A transformer block's index and its parameter gradients.
pub type BlockGrads = (usize, BlockParts<Vec<f32>>);

/// Where transformer blocks leave their gradients, by block index.
pub type BlockGradSink = GradSink<BlockGrads>;

/// A parameter's name and gradient.
pub type NamedGrad = (String, Vec<f32>);

/// Where CNN blocks leave their gradients, by parameter name.
pub type NamedGradSink = GradSink<NamedGrad>;

/// One pre-norm transformer block to train as a single op (see [`block_train`]).
pub struct TrainingBlock {
    /// The block's index in the model (reported with its gradients).
    pub index: usize,
    /// Its parameters: CPU f32 tensors.
    pub weights: BlockParts<Tensor>,
    /// Attention heads.
    pub heads: usize,
    /// The MLP's kind.
    pub mlp: Mlp,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// RoPE tables (empty: none).
    pub rope: Arc<RopeTables>,
    /// Per-image drop-path scales of the attention and MLP branches.
    pub drop: Option<(Vec<f32>, Vec<f32>)>,
    /// The dense layers' products in bf16 ([`BlockShape::bf16`]).
    pub bf16: bool,
}

struct TransformerBlockOp {
    block: TrainingBlock,
    saved: Mutex<Option<Saved>>,
    sink: BlockGradSink,
}

impl TransformerBlockOp {
    /// Runs `f` on the block's shape and weights for an input of `dims`.
    fn with_block<R>(
        &self,
        dims: &[usize],
        f: impl FnOnce(&BlockShape, &BlockParts<&[f32]>) -> Result<R>,
    ) -> Result<R> {
        let &[b, t, c] = dims else {
            candle_core::bail!("transformer block: expected [B, T, C], got {dims:?}");
        };
        let blk = &self.block;
        let shape = BlockShape {
            attention: AttentionShape {
                b,
                t,
                c,
                heads: blk.heads,
                cos: &blk.rope.cos,
                sin: &blk.rope.sin,
                roped: false,
            },
            mlp: blk.mlp,
            eps: blk.eps,
            bf16: blk.bf16,
        };
        with_values(
            &blk.weights.as_ref().into_list(),
            "transformer block weight",
            |v| {
                let w = BlockParts::from_list(v.iter().copied()).expect("the same list");
                f(&shape, &w)
            },
        )
    }

    fn drop_scales(&self) -> block_train::DropScales<'_> {
        self.block
            .drop
            .as_ref()
            .map(|(a, m)| (a.as_slice(), m.as_slice()))
    }
}

impl CustomOp1 for TransformerBlockOp {
    fn name(&self) -> &'static str {
        "evax-transformer-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "transformer block input")?;
        let (y, saved) = self.with_block(l.dims(), |shape, w| {
            block_train::forward(x, w, shape, self.drop_scales()).map_err(candle_core::Error::Msg)
        })?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("transformer block: a second backward through one forward");
        };
        let (dx, grads) = read(x, |xv| {
            read(dy, |g| {
                self.with_block(x.dims(), |shape, w| {
                    block_train::backward(xv, g, w, shape, self.drop_scales(), &saved)
                        .map_err(candle_core::Error::Msg)
                })
            })
        })?;
        self.sink.extend([(self.block.index, grads)]);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// A whole pre-norm transformer block on a CPU f32 `x` `[B, T, C]`, differentiable in `x`; its
/// parameter gradients go to `sink`.
pub fn transformer_block_train(
    x: &Tensor,
    block: TrainingBlock,
    sink: &BlockGradSink,
) -> Result<Tensor> {
    let op = TransformerBlockOp {
        block,
        saved: Mutex::new(None),
        sink: sink.clone(),
    };
    x.contiguous()?.apply_op1(op)
}

/// A DenseNet dense block to train as a single op (see [`dense_train`]).
pub struct TrainingDenseBlock {
    /// Each layer's parameters: CPU f32 tensors.
    pub layers: Vec<DenseLayerParts<Tensor>>,
    /// Their names, for the gradients.
    pub names: Vec<DenseLayerParts<String>>,
    /// BatchNorm epsilon.
    pub eps: f32,
}

/// A CNN block trained as one op: its description, what its forward keeps for the backward,
/// the batch statistics the forward measured, and where its parameter gradients go.
struct CnnBlockOp<B, S, T> {
    block: B,
    saved: Mutex<Option<S>>,
    stats: Arc<Mutex<Vec<T>>>,
    sink: NamedGradSink,
}

impl<B, S, T> CnnBlockOp<B, S, T> {
    /// Keeps what the forward measured and saved.
    fn keep(&self, stats: Vec<T>, saved: S) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
    }

    /// What the forward saved (an error on a second backward).
    fn take_saved(&self) -> Result<S> {
        match self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(s) => Ok(s),
            None => candle_core::bail!("{}: a second backward through one forward", self.name()),
        }
    }

    fn name(&self) -> &'static str {
        std::any::type_name::<B>()
            .rsplit("::")
            .next()
            .unwrap_or("block")
    }
}

/// Runs `block` as one op on `x`: its output and the batch statistics its forward measured.
fn cnn_block_train<B, S, T>(x: &Tensor, block: B, sink: &NamedGradSink) -> Result<(Tensor, Vec<T>)>
where
    B: Send + Sync + 'static,
    S: Send + 'static,
    T: Send + 'static,
    CnnBlockOp<B, S, T>: CustomOp1,
{
    let stats = Arc::new(Mutex::new(Vec::new()));
    let op = CnnBlockOp {
        block,
        saved: Mutex::new(None),
        stats: stats.clone(),
        sink: sink.clone(),
    };
    let y = x.contiguous()?.apply_op1(op)?;
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((y, stats))
}

type DenseBlockOp = CnnBlockOp<TrainingDenseBlock, Vec<SavedLayer>, LayerStats>;

impl DenseBlockOp {
    /// Runs `f` on the layers' parameter values.
    fn with_layers<R>(&self, f: impl FnOnce(&[DenseLayerParts<&[f32]>]) -> Result<R>) -> Result<R> {
        let tensors: Vec<&Tensor> = self
            .block
            .layers
            .iter()
            .flat_map(|l| {
                [
                    &l.norm1.0, &l.norm1.1, &l.conv1, &l.norm2.0, &l.norm2.1, &l.conv2,
                ]
            })
            .collect();
        with_values(&tensors, "dense layer parameter", |v| {
            let layers: Vec<DenseLayerParts<&[f32]>> = v
                .chunks_exact(6)
                .zip(&self.block.layers)
                .map(|(p, l)| DenseLayerParts {
                    norm1: (p[0], p[1]),
                    conv1: p[2],
                    norm2: (p[3], p[4]),
                    conv2: p[5],
                    conv2_size: l.conv2_size,
                })
                .collect();
            f(&layers)
        })
    }
}

fn nchw_dims(d: &[usize]) -> Result<dense_train::Dims> {
    match *d {
        [b, c, h, w] => Ok((b, c, h, w)),
        _ => candle_core::bail!("training block: expected [B, C, H, W], got {d:?}"),
    }
}

impl CustomOp1 for DenseBlockOp {
    fn name(&self) -> &'static str {
        "evax-dense-block-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "dense block input")?;
        let dims = nchw_dims(l.dims())?;
        let (y, saved) = self.with_layers(|layers| {
            dense_train::forward(x, dims, layers, self.block.eps).map_err(candle_core::Error::Msg)
        })?;
        self.keep(dense_train::stats(&saved), saved);
        let (b, _, h, w) = dims;
        let total = y.len() / (b * h * w);
        Ok((CpuStorage::F32(y), Shape::from((b, total, h, w))))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.take_saved()?;
        let dims = nchw_dims(x.dims())?;
        let (dx, grads) = read(res, |out| {
            read(dy, |g| {
                self.with_layers(|layers| {
                    dense_train::backward(out, g, dims, layers, &saved, self.block.eps)
                        .map_err(candle_core::Error::Msg)
                })
            })
        })?;
        self.sink.extend(
            self.block
                .names
                .iter()
                .zip(grads)
                .flat_map(|(n, g)| n.clone().into_list().into_iter().zip(g.into_list())),
        );
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// A whole dense block on a CPU f32 `x` `[B, C, H, W]` in training mode, differentiable in
/// `x` (parameter gradients go to `sink`), with every layer's batch statistics.
pub fn dense_block_train(
    x: &Tensor,
    block: TrainingDenseBlock,
    sink: &NamedGradSink,
) -> Result<(Tensor, Vec<LayerStats>)> {
    cnn_block_train::<_, Vec<SavedLayer>, _>(x, block, sink)
}

/// A ResNet bottleneck block to train as a single op (see [`residual_train`]).
pub struct TrainingBottleneck {
    /// Its parameters: CPU f32 tensors.
    pub parts: Bottleneck<Tensor>,
    /// Their names, for the gradients.
    pub names: Bottleneck<String>,
    /// BatchNorm epsilon.
    pub eps: f32,
}

type BottleneckOp = CnnBlockOp<TrainingBottleneck, residual_train::Saved, residual_train::Stats>;

impl BottleneckOp {
    /// Runs `f` on the block's parameter values.
    fn with_parts<R>(&self, f: impl FnOnce(&Bottleneck<&[f32]>) -> Result<R>) -> Result<R> {
        let p = &self.block.parts;
        let tensors: Vec<&Tensor> = p
            .main
            .iter()
            .chain(&p.down)
            .flat_map(|u| [&u.conv, &u.bn.0, &u.bn.1])
            .collect();
        with_values(&tensors, "bottleneck parameter", |v| {
            let unit = |i: usize, u: &residual_train::ConvBn<Tensor>| residual_train::ConvBn {
                conv: v[3 * i],
                bn: (v[3 * i + 1], v[3 * i + 2]),
                size: u.size,
            };
            let [a, b, c] = &p.main;
            let parts = Bottleneck {
                main: [unit(0, a), unit(1, b), unit(2, c)],
                down: p.down.as_ref().map(|d| unit(3, d)),
                stride: p.stride,
            };
            f(&parts)
        })
    }
}

impl CustomOp1 for BottleneckOp {
    fn name(&self) -> &'static str {
        "evax-bottleneck-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "bottleneck input")?;
        let dims = nchw_dims(l.dims())?;
        let (y, out, saved) = self.with_parts(|p| {
            residual_train::forward(x, dims, p, self.block.eps).map_err(candle_core::Error::Msg)
        })?;
        self.keep(saved.stats(), saved);
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.take_saved()?;
        let dims = nchw_dims(x.dims())?;
        let (dx, grads) = read(x, |xv| {
            read(res, |out| {
                read(dy, |g| {
                    self.with_parts(|p| {
                        residual_train::backward((xv, out), dims, g, p, &saved, self.block.eps)
                            .map_err(candle_core::Error::Msg)
                    })
                })
            })
        })?;
        let names = self.block.names.clone().into_list();
        self.sink.extend(names.into_iter().zip(grads.into_list()));
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// A whole bottleneck block on a CPU f32 `x` `[B, C, H, W]` in training mode, differentiable
/// in `x` (parameter gradients go to `sink`), with its BatchNorms' batch statistics (main
/// units, then the shortcut's).
pub fn bottleneck_train(
    x: &Tensor,
    block: TrainingBottleneck,
    sink: &NamedGradSink,
) -> Result<(Tensor, Vec<residual_train::Stats>)> {
    cnn_block_train::<_, residual_train::Saved, _>(x, block, sink)
}
