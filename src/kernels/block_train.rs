//! One pre-norm transformer block (ViT's and EVA-X's) for training, forward and backward on
//! CPU slices, keeping what the backward needs in between.
//!
//! `x1 = x + s_a * proj(attn(qkv(norm1(x))))`, then `x2 = x1 + s_m * mlp(norm2(x1))`, with
//! per-image drop-path scales `s_a`, `s_m` (0 or 1 / keep). Each step is one of the fused
//! kernels of [`super::cpu`], in the same order and with the same arithmetic as the step-by-step
//! graph, so the results are the same to the bit; what the whole block saves is the graph's
//! bookkeeping between the steps (a zeroed buffer and an add for every intermediate gradient).

use rayon::prelude::*;

use super::cpu::{self, AttentionShape, WeightLayout};

/// The MLP of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// `fc2(gelu(fc1(y)))` (ViT).
    Gelu,
    /// `fc2(silu(h1) * h2)`, `[h1 | h2] = fc1(y)`, with EVA-X-B's sub-LN on the product when
    /// [`BlockParts::sub_ln`] is there (EVA-X).
    SwiGlu,
}

/// One value per parameter of a block (`(weight, bias)` pairs; linear weights `[out, in]`).
#[derive(Debug, Clone)]
pub struct BlockParts<T> {
    /// Pre-attention LayerNorm.
    pub norm1: (T, T),
    /// Fused q/k/v projection `[3C, C]`.
    pub qkv: (T, T),
    /// Attention output projection `[C, C]`.
    pub proj: (T, T),
    /// Pre-MLP LayerNorm.
    pub norm2: (T, T),
    /// MLP input projection `[H, C]` (GELU) or `[2H, C]` (SwiGLU).
    pub fc1: (T, T),
    /// LayerNorm of the MLP's hidden activation (EVA-X-B).
    pub sub_ln: Option<(T, T)>,
    /// MLP output projection `[C, H]`.
    pub fc2: (T, T),
}

fn pair<T>(p: &(T, T)) -> (&T, &T) {
    (&p.0, &p.1)
}

impl<T> BlockParts<T> {
    /// References to the parts.
    pub fn as_ref(&self) -> BlockParts<&T> {
        BlockParts {
            norm1: pair(&self.norm1),
            qkv: pair(&self.qkv),
            proj: pair(&self.proj),
            norm2: pair(&self.norm2),
            fc1: pair(&self.fc1),
            sub_ln: self.sub_ln.as_ref().map(pair),
            fc2: pair(&self.fc2),
        }
    }

    /// The parts in order: norm1, qkv, proj, norm2, fc1, sub-LN (when there), fc2; weight
    /// before bias.
    pub fn into_list(self) -> Vec<T> {
        let mut out = Vec::with_capacity(14);
        for (w, b) in [self.norm1, self.qkv, self.proj, self.norm2, self.fc1]
            .into_iter()
            .chain(self.sub_ln)
            .chain([self.fc2])
        {
            out.push(w);
            out.push(b);
        }
        out
    }

    /// The parts from values in [`BlockParts::into_list`]'s order (`None` unless there are 12
    /// or 14).
    pub fn from_list(values: impl IntoIterator<Item = T>) -> Option<Self> {
        let v: Vec<T> = values.into_iter().collect();
        if v.len() != 12 && v.len() != 14 {
            return None;
        }
        let with_sub_ln = v.len() == 14;
        let mut it = v.into_iter();
        let mut pair = || Some((it.next()?, it.next()?));
        Some(BlockParts {
            norm1: pair()?,
            qkv: pair()?,
            proj: pair()?,
            norm2: pair()?,
            fc1: pair()?,
            sub_ln: if with_sub_ln { Some(pair()?) } else { None },
            fc2: pair()?,
        })
    }

    /// The same parts through `f`.
    pub fn map<U>(&self, f: impl FnMut(&T) -> U) -> BlockParts<U> {
        BlockParts::from_list(self.as_ref().into_list().into_iter().map(f)).expect("as many parts")
    }
}

/// The shape of a block's computation.
pub struct BlockShape<'a> {
    /// Images, tokens, width and heads, and the RoPE tables (empty: none).
    pub attention: AttentionShape<'a>,
    /// The MLP's kind.
    pub mlp: Mlp,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// The dense layers' products in bf16 (operands rounded, sums in f32, as PyTorch's CPU
    /// autocast; [`super::bf16`]): forward, input gradients, weight gradients and, with AMX,
    /// attention's products; everything else in f32.
    pub bf16: bool,
}

/// `x W^T + b` for the block's dense layers, `W` `[n, k]` as stored: in f32, or in bf16
/// products ([`BlockShape::bf16`]).
fn dense(
    x: &[f32],
    (w, b): (&[f32], &[f32]),
    k: usize,
    n: usize,
    bf16: bool,
) -> Result<Vec<f32>, String> {
    if bf16 {
        return super::bf16::linear(
            x,
            &super::bf16::Bf16Weight::from_stored(w, n, k),
            Some(b),
            None,
        );
    }
    Ok(cpu::linear_forward(
        x,
        k,
        w,
        WeightLayout::AsStored,
        n,
        Some(b),
        None,
    ))
}

/// A dense layer's gradients `(dx, dW, db)`.
type DenseGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The gradients `(dx, dW, db)` of [`dense`] given the output gradient `g`: `dx = g W` and
/// `dW = g^T x` in bf16 products where the forward's were (`dW` in f32 on CPUs without
/// AVX512-BF16), `db` in f32.
fn dense_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (n, k): (usize, usize),
    bf16: bool,
) -> Result<DenseGrads, String> {
    if !bf16 {
        return Ok(cpu::linear_backward(x, w, g, n, k));
    }
    // W [n, k] row-major is the W^T of the layer taking g's n values to dx's k.
    let dx = super::bf16::linear(g, &super::bf16::Bf16Weight::new(w, n, k), None, None)?;
    let (dw, db) = match super::bf16::weight_grad(x, g, n, k)? {
        Some(dw) => (dw, cpu::bias_grad(g, n)),
        None => cpu::linear_param_grads(x, g, n, k),
    };
    Ok((dx, dw, db))
}

/// What the forward keeps for the backward.
pub struct Saved {
    y1: Vec<f32>,
    qkv: Vec<f32>,
    /// The attention probabilities, when kept (see [`keeps_probabilities`]); else the
    /// backward computes them again.
    probs: Option<Vec<f32>>,
    attn: Vec<f32>,
    x1: Vec<f32>,
    y2: Vec<f32>,
    hidden: Vec<f32>,
    act: Vec<f32>,
    normed: Option<Vec<f32>>,
}

/// Per-image drop-path scales of the attention and MLP branches.
pub type DropScales<'a> = Option<(&'a [f32], &'a [f32])>;

/// `x + s * t` row by row (`s` per image of `rows_per_image` rows of width `c`; 1 without
/// scales), in place in `t`: a residual branch joining the stream, as `x + t * s` in the graph.
fn join_branch(x: &[f32], t: &mut [f32], s: Option<&[f32]>, image: usize) {
    t.par_chunks_mut(image)
        .zip(x.par_chunks(image))
        .enumerate()
        .for_each(|(i, (t, x))| match s {
            Some(s) => t.iter_mut().zip(x).for_each(|(t, x)| *t = x + *t * s[i]),
            None => t.iter_mut().zip(x).for_each(|(t, x)| *t += x),
        });
}

/// `g * s` per image (the gradient of a scaled branch), or `g` itself without scales.
fn scaled<'a>(g: &'a [f32], s: Option<&[f32]>, image: usize) -> std::borrow::Cow<'a, [f32]> {
    match s {
        None => std::borrow::Cow::Borrowed(g),
        Some(s) => {
            let mut out = g.to_vec();
            out.par_chunks_mut(image)
                .enumerate()
                .for_each(|(i, o)| o.iter_mut().for_each(|v| *v *= s[i]));
            std::borrow::Cow::Owned(out)
        }
    }
}

/// `a + b` elementwise, in place in `a`.
fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Widths checked against the parameters: `(hidden, fc1 outputs)`.
fn widths(w: &BlockParts<&[f32]>, shape: &BlockShape) -> Result<(usize, usize), String> {
    let c = shape.attention.c;
    let bad = |what: &str| Err(format!("transformer block: {what} does not fit width {c}"));
    if c == 0 || w.norm1.0.len() != c || w.norm1.1.len() != c {
        return bad("norm1");
    }
    if w.qkv.0.len() != 3 * c * c || w.qkv.1.len() != 3 * c {
        return bad("qkv");
    }
    if w.proj.0.len() != c * c || w.proj.1.len() != c || w.norm2.0.len() != c {
        return bad("proj / norm2");
    }
    let hidden = w.fc2.0.len() / c;
    let fc1_out = match shape.mlp {
        Mlp::Gelu => hidden,
        Mlp::SwiGlu => 2 * hidden,
    };
    if hidden == 0
        || w.fc2.0.len() != c * hidden
        || w.fc2.1.len() != c
        || w.fc1.0.len() != fc1_out * c
        || w.fc1.1.len() != fc1_out
        || w.sub_ln
            .is_some_and(|(a, b)| a.len() != hidden || b.len() != hidden)
    {
        return bad("the MLP");
    }
    if w.sub_ln.is_some() && shape.mlp == Mlp::Gelu {
        return bad("a sub-LN with GELU");
    }
    Ok((hidden, fc1_out))
}

/// Whether the forward keeps the attention probabilities for the backward: only while they
/// add at most half again to what a block saves anyway (at 224 pixels, 197 tokens, they are
/// a fifth of it for EVA-X-S). At 512 pixels (1025 tokens) they would be more than all the
/// rest (100 MB a block for EVA-X-S at batch 4), so the backward computes them again, as
/// its `q k^T` and softmax, about 5 % of the block's training time.
fn keeps_probabilities(a: &AttentionShape, hidden: usize, fc1_out: usize, sub_ln: bool) -> bool {
    // Per token: y1, attn, x1 and y2 (c each), qkv (3c), fc1's output, the activation and
    // the sub-LN's output.
    let rest = 7 * a.c + fc1_out + hidden + if sub_ln { hidden } else { 0 };
    2 * a.heads * a.t <= rest
}

/// The block's output `[b, t, c]` from its input `x`, and what the backward needs.
pub fn forward(
    x: &[f32],
    w: &BlockParts<&[f32]>,
    shape: &BlockShape,
    scales: DropScales,
) -> Result<(Vec<f32>, Saved), String> {
    let a = &shape.attention;
    let (c, image) = (a.c, a.t * a.c);
    let (hidden, fc1_out) = widths(w, shape)?;
    if x.len() != a.b * image || scales.is_some_and(|(s, m)| s.len() != a.b || m.len() != a.b) {
        return Err("transformer block: input or drop-path scales do not fit".into());
    }
    let eps = shape.eps;
    let linear = |x: &[f32], w: (&[f32], &[f32]), k: usize, n: usize| dense(x, w, k, n, shape.bf16);
    let y1 = cpu::layer_norm_forward(x, w.norm1.0, w.norm1.1, eps);
    let qkv = linear(&y1, w.qkv, c, 3 * c)?;
    let keep = keeps_probabilities(a, hidden, fc1_out, w.sub_ln.is_some());
    let bf16_attention = if shape.bf16 {
        super::bf16::attention_keeping(&qkv, a, keep)?
    } else {
        None
    };
    let (attn, probs) = match bf16_attention {
        Some(both) => both,
        None => cpu::attention_forward_keeping(&qkv, a, keep)?,
    };
    let probs = keep.then_some(probs);
    let mut x1 = linear(&attn, w.proj, c, c)?;
    join_branch(x, &mut x1, scales.map(|d| d.0), image);
    let y2 = cpu::layer_norm_forward(&x1, w.norm2.0, w.norm2.1, eps);
    let hidden_pre = linear(&y2, w.fc1, c, fc1_out)?;
    let act = match shape.mlp {
        Mlp::Gelu => cpu::gelu_forward(&hidden_pre),
        Mlp::SwiGlu => cpu::swiglu_forward(&hidden_pre, hidden),
    };
    let normed = w
        .sub_ln
        .map(|(g, b)| cpu::layer_norm_forward(&act, g, b, eps));
    let mut out = linear(normed.as_deref().unwrap_or(&act), w.fc2, hidden, c)?;
    join_branch(&x1, &mut out, scales.map(|d| d.1), image);
    let saved = Saved {
        y1,
        qkv,
        probs,
        attn,
        x1,
        y2,
        hidden: hidden_pre,
        act,
        normed,
    };
    Ok((out, saved))
}

/// The input gradient and the parameter gradients of [`forward`], from the output gradient
/// `dy` and what the forward kept.
pub fn backward(
    x: &[f32],
    dy: &[f32],
    w: &BlockParts<&[f32]>,
    shape: &BlockShape,
    scales: DropScales,
    saved: &Saved,
) -> Result<(Vec<f32>, BlockParts<Vec<f32>>), String> {
    let a = &shape.attention;
    let (c, image) = (a.c, a.t * a.c);
    let (hidden, fc1_out) = widths(w, shape)?;
    if dy.len() != x.len() || saved.x1.len() != x.len() {
        return Err("transformer block backward: gradient does not fit".into());
    }
    let eps = shape.eps;
    // The MLP branch.
    let dm = scaled(dy, scales.map(|d| d.1), image);
    let fc2_in = saved.normed.as_deref().unwrap_or(&saved.act);
    let bf16 = shape.bf16;
    let (mut dact, dfc2_w, dfc2_b) = dense_backward(fc2_in, w.fc2.0, &dm, (c, hidden), bf16)?;
    let sub_ln = match w.sub_ln {
        Some((g, _)) => {
            let (d, dg, db) = cpu::layer_norm_backward(&saved.act, g, &dact, eps);
            dact = d;
            Some((dg, db))
        }
        None => None,
    };
    let dhidden = match shape.mlp {
        Mlp::Gelu => cpu::gelu_backward(&saved.hidden, &dact),
        Mlp::SwiGlu => cpu::swiglu_backward(&saved.hidden, &dact, hidden),
    };
    drop(dact);
    let (dy2, dfc1_w, dfc1_b) = dense_backward(&saved.y2, w.fc1.0, &dhidden, (fc1_out, c), bf16)?;
    drop(dhidden);
    let (mut dx1, dn2_w, dn2_b) = cpu::layer_norm_backward(&saved.x1, w.norm2.0, &dy2, eps);
    add_into(&mut dx1, dy);
    // The attention branch.
    let da = scaled(&dx1, scales.map(|d| d.0), image);
    let (dattn, dproj_w, dproj_b) = dense_backward(&saved.attn, w.proj.0, &da, (c, c), bf16)?;
    drop(da);
    let probs = saved.probs.as_deref();
    let bf16_attention = if bf16 {
        super::bf16::attention_backward(&saved.qkv, &dattn, a, probs)?
    } else {
        None
    };
    let dqkv = match bf16_attention {
        Some(dqkv) => dqkv,
        None => cpu::attention_backward(&saved.qkv, &dattn, a, probs)?,
    };
    drop(dattn);
    let (dy1, dqkv_w, dqkv_b) = dense_backward(&saved.y1, w.qkv.0, &dqkv, (3 * c, c), bf16)?;
    drop(dqkv);
    let (mut dx, dn1_w, dn1_b) = cpu::layer_norm_backward(x, w.norm1.0, &dy1, eps);
    add_into(&mut dx, &dx1);
    let grads = BlockParts {
        norm1: (dn1_w, dn1_b),
        qkv: (dqkv_w, dqkv_b),
        proj: (dproj_w, dproj_b),
        norm2: (dn2_w, dn2_b),
        fc1: (dfc1_w, dfc1_b),
        sub_ln,
        fc2: (dfc2_w, dfc2_b),
    };
    Ok((dx, grads))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::kernels::candle_ops::{BlockGradSink, TrainingBlock, transformer_block_train};
    use crate::kernels::testing::{backward_with, flat, var};
    use crate::kernels::{self, Kernels};
    use crate::model::rope::RopeTables;

    /// The same block step by step from the fused kernels that have a backward (the path
    /// the fixtures check against PyTorch).
    fn step_by_step(
        x: &Tensor,
        w: &BlockParts<Var>,
        mlp: Mlp,
        heads: usize,
        rope: &Arc<RopeTables>,
        drop: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let k = Kernels::Fused;
        let ln = |x: &Tensor, (g, b): &(Var, Var)| kernels::layer_norm(k, x, g, b, 1e-6, true);
        let lin = |x: &Tensor, (wt, b): &(Var, Var)| kernels::linear_train(k, x, wt, b);
        let y = ln(x, &w.norm1)?;
        let mut a = lin(
            &kernels::attention(k, &lin(&y, &w.qkv)?, heads, rope, true)?,
            &w.proj,
        )?;
        if let Some((s, _)) = drop {
            a = a.broadcast_mul(s)?;
        }
        let x1 = (x + a)?;
        let h = lin(&ln(&x1, &w.norm2)?, &w.fc1)?;
        let mut h = match mlp {
            Mlp::Gelu => kernels::gelu(k, &h, true)?,
            Mlp::SwiGlu => kernels::swiglu(k, &h, true)?,
        };
        if let Some(sub) = &w.sub_ln {
            h = ln(&h, sub)?;
        }
        let mut m = lin(&h, &w.fc2)?;
        if let Some((_, s)) = drop {
            m = m.broadcast_mul(s)?;
        }
        &x1 + m
    }

    /// The single-op block gives the step-by-step graph's output, input gradient and
    /// parameter gradients to the bit, with and without RoPE, sub-LN and drop path (the
    /// fixtures' training steps have neither drop path nor a sub-LN).
    #[test]
    fn whole_block_matches_the_step_by_step_graph() {
        let (b, c, heads) = (3usize, 128usize, 2usize);
        let mut compared = 0;
        // The last case has tokens enough that the forward does not keep the probabilities.
        for (case, (mlp, rope, sub_ln, drop, grid)) in [
            (Mlp::Gelu, false, false, false, (2, 3)),
            (Mlp::Gelu, false, false, true, (2, 3)),
            (Mlp::SwiGlu, true, true, true, (2, 3)),
            (Mlp::SwiGlu, true, false, false, (2, 3)),
            (Mlp::SwiGlu, true, true, true, (18, 18)),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 100 * case as u64;
            let hidden = 96usize;
            let t = 1 + grid.0 * grid.1;
            let fc1_out = if mlp == Mlp::Gelu { hidden } else { 2 * hidden };
            let shape = AttentionShape {
                b,
                t,
                c,
                heads,
                cos: &[],
                sin: &[],
                roped: false,
            };
            assert_eq!(
                keeps_probabilities(&shape, hidden, fc1_out, sub_ln),
                case < 4,
                "case {case}: probabilities kept"
            );
            let norm = |n: usize, s: u64| (var(&[n], s, 0.2, 1.0), var(&[n], s + 1, 0.1, 0.0));
            let linear = |o: usize, i: usize, s: u64| {
                (var(&[o, i], s, 0.1, 0.0), var(&[o], s + 1, 0.1, 0.0))
            };
            let w = BlockParts {
                norm1: norm(c, seed + 1),
                qkv: linear(3 * c, c, seed + 3),
                proj: linear(c, c, seed + 5),
                norm2: norm(c, seed + 7),
                fc1: linear(fc1_out, c, seed + 9),
                sub_ln: sub_ln.then(|| norm(hidden, seed + 11)),
                fc2: linear(c, hidden, seed + 13),
            };
            let tables = if rope {
                RopeTables::new(grid, 2.0, c / heads)
            } else {
                RopeTables::none(c / heads)
            };
            let rope = Arc::new(tables);
            let scales = drop.then(|| (vec![0.0, 1.25, 1.25], vec![1.25, 1.25, 0.0]));
            let drop_t = scales.as_ref().map(|(a, m)| {
                let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), (b, 1, 1), &Device::Cpu);
                (t(a).unwrap(), t(m).unwrap())
            });
            let x = var(&[b, t, c], seed + 20, 1.0, 0.0);
            let cot = var(&[b, t, c], seed + 21, 1.0, 0.0).as_tensor().clone();
            let graph =
                step_by_step(x.as_tensor(), &w, mlp, heads, &rope, drop_t.as_ref()).unwrap();
            let graph_grads = backward_with(&graph, &cot);
            let sink = BlockGradSink::default();
            let block = TrainingBlock {
                index: 7,
                weights: w.map(|v| v.as_tensor().clone()),
                heads,
                mlp,
                eps: 1e-6,
                rope: rope.clone(),
                drop: scales,
                bf16: false,
            };
            let whole = transformer_block_train(x.as_tensor(), block, &sink).unwrap();
            let whole_grads = backward_with(&whole, &cot);
            let same = |a: &Tensor, b: &Tensor, what: &str| {
                let (a, b) = (flat(a), flat(b));
                assert_eq!(a.len(), b.len(), "case {case}: {what} length");
                assert!(a == b, "case {case}: {what} differs");
            };
            same(&graph, &whole, "output");
            same(
                graph_grads.get(x.as_tensor()).unwrap(),
                whole_grads.get(x.as_tensor()).unwrap(),
                "input gradient",
            );
            compared += 2;
            let mut left = sink.take();
            assert_eq!(left.len(), 1, "one block's gradients");
            let (index, parts) = left.pop().unwrap();
            assert_eq!(index, 7);
            let vars = w.into_list();
            let grads = parts.into_list();
            assert_eq!(grads.len(), vars.len(), "case {case}: parameter gradients");
            for (i, (v, g)) in vars.iter().zip(grads).enumerate() {
                let g = Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap();
                same(
                    graph_grads.get(v.as_tensor()).unwrap(),
                    &g,
                    &format!("part {i}"),
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 5 * 2 + 3 * 12 + 2 * 14, "tensors compared");
    }

    /// With bf16 products (`--precision bf16` training on the CPU) the block's output, input
    /// gradient and parameter gradients stay within 2e-2 of the f32 block's, relative to each
    /// tensor's largest value (measured 5.1e-3 on the Intel Xeon type).
    #[test]
    fn bf16_products_agree_with_f32() {
        if !crate::kernels::bf16::native() {
            eprintln!("SKIPPED bf16 training block: this CPU has no AVX512-BF16");
            return;
        }
        let (b, c, heads, hidden, grid) = (2usize, 128usize, 2usize, 96usize, (4, 4));
        let t = 1 + grid.0 * grid.1;
        let mut rng = crate::rng::Rng::new(5);
        let mut data = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.unit() as f32 * 2.0 - 1.0) * scale + offset)
                .collect()
        };
        let parts = BlockParts {
            norm1: (data(c, 0.2, 1.0), data(c, 0.1, 0.0)),
            qkv: (data(3 * c * c, 0.1, 0.0), data(3 * c, 0.1, 0.0)),
            proj: (data(c * c, 0.1, 0.0), data(c, 0.1, 0.0)),
            norm2: (data(c, 0.2, 1.0), data(c, 0.1, 0.0)),
            fc1: (data(2 * hidden * c, 0.1, 0.0), data(2 * hidden, 0.1, 0.0)),
            sub_ln: None,
            fc2: (data(c * hidden, 0.1, 0.0), data(c, 0.1, 0.0)),
        };
        let (x, dy) = (data(b * t * c, 1.0, 0.0), data(b * t * c, 1.0, 0.0));
        let tables = RopeTables::new(grid, 2.0, c / heads);
        let run = |bf16: bool| {
            let shape = BlockShape {
                attention: AttentionShape {
                    b,
                    t,
                    c,
                    heads,
                    cos: &tables.cos,
                    sin: &tables.sin,
                    roped: false,
                },
                mlp: Mlp::SwiGlu,
                eps: 1e-6,
                bf16,
            };
            let w = parts.as_ref().map(|v| v.as_slice());
            let (out, saved) = forward(&x, &w, &shape, None).unwrap();
            let (dx, grads) = backward(&x, &dy, &w, &shape, None, &saved).unwrap();
            let mut all = vec![out, dx];
            all.extend(grads.into_list());
            all
        };
        let (want, got) = (run(false), run(true));
        assert_eq!((want.len(), got.len()), (14, 14), "tensors");
        let mut worst = 0f32;
        for (i, (a, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(a.len(), g.len(), "tensor {i}: length");
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let d = a.iter().zip(g).fold(0f32, |m, (a, g)| m.max((a - g).abs())) / scale;
            worst = worst.max(d);
            assert!(d <= 2e-2, "tensor {i}: {d:.2e} of its largest value");
        }
        eprintln!("bf16 training block: worst relative difference {worst:.2e} over 14 tensors");
    }
}
