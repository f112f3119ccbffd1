//! The fused CPU kernels on plain slices: no candle types, no devices. The candle adapters in
//! [`super::candle_ops`] call these; everything here is f32, row-major and contiguous.
//!
//! - attention with 2-D RoPE over a fused `qkv` activation, forward and backward (the backward
//!   recomputes the probabilities per image and head);
//! - LayerNorm, SwiGLU and linear layers, forward and backward.
//!
//! Elementwise loops are written so that the compiler vectorises them; [`simd`] compiles them
//! for AVX-512 / AVX2 and picks the best at run time.

use rayon::prelude::*;

use super::unfilled;

/// Fast `exp` for f32 (Cephes-style range reduction and degree-6 polynomial, ~1 ulp over the
/// range softmax and SiLU use); branch-free so loops over it vectorise.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' published coefficients
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(r2, r) + 1.0;
    // 2^n by integer addition to the exponent; n is read off the bits of n + 1.5 * 2^23 (exact
    // for |n| < 2^22), which vectorises where a float-to-int cast would not.
    const MAGIC: f32 = 12_582_912.0;
    let ni = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(y.to_bits().wrapping_add(ni << 23))
}

/// `erf(x)` by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7 in exact arithmetic, 4.2e-7
/// measured in f32), branch-free so loops over it vectorise.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_429f32;
    let p = p * t - 1.453_152_027;
    let p = p * t + 1.421_413_741;
    let p = p * t - 0.284_496_736;
    let p = p * t + 0.254_829_592;
    let y = 1.0 - p * t * exp_f32(-a * a);
    y.copysign(x)
}

/// `gelu(x)` (the erf form) over a slice, in parallel.
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    // SAFETY: `simd::gelu` writes every value of each chunk.
    let mut y = unsafe { unfilled(x.len()) };
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| simd::gelu(x, o));
    y
}

/// `f` over matching pieces of two slices of one length and a fresh output, in parallel.
fn zip_map(
    a: &[f32],
    b: &[f32],
    what: &str,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    // SAFETY: `f` writes every value of each chunk (all its callers do).
    let mut y = unsafe { unfilled(a.len()) };
    y.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
        .for_each(|(o, (a, b))| f(a, b, o));
    y
}

/// `max(a + b, 0)` over two slices of the same length, in parallel (a residual block's end).
pub fn add_relu_forward(a: &[f32], b: &[f32]) -> Vec<f32> {
    zip_map(a, b, "add + relu", |a, b, o| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = (a + b).max(0.0);
        }
    })
}

/// The gradient of [`add_relu_forward`] for either input, from its output `y`: `dy` where
/// `y > 0`, else 0 (as torch's ReLU backward).
pub fn relu_backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    zip_map(y, dy, "relu backward", |y, g, o| {
        // Both values read before the choice, so that the loop vectorises.
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = if y > 0.0 { g } else { 0.0 };
        }
    })
}

/// The input gradient of [`gelu_forward`].
pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    zip_map(x, dy, "gelu backward", simd::gelu_back)
}

/// Kernels compiled for several instruction sets, dispatched at run time.
pub mod simd {
    use super::exp_f32;
    use crate::dispatch;

    /// Lanes of the manual reductions (float sums do not auto-vectorise without them).
    const LANES: usize = 16;

    /// In-place softmax of the first `n` values of each row of `x`, rows `stride` apart.
    pub fn softmax_rows(x: &mut [f32], n: usize, stride: usize) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::dispatch::has_v4() {
            // SAFETY: AVX-512 present (checked).
            return unsafe { super::avx512::softmax_rows(x, n, stride) };
        }
        softmax_rows_autovec(x, n, stride)
    }

    dispatch! {
        /// [`softmax_rows`] as loops the compiler vectorises (AVX2 and older CPUs).
        fn softmax_rows_autovec(x: &mut [f32], n: usize, stride: usize) {
            for row in x.chunks_mut(stride).filter(|r| r.len() >= n) {
                let row = &mut row[..n];
                let mut m = [f32::NEG_INFINITY; LANES];
                let mut chunks = row.chunks_exact(LANES);
                for c in &mut chunks {
                    for (m, &v) in m.iter_mut().zip(c) {
                        *m = if v > *m { v } else { *m };
                    }
                }
                let max = chunks
                    .remainder()
                    .iter()
                    .chain(&m)
                    .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                let mut s = [0f32; LANES];
                let mut chunks = row.chunks_exact_mut(LANES);
                for c in &mut chunks {
                    for (s, v) in s.iter_mut().zip(c.iter_mut()) {
                        *v = exp_f32(*v - max);
                        *s += *v;
                    }
                }
                // The last part-vector as one whole vector too (a scalar tail took a third of a
                // 197-wide row): padding lanes at the maximum (exp 1, no underflow to slow
                // denormals) are masked out of the sum.
                let rest = chunks.into_remainder();
                if !rest.is_empty() {
                    let (mut tail, mut keep) = ([max; LANES], [0f32; LANES]);
                    tail[..rest.len()].copy_from_slice(rest);
                    keep[..rest.len()].fill(1.0);
                    for ((s, v), &k) in s.iter_mut().zip(tail.iter_mut()).zip(&keep) {
                        *v = exp_f32(*v - max) * k;
                        *s += *v;
                    }
                    rest.copy_from_slice(&tail[..rest.len()]);
                }
                let sum: f32 = s.iter().sum();
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }

    dispatch! {
        /// LayerNorm of each `w.len()`-long row of `x` into `y`: `(x - mean) / sqrt(var + eps)
        /// * w + b`, the mean and the (biased) variance summed in 16 lanes.
        fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
            let c = w.len();
            for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let mut s = [0f32; LANES];
                let mut chunks = xr.chunks_exact(LANES);
                for ch in &mut chunks {
                    for (s, &v) in s.iter_mut().zip(ch) {
                        *s += v;
                    }
                }
                let sum: f32 = s.iter().chain(chunks.remainder()).sum();
                let mean = sum / c as f32;
                let mut q = [0f32; LANES];
                let mut chunks = xr.chunks_exact(LANES);
                for ch in &mut chunks {
                    for (q, &v) in q.iter_mut().zip(ch) {
                        *q += (v - mean) * (v - mean);
                    }
                }
                let tail: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
                let var = (q.iter().sum::<f32>() + tail) / c as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for (((y, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *y = (v - mean) * rstd * w + b;
                }
            }
        }
    }

    dispatch! {
        /// `out[i] = a[i] + b[i]`.
        fn add_into(a: &[f32], b: &[f32], out: &mut [f32]) {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        }
    }

    dispatch! {
        /// `out[i] = a[i] + b[i] + c[i]`.
        fn add2_into(a: &[f32], b: &[f32], c: &[f32], out: &mut [f32]) {
            for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
                *o = a + b + c;
            }
        }
    }

    dispatch! {
        /// `x[i] += b[i]`.
        fn add_in_place(x: &mut [f32], b: &[f32]) {
            for (x, &b) in x.iter_mut().zip(b) {
                *x += b;
            }
        }
    }

    dispatch! {
        /// `out[i] = silu(x[i]) * x[h + i]` for each `2h`-long row of `x` into `h`-long rows.
        fn swiglu_rows(x: &[f32], out: &mut [f32], h: usize) {
            for (row, o) in x.chunks_exact(2 * h).zip(out.chunks_exact_mut(h)) {
                let (a, b) = row.split_at(h);
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a / (1.0 + exp_f32(-a)) * b;
                }
            }
        }
    }

    dispatch! {
        /// The gradient of [`swiglu_rows`] for each `2h`-long row of `x`, from the `h`-long
        /// rows of `dy`, into `2h`-long rows of `dx` (`[d silu part | d gate part]`).
        fn swiglu_back_rows(x: &[f32], dy: &[f32], dx: &mut [f32], h: usize) {
            for ((dxr, xr), dyr) in dx
                .chunks_exact_mut(2 * h)
                .zip(x.chunks_exact(2 * h))
                .zip(dy.chunks_exact(h))
            {
                let (da, db) = dxr.split_at_mut(h);
                let (a, b) = xr.split_at(h);
                for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db).zip(a).zip(b).zip(dyr) {
                    let s = 1.0 / (1.0 + exp_f32(-a));
                    let silu = a * s;
                    *db = g * silu;
                    *da = g * b * s * (1.0 + a * (1.0 - s));
                }
            }
        }
    }

    dispatch! {
        /// `out[i] = gelu(x[i])` with erf (Abramowitz-Stegun 7.1.26, see [`super::erf_f32`]).
        fn gelu(x: &[f32], out: &mut [f32]) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = 0.5 * v * (1.0 + super::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }

    dispatch! {
        /// `out[i] = dy[i] * gelu'(x[i])`.
        fn gelu_back(x: &[f32], dy: &[f32], out: &mut [f32]) {
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                let cdf = 0.5 * (1.0 + super::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                *o = g * (cdf + v * INV_SQRT_2PI * exp_f32(-0.5 * v * v));
            }
        }
    }

    dispatch! {
        /// The transpose of [`rope_scale`]: rotate the gradient pairs of `g` back by the angles
        /// in `cos`/`sin` and multiply by `scale`, writing `out`.
        fn rope_back(g: &[f32], cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) {
            for (((o, g), c), s) in out
                .chunks_exact_mut(2)
                .zip(g.chunks_exact(2))
                .zip(cos.chunks_exact(2))
                .zip(sin.chunks_exact(2))
            {
                o[0] = (g[0] * c[0] + g[1] * s[1]) * scale;
                o[1] = (g[1] * c[1] - g[0] * s[0]) * scale;
            }
        }
    }

    dispatch! {
        /// Rotate interleaved pairs of `x` (one token, `cos.len()` wide) by the angles in
        /// `cos`/`sin` and multiply by `scale`, writing `out`.
        fn rope_scale(x: &[f32], cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) {
            for (((o, x), c), s) in out
                .chunks_exact_mut(2)
                .zip(x.chunks_exact(2))
                .zip(cos.chunks_exact(2))
                .zip(sin.chunks_exact(2))
            {
                o[0] = (x[0] * c[0] - x[1] * s[0]) * scale;
                o[1] = (x[1] * c[1] + x[0] * s[1]) * scale;
            }
        }
    }
}

/// Hand-written AVX-512 forms of the loops the compiler does not vectorise well.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    /// The 16 x 16 transpose of sixteen rows of sixteen 32-bit lanes: `out[j]` holds lane `j`
    /// of every row, row `i` in lane `i`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved, then fours: each 128-bit lane L of u[4g + c] holds value
        // 4L + c of rows 4g..4g + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, e) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (lo01, hi01) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let (lo23, hi23) = (_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
            u[4 * g] = _mm512_shuffle_ps::<0x44>(lo01, lo23);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(lo01, lo23);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(hi01, hi23);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(hi01, hi23);
        }
        // Then the 4 x 4 blocks of lanes: value 4L + c of all sixteen rows.
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v02 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v13 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            let w02 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let w13 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v02, w02);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v13, w13);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v02, w02);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v13, w13);
        }
        out
    }

    /// [`super::exp_f32`] on sixteen lanes, the same operations in the same order (so the same
    /// values).
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::excessive_precision)]
    fn exp16(x: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        // The bounds first: min and max return their second operand for NaN, which passes.
        let x = _mm512_max_ps(c(-87.3), _mm512_min_ps(c(88.7), x));
        let n = _mm512_add_ps(_mm512_mul_ps(x, c(std::f32::consts::LOG2_E)), c(0.5));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(n);
        let r = _mm512_sub_ps(x, _mm512_mul_ps(n, c(0.693_359_4)));
        let r = _mm512_sub_ps(r, _mm512_mul_ps(n, c(-2.121_944_4e-4)));
        let r2 = _mm512_mul_ps(r, r);
        let p = _mm512_fmadd_ps(c(1.987_569_1e-4), r, c(1.398_199_9e-3));
        let p = _mm512_fmadd_ps(p, r, c(8.333_452e-3));
        let p = _mm512_fmadd_ps(p, r, c(4.166_579_6e-2));
        let p = _mm512_fmadd_ps(p, r, c(1.666_666_5e-1));
        let p = _mm512_fmadd_ps(p, r, c(5.000_000_1e-1));
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), c(1.0));
        const MAGIC: f32 = 12_582_912.0;
        let ni = _mm512_sub_epi32(
            _mm512_castps_si512(_mm512_add_ps(n, c(MAGIC))),
            _mm512_set1_epi32(MAGIC.to_bits() as i32),
        );
        _mm512_castsi512_ps(_mm512_add_epi32(
            _mm512_castps_si512(y),
            _mm512_slli_epi32::<23>(ni),
        ))
    }

    /// [`super::simd::softmax_rows`]: the maximum, then `exp` and the sum in one pass, then
    /// the scale; the last part-vector masked.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_rows(x: &mut [f32], n: usize, stride: usize) {
        let (full, rem) = (n / 16, n % 16);
        let tail: __mmask16 = ((1u32 << rem) - 1) as u16;
        for row in x.chunks_mut(stride).filter(|r| r.len() >= n) {
            let p = row.as_mut_ptr();
            // SAFETY (all accesses below): the row holds n values; whole vectors read and write
            // 16 at 16 * i < n - rem, the masked ones only the rem values from 16 * full.
            unsafe {
                let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                for i in 0..full {
                    m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(16 * i)));
                }
                if rem > 0 {
                    let v = _mm512_mask_loadu_ps(m, tail, p.add(16 * full));
                    m = _mm512_max_ps(m, v);
                }
                let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
                let mut s = _mm512_setzero_ps();
                for i in 0..full {
                    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), max));
                    _mm512_storeu_ps(p.add(16 * i), e);
                    s = _mm512_add_ps(s, e);
                }
                if rem > 0 {
                    // Padding lanes at the maximum (exp 1, no denormals), masked out.
                    let v = _mm512_mask_loadu_ps(max, tail, p.add(16 * full));
                    let e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(v, max)));
                    _mm512_mask_storeu_ps(p.add(16 * full), tail, e);
                    s = _mm512_add_ps(s, e);
                }
                let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(s));
                for i in 0..full {
                    let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * i)), inv);
                    _mm512_storeu_ps(p.add(16 * i), v);
                }
                if rem > 0 {
                    let v = _mm512_maskz_loadu_ps(tail, p.add(16 * full));
                    _mm512_mask_storeu_ps(p.add(16 * full), tail, _mm512_mul_ps(v, inv));
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp16_is_exp_f32() {
            if !crate::kernels::dispatch::has_v4() {
                eprintln!("SKIPPED exp16: this CPU has no AVX-512");
                return;
            }
            let mut xs: Vec<f32> = (-9000..=9000).map(|i| i as f32 * 0.01).collect();
            xs.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-30]);
            xs.resize(xs.len().next_multiple_of(16), 0.5);
            let mut compared = 0;
            for c in xs.chunks_exact(16) {
                let mut got = [0f32; 16];
                // SAFETY: AVX-512 present (checked); 16 values read and written.
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
                for (&g, &x) in got.iter().zip(c) {
                    let want = super::super::exp_f32(x);
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "{x}"
                    );
                    compared += 1;
                }
            }
            assert_eq!(compared, xs.len());
            assert!(compared >= 18006);
        }
    }
}

/// A raw pointer that may be shared by tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only for writes to disjoint regions, synchronised by rayon's join.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Rows of a contiguous tensor per parallel task in the differentiable kernels (fixed, so that
/// parameter-gradient sums are added in the same order on every run).
const ROWS_PER_TASK: usize = 64;

/// `dst (m x n) = a (m x k) * b (k x n)`, each given by row and column strides, one thread.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of stride `dst_rs` (n contiguous columns each);
/// `a` for reads of `m x k` and `b` of `k x n` elements at the given row and column strides;
/// `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    // SAFETY: the caller's contract covers every element the product touches.
    unsafe {
        super::sgemm::sgemm(
            (m, n, k),
            dst,
            dst_rs,
            false,
            a,
            (a_rs, a_cs),
            b,
            (b_rs, b_cs),
            1,
        );
    }
}

/// Shapes and RoPE tables of one fused attention call: `qkv` is `[b, t, 3c]` with `heads`
/// heads of width `c / heads`; token 0 is the class token and tokens `1..t` get RoPE from
/// `cos` / `sin` (`[(t - 1), head_dim]` each; both empty: no RoPE, a plain ViT).
pub struct AttentionShape<'a> {
    /// Images.
    pub b: usize,
    /// Tokens per image.
    pub t: usize,
    /// Width of q, k and v.
    pub c: usize,
    /// Heads.
    pub heads: usize,
    /// RoPE cosines.
    pub cos: &'a [f32],
    /// RoPE sines.
    pub sin: &'a [f32],
    /// q and k arrive rotated and q scaled (by the qkv layer's epilogue,
    /// [`super::prepacked::linear_qkv_roped`]; inference only).
    pub roped: bool,
}

impl AttentionShape<'_> {
    /// An error unless the widths, heads and tables fit together and `qkv` has `b * t * 3c`
    /// values.
    pub fn check(&self, qkv_len: usize) -> Result<(), String> {
        let (h, c, t) = (self.heads, self.c, self.t);
        if h == 0 || c == 0 || !c.is_multiple_of(h) || t == 0 {
            return Err(format!("attention: width {c} does not fit {h} heads"));
        }
        let d = c / h;
        let no_rope = self.cos.is_empty() && self.sin.is_empty();
        if !no_rope && (self.cos.len() != (t - 1) * d || self.sin.len() != self.cos.len()) {
            return Err(format!(
                "attention: RoPE tables hold {} values, {} tokens of width {d} need {}",
                self.cos.len(),
                t - 1,
                (t - 1) * d
            ));
        }
        if qkv_len != self.b * t * 3 * c {
            return Err(format!(
                "attention: qkv holds {qkv_len} values, expected {}",
                self.b * t * 3 * c
            ));
        }
        Ok(())
    }

    /// The roped, scaled q and the roped k of one (image, head).
    pub(super) fn prepare(&self, qkv: &[f32], bi: usize, hi: usize, q: &mut [f32], k: &mut [f32]) {
        let (t, c) = (self.t, self.c);
        let d = c / self.heads;
        let c3 = 3 * c;
        let scale = 1.0 / (d as f32).sqrt();
        let base = &qkv[bi * t * c3..(bi + 1) * t * c3];
        for ti in 0..t {
            let row = &base[ti * c3..(ti + 1) * c3];
            let (qs, ks) = (
                &row[hi * d..(hi + 1) * d],
                &row[c + hi * d..c + (hi + 1) * d],
            );
            let (qd, kd) = (&mut q[ti * d..(ti + 1) * d], &mut k[ti * d..(ti + 1) * d]);
            if self.roped {
                // Rotated and scaled by the qkv layer already.
                qd.copy_from_slice(qs);
                kd.copy_from_slice(ks);
            } else if ti == 0 || self.cos.is_empty() {
                qd.iter_mut().zip(qs).for_each(|(o, &x)| *o = x * scale);
                kd.copy_from_slice(ks);
            } else {
                let cos = &self.cos[(ti - 1) * d..ti * d];
                let sin = &self.sin[(ti - 1) * d..ti * d];
                simd::rope_scale(qs, cos, sin, scale, qd);
                simd::rope_scale(ks, cos, sin, 1.0, kd);
            }
        }
    }

    /// [`Self::check`] for the backward: the output gradient `[b, t, c]` and, kept, the
    /// probabilities `[b, heads, t, t]` must fit too.
    pub fn check_backward(
        &self,
        qkv_len: usize,
        dy_len: usize,
        probs_len: Option<usize>,
    ) -> Result<(), String> {
        self.check(qkv_len)?;
        let (b, t, c) = (self.b, self.t, self.c);
        if dy_len != b * t * c {
            return Err(format!(
                "attention backward: output gradient holds {dy_len} values, expected {}",
                b * t * c
            ));
        }
        if probs_len.is_some_and(|n| n != b * self.heads * t * t) {
            return Err("attention backward: kept probabilities do not fit".into());
        }
        Ok(())
    }

    /// Writes one (image, head)'s gradients with respect to its prepared q and k and its v
    /// (`t` rows of `d` each) into its columns of `dqkv` (`[b, t, 3c]`): back through RoPE
    /// and q's scale, the inverse of [`Self::prepare`].
    ///
    /// # Safety
    /// `dqkv` writable for `b * t * 3c` values; no other thread writes this (image, head)'s
    /// columns meanwhile.
    pub(super) unsafe fn write_gradients(
        &self,
        dqkv: *mut f32,
        (bi, hi): (usize, usize),
        (dq, dk, dv): (&[f32], &[f32], &[f32]),
    ) {
        let (t, c) = (self.t, self.c);
        let d = c / self.heads;
        let (c3, scale) = (3 * c, 1.0 / (d as f32).sqrt());
        // SAFETY: every slice made here is d elements of this (image, head)'s own q, k or v
        // columns inside `dqkv` (the contract).
        let seg = |ti: usize, part: usize| unsafe {
            std::slice::from_raw_parts_mut(dqkv.add(bi * t * c3 + ti * c3 + part * c + hi * d), d)
        };
        for ti in 0..t {
            let (gq, gk) = (&dq[ti * d..(ti + 1) * d], &dk[ti * d..(ti + 1) * d]);
            if self.roped {
                // The qkv layer rotated and scaled: its gradient as it is.
                seg(ti, 0).copy_from_slice(gq);
                seg(ti, 1).copy_from_slice(gk);
            } else if ti == 0 || self.cos.is_empty() {
                seg(ti, 0)
                    .iter_mut()
                    .zip(gq)
                    .for_each(|(o, &g)| *o = g * scale);
                seg(ti, 1).copy_from_slice(gk);
            } else {
                let cos = &self.cos[(ti - 1) * d..ti * d];
                let sin = &self.sin[(ti - 1) * d..ti * d];
                simd::rope_back(gq, cos, sin, scale, seg(ti, 0));
                simd::rope_back(gk, cos, sin, 1.0, seg(ti, 1));
            }
            seg(ti, 2).copy_from_slice(&dv[ti * d..(ti + 1) * d]);
        }
    }

    /// Where v of one (image, head) starts in `qkv`: `t` rows of `d` values at stride `3c`
    /// (read in place by the products).
    pub(super) fn v_start(&self, qkv: &[f32], bi: usize, hi: usize) -> *const f32 {
        let d = self.c / self.heads;
        qkv[bi * self.t * 3 * self.c + 2 * self.c + hi * d..].as_ptr()
    }
}

/// How one head's scores are computed and laid out: on AVX-512 with heads of 64, both of
/// attention's products run on the dense layers' micro-kernel ([`super::prepacked`]) and the
/// score rows are padded to whole panels of 64 keys; elsewhere through [`mm`], rows `t` wide.
fn score_layout(t: usize, d: usize) -> (bool, usize) {
    let micro = super::prepacked::available() && d == 64;
    (micro, if micro { t.next_multiple_of(64) } else { t })
}

/// One head's attention probabilities `softmax(q k^T)` (q already scaled) into `t` rows `ts`
/// apart, computed the same way wherever they are needed (the forward, and the backward when
/// it recomputes them); `kp` is scratch. `done` gets each finished run of rows (the first
/// row's index and the rows): on the micro-kernel, groups of six while they are in L1, so the
/// forward multiplies them by v there; elsewhere all rows at once.
fn head_probabilities(
    (q, q_rs): (&[f32], usize),
    (k, k_rs): (&[f32], usize),
    (t, d): (usize, usize),
    (micro, ts): (bool, usize),
    sc: &mut [f32],
    kp: &mut Vec<f32>,
    mut done: impl FnMut(usize, &mut [f32]),
) {
    if micro {
        super::prepacked::scores((q, q_rs), (k, k_rs), (t, d), (sc, ts), kp, |i0, rows| {
            simd::softmax_rows(rows, t, ts);
            done(i0, rows)
        });
    } else {
        let rows = |v: &[f32], rs: usize| rs >= d && v.len() >= (t - 1) * rs + d;
        assert!(rows(q, q_rs) && rows(k, k_rs) && sc.len() >= t * t);
        // SAFETY: q and k hold t rows of d at their strides and sc holds t x t (asserted).
        unsafe {
            mm(
                t,
                t,
                d,
                sc.as_mut_ptr(),
                t,
                q.as_ptr(),
                q_rs,
                1,
                k.as_ptr(),
                1,
                k_rs,
            )
        };
        simd::softmax_rows(&mut sc[..t * ts], t, ts);
        done(0, &mut sc[..t * ts]);
    }
}

/// Multi-head self-attention with RoPE: `qkv` `[b, t, 3c]` (biases added) to `[b, t, c]`, one
/// GEMM pair per (image, head); an error unless the shapes fit ([`AttentionShape::check`]).
pub fn attention_forward(qkv: &[f32], shape: &AttentionShape) -> Result<Vec<f32>, String> {
    Ok(attention_forward_keeping(qkv, shape, false)?.0)
}

/// [`attention_forward`], and with `keep` the attention probabilities `[b, heads, t, t]` for
/// [`attention_backward`] (else an empty vector).
pub fn attention_forward_keeping(
    qkv: &[f32],
    shape: &AttentionShape,
    keep: bool,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    shape.check(qkv.len())?;
    let AttentionShape {
        b, t, c, heads: h, ..
    } = *shape;
    let d = c / h;
    let mut out: Vec<f32> = Vec::with_capacity(b * t * c);
    let dst = SharedMut(out.as_mut_ptr());
    let mut probs: Vec<f32> = Vec::with_capacity(if keep { b * h * t * t } else { 0 });
    let kept = SharedMut(probs.as_mut_ptr());
    let (micro, ts) = score_layout(t, d);
    (0..b * h).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; t * d],
                vec![0f32; t * d],
                vec![0f32; t * ts],
                Vec::new(),
            )
        },
        |(q, k, sc, kp), bh| {
            let (bi, hi) = (bh / h, bh % h);
            let v = shape.v_start(qkv, bi, hi);
            let (q, k) = if shape.roped {
                // Rotated and scaled already: read in place.
                let row = bi * t * 3 * c + hi * d;
                ((&qkv[row..], 3 * c), (&qkv[row + c..], 3 * c))
            } else {
                shape.prepare(qkv, bi, hi, q, k);
                ((&q[..], d), (&k[..], d))
            };
            head_probabilities(q, k, (t, d), (micro, ts), sc, kp, |i0, p| {
                let rows = p.len() / ts;
                if keep {
                    for (i, row) in p.chunks_exact(ts).enumerate() {
                        let whole = kept;
                        // SAFETY: each (image, head) task writes its own t * t probabilities;
                        // `probs` holds b * heads * t * t.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                row.as_ptr(),
                                whole.0.add((bh * t + i0 + i) * t),
                                t,
                            )
                        };
                    }
                }
                let o = dst;
                // SAFETY: each (image, head) task writes its own d columns of its own image's
                // rows of `out` (t rows of stride c); no two tasks overlap, and `out` holds
                // b * t * c; v is t rows of d values at stride 3c inside `qkv` (b * t * 3c,
                // checked); p holds `rows` rows of t probabilities at stride ts.
                unsafe {
                    let o = o.0.add((bi * t + i0) * c + hi * d);
                    if micro {
                        super::prepacked::weighted_values(p, (rows, t, ts), (v, 3 * c), (o, c));
                    } else {
                        mm(rows, d, t, o, c, p.as_ptr(), ts, 1, v, 3 * c, 1);
                    }
                }
            });
        },
    );
    // SAFETY: the (image, head) tasks together wrote all b * t * c elements (and, kept, all
    // b * heads * t * t probabilities).
    unsafe {
        out.set_len(b * t * c);
        if keep {
            probs.set_len(b * h * t * t);
        }
    }
    Ok((out, probs))
}

/// Gradient of [`attention_forward`] with respect to `qkv`, given the output gradient `dy`
/// `[b, t, c]`; the probabilities those of [`attention_forward_keeping`], or recomputed
/// without them. An error unless the shapes fit.
pub fn attention_backward(
    qkv: &[f32],
    dy: &[f32],
    shape: &AttentionShape,
    probs: Option<&[f32]>,
) -> Result<Vec<f32>, String> {
    shape.check_backward(qkv.len(), dy.len(), probs.map(<[f32]>::len))?;
    let AttentionShape {
        b, t, c, heads: h, ..
    } = *shape;
    let d = c / h;
    let c3 = 3 * c;
    // SAFETY: every (image, head) task writes its q, k and v columns of every token below.
    let mut dqkv = unsafe { unfilled(b * t * c3) };
    let dst = SharedMut(dqkv.as_mut_ptr());
    let (micro, ts) = score_layout(t, d);
    (0..b * h).into_par_iter().for_each_init(
        || {
            (
                (vec![0f32; t * d], vec![0f32; t * d]),
                (vec![0f32; t * t], vec![0f32; t * t]),
                (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]),
                (vec![0f32; if ts == t { 0 } else { t * ts }], Vec::new()),
            )
        },
        |((q, k), (p, dp), (dv, dq, dk), (padded, kp)), bh| {
            let (bi, hi) = (bh / h, bh % h);
            shape.prepare(qkv, bi, hi, q, k);
            let v = shape.v_start(qkv, bi, hi);
            let dout = dy[bi * t * c + hi * d..].as_ptr();
            let p: &[f32] = match probs {
                Some(kept) => &kept[bh * t * t..(bh + 1) * t * t],
                None => {
                    if ts == t {
                        head_probabilities((q, d), (k, d), (t, d), (micro, ts), p, kp, |_, _| ());
                    } else {
                        // Padded rows, then packed t wide for the products below.
                        head_probabilities(
                            (q, d),
                            (k, d),
                            (t, d),
                            (micro, ts),
                            padded,
                            kp,
                            |_, _| (),
                        );
                        for (dst, src) in p.chunks_exact_mut(t).zip(padded.chunks_exact(ts)) {
                            dst.copy_from_slice(&src[..t]);
                        }
                    }
                    p
                }
            };
            // SAFETY: every buffer is owned by this task and sized as the shapes say; `dout`
            // addresses t rows of stride c and width d inside `dy`, v t rows of stride 3c and
            // width d inside `qkv` (both checked above).
            unsafe {
                // dV = P^T dO; dP = dO V^T.
                mm(t, d, t, dv.as_mut_ptr(), d, p.as_ptr(), 1, t, dout, c, 1);
                mm(t, t, d, dp.as_mut_ptr(), t, dout, c, 1, v, 1, 3 * c);
            }
            softmax_backward_rows(dp, p, t);
            // SAFETY: as above; dQs = dS K; dK' = dS^T Qs.
            unsafe {
                mm(
                    t,
                    d,
                    t,
                    dq.as_mut_ptr(),
                    d,
                    dp.as_ptr(),
                    t,
                    1,
                    k.as_ptr(),
                    d,
                    1,
                );
                mm(
                    t,
                    d,
                    t,
                    dk.as_mut_ptr(),
                    d,
                    dp.as_ptr(),
                    1,
                    t,
                    q.as_ptr(),
                    d,
                    1,
                );
            }
            let whole = dst; // the whole wrapper (not its field) is moved into the closure
            // SAFETY: `dqkv` holds b * t * 3c values; this task writes its own columns.
            unsafe { shape.write_gradients(whole.0, (bi, hi), (dq, dk, dv)) };
        },
    );
    Ok(dqkv)
}

/// The softmax's backward in place, row by row: `dS = P * (dP - rowsum(dP * P))` for `dp`
/// holding dP and `p` the probabilities (rows of `t`).
pub(super) fn softmax_backward_rows(dp: &mut [f32], p: &[f32], t: usize) {
    for (dpr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let dot: f32 = dpr.iter().zip(pr.iter()).map(|(a, b)| a * b).sum();
        dpr.iter_mut()
            .zip(pr.iter())
            .for_each(|(g, &pv)| *g = pv * (*g - dot));
    }
}

/// The non-overlapping `p x p` patches of images `x` `[b, ch, h, w]` (sides multiples of `p`)
/// as rows of `ch * p * p` values (channel, then row, then column), patches in row-major
/// order: one copy of `p` values at a time.
pub fn patch_rows(
    x: &[f32],
    (b, ch, h, w): (usize, usize, usize, usize),
    p: usize,
) -> Result<Vec<f32>, String> {
    if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) || x.len() != b * ch * h * w {
        return Err(format!(
            "patches: {} values are not images [{b}, {ch}, {h}, {w}] of whole {p} x {p} patches",
            x.len()
        ));
    }
    let (gh, gw, row) = (h / p, w / p, ch * p * p);
    // SAFETY: each task below writes every value of its gw rows of patches.
    let mut out = unsafe { unfilled(b * gh * gw * row) };
    if out.is_empty() {
        return Ok(out);
    }
    out.par_chunks_mut(gw * row)
        .enumerate()
        .for_each(|(band, rows)| {
            let (bi, gy) = (band / gh, band % gh);
            for (gx, patch) in rows.chunks_exact_mut(row).enumerate() {
                for (c, plane) in patch.chunks_exact_mut(p * p).enumerate() {
                    for (py, dst) in plane.chunks_exact_mut(p).enumerate() {
                        let at = ((bi * ch + c) * h + gy * p + py) * w + gx * p;
                        dst.copy_from_slice(&x[at..at + p]);
                    }
                }
            }
        });
    Ok(out)
}

/// `silu(x1) * x2` for each row `[x1 | x2]` of width `2h` of `x`.
pub fn swiglu_forward(x: &[f32], h: usize) -> Vec<f32> {
    assert!(h > 0 && x.len().is_multiple_of(2 * h), "swiglu: rows of 2h");
    // SAFETY: the rows of x (2h values each) fill every h-value row of out below.
    let mut out = unsafe { super::unfilled(x.len() / 2) };
    let rows_per_task = (4096 / h.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * h)
        .zip(x.par_chunks(rows_per_task * 2 * h))
        .for_each(|(o, x)| simd::swiglu_rows(x, o, h));
    out
}

/// Gradient of [`swiglu_forward`] with respect to `x`, given the output gradient `dy`.
pub fn swiglu_backward(x: &[f32], dy: &[f32], h: usize) -> Vec<f32> {
    let w = 2 * h;
    // SAFETY: `simd::swiglu_back_rows` writes every value of each row.
    let mut dx = unsafe { unfilled(x.len()) };
    dx.par_chunks_mut(ROWS_PER_TASK * w)
        .zip(x.par_chunks(ROWS_PER_TASK * w))
        .zip(dy.par_chunks(ROWS_PER_TASK * h))
        .for_each(|((dx, x), dy)| simd::swiglu_back_rows(x, dy, dx, h));
    dx
}

/// LayerNorm of each row of width `w.len()` of `x`, with weight `w` and bias `b`.
pub fn layer_norm_forward(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    // SAFETY: `simd::layer_norm_rows` writes every value of each row.
    let mut y = unsafe { unfilled(x.len()) };
    y.par_chunks_mut(ROWS_PER_TASK * c)
        .zip(x.par_chunks(ROWS_PER_TASK * c))
        .for_each(|(y, x)| simd::layer_norm_rows(x, w, b, eps, y));
    y
}

/// Gradients `(dx, dw, db)` of [`layer_norm_forward`] given the output gradient `dy`
/// (parameter sums in a fixed order: deterministic).
pub fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = w.len();
    assert!(
        c > 0 && x.len().is_multiple_of(c) && dy.len() == x.len(),
        "layer norm backward: rows of {c}"
    );
    // SAFETY: each task writes every value of its rows below (whole rows, asserted).
    let mut dx = unsafe { unfilled(x.len()) };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS_PER_TASK * c)
        .zip(x.par_chunks(ROWS_PER_TASK * c))
        .zip(dy.par_chunks(ROWS_PER_TASK * c))
        .map(|((dx, x), dy)| {
            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
            let mut xhat = vec![0f32; c];
            for ((dxr, xr), dyr) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(dy.chunks_exact(c))
            {
                let mean = xr.iter().sum::<f32>() / c as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                let (mut m1, mut m2) = (0f32, 0f32);
                for i in 0..c {
                    xhat[i] = (xr[i] - mean) * rstd;
                    let g = dyr[i] * w[i];
                    m1 += g;
                    m2 += g * xhat[i];
                    dw[i] += dyr[i] * xhat[i];
                    db[i] += dyr[i];
                }
                let (m1, m2) = (m1 / c as f32, m2 / c as f32);
                for i in 0..c {
                    dxr[i] = rstd * (dyr[i] * w[i] - m1 - xhat[i] * m2);
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    for (pw, pb) in &partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    (dx, dw, db)
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `W^T`, `[k, n]` contiguous (inference: read without repacking).
    Transposed,
    /// `W`, `[n, k]` as in the checkpoint (training: read in place).
    AsStored,
}

/// `y = x W^T + b (+ residual)` for `x` `[m, k]`, the weight in `layout`, `b` `[n]`, residual
/// `[m, n]`: the accumulator starts as residual + bias and the GEMM adds to it. Lengths must
/// fit (`x.len() == m * k`, `w.len() == n * k`, `b.len() == n`, `residual.len() == m * n`).
pub fn linear_forward(
    x: &[f32],
    k: usize,
    w: &[f32],
    layout: WeightLayout,
    n: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        k > 0 && n > 0 && w.len() == n * k && x.len().is_multiple_of(k),
        "linear: shapes"
    );
    let m = x.len() / k;
    assert!(bias.is_none_or(|b| b.len() == n) && residual.is_none_or(|r| r.len() == m * n));
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let rows = (65536 / n).max(1);
    let zeros = vec![0f32; n];
    let b = bias.unwrap_or(&zeros);
    let init = &mut y.spare_capacity_mut()[..m * n];
    match residual {
        Some(r) => init
            .par_chunks_mut(rows * n)
            .zip(r.par_chunks(rows * n))
            .for_each(|(y, r)| {
                for (yr, rr) in y.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                    for ((d, &r), &b) in yr.iter_mut().zip(rr).zip(b) {
                        d.write(r + b);
                    }
                }
            }),
        None => init.par_chunks_mut(rows * n).for_each(|y| {
            for yr in y.chunks_exact_mut(n) {
                for (d, &b) in yr.iter_mut().zip(b) {
                    d.write(b);
                }
            }
        }),
    }
    // SAFETY: all m * n elements were written above.
    unsafe { y.set_len(m * n) };
    let (w_rs, w_cs) = match layout {
        WeightLayout::Transposed => (n, 1),
        WeightLayout::AsStored => (1, k),
    };
    // SAFETY: x is m x k (row stride k), W^T is k x n at strides (w_rs, w_cs) inside w
    // (n * k values), y is m x n; lengths asserted above.
    unsafe {
        super::sgemm::sgemm(
            (m, n, k),
            y.as_mut_ptr(),
            n,
            true,
            x.as_ptr(),
            (k, 1),
            w.as_ptr(),
            (w_rs, w_cs),
            rayon::current_num_threads(),
        );
    }
    y
}

/// Gradients `(dx, dW, db)` of `y = x W^T + b` for `x` `[m, k]`, `W` `[n, k]` as stored and the
/// output gradient `g` `[m, n]` (bias sums in a fixed order: deterministic).
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    n: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(
        k > 0 && n > 0 && w.len() == n * k && x.len().is_multiple_of(k),
        "linear: shapes"
    );
    let m = x.len() / k;
    assert_eq!(g.len(), m * n, "linear backward: output gradient size");
    use super::conv::{Mat, matmul};
    let threads = rayon::current_num_threads();
    // SAFETY: the products below overwrite both (dW with zeros where m is 0).
    let (mut dx, mut dw) = unsafe { (unfilled(m * k), unfilled(n * k)) };
    // The two products side by side, each on half the threads (measured ~8 % faster on a
    // ViT-S training step than one after the other, each split across all threads; with one
    // thread, join runs them in turn).
    let par = (threads / 2).max(1);
    rayon::join(
        // dx (m x k) = g (m x n) W (n x k).
        || {
            matmul(
                (m, k, n),
                &mut dx,
                k,
                false,
                Mat::rows(g, n),
                Mat::rows(w, k),
                par,
            )
        },
        || weight_grad(x, g, (m, n, k), &mut dw, par),
    );
    (dx, dw, bias_grad(g, n))
}

/// The parameter gradients `(dW, db)` of [`linear_forward`] alone (the input gradient computed
/// elsewhere, e.g. in bf16 products).
pub fn linear_param_grads(x: &[f32], g: &[f32], n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    assert!(
        k > 0 && n > 0 && x.len().is_multiple_of(k),
        "linear: shapes"
    );
    let m = x.len() / k;
    assert_eq!(g.len(), m * n, "linear backward: output gradient size");
    // SAFETY: the product overwrites it (with zeros where m is 0).
    let mut dw = unsafe { unfilled(n * k) };
    weight_grad(x, g, (m, n, k), &mut dw, rayon::current_num_threads());
    (dw, bias_grad(g, n))
}

/// `dW (n x k) = g^T (n x m) x (m x k)` into `dw`, on `threads` threads.
fn weight_grad(
    x: &[f32],
    g: &[f32],
    (m, n, k): (usize, usize, usize),
    dw: &mut [f32],
    threads: usize,
) {
    use super::conv::{Mat, matmul};
    matmul(
        (n, k, m),
        dw,
        k,
        false,
        Mat::transposed(g, n),
        Mat::rows(x, k),
        threads,
    );
}

/// The bias gradient: the column sums of `g` (rows of `n`), in a fixed order.
pub(super) fn bias_grad(g: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = g
        .par_chunks(ROWS_PER_TASK * n)
        .map(|c| {
            let mut s = vec![0f32; n];
            c.chunks_exact(n)
                .for_each(|r| s.iter_mut().zip(r).for_each(|(a, v)| *a += v));
            s
        })
        .collect();
    let mut db = vec![0f32; n];
    partials
        .iter()
        .for_each(|p| db.iter_mut().zip(p).for_each(|(a, v)| *a += v));
    db
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_the_definition() {
        // Two images of 3 channels, 2 x 3 patches of 4 x 4; each value its own index.
        let (b, ch, p, gh, gw) = (2, 3, 4, 2, 3);
        let (h, w) = (gh * p, gw * p);
        let x: Vec<f32> = (0..b * ch * h * w).map(|i| i as f32).collect();
        let rows = patch_rows(&x, (b, ch, h, w), p).unwrap();
        assert_eq!(rows.len(), x.len());
        let mut compared = 0;
        for (n, row) in rows.chunks_exact(ch * p * p).enumerate() {
            let (bi, gy, gx) = (n / (gh * gw), n / gw % gh, n % gw);
            for (i, &v) in row.iter().enumerate() {
                let (c, py, px) = (i / (p * p), i / p % p, i % p);
                let at = ((bi * ch + c) * h + gy * p + py) * w + gx * p + px;
                assert_eq!(v, x[at], "patch {n}, value {i}");
                compared += 1;
            }
        }
        assert_eq!(compared, b * ch * h * w);
        assert!(patch_rows(&x, (b, ch, h, w + 1), p).is_err());
        assert!(patch_rows(&x[1..], (b, ch, h, w), p).is_err());
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8000..=800 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 * 1e-3;
            // std has no erf: the f64 reference is its series (below).
            let want = libm_erf(x as f64);
            worst = worst.max((erf_f32(x) as f64 - want).abs());
        }
        // A-S 7.1.26 is good to 1.5e-7; f32 arithmetic adds rounding (4.1e-7 measured).
        assert!(worst < 5e-7, "erf worst abs error {worst}");
        let x: Vec<f32> = (-300..300).map(|i| i as f32 * 0.02).collect();
        let y = gelu_forward(&x);
        let d = gelu_backward(&x, &vec![1.0; x.len()]);
        for ((&v, &g), &dg) in x.iter().zip(&y).zip(&d) {
            let want = 0.5 * v as f64 * (1.0 + libm_erf(v as f64 / 2f64.sqrt()));
            assert!((g as f64 - want).abs() < 1e-6, "gelu({v})");
            let h = 1e-3f64;
            let num = |t: f64| 0.5 * t * (1.0 + libm_erf(t / 2f64.sqrt()));
            let want_d = (num(v as f64 + h) - num(v as f64 - h)) / (2.0 * h);
            assert!((dg as f64 - want_d).abs() < 1e-5, "gelu'({v})");
        }
    }

    /// erf in f64 by its Maclaurin series (|x| < 3) or the asymptotic complement.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            loop {
                n += 1.0;
                term *= -a * a / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) ~ exp(-a^2) / (a sqrt(pi)) (1 - 1/(2a^2) + 3/(4a^4) - 15/(8a^6))
            let a2 = a * a;
            1.0 - (-a2).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * a2) + 3.0 / (4.0 * a2 * a2) - 15.0 / (8.0 * a2 * a2 * a2))
        };
        v.copysign(x)
    }

    #[test]
    fn softmax_rows_match_the_definition() {
        // Rows of 37 (two vectors and a part-vector) 48 apart: the padding stays untouched.
        let (n, stride, rows) = (37, 48, 5);
        let x: Vec<f32> = (0..rows * stride)
            .map(|i| (i as f32 * 0.7).sin() * 5.0)
            .collect();
        let mut y = x.clone();
        simd::softmax_rows(&mut y, n, stride);
        let mut compared = 0;
        for (yr, xr) in y.chunks(stride).zip(x.chunks(stride)) {
            let max = xr[..n].iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let sum: f64 = xr[..n].iter().map(|&v| (v as f64 - max).exp()).sum();
            for (&got, &v) in yr[..n].iter().zip(&xr[..n]) {
                let want = (v as f64 - max).exp() / sum;
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * want.max(1e-3),
                    "{got} {want}"
                );
                compared += 1;
            }
            assert_eq!(&yr[n..], &xr[n..]);
        }
        assert_eq!(compared, rows * n);
    }
}
