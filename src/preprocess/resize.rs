//! Pillow-exact bicubic resampling of 8-bit images (`Image.resize(..., BICUBIC)`).
//!
//! Pillow computes a support-scaled Keys kernel (a = -0.5; antialiased when shrinking), turns
//! the weights into 22-bit fixed point, resamples horizontally then vertically with an 8-bit
//! intermediate image. Doing the same arithmetic gives bit-identical output.
//!
//! For speed each pass is run as a sum of whole lines (the horizontal pass on the transposed
//! image), which vectorises, and only the output window that a centre crop keeps is computed;
//! every output value is the same as Pillow's.

use crate::dispatch;

/// Fixed-point fraction bits of the weights (Pillow's `PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
const ROUND: i32 = 1 << (PRECISION_BITS - 1);

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

dispatch! {
    /// `out = clip8(ROUND + sum_j taps[j] * line(first + j))`, where line i is
    /// `src[i * stride ..][.. out.len()]`.
    fn filter_lines(src: &[u8], stride: usize, first: usize, taps: &[i32], acc: &mut [i32], out: &mut [u8]) {
        let n = out.len();
        let acc = &mut acc[..n];
        acc.iter_mut().for_each(|a| *a = ROUND);
        for (j, &k) in taps.iter().enumerate() {
            let line = &src[(first + j) * stride..][..n];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += v as i32 * k;
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = (a >> PRECISION_BITS).clamp(0, 255) as u8;
        }
    }
}

/// Transpose a `rows x cols` byte matrix.
fn transpose(src: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    const B: usize = 32;
    let mut out = vec![0u8; rows * cols];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// A window of the resized image: `left`, `top`, width, height (in resized pixels).
pub type Window = (usize, usize, usize, usize);

/// Resize one plane `w x h` to `ow x oh` and return the `window` of the result.
fn resize_plane(
    plane: &[u8],
    (w, h): (usize, usize),
    (ow, oh): (usize, usize),
    win: Window,
) -> Vec<u8> {
    let (left, top, cw, ch) = win;
    // Rows of the (horizontally resized) image the vertical pass reads.
    let cy = (oh != h).then(|| coeffs(h, oh));
    let (r0, r1) = match &cy {
        Some(c) => {
            let r0 = c.start[top..top + ch].iter().copied().min().unwrap_or(0);
            let r1 = (top..top + ch)
                .map(|i| c.start[i] + c.taps[i].len())
                .max()
                .unwrap_or(0);
            (r0, r1)
        }
        None => (top, top + ch),
    };
    let nr = r1 - r0;
    // Horizontal pass on the transposed rows r0..r1: one output column per line.
    let tmp = if ow != w {
        let cx = coeffs(w, ow);
        let t = transpose(&plane[r0 * w..r1 * w], nr, w);
        let mut tmp_t = vec![0u8; cw * nr];
        let mut acc = vec![0i32; nr];
        for (i, out) in tmp_t.chunks_exact_mut(nr).enumerate() {
            let ox = left + i;
            filter_lines(&t, nr, cx.start[ox], &cx.taps[ox], &mut acc, out);
        }
        transpose(&tmp_t, cw, nr)
    } else {
        let mut tmp = Vec::with_capacity(nr * cw);
        for y in r0..r1 {
            tmp.extend_from_slice(&plane[y * w + left..y * w + left + cw]);
        }
        tmp
    };
    // Vertical pass.
    match cy {
        Some(c) => {
            let mut out = vec![0u8; cw * ch];
            let mut acc = vec![0i32; cw];
            for (i, row) in out.chunks_exact_mut(cw).enumerate() {
                let oy = top + i;
                filter_lines(&tmp, cw, c.start[oy] - r0, &c.taps[oy], &mut acc, row);
            }
            out
        }
        None => tmp,
    }
}

/// Resize an interleaved 8-bit image with `channels` channels from `w x h` to `ow x oh` and
/// return the `window` of the result (interleaved).
pub fn resize_bicubic_window(
    data: &[u8],
    (w, h): (usize, usize),
    channels: usize,
    (ow, oh): (usize, usize),
    window: Window,
) -> Vec<u8> {
    assert_eq!(data.len(), w * h * channels, "image buffer size");
    let (left, top, cw, ch) = window;
    assert!(
        left + cw <= ow && top + ch <= oh,
        "window outside the resized image"
    );
    if channels == 1 {
        return resize_plane(data, (w, h), (ow, oh), window);
    }
    let planes: Vec<Vec<u8>> = (0..channels)
        .map(|c| {
            let plane: Vec<u8> = data.iter().skip(c).step_by(channels).copied().collect();
            resize_plane(&plane, (w, h), (ow, oh), window)
        })
        .collect();
    let mut out = vec![0u8; cw * ch * channels];
    for (c, p) in planes.iter().enumerate() {
        for (i, &v) in p.iter().enumerate() {
            out[i * channels + c] = v;
        }
    }
    out
}

/// Resize an interleaved 8-bit image with `channels` channels from `w x h` to `ow x oh`.
pub fn resize_bicubic(
    data: &[u8],
    size: (usize, usize),
    channels: usize,
    out: (usize, usize),
) -> Vec<u8> {
    resize_bicubic_window(data, size, channels, out, (0, 0, out.0, out.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow's loops written plainly: the whole image, horizontal then vertical.
    fn reference(
        data: &[u8],
        (w, h): (usize, usize),
        channels: usize,
        (ow, oh): (usize, usize),
    ) -> Vec<u8> {
        let clip8 = |acc: i32| (acc >> PRECISION_BITS).clamp(0, 255) as u8;
        let (tmp, tw) = if ow != w {
            let cx = coeffs(w, ow);
            let mut tmp = vec![0u8; ow * h * channels];
            for (src, dst) in data
                .chunks_exact(w * channels)
                .zip(tmp.chunks_exact_mut(ow * channels))
            {
                for (ox, (s, k)) in cx.start.iter().zip(&cx.taps).enumerate() {
                    for c in 0..channels {
                        let mut acc = ROUND;
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
        let cy = coeffs(h, oh);
        let row = tw * channels;
        let mut out = vec![0u8; row * oh];
        for (oy, (s, k)) in cy.start.iter().zip(&cy.taps).enumerate() {
            for x in 0..row {
                let mut acc = ROUND;
                for (j, &kj) in k.iter().enumerate() {
                    acc += tmp[(s + j) * row + x] as i32 * kj;
                }
                out[oy * row + x] = clip8(acc);
            }
        }
        out
    }

    fn noise(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn fast_path_equals_pillow_loops() {
        for &((w, h), c, (ow, oh)) in &[
            ((97, 61), 1, (40, 30)),
            ((64, 80), 3, (150, 33)),
            ((50, 50), 1, (50, 20)),
            ((33, 47), 3, (12, 47)),
            ((200, 120), 1, (256, 153)),
        ] {
            let img = noise(w * h * c, (w * 31 + h) as u32);
            let want = reference(&img, (w, h), c, (ow, oh));
            assert_eq!(
                resize_bicubic(&img, (w, h), c, (ow, oh)),
                want,
                "{w}x{h}x{c} -> {ow}x{oh}"
            );
            // A window equals the same crop of the full result.
            let (l, t, cw, ch) = (ow / 5, oh / 4, ow / 2, oh / 2);
            let win = resize_bicubic_window(&img, (w, h), c, (ow, oh), (l, t, cw, ch));
            let mut crop = Vec::new();
            for y in t..t + ch {
                crop.extend_from_slice(&want[(y * ow + l) * c..(y * ow + l + cw) * c]);
            }
            assert_eq!(win, crop);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = vec![77u8; 40 * 30];
        let out = resize_bicubic(&img, (40, 30), 1, (13, 11));
        assert!(out.iter().all(|&v| v == 77));
    }
}
