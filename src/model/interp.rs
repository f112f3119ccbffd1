//! PyTorch-exact resampling of learned grids: `F.interpolate(mode='bicubic',
//! align_corners=False)` as separable interpolation matrices (Keys cubic, a = -0.75, borders
//! clamped, no antialiasing), used for `pos_embed` and patch-embedding kernels.

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
    fn rows_sum_to_one() {
        let m = bicubic_matrix(14, 30);
        for r in m.chunks(14) {
            assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }
}
