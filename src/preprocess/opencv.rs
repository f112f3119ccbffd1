//! OpenCV's `cv2.resize(img, (w, h), interpolation=INTER_LINEAR)` on 8-bit images, bit for bit:
//! the original's segmentation pipeline resizes with it (REFERENCE.md 8). OpenCV computes it in
//! fixed point: 11-bit horizontal and vertical weights (rounded half to even), the horizontal
//! pass into 32-bit rows, the vertical pass as its SIMD kernel does for every value (`(row >>
//! 4) * beta >> 16` per row, summed, then `(t + 2) >> 2`; checked against opencv-python 5.0 on
//! row lengths that are and are not multiples of the vector width). An exact 2x reduction in
//! both directions is averaged over 2x2 blocks instead, as OpenCV switches to `INTER_AREA`
//! there.

use super::Image;

/// 2^11: OpenCV's `INTER_RESIZE_COEF_SCALE`.
const COEF_SCALE: f32 = 2048.0;

/// Per output index along one axis: the first source index, and the two fixed-point weights.
fn taps(input: usize, output: usize, clamp_weight: bool) -> Vec<(i64, [i32; 2])> {
    let scale = 1.0 / (output as f64 / input as f64);
    (0..output)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            let mut f = f - s as f32;
            if clamp_weight {
                // Horizontally, OpenCV moves the edges' taps inside and gives them weight 0.
                if s < 0 {
                    f = 0.0;
                    s = 0;
                }
                if s >= input as i64 - 1 {
                    f = 0.0;
                    s = input as i64 - 1;
                }
            }
            let w0 = ((1.0 - f) * COEF_SCALE).round_ties_even() as i32;
            let w1 = (f * COEF_SCALE).round_ties_even() as i32;
            (s, [w0, w1])
        })
        .collect()
}

/// `img` resized to `width x height` as `cv2.resize(..., INTER_LINEAR)` does.
pub fn resize_linear(img: &Image, (width, height): (usize, usize)) -> Image {
    let (w, h, cn) = (img.width, img.height, img.channels);
    if w * h * width * height == 0 {
        return Image {
            width,
            height,
            channels: cn,
            data: vec![0; width * height * cn],
        };
    }
    if w == 2 * width && h == 2 * height {
        return halve(img);
    }
    let row_len = width * cn;
    // Horizontal pass of every source row: 32-bit values scaled by 2^11.
    let xs = taps(w, width, true);
    let rows: Vec<Vec<i32>> = (0..h)
        .map(|y| {
            let src = &img.data[y * w * cn..(y + 1) * w * cn];
            let mut out = Vec::with_capacity(row_len);
            for &(sx, [a0, a1]) in &xs {
                let sx = sx as usize;
                for k in 0..cn {
                    let v0 = src[sx * cn + k] as i32;
                    let v1 = if sx + 1 < w {
                        src[(sx + 1) * cn + k] as i32
                    } else {
                        0
                    };
                    out.push(v0 * a0 + v1 * a1);
                }
            }
            out
        })
        .collect();
    // Vertical pass.
    let ys = taps(h, height, false);
    let mut data = Vec::with_capacity(height * row_len);
    for &(sy, [b0, b1]) in &ys {
        let clamp = |y: i64| y.clamp(0, h as i64 - 1) as usize;
        let (r0, r1) = (&rows[clamp(sy)], &rows[clamp(sy + 1)]);
        let hi = |s: i32, b: i32| ((s >> 4) * b) >> 16;
        for x in 0..row_len {
            let v = (hi(r0[x], b0) + hi(r1[x], b1) + 2) >> 2;
            data.push(v.clamp(0, 255) as u8);
        }
    }
    Image {
        width,
        height,
        channels: cn,
        data,
    }
}

/// OpenCV's `INTER_AREA` for an exact 2x reduction: each 2x2 block's rounded mean.
fn halve(img: &Image) -> Image {
    let (w, cn) = (img.width, img.channels);
    let (ow, oh) = (img.width / 2, img.height / 2);
    let at = |x: usize, y: usize, k: usize| img.data[(y * w + x) * cn + k] as u32;
    let mut data = Vec::with_capacity(ow * oh * cn);
    for y in 0..oh {
        for x in 0..ow {
            for k in 0..cn {
                let s = at(2 * x, 2 * y, k)
                    + at(2 * x + 1, 2 * y, k)
                    + at(2 * x, 2 * y + 1, k)
                    + at(2 * x + 1, 2 * y + 1, k);
                data.push(((s + 2) >> 2) as u8);
            }
        }
    }
    Image {
        width: ow,
        height: oh,
        channels: cn,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values `cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)` gave (opencv-python 5.0).
    #[test]
    fn matches_opencv_up_down_and_halving() {
        let img = Image {
            width: 6,
            height: 4,
            channels: 1,
            data: vec![
                139, 74, 229, 241, 169, 65, 6, 160, 149, 106, 38, 175, 188, 205, 175, 229, 98, 249,
                10, 148, 95, 86, 147, 198,
            ],
        };
        let cases: [((usize, usize), &[u8]); 3] = [
            ((3, 2), &[95, 181, 112, 138, 146, 173]),
            (
                (4, 3),
                &[110, 184, 201, 99, 118, 167, 143, 176, 69, 120, 117, 189],
            ),
            (
                (9, 7),
                &[
                    139, 106, 100, 203, 235, 229, 181, 117, 65, 91, 98, 120, 184, 197, 181, 134,
                    113, 104, 15, 85, 154, 154, 135, 104, 59, 107, 167, 97, 140, 179, 165, 165,
                    151, 84, 140, 212, 175, 188, 195, 174, 194, 199, 121, 173, 245, 73, 121, 161,
                    131, 130, 136, 131, 173, 216, 10, 79, 139, 104, 90, 96, 137, 172, 198,
                ],
            ),
        ];
        for ((w, h), want) in cases {
            let got = resize_linear(&img, (w, h));
            assert_eq!((got.width, got.height, got.data.len()), (w, h, want.len()));
            assert_eq!(got.data, want, "{w}x{h}");
        }
        assert!(resize_linear(&img, (0, 5)).data.is_empty());
    }
}
