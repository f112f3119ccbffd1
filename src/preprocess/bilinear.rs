//! Bilinear resampling of float planes with half-pixel centres and no antialiasing: OpenCV's
//! `cv2.resize(INTER_LINEAR)` on float images and PyTorch's `interpolate(mode='bilinear',
//! align_corners=False)` / torchvision's tensor `Resize(antialias=False)` compute the same
//! function (source `(i + 0.5) * in / out - 0.5`, clamped to the edges).

/// For each output index: the two source indices and the weight of the second.
fn taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let l = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, l)
        })
        .collect()
}

/// Resize `planes` channel-first planes of `h x w` (`[planes, h, w]`) to `oh x ow`.
pub fn resize_bilinear(
    data: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    assert_eq!(data.len(), planes * h * w, "plane size");
    let ty = taps(h, oh);
    let tx = taps(w, ow);
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let src = &data[p * h * w..(p + 1) * h * w];
        for &(y0, y1, ly) in &ty {
            let (r0, r1) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, lx) in &tx {
                let top = r0[x0] * (1.0 - lx) + r0[x1] * lx;
                let bottom = r1[x0] * (1.0 - lx) + r1[x1] * lx;
                out.push(top * (1.0 - ly) + bottom * ly);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_keeps_edges_and_interpolates() {
        let out = resize_bilinear(&[0.0, 1.0], 1, (1, 2), (1, 4));
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
