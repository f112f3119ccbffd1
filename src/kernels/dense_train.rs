//! A DenseNet dense block for training, forward and backward on CPU slices, keeping what the
//! backward needs in between.
//!
//! Layer `l` reads the block's first `c0 + l * growth` channels and appends `growth` new ones:
//! `conv2(relu(norm2(conv1(relu(norm1(x))))))`, BatchNorm on the batch's statistics. Each step
//! is the kernel the step-by-step graph uses, in the same order, and the gradient of the
//! block's channels is summed in one buffer in the order the graph's concatenations sum it, so
//! the results are the same to the bit; what the whole block saves is the graph's
//! concatenations and its bookkeeping (a zeroed buffer and an add for every intermediate
//! gradient).

use rayon::prelude::*;

use super::conv::{self, ConvShape, InputGrad, Planes};

/// One dense layer's parameters (weights `[out, in, kh, kw]`).
#[derive(Debug, Clone)]
pub struct DenseLayerParts<T> {
    /// `norm1`'s weight and bias.
    pub norm1: (T, T),
    /// `conv1`'s weight (1x1).
    pub conv1: T,
    /// `norm2`'s weight and bias.
    pub norm2: (T, T),
    /// `conv2`'s weight (3x3).
    pub conv2: T,
    /// `conv2`'s kernel side (3).
    pub conv2_size: usize,
}

impl<T> DenseLayerParts<T> {
    /// The parts in order: norm1 weight, bias, conv1, norm2 weight, bias, conv2.
    pub fn into_list(self) -> [T; 6] {
        [
            self.norm1.0,
            self.norm1.1,
            self.conv1,
            self.norm2.0,
            self.norm2.1,
            self.conv2,
        ]
    }
}

/// One layer's parameter gradients.
pub type LayerGrads = DenseLayerParts<Vec<f32>>;

/// A layer's batch statistics: mean and biased variance per channel of `norm1` and `norm2`.
#[derive(Debug, Clone)]
pub struct LayerStats {
    /// `norm1`'s.
    pub norm1: (Vec<f32>, Vec<f32>),
    /// `norm2`'s.
    pub norm2: (Vec<f32>, Vec<f32>),
}

/// What the forward keeps of one layer for the backward (its input is the block output's
/// first channels).
pub struct SavedLayer {
    act1: Vec<f32>,
    mid: Vec<f32>,
    act2: Vec<f32>,
    stats: LayerStats,
}

/// Images, input channels, height and width of a block's input.
pub type Dims = (usize, usize, usize, usize);

/// The shapes of layer `l`'s two convolutions, and its input and new channels.
fn layer_shapes(
    (b, c0, h, w): Dims,
    before: usize,
    p: &DenseLayerParts<&[f32]>,
) -> Result<(ConvShape, ConvShape), String> {
    let cin = c0 + before;
    let mid = p.norm2.0.len();
    let bad = || {
        Err(format!(
            "dense layer: parameters do not fit {cin} input channels"
        ))
    };
    if p.norm1.0.len() != cin || p.norm1.1.len() != cin || mid == 0 || p.norm2.1.len() != mid {
        return bad();
    }
    if p.conv1.len() != mid * cin {
        return bad();
    }
    let k = p.conv2_size;
    let growth = p.conv2.len() / (mid * k * k).max(1);
    if k == 0 || k.is_multiple_of(2) || growth == 0 || growth * mid * k * k != p.conv2.len() {
        return bad();
    }
    Ok(ConvShape::dense_layer((b, cin, h, w), mid, growth, k))
}

/// The growth (new channels) of each layer, checked against the parameters.
fn growths(dims: Dims, layers: &[DenseLayerParts<&[f32]>]) -> Result<Vec<usize>, String> {
    let mut before = 0;
    layers
        .iter()
        .map(|p| {
            let (_, s2) = layer_shapes(dims, before, p)?;
            before += s2.cout;
            Ok(s2.cout)
        })
        .collect()
}

/// The block's output `[b, c0 + sum of growths, h, w]` from its input, the batch statistics
/// of every layer's norms, and what the backward needs.
pub fn forward(
    x: &[f32],
    dims: Dims,
    layers: &[DenseLayerParts<&[f32]>],
    eps: f32,
) -> Result<(Vec<f32>, Vec<SavedLayer>), String> {
    let (b, c0, h, w) = dims;
    let plane = h * w;
    if b * c0 * plane == 0 || x.len() != b * c0 * plane {
        return Err(format!("dense block: input does not fit {dims:?}"));
    }
    let total = c0 + growths(dims, layers)?.iter().sum::<usize>();
    // SAFETY: the input channels are copied in here, and each layer writes its new channels
    // before any later layer reads them.
    let mut out = unsafe { super::unfilled(b * total * plane) };
    out.par_chunks_mut(total * plane)
        .zip(x.par_chunks(c0 * plane))
        .for_each(|(o, x)| o[..c0 * plane].copy_from_slice(x));
    let mut saved = Vec::with_capacity(layers.len());
    let mut cin = c0;
    for p in layers {
        let (s1, s2) = layer_shapes(dims, cin - c0, p)?;
        let input = Planes::leading(&out, cin, total, plane);
        let (m1, v1) = conv::channel_stats(input);
        let act1 = conv::batch_norm_forward(input, (&m1, &v1), p.norm1, eps, true);
        let mid = conv::conv_forward(&act1, p.conv1, None, false, None, &s1)?;
        let mids = Planes::whole(&mid, s1.cout, plane);
        let (m2, v2) = conv::channel_stats(mids);
        let act2 = conv::batch_norm_forward(mids, (&m2, &v2), p.norm2, eps, true);
        let new = conv::conv_forward(&act2, p.conv2, None, false, None, &s2)?;
        let g = s2.cout;
        out.par_chunks_mut(total * plane)
            .zip(new.par_chunks(g * plane))
            .for_each(|(o, n)| o[cin * plane..(cin + g) * plane].copy_from_slice(n));
        saved.push(SavedLayer {
            act1,
            mid,
            act2,
            stats: LayerStats {
                norm1: (m1, v1),
                norm2: (m2, v2),
            },
        });
        cin += g;
    }
    Ok((out, saved))
}

/// The batch statistics of a forward's layers.
pub fn stats(saved: &[SavedLayer]) -> Vec<LayerStats> {
    saved.iter().map(|s| s.stats.clone()).collect()
}

/// The input gradient and every layer's parameter gradients of [`forward`], from the output
/// gradient `dy` and what the forward kept (`out`: its output).
pub fn backward(
    out: &[f32],
    dy: &[f32],
    dims: Dims,
    layers: &[DenseLayerParts<&[f32]>],
    saved: &[SavedLayer],
    eps: f32,
) -> Result<(Vec<f32>, Vec<LayerGrads>), String> {
    let (b, c0, h, w) = dims;
    let plane = h * w;
    let grow = growths(dims, layers)?;
    let total = c0 + grow.iter().sum::<usize>();
    if dy.len() != b * total * plane || out.len() != dy.len() || saved.len() != layers.len() {
        return Err("dense block backward: gradient or saved layers do not fit".into());
    }
    // The gradient of every channel of the block, summed layer by layer from the last.
    let mut grad = dy.to_vec();
    let mut grads = Vec::with_capacity(layers.len());
    let mut cin = total;
    for ((p, s), &g) in layers.iter().zip(saved).rev().zip(grow.iter().rev()) {
        cin -= g;
        let (s1, s2) = layer_shapes(dims, cin - c0, p)?;
        // SAFETY: every image's part is copied in.
        let mut dnew = unsafe { super::unfilled(b * g * plane) };
        dnew.par_chunks_mut(g * plane)
            .zip(grad.par_chunks(total * plane))
            .for_each(|(d, gr)| d.copy_from_slice(&gr[cin * plane..(cin + g) * plane]));
        let (dact2, dconv2, _) = conv::conv_backward(&s.act2, p.conv2, &dnew, &s2, true, false)?;
        let mut dmid = dact2.expect("asked for");
        let (m2, v2) = (&s.stats.norm2.0[..], &s.stats.norm2.1[..]);
        let mids = Planes::whole(&s.mid, s1.cout, plane);
        let (dg2, db2) = conv::batch_norm_backward_over(
            mids,
            &mut dmid,
            p.norm2.0,
            (m2, v2),
            eps,
            Some(&s.act2),
            InputGrad::Over,
        )?;
        let (dact1, dconv1, _) = conv::conv_backward(&s.act1, p.conv1, &dmid, &s1, true, false)?;
        let mut dact1 = dact1.expect("asked for");
        let (m1, v1) = (&s.stats.norm1.0[..], &s.stats.norm1.1[..]);
        // The input's gradient is added to the block's as it is made.
        let (dg1, db1) = conv::batch_norm_backward_over(
            Planes::leading(out, cin, total, plane),
            &mut dact1,
            p.norm1.0,
            (m1, v1),
            eps,
            Some(&s.act1),
            InputGrad::AddTo(&mut grad),
        )?;
        grads.push(DenseLayerParts {
            norm1: (dg1, db1),
            conv1: dconv1,
            norm2: (dg2, db2),
            conv2: dconv2,
            conv2_size: p.conv2_size,
        });
    }
    grads.reverse();
    // SAFETY: every image's part is copied in.
    let mut dx = unsafe { super::unfilled(b * c0 * plane) };
    dx.par_chunks_mut(c0 * plane)
        .zip(grad.par_chunks(total * plane))
        .for_each(|(d, g)| d.copy_from_slice(&g[..c0 * plane]));
    Ok((dx, grads))
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use super::*;
    use crate::kernels::candle_ops::{NamedGradSink, TrainingDenseBlock, dense_block_train};
    use crate::kernels::testing::{backward_with, flat, var};
    use crate::kernels::{self, Kernels};

    /// The single-op dense block gives the step-by-step graph's output, batch statistics, input
    /// gradient and parameter gradients to the bit (odd batch, a non-square plane).
    #[test]
    fn whole_dense_block_matches_the_step_by_step_graph() {
        let (b, c0, h, w, mid, growth, eps) = (3usize, 5usize, 5usize, 7usize, 8, 4, 1e-5f32);
        let k = Kernels::Fused;
        let layers: Vec<DenseLayerParts<Var>> = (0..3)
            .map(|l| {
                let cin = c0 + l * growth;
                let s = 10 * l as u64;
                DenseLayerParts {
                    norm1: (var(&[cin], s, 0.2, 1.0), var(&[cin], s + 1, 0.1, 0.0)),
                    conv1: var(&[mid, cin, 1, 1], s + 2, 0.3, 0.0),
                    norm2: (var(&[mid], s + 3, 0.2, 1.0), var(&[mid], s + 4, 0.1, 0.0)),
                    conv2: var(&[growth, mid, 3, 3], s + 5, 0.2, 0.0),
                    conv2_size: 3,
                }
            })
            .collect();
        let x = var(&[b, c0, h, w], 99, 1.0, 0.3);
        // Step by step, as `densenet::layers_stepwise` on `BatchStats` builds it.
        let mut graph = x.as_tensor().clone();
        let mut graph_stats = Vec::new();
        for p in &layers {
            let (y1, m1, v1) =
                kernels::batch_norm_train(k, &graph, &p.norm1.0, &p.norm1.1, eps, true).unwrap();
            let z = kernels::conv2d(k, &y1, &p.conv1, None, 1, 0, false).unwrap();
            let (y2, m2, v2) =
                kernels::batch_norm_train(k, &z, &p.norm2.0, &p.norm2.1, eps, true).unwrap();
            let new = kernels::conv2d(k, &y2, &p.conv2, None, 1, 1, false).unwrap();
            graph_stats.push([m1, v1, m2, v2].map(|t| flat(&t)));
            graph = Tensor::cat(&[&graph, &new], 1).unwrap();
        }
        let total = c0 + 3 * growth;
        assert_eq!(graph.dims(), &[b, total, h, w]);
        let cot = var(&[b, total, h, w], 7, 1.0, 0.0).as_tensor().clone();
        let graph_grads = backward_with(&graph, &cot);
        // The single op.
        let names: Vec<DenseLayerParts<String>> = (0..3)
            .map(|l| DenseLayerParts {
                norm1: (format!("{l}.n1w"), format!("{l}.n1b")),
                conv1: format!("{l}.c1"),
                norm2: (format!("{l}.n2w"), format!("{l}.n2b")),
                conv2: format!("{l}.c2"),
                conv2_size: 3,
            })
            .collect();
        let block = TrainingDenseBlock {
            layers: layers
                .iter()
                .map(|p| DenseLayerParts {
                    norm1: (p.norm1.0.as_tensor().clone(), p.norm1.1.as_tensor().clone()),
                    conv1: p.conv1.as_tensor().clone(),
                    norm2: (p.norm2.0.as_tensor().clone(), p.norm2.1.as_tensor().clone()),
                    conv2: p.conv2.as_tensor().clone(),
                    conv2_size: 3,
                })
                .collect(),
            names: names.clone(),
            eps,
        };
        let sink = NamedGradSink::default();
        let (whole, stats) = dense_block_train(x.as_tensor(), block, &sink).unwrap();
        let whole_grads = backward_with(&whole, &cot);
        let mut compared = 0;
        assert_eq!(flat(&whole), flat(&graph), "output");
        let dx = |g: &candle_core::backprop::GradStore| flat(g.get(x.as_tensor()).unwrap());
        assert_eq!(dx(&whole_grads), dx(&graph_grads), "input gradient");
        compared += 2;
        assert_eq!(stats.len(), 3, "layers' statistics");
        for (s, want) in stats.iter().zip(&graph_stats) {
            let got = [&s.norm1.0, &s.norm1.1, &s.norm2.0, &s.norm2.1];
            for (g, w) in got.into_iter().zip(want) {
                assert_eq!(g, w, "batch statistics");
                compared += 1;
            }
        }
        let left: std::collections::BTreeMap<String, Vec<f32>> = sink.take().into_iter().collect();
        assert_eq!(left.len(), 18, "parameter gradients");
        for (p, n) in layers.iter().zip(&names) {
            let vars = p.clone().into_list();
            for (v, name) in vars.iter().zip(n.clone().into_list()) {
                let want = flat(graph_grads.get(v.as_tensor()).unwrap());
                assert_eq!(left[&name], want, "{name}");
                compared += 1;
            }
        }
        assert_eq!(compared, 2 + 12 + 18, "tensors compared");
    }
}
