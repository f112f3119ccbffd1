//! PyTorch-exact resampling as separable `[out, in]` matrices: `F.interpolate(mode='bicubic',
//! align_corners=False)` (Keys cubic, a = -0.75, borders clamped, no antialiasing) for
//! `pos_embed` and patch-embedding kernels; bilinear (`align_corners=False`) and
//! `adaptive_avg_pool2d` for feature maps, applied by [`resample`] as two matrix products, so
//! that they are differentiable without a backward of their own.

use candle_core::Tensor;

/// Keys cubic convolution weight with a = -0.75 (PyTorch's bicubic).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The `[out, in]` matrix mapping a length-`input` axis to length `output`, as PyTorch's
/// bicubic upsampling with `align_corners=False` does.
pub fn bicubic_matrix(input: usize, output: usize) -> Vec<f64> {
    let mut m = vec![0.0; output * input];
    let scale = input as f64 / output as f64;
    for i in 0..output {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let w = [cubic(t + 1.0), cubic(t), cubic(1.0 - t), cubic(2.0 - t)];
        for (j, wj) in w.iter().enumerate() {
            let idx = (x0 as i64 - 1 + j as i64).clamp(0, input as i64 - 1) as usize;
            m[i * input + idx] += wj;
        }
    }
    m
}

/// The `[out, in]` matrix of PyTorch's bilinear resizing with `align_corners=False` (source
/// `(i + 0.5) * in / out - 0.5`, negative sources clamped to 0, the far tap to the last).
pub fn bilinear_matrix(input: usize, output: usize) -> Vec<f64> {
    let mut m = vec![0.0; output * input];
    let scale = input as f64 / output as f64;
    for i in 0..output {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let t = src - i0 as f64;
        m[i * input + i0] += 1.0 - t;
        m[i * input + i1] += t;
    }
    m
}

/// The `[out, in]` matrix of PyTorch's adaptive average pooling: output cell `i` averages
/// inputs `floor(i * in / out) .. ceil((i + 1) * in / out)`.
pub fn adaptive_avg_matrix(input: usize, output: usize) -> Vec<f64> {
    let mut m = vec![0.0; output * input];
    for i in 0..output {
        let start = i * input / output;
        let end = ((i + 1) * input).div_ceil(output);
        for j in start..end {
            m[i * input + j] = 1.0 / (end - start) as f64;
        }
    }
    m
}

/// `[B, C, H, W]` to `[B, C, out_h, out_w]` through the separable matrices `my` (`[out_h, H]`)
/// and `mx` (`[out_w, W]`), made by `matrix(in, out)`; differentiable.
pub fn resample(
    x: &Tensor,
    (out_h, out_w): (usize, usize),
    matrix: fn(usize, usize) -> Vec<f64>,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let dev = x.device();
    let as_tensor = |m: Vec<f64>, rows: usize, cols: usize| {
        Tensor::from_vec(m, (rows, cols), dev)?.to_dtype(x.dtype())
    };
    let my = as_tensor(matrix(h, out_h), out_h, h)?;
    let mxt = as_tensor(matrix(w, out_w), out_w, w)?.t()?;
    // Along W: [B*C*H, W] x [W, out_w]; then along H: [out_h, H] x [B*C, H, out_w].
    let along_w = x.reshape((b * c * h, w))?.matmul(&mxt)?;
    let along_h = my
        .broadcast_left(b * c)?
        .matmul(&along_w.reshape((b * c, h, out_w))?)?;
    along_h.reshape((b, c, out_h, out_w))
}

/// Resize `channels` planes of `in_h x in_w` (channel-last: `[in_h, in_w, channels]`) to
/// `out_h x out_w`, bicubically as PyTorch does. Returns `[out_h, out_w, channels]`.
pub fn resize_grid_bicubic(
    data: &[f32],
    (in_h, in_w): (usize, usize),
    channels: usize,
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    assert_eq!(data.len(), in_h * in_w * channels, "grid size mismatch");
    let my = bicubic_matrix(in_h, out_h);
    let mx = bicubic_matrix(in_w, out_w);
    // Horizontal pass: [in_h, out_w, C].
    let mut tmp = vec![0.0f64; in_h * out_w * channels];
    for y in 0..in_h {
        for ox in 0..out_w {
            let dst = &mut tmp[(y * out_w + ox) * channels..][..channels];
            for x in 0..in_w {
                let w = mx[ox * in_w + x];
                if w != 0.0 {
                    let src = &data[(y * in_w + x) * channels..][..channels];
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(d, &s)| *d += w * s as f64);
                }
            }
        }
    }
    let mut out = vec![0.0f32; out_h * out_w * channels];
    for oy in 0..out_h {
        for y in 0..in_h {
            let w = my[oy * in_h + y];
            if w == 0.0 {
                continue;
            }
            for ox in 0..out_w {
                let src = &tmp[(y * out_w + ox) * channels..][..channels];
                let dst = &mut out[(oy * out_w + ox) * channels..][..channels];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, &s)| *d += (w * s) as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_when_sizes_match() {
        let m = bicubic_matrix(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((m[i * 5 + j] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn bilinear_and_adaptive_pooling_as_pytorch_computes_them() {
        // F.interpolate(arange(4.), size=8, mode='linear', align_corners=False) and
        // adaptive_avg_pool1d(arange(5.), 3).
        let x = Tensor::arange(0f32, 4.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let up = resample(&x, (1, 8), bilinear_matrix).unwrap();
        let got = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{got:?}"
        );
        let x = Tensor::arange(0f32, 5.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 5))
            .unwrap();
        let pooled = resample(&x, (1, 3), adaptive_avg_matrix).unwrap();
        let got = pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Cells 0..2, 1..4, 3..5.
        let want = [0.5, 2.0, 3.5];
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{got:?}"
        );
    }

    #[test]
    fn rows_sum_to_one() {
        let m = bicubic_matrix(14, 30);
        for r in m.chunks(14) {
            assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }
}
