//! Pillow-exact bicubic resampling of 8-bit images (`Image.resize(..., BICUBIC)`).
//!
//! Pillow computes a support-scaled Keys kernel (a = -0.5; antialiased when shrinking), turns
//! the weights into 22-bit fixed point, resamples horizontally then vertically with an 8-bit
//! intermediate image. Doing the same arithmetic gives bit-identical output.

/// Fixed-point fraction bits of the weights (Pillow's `PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights for one axis: for each output index, the first input index and the taps.
struct Coeffs {
    start: Vec<usize>,
    taps: Vec<Vec<i32>>,
}

fn coeffs(input: usize, output: usize) -> Coeffs {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut start = Vec::with_capacity(output);
    let mut taps = Vec::with_capacity(output);
    for i in 0..output {
        let center = (i as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let w: Vec<f64> = (xmin..xmax)
            .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
            .collect();
        let sum: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&k| {
                let k = if sum != 0.0 { k / sum } else { k };
                let s = k * (1u32 << PRECISION_BITS) as f64;
                if k < 0.0 {
                    (s - 0.5) as i32
                } else {
                    (s + 0.5) as i32
                }
            })
            .collect();
        start.push(xmin);
        taps.push(fixed);
    }
    Coeffs { start, taps }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an interleaved 8-bit image with `channels` channels from `w x h` to `ow x oh`.
pub fn resize_bicubic(
    data: &[u8],
    (w, h): (usize, usize),
    channels: usize,
    (ow, oh): (usize, usize),
) -> Vec<u8> {
    assert_eq!(data.len(), w * h * channels, "image buffer size");
    let round = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as Pillow does).
    let (tmp, tw) = if ow != w {
        let cx = coeffs(w, ow);
        let mut tmp = vec![0u8; ow * h * channels];
        for (src, dst) in data
            .chunks_exact(w * channels)
            .zip(tmp.chunks_exact_mut(ow * channels))
        {
            for (ox, (s, k)) in cx.start.iter().zip(&cx.taps).enumerate() {
                for c in 0..channels {
                    let mut acc = round;
                    for (j, &kj) in k.iter().enumerate() {
                        acc += src[(s + j) * channels + c] as i32 * kj;
                    }
                    dst[ox * channels + c] = clip8(acc);
                }
            }
        }
        (tmp, ow)
    } else {
        (data.to_vec(), w)
    };
    if oh == h {
        return tmp;
    }
    // Vertical pass.
    let cy = coeffs(h, oh);
    let row = tw * channels;
    let mut out = vec![0u8; row * oh];
    let mut acc = vec![0i32; row];
    for (oy, (s, k)) in cy.start.iter().zip(&cy.taps).enumerate() {
        acc.iter_mut().for_each(|a| *a = round);
        for (j, &kj) in k.iter().enumerate() {
            let src = &tmp[(s + j) * row..(s + j + 1) * row];
            acc.iter_mut()
                .zip(src)
                .for_each(|(a, &v)| *a += v as i32 * kj);
        }
        out[oy * row..(oy + 1) * row]
            .iter_mut()
            .zip(&acc)
            .for_each(|(o, &a)| *o = clip8(a));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        let img = vec![77u8; 40 * 30];
        let out = resize_bicubic(&img, (40, 30), 1, (13, 11));
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        let c = coeffs(1024, 256);
        for k in &c.taps {
            let s: i32 = k.iter().sum();
            assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i32);
        }
    }
}
