//! A ResNet bottleneck block for training, forward and backward on CPU slices, keeping what
//! the backward needs in between.
//!
//! `relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut)`, the shortcut `x` or
//! `bn(conv(x))` (stride on `conv2` and the shortcut's convolution), BatchNorm on the batch's
//! statistics. Each step is the kernel the step-by-step graph uses, in the same order, so the
//! results are the same to the bit; what the whole block saves is the graph's bookkeeping (a
//! zeroed buffer and an add for every intermediate gradient).

use super::conv::{self, ConvShape};
use super::cpu;

/// A convolution (no bias) and the BatchNorm after it.
#[derive(Debug, Clone)]
pub struct ConvBn<T> {
    /// The convolution's weight `[out, in, k, k]`.
    pub conv: T,
    /// The BatchNorm's weight and bias.
    pub bn: (T, T),
    /// The kernel side `k`.
    pub size: usize,
}

impl<T> ConvBn<T> {
    /// The parts in order: convolution, BatchNorm weight, bias.
    pub fn into_list(self) -> [T; 3] {
        [self.conv, self.bn.0, self.bn.1]
    }
}

/// A bottleneck block's parameters.
#[derive(Debug, Clone)]
pub struct Bottleneck<T> {
    /// `conv1` / `bn1`, `conv2` / `bn2`, `conv3` / `bn3`.
    pub main: [ConvBn<T>; 3],
    /// `downsample.0` / `downsample.1`, when the shortcut is not the identity.
    pub down: Option<ConvBn<T>>,
    /// The stride of `conv2` and of the shortcut's convolution.
    pub stride: usize,
}

impl<T> Bottleneck<T> {
    /// The parts in order: the three main units, then the shortcut's.
    pub fn into_list(self) -> Vec<T> {
        let [a, b, c] = self.main;
        [a, b, c]
            .into_iter()
            .chain(self.down)
            .flat_map(ConvBn::into_list)
            .collect()
    }
}

/// A BatchNorm's batch mean and biased variance per channel.
pub type Stats = (Vec<f32>, Vec<f32>);

/// What the forward keeps of one unit: the convolution's output, its batch statistics and the
/// BatchNorm's output.
struct SavedUnit {
    conv_out: Vec<f32>,
    stats: Stats,
    norm_out: Vec<f32>,
}

/// What the forward keeps for the backward.
pub struct Saved {
    main: Vec<SavedUnit>,
    down: Option<SavedUnit>,
}

impl Saved {
    /// The batch statistics of the BatchNorms: the main units', then the shortcut's.
    pub fn stats(&self) -> Vec<Stats> {
        self.main
            .iter()
            .chain(&self.down)
            .map(|u| u.stats.clone())
            .collect()
    }
}

/// Images, channels, height and width.
pub type Dims = (usize, usize, usize, usize);

/// The convolution shape of `unit` on an input of `dims` with `stride`, and its output dims.
fn unit_shape(
    dims: Dims,
    unit: &ConvBn<&[f32]>,
    stride: usize,
) -> Result<(ConvShape, Dims), String> {
    let (b, cin, h, w) = dims;
    let cout = unit.bn.0.len();
    let k = unit.size;
    if cout == 0 || unit.bn.1.len() != cout || k == 0 || unit.conv.len() != cout * cin * k * k {
        return Err(format!(
            "bottleneck: a unit does not fit {cin} input channels"
        ));
    }
    let s = ConvShape::square((b, cin, h, w), cout, k, (stride, k / 2));
    let (ho, wo) = s
        .out()
        .ok_or_else(|| format!("bottleneck: a {k}x{k} kernel does not fit {h}x{w}"))?;
    Ok((s, (b, cout, ho, wo)))
}

/// Convolution, batch statistics, BatchNorm (then ReLU).
fn unit_forward(
    x: &[f32],
    dims: Dims,
    unit: &ConvBn<&[f32]>,
    stride: usize,
    eps: f32,
    relu: bool,
) -> Result<(SavedUnit, Dims), String> {
    let (s, out) = unit_shape(dims, unit, stride)?;
    let conv_out = conv::conv_forward(x, unit.conv, None, false, None, &s)?;
    let plane = out.2 * out.3;
    let planes = conv::Planes::whole(&conv_out, out.1, plane);
    let (mean, var) = conv::channel_stats(planes);
    let norm_out = conv::batch_norm_forward(planes, (&mean, &var), unit.bn, eps, relu);
    let saved = SavedUnit {
        conv_out,
        stats: (mean, var),
        norm_out,
    };
    Ok((saved, out))
}

/// The block's output from its input `x` `dims`, and what the backward needs.
pub fn forward(
    x: &[f32],
    dims: Dims,
    p: &Bottleneck<&[f32]>,
    eps: f32,
) -> Result<(Vec<f32>, Dims, Saved), String> {
    if x.len() != dims.0 * dims.1 * dims.2 * dims.3 {
        return Err(format!("bottleneck: input does not fit {dims:?}"));
    }
    let (u1, d1) = unit_forward(x, dims, &p.main[0], 1, eps, true)?;
    let (u2, d2) = unit_forward(&u1.norm_out, d1, &p.main[1], p.stride, eps, true)?;
    let (u3, d3) = unit_forward(&u2.norm_out, d2, &p.main[2], 1, eps, false)?;
    let down = match &p.down {
        Some(unit) => Some(unit_forward(x, dims, unit, p.stride, eps, false)?),
        None => None,
    };
    let shortcut = match &down {
        Some((u, d)) if *d == d3 => &u.norm_out[..],
        None if dims == d3 => x,
        _ => return Err("bottleneck: the shortcut does not fit the block's output".into()),
    };
    let out = cpu::add_relu_forward(&u3.norm_out, shortcut);
    let saved = Saved {
        main: vec![u1, u2, u3],
        down: down.map(|(u, _)| u),
    };
    Ok((out, d3, saved))
}

/// The BatchNorm's and the convolution's backward of one unit: the gradients of its input,
/// convolution weight, and BatchNorm weight and bias (`dy`, the output gradient, is used as
/// work space).
#[allow(clippy::too_many_arguments)]
fn unit_backward(
    input: &[f32],
    dims: Dims,
    unit: &ConvBn<&[f32]>,
    stride: usize,
    saved: &SavedUnit,
    mut dy: Vec<f32>,
    eps: f32,
    relu: bool,
) -> Result<(Vec<f32>, ConvBn<Vec<f32>>), String> {
    let (s, out) = unit_shape(dims, unit, stride)?;
    let (m, v) = (&saved.stats.0[..], &saved.stats.1[..]);
    let (dg, db) = conv::batch_norm_backward_over(
        conv::Planes::whole(&saved.conv_out, out.1, out.2 * out.3),
        &mut dy,
        unit.bn.0,
        (m, v),
        eps,
        relu.then_some(&saved.norm_out[..]),
        conv::InputGrad::Over,
    )?;
    let (dx, dw, _) = conv::conv_backward(input, unit.conv, &dy, &s, true, false)?;
    let grads = ConvBn {
        conv: dw,
        bn: (dg, db),
        size: unit.size,
    };
    Ok((dx.expect("asked for"), grads))
}

/// The input gradient and the parameter gradients of [`forward`] from the output gradient
/// `dy` and what the forward kept (`x`: the block's input, `out`: its output).
pub fn backward(
    (x, out): (&[f32], &[f32]),
    dims: Dims,
    dy: &[f32],
    p: &Bottleneck<&[f32]>,
    saved: &Saved,
    eps: f32,
) -> Result<(Vec<f32>, Bottleneck<Vec<f32>>), String> {
    if dy.len() != out.len() || saved.main.len() != 3 {
        return Err("bottleneck backward: gradient does not fit".into());
    }
    let (_, d1) = unit_shape(dims, &p.main[0], 1)?;
    let (_, d2) = unit_shape(d1, &p.main[1], p.stride)?;
    // The sum's gradient, which both branches receive.
    let d = cpu::relu_backward(out, dy);
    let [s1, s2, s3] = [&saved.main[0], &saved.main[1], &saved.main[2]];
    let (da2, g3) = unit_backward(&s2.norm_out, d2, &p.main[2], 1, s3, d.clone(), eps, false)?;
    let (da1, g2) = unit_backward(&s1.norm_out, d1, &p.main[1], p.stride, s2, da2, eps, true)?;
    let (mut dx, g1) = unit_backward(x, dims, &p.main[0], 1, s1, da1, eps, true)?;
    let down = match (&p.down, &saved.down) {
        (Some(unit), Some(su)) => {
            let (dxs, gd) = unit_backward(x, dims, unit, p.stride, su, d, eps, false)?;
            dx.iter_mut().zip(&dxs).for_each(|(a, b)| *a += b);
            Some(gd)
        }
        (None, None) => {
            dx.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            None
        }
        _ => return Err("bottleneck backward: the shortcut does not match the forward".into()),
    };
    let grads = Bottleneck {
        main: [g1, g2, g3],
        down,
        stride: p.stride,
    };
    Ok((dx, grads))
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use super::*;
    use crate::kernels::candle_ops::{NamedGradSink, TrainingBottleneck, bottleneck_train};
    use crate::kernels::testing::{backward_with, flat, var};
    use crate::kernels::{self, Kernels};

    fn unit(cout: usize, cin: usize, k: usize, seed: u64) -> ConvBn<Var> {
        ConvBn {
            conv: var(&[cout, cin, k, k], seed, 0.3, 0.0),
            bn: (
                var(&[cout], seed + 1, 0.2, 1.0),
                var(&[cout], seed + 2, 0.1, 0.0),
            ),
            size: k,
        }
    }

    /// The single-op bottleneck gives the step-by-step graph's output, batch statistics, input
    /// gradient and parameter gradients to the bit: an identity shortcut, and a strided
    /// convolution shortcut on an odd plane.
    #[test]
    fn whole_bottleneck_matches_the_step_by_step_graph() {
        let (eps, k) = (1e-5f32, Kernels::Fused);
        let mut compared = 0;
        for (case, (cin, stride, down, (h, w))) in [(16, 1, false, (6, 5)), (8, 2, true, (7, 9))]
            .into_iter()
            .enumerate()
        {
            let (b, mid, cout) = (3usize, 4usize, 16usize);
            let s = 100 * case as u64;
            let p = Bottleneck {
                main: [
                    unit(mid, cin, 1, s),
                    unit(mid, mid, 3, s + 10),
                    unit(cout, mid, 1, s + 20),
                ],
                down: down.then(|| unit(cout, cin, 1, s + 30)),
                stride,
            };
            let x = var(&[b, cin, h, w], s + 40, 1.0, 0.2);
            // Step by step, as `ResNetLayout::branches` + `add_relu` on `BatchStats`.
            let mut graph_stats = Vec::new();
            let mut conv_bn = |x: &Tensor, u: &ConvBn<Var>, stride: usize, relu: bool| {
                let z = kernels::conv2d(k, x, &u.conv, None, stride, u.size / 2, false).unwrap();
                let (y, m, v) =
                    kernels::batch_norm_train(k, &z, &u.bn.0, &u.bn.1, eps, relu).unwrap();
                graph_stats.push((flat(&m), flat(&v)));
                y
            };
            let h1 = conv_bn(x.as_tensor(), &p.main[0], 1, true);
            let h2 = conv_bn(&h1, &p.main[1], stride, true);
            let y = conv_bn(&h2, &p.main[2], 1, false);
            let shortcut = match &p.down {
                Some(u) => conv_bn(x.as_tensor(), u, stride, false),
                None => x.as_tensor().clone(),
            };
            let graph = kernels::add_relu(k, &y, &shortcut).unwrap();
            let cot = var(graph.dims(), s + 50, 1.0, 0.0).as_tensor().clone();
            let graph_grads = backward_with(&graph, &cot);
            // The single op.
            let tensors = |u: &ConvBn<Var>| ConvBn {
                conv: u.conv.as_tensor().clone(),
                bn: (u.bn.0.as_tensor().clone(), u.bn.1.as_tensor().clone()),
                size: u.size,
            };
            let named = |i: usize| ConvBn {
                conv: format!("{i}.conv"),
                bn: (format!("{i}.bn.w"), format!("{i}.bn.b")),
                size: 0,
            };
            let block = TrainingBottleneck {
                parts: Bottleneck {
                    main: [
                        tensors(&p.main[0]),
                        tensors(&p.main[1]),
                        tensors(&p.main[2]),
                    ],
                    down: p.down.as_ref().map(tensors),
                    stride,
                },
                names: Bottleneck {
                    main: [named(0), named(1), named(2)],
                    down: down.then(|| named(3)),
                    stride,
                },
                eps,
            };
            let sink = NamedGradSink::default();
            let (whole, stats) = bottleneck_train(x.as_tensor(), block, &sink).unwrap();
            let whole_grads = backward_with(&whole, &cot);
            assert_eq!(whole.dims(), graph.dims(), "case {case}: output shape");
            assert_eq!(flat(&whole), flat(&graph), "case {case}: output");
            let dx = |g: &candle_core::backprop::GradStore| flat(g.get(x.as_tensor()).unwrap());
            assert_eq!(
                dx(&whole_grads),
                dx(&graph_grads),
                "case {case}: input gradient"
            );
            compared += 2;
            assert_eq!(stats.len(), graph_stats.len(), "case {case}: statistics");
            for (got, want) in stats.iter().zip(&graph_stats) {
                assert_eq!(got, want, "case {case}: batch statistics");
                compared += 1;
            }
            let left: std::collections::BTreeMap<String, Vec<f32>> =
                sink.take().into_iter().collect();
            let vars = p.into_list();
            assert_eq!(left.len(), vars.len(), "case {case}: parameter gradients");
            for (i, v) in vars.iter().enumerate() {
                let name = format!("{}.{}", i / 3, ["conv", "bn.w", "bn.b"][i % 3]);
                let want = flat(graph_grads.get(v.as_tensor()).unwrap());
                assert_eq!(left[&name], want, "case {case}: {name}");
                compared += 1;
            }
        }
        assert_eq!(compared, (2 + 3 + 9) + (2 + 4 + 12), "tensors compared");
    }
}
