//! bf16 matrix products for inference on the CPU (`--precision bf16`): `x W^T + b (+ r)` with
//! `x` and `W` rounded to bf16 (round to nearest even) and every product summed in f32, as
//! PyTorch's CPU autocast computes a linear layer. On CPUs with AVX512-BF16 (`vdpbf16ps`: two
//! bf16 products per f32 lane and instruction; twice the f32 FMA rate where the CPU issues it
//! as often as an FMA, half of it on Intel Xeons that issue it every other cycle, see
//! [`faster_than_f32`]) the weights are packed once into 32-column panels of bf16 pairs and
//! the product runs in an 8 x 32 register tile;
//! on CPUs with AMX (Xeon since Sapphire Rapids) the same panels feed `tdpbf16ps` tile
//! products (16 x 16 x 32 per instruction) where k is a multiple of 32, as it is in every
//! EVA-X layer; elsewhere the rounded values go through the f32 product, which gives the same
//! numbers up to the order of the f32 sums (and is no faster than f32: the command line falls
//! back to f32 there).

use rayon::prelude::*;

use super::cpu::AttentionShape;
use super::sgemm::SendPtr;

/// Rows of the register tile.
const MR: usize = 8;
/// Columns of one packed panel (two 16-lane vectors).
const NP: usize = 32;
/// Rows of A per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `x` rounded to the nearest bf16 (ties to even; NaN stays NaN), as its 16 bits.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// `x` rounded to the nearest bf16, as an f32.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Whether this CPU runs the packed AVX512-BF16 product.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *NATIVE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the packed product on AMX tiles (`tdpbf16ps`: a 16 x 16 f32 tile
/// times 32 bf16 steps per instruction) and the kernel lets this process use them (Linux's
/// `arch_prctl` permission for the tile data, asked for once). `EVAX_AMX=0` turns it off (to
/// compare with the AVX512-BF16 tile).
pub fn amx() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(|| {
            if !native() || std::env::var("EVAX_AMX").as_deref() == Ok("0") {
                return false;
            }
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with these codes takes an integer and writes one u64.
            let granted = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            };
            let mut mask = 0u64;
            // SAFETY: as above; `mask` outlives the call.
            let read = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_GET_XCOMP_PERM,
                    &mut mask as *mut u64,
                ) == 0
            };
            granted && read && mask & (1 << XFEATURE_XTILEDATA) != 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Whether bf16 products are faster than f32 ones on this CPU, so that `--precision bf16`
/// computes in them: with AMX, or with AVX512-BF16 whose `vdpbf16ps` measures at least 1.25
/// times this core's f32 FMA rate ([`measured_rates`]; on Intel Xeons it runs at half of it,
/// and without AMX bf16 there is slower than f32). `EVAX_BF16=1` takes the AVX512-BF16
/// products regardless (to compare them).
pub fn faster_than_f32() -> bool {
    static FASTER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FASTER.get_or_init(|| {
        amx()
            || (native()
                && (std::env::var("EVAX_BF16").as_deref() == Ok("1") || {
                    let (f32_rate, bf16_rate) = measured_rates();
                    bf16_rate >= 1.25 * f32_rate
                }))
    })
}

/// This core's peak rates in GFLOP/s as measured once (well under a millisecond): f32 FMAs
/// (`vfmadd231ps`) and bf16 products (`vdpbf16ps`), each the best of five runs of twelve
/// independent accumulators; `(0, 0)` without AVX512-BF16.
pub fn measured_rates() -> (f64, f64) {
    static RATES: std::sync::OnceLock<(f64, f64)> = std::sync::OnceLock::new();
    *RATES.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if native() {
            const ITERS: usize = 20_000;
            let (mut f, mut b) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                // SAFETY: AVX-512F and AVX512-BF16 present (checked).
                let (tf, tb) = unsafe { avx512::rate_loops(ITERS) };
                (f, b) = (f.min(tf), b.min(tb));
            }
            // Twelve accumulators of sixteen lanes: 2 (f32) or 4 (bf16) operations a lane.
            let ops = (ITERS * 12 * 16) as f64;
            return (2.0 * ops / f / 1e9, 4.0 * ops / b / 1e9);
        }
        (0.0, 0.0)
    })
}

/// Which unit computes the CPU's bf16 products here (for reports): `AMX`, `AVX512-BF16`, or
/// `emulated` (rounded operands through the f32 product).
pub fn cpu_unit() -> &'static str {
    if amx() {
        "AMX"
    } else if native() {
        "AVX512-BF16"
    } else {
        "emulated"
    }
}

/// A weight `W^T` `[k, n]` prepared for bf16 products.
#[derive(Debug, Clone)]
pub struct Bf16Weight {
    k: usize,
    n: usize,
    /// AVX512-BF16 panels: for each 32 columns, for each pair of rows `(2p, 2p + 1)`, 32
    /// words holding `bf16(W^T[2p, j]) | bf16(W^T[2p + 1, j]) << 16` (zeros past the edges).
    panels: Vec<u32>,
    /// Elsewhere: `W^T` rounded to bf16, as f32 `[k, n]`.
    rounded: Vec<f32>,
}

impl Bf16Weight {
    /// Prepares `wt` (`W^T`, `[k, n]` row-major) for this CPU.
    pub fn new(wt: &[f32], k: usize, n: usize) -> Self {
        Self::with_panels(wt, k, n, native())
    }

    /// Prepares `wt` as packed panels (`panels`, for the AVX512-BF16 product) or as rounded
    /// f32 values.
    pub fn with_panels(wt: &[f32], k: usize, n: usize, panels: bool) -> Self {
        assert_eq!(wt.len(), k * n, "bf16 weight: shape");
        #[cfg(target_arch = "x86_64")]
        if panels && native() {
            // SAFETY: AVX512-BF16 present; wt holds k rows of n values.
            return unsafe {
                Self::from_panels(k, n, |out| avx512::panels_from_rows(wt, k, n, out))
            };
        }
        Self::packed(k, n, panels, |r, c| wt[r * n + c])
    }

    /// Prepares `W` `[n, k]` row-major, as a dense layer stores it (a training step's
    /// weights, packed again after every update), for this CPU.
    pub fn from_stored(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), k * n, "bf16 weight: shape");
        #[cfg(target_arch = "x86_64")]
        if native() {
            // SAFETY: AVX512-BF16 present; w holds n rows of k values.
            return unsafe {
                Self::from_panels(k, n, |out| avx512::panels_from_stored(w, n, k, out))
            };
        }
        Self::packed(k, n, native(), |r, c| w[c * k + r])
    }

    /// Panels for `W^T` `[k, n]` written whole by `fill` (given the uninitialised words).
    ///
    /// # Safety
    /// `fill` writes every word of the panels (see the `panels` field).
    #[cfg(target_arch = "x86_64")]
    unsafe fn from_panels(k: usize, n: usize, fill: impl FnOnce(&mut [u32])) -> Self {
        // SAFETY: `fill` overwrites every word (the contract).
        let mut panels = unsafe { super::unfilled(n.div_ceil(NP) * k.div_ceil(2) * NP) };
        fill(&mut panels);
        Bf16Weight {
            k,
            n,
            panels,
            rounded: Vec::new(),
        }
    }

    /// `W^T` `[k, n]` given by `at(row, column)`, packed or rounded.
    fn packed(k: usize, n: usize, panels: bool, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        if !panels {
            let mut rounded = vec![0f32; k * n];
            rounded
                .par_chunks_mut(n.max(1))
                .enumerate()
                .for_each(|(r, row)| {
                    row.iter_mut()
                        .enumerate()
                        .for_each(|(c, v)| *v = round_bf16(at(r, c)))
                });
            return Bf16Weight {
                k,
                n,
                panels: Vec::new(),
                rounded,
            };
        }
        let pairs = k.div_ceil(2);
        let npanels = n.div_ceil(NP);
        let mut out = vec![0u32; npanels * pairs * NP];
        let bits = |r: usize, c: usize| {
            if r < k && c < n {
                bf16_bits(at(r, c)) as u32
            } else {
                0
            }
        };
        out.par_chunks_mut((pairs * NP).max(1))
            .enumerate()
            .for_each(|(j, panel)| {
                for (p, row) in panel.chunks_exact_mut(NP).enumerate() {
                    for (l, w) in row.iter_mut().enumerate() {
                        let c = j * NP + l;
                        *w = bits(2 * p, c) | (bits(2 * p + 1, c) << 16);
                    }
                }
            });
        Bf16Weight {
            k,
            n,
            panels: out,
            rounded: Vec::new(),
        }
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// `x W^T + bias (+ residual)` for `x` `[m, k]` row-major; an error unless the shapes fit.
pub fn linear(
    x: &[f32],
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>, String> {
    let (k, n) = (w.k, w.n);
    if k == 0 || n == 0 || !x.len().is_multiple_of(k) {
        return Err(format!(
            "bf16 linear: {} input values do not fit width {k}",
            x.len()
        ));
    }
    let m = x.len() / k;
    if bias.is_some_and(|b| b.len() != n) || residual.is_some_and(|r| r.len() != m * n) {
        return Err(format!(
            "bf16 linear: bias or residual does not match the {m}x{n} output"
        ));
    }
    if w.panels.is_empty() {
        let xq: Vec<f32> = x.par_iter().map(|&v| round_bf16(v)).collect();
        return Ok(super::cpu::linear_forward(
            &xq,
            k,
            &w.rounded,
            super::cpu::WeightLayout::Transposed,
            n,
            bias,
            residual,
        ));
    }
    #[cfg(target_arch = "x86_64")]
    {
        if amx() && k.is_multiple_of(amx_tiles::K_STEP) {
            // SAFETY: AMX (and AVX512-BF16) usable; k is a whole number of tile steps; the
            // shapes were checked above.
            return Ok(unsafe { amx_tiles::linear(x, m, w, bias, residual, false) });
        }
        if native() {
            // SAFETY: AVX512F and AVX512-BF16 are present; the shapes were checked above.
            return Ok(unsafe { avx512::linear(x, m, w, bias, residual) });
        }
    }
    Err("bf16 linear: packed weights need a CPU with AVX512-BF16".into())
}

/// A dense layer's weight gradient `dW = g^T x` (`[n, k]`) from its output gradient `g`
/// (`[m, n]`) and input `x` (`[m, k]`), in bf16 products summed in f32 (as PyTorch's CPU
/// autocast computes it) on AMX tiles, or AVX512-BF16 register tiles without them; `None` on
/// CPUs without AVX512-BF16 (the caller sums in f32). An error unless the shapes fit.
pub fn weight_grad(x: &[f32], g: &[f32], n: usize, k: usize) -> Result<Option<Vec<f32>>, String> {
    if k == 0 || n == 0 || !x.len().is_multiple_of(k) || g.len() != x.len() / k * n {
        return Err(format!(
            "bf16 weight gradient: {} inputs and {} output gradients do not fit widths {k} and {n}",
            x.len(),
            g.len()
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if native() {
        // SAFETY: AVX512-BF16 present, AMX usable where asked for; the shapes were checked.
        return Ok(Some(unsafe {
            amx_tiles::weight_grad(x, g, (x.len() / k, n, k), amx())
        }));
    }
    Ok(None)
}

/// `silu(y1) * y2` for `[y1 | y2] = x W^T + bias` (SwiGLU after its packed dense layer), the
/// product in bf16 as [`linear`]; on AMX each block of rows goes through SwiGLU while it is in
/// cache. An error unless the shapes fit (an even output width).
pub fn linear_swiglu(x: &[f32], w: &Bf16Weight, bias: Option<&[f32]>) -> Result<Vec<f32>, String> {
    if !w.n.is_multiple_of(2) {
        return Err(format!("bf16 SwiGLU: width {} is not 2h", w.n));
    }
    #[cfg(target_arch = "x86_64")]
    if amx() && !w.panels.is_empty() && w.k.is_multiple_of(amx_tiles::K_STEP) {
        let (k, n) = (w.k, w.n);
        if x.len().is_multiple_of(k) && bias.is_none_or(|b| b.len() == n) {
            // SAFETY: AMX usable; k a whole number of tile steps; the shapes were checked
            // (n even, no residual).
            return Ok(unsafe { amx_tiles::linear(x, x.len() / k, w, bias, None, true) });
        }
    }
    let y = linear(x, w, bias, None)?;
    Ok(super::cpu::swiglu_forward(&y, w.n / 2))
}

/// Output pixels of one block of a bf16 convolution (its im2col rows, `cin * kh * kw` wide,
/// are made a block at a time).
const CONV_PIXELS: usize = 512;

/// The weight of a convolution `[cout, cin, kh, kw]` prepared for [`conv_forward`]: `W^T`
/// with its rows in tap-major order, `[(ky, kx, ci), cout]`, in bf16.
pub fn conv_weight(w: &[f32], cout: usize, (kh, kw): (usize, usize)) -> Bf16Weight {
    let k = w.len() / cout.max(1);
    let cin = k / (kh * kw).max(1);
    let mut wt = vec![0f32; w.len()];
    for (co, row) in w.chunks_exact(k).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            let (ci, tap) = (r / (kh * kw), r % (kh * kw));
            wt[(tap * cin + ci) * cout + co] = v;
        }
    }
    Bf16Weight::new(&wt, k, cout)
}

/// A convolution (NCHW, `s`) with its products in bf16 summed in f32, as [`linear`]: each
/// image's channels transposed to one row per pixel, then for each block of output pixels
/// their im2col rows (the taps' channel rows side by side) times the weight
/// ([`conv_weight`]), then the bias and ReLU, written back as channels. An error unless the
/// shapes fit.
pub fn conv_forward(
    x: &[f32],
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    relu: bool,
    s: &super::conv::ConvShape,
) -> Result<Vec<f32>, String> {
    let (cin, taps) = (s.cin, s.kh * s.kw);
    let k = cin * taps;
    let (ho, wo) = s
        .out()
        .ok_or_else(|| format!("bf16 convolution: no output ({s:?})"))?;
    if k == 0 || s.cout == 0 || x.len() != s.b * cin * s.h * s.w || w.k != k || w.n != s.cout {
        return Err(format!("bf16 convolution: shapes do not fit ({s:?})"));
    }
    let (plane, area) = (ho * wo, s.h * s.w);
    // SAFETY: every value of these is written before it is read: each output channel's
    // pixels block by block, each input pixel's channels, and each im2col row whole (a copy
    // or zeros per tap) before its block's product.
    let (mut y, mut pixels, mut rows) = unsafe {
        (
            super::unfilled(s.b * s.cout * plane),
            super::unfilled(area * cin),
            super::unfilled(CONV_PIXELS.min(plane) * k),
        )
    };
    for (xi, yi) in x
        .chunks_exact(cin * area)
        .zip(y.chunks_exact_mut(s.cout * plane))
    {
        // One row of channels per input pixel, 64 pixels a task, 16 channels at a time (a
        // cache line of each row written whole).
        pixels
            .par_chunks_mut(64 * cin)
            .enumerate()
            .for_each(|(blk, dst)| {
                let (p0, np) = (blk * 64, dst.len() / cin);
                for c0 in (0..cin).step_by(16) {
                    let nc = 16.min(cin - c0);
                    for p in 0..np {
                        let row = &mut dst[p * cin + c0..][..nc];
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = xi[(c0 + j) * area + p0 + p];
                        }
                    }
                }
            });
        for p0 in (0..plane).step_by(CONV_PIXELS) {
            let n = CONV_PIXELS.min(plane - p0);
            let rows = &mut rows[..n * k];
            rows.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
                let (oy, ox) = ((p0 + i) / wo, (p0 + i) % wo);
                for (t, dst) in row.chunks_exact_mut(cin).enumerate() {
                    let iy = (oy * s.stride + t / s.kw) as isize - s.pad as isize;
                    let ix = (ox * s.stride + t % s.kw) as isize - s.pad as isize;
                    if (0..s.h as isize).contains(&iy) && (0..s.w as isize).contains(&ix) {
                        let at = (iy as usize * s.w + ix as usize) * cin;
                        dst.copy_from_slice(&pixels[at..at + cin]);
                    } else {
                        dst.fill(0.0);
                    }
                }
            });
            let out = linear(rows, w, bias, None)?;
            // Back to channels, 16 at a time (a cache line of the block's rows read whole).
            yi.par_chunks_mut(16 * plane)
                .enumerate()
                .for_each(|(blk, yc)| {
                    let co0 = blk * 16;
                    for i in 0..n {
                        let row = &out[i * s.cout + co0..][..yc.len() / plane];
                        for (j, &o) in row.iter().enumerate() {
                            yc[j * plane + p0 + i] = if relu { o.max(0.0) } else { o };
                        }
                    }
                });
        }
    }
    Ok(y)
}

/// Multi-head attention with RoPE over `qkv` `[b, t, 3c]` with both products in bf16 (summed
/// in f32) on AMX tiles; `None` where this CPU has no AMX or a head is not a multiple of 32
/// wide (the caller computes in f32 then). An error unless the shapes fit.
pub fn attention(qkv: &[f32], shape: &AttentionShape) -> Result<Option<Vec<f32>>, String> {
    Ok(attention_keeping(qkv, shape, false)?.map(|(out, _)| out))
}

/// Whether [`attention`] and its backward run on this CPU for heads of width `d`.
fn amx_attention(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx() && d.is_multiple_of(amx_tiles::K_STEP)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Attention's output and the probabilities it kept (empty when not asked to).
pub type AttentionKept = (Vec<f32>, Vec<f32>);

/// [`attention`] for training: also the f32 probabilities `[b, heads, t, t]` when `keep`
/// (else an empty vector), as [`crate::kernels::cpu::attention_forward_keeping`].
pub fn attention_keeping(
    qkv: &[f32],
    shape: &AttentionShape,
    keep: bool,
) -> Result<Option<AttentionKept>, String> {
    shape.check(qkv.len())?;
    #[cfg(target_arch = "x86_64")]
    if amx_attention(shape.c / shape.heads) {
        // SAFETY: AMX usable; the head width is a multiple of 32; the shape was checked.
        return Ok(Some(unsafe { amx_tiles::attention(qkv, shape, keep) }));
    }
    Ok(None)
}

/// The gradient of [`attention_keeping`] with respect to `qkv`, given the output gradient
/// `dy` `[b, t, c]`, its four products in bf16 (summed in f32) on AMX tiles; the
/// probabilities those kept, or made again; `None` where [`attention`] is (the caller computes
/// in f32). An error unless the shapes fit.
pub fn attention_backward(
    qkv: &[f32],
    dy: &[f32],
    shape: &AttentionShape,
    probs: Option<&[f32]>,
) -> Result<Option<Vec<f32>>, String> {
    shape.check_backward(qkv.len(), dy.len(), probs.map(<[f32]>::len))?;
    #[cfg(target_arch = "x86_64")]
    if amx_attention(shape.c / shape.heads) {
        // SAFETY: AMX usable; the head width is a multiple of 32; the shapes were checked.
        return Ok(Some(unsafe {
            amx_tiles::attention_backward(qkv, dy, shape, probs)
        }));
    }
    Ok(None)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Seconds for `iters` rounds of twelve independent `vfmadd231ps`, then of twelve
    /// `vdpbf16ps` (see [`super::measured_rates`]).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn rate_loops(iters: usize) -> (f64, f64) {
        let seed = std::hint::black_box(1.0f32);
        let (a, b) = (_mm512_set1_ps(seed * 1e-7), _mm512_set1_ps(seed));
        let start: [__m512; 12] = std::array::from_fn(|j| _mm512_set1_ps(seed * j as f32));
        let mut acc = start;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(a, b, *v);
            }
        }
        std::hint::black_box(&acc);
        let f32_s = t.elapsed().as_secs_f64();
        // SAFETY: the transmutes reinterpret 512 bits.
        let (ah, bh) = unsafe {
            (
                std::mem::transmute::<__m512, __m512bh>(a),
                std::mem::transmute::<__m512, __m512bh>(b),
            )
        };
        let mut acc = start;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, ah, bh);
            }
        }
        std::hint::black_box(&acc);
        (f32_s, t.elapsed().as_secs_f64())
    }

    /// Row `x` (k values) as bf16 in natural order into `out` (`2 * pairs` halves, the last
    /// zero when k is odd), i.e. `pairs` words `bf16(x[2p]) | bf16(x[2p + 1]) << 16`.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512VL and AVX512-BF16; `out` holds at least `ceil(x.len() /
    /// 2)` words (any more are zeroed).
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_row(x: &[f32], out: &mut [u32]) {
        let k = x.len();
        let full = k / 16;
        for c in 0..full {
            // SAFETY: 16 values from 16 * c lie in x; 8 words from 8 * c lie in out
            // (out holds ceil(k / 2) >= 8 * full words).
            unsafe {
                let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(16 * c)));
                let bits: __m256i = std::mem::transmute(v);
                _mm256_storeu_si256(out.as_mut_ptr().add(8 * c) as *mut __m256i, bits);
            }
        }
        let rest = k - 16 * full;
        if rest > 0 {
            // The last values through a mask: zeros past the end, so an odd k's last high
            // half is zero.
            // SAFETY: `rest` values from 16 * full lie in x; ceil(rest / 2) words from
            // 8 * full lie in out.
            unsafe {
                let mask: __mmask16 = (1u16 << rest) - 1;
                let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x.as_ptr().add(16 * full)));
                let bits: __m256i = std::mem::transmute(v);
                let words = ((1u16 << rest.div_ceil(2)) - 1) as __mmask8;
                _mm256_mask_storeu_epi32(out.as_mut_ptr().add(8 * full) as *mut i32, words, bits);
            }
        }
        out[k.div_ceil(2)..].fill(0);
    }

    /// Two rows `r0` and `r1` (`len` values each; `r1` absent: zeros) as bf16 pairs across
    /// them: `out[j] = bf16(r0[j]) | bf16(r1[j]) << 16` (a row of a panel whose steps are
    /// the rows).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; `r0` (`r1`) readable for `len` values; `out`
    /// holds `len` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_pair_rows(
        r0: *const f32,
        r1: Option<*const f32>,
        len: usize,
        out: &mut [u32],
    ) {
        let out = &mut out[..len];
        let full = len / 16;
        // SAFETY: reads of 16 values from 16 * j < len - 15 and writes of 16 words there.
        unsafe {
            for j in 0..full {
                let lo = _mm512_cvtneps_pbh(_mm512_loadu_ps(r0.add(16 * j)));
                let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(lo));
                let w = match r1 {
                    Some(r1) => {
                        let hi = _mm512_cvtneps_pbh(_mm512_loadu_ps(r1.add(16 * j)));
                        let hi =
                            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(hi));
                        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
                    }
                    None => lo,
                };
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * j) as *mut __m512i, w);
            }
            for (j, o) in out.iter_mut().enumerate().skip(16 * full) {
                let hi = r1.map_or(0, |r1| bf16_bits(*r1.add(j)) as u32);
                *o = bf16_bits(*r0.add(j)) as u32 | (hi << 16);
            }
        }
    }

    /// Panels of `W^T` (see [`Bf16Weight`]) from `wt` `[k, n]` row-major: each row of a
    /// panel a pair of rows of `wt`. Writes every word of `out`.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; `wt` holds `k * n` values and `out`
    /// `ceil(n / 32) * ceil(k / 2) * 32` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn panels_from_rows(wt: &[f32], k: usize, n: usize, out: &mut [u32]) {
        let pairs = k.div_ceil(2);
        assert!(wt.len() == k * n && out.len() == n.div_ceil(NP) * pairs * NP);
        out.par_chunks_mut(pairs * NP)
            .enumerate()
            .for_each(|(j, panel)| {
                let (c0, cols) = (j * NP, NP.min(n - j * NP));
                for (p, row) in panel.chunks_exact_mut(NP).enumerate() {
                    let r1 = (2 * p + 1 < k).then(|| wt[(2 * p + 1) * n + c0..].as_ptr());
                    // SAFETY: AVX512-BF16 present; rows 2p (and 2p + 1) < k hold `cols` values
                    // from column c0.
                    unsafe { pack_pair_rows(wt[2 * p * n + c0..].as_ptr(), r1, cols, row) };
                    row[cols..].fill(0);
                }
            });
    }

    /// Panels of `W^T` (see [`Bf16Weight`]) from `W` `[n, k]` row-major: sixteen rows of W
    /// by sixteen pairs at a time, each row's pairs converted in one step and the sixteen
    /// turned into panel rows by a 16 x 16 register transpose. Writes every word of `out`.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; `w` holds `n * k` values and `out`
    /// `ceil(n / 32) * ceil(k / 2) * 32` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn panels_from_stored(w: &[f32], n: usize, k: usize, out: &mut [u32]) {
        let pairs = k.div_ceil(2);
        assert!(w.len() == k * n && out.len() == n.div_ceil(NP) * pairs * NP);
        out.par_chunks_mut(pairs * NP)
            .enumerate()
            .for_each(|(j, panel)| {
                for half in 0..2 {
                    let c0 = j * NP + 16 * half;
                    for p0 in (0..pairs).step_by(16) {
                        // Values 2 p0.. of each of the sixteen rows, masked at k.
                        let live = k - 2 * p0;
                        let mask = |from: usize| -> __mmask16 {
                            let n = live.saturating_sub(from).min(16);
                            ((1u32 << n) - 1) as u16
                        };
                        let mut v = [_mm512_setzero_ps(); 16];
                        for (l, v) in v.iter_mut().enumerate() {
                            let c = c0 + l;
                            if c >= n {
                                break;
                            }
                            // SAFETY: row c < n of w, values 2 p0.. masked at k; the transmute
                            // reinterprets 512 bits.
                            unsafe {
                                let at = w.as_ptr().add(c * k + 2 * p0);
                                let lo = _mm512_maskz_loadu_ps(mask(0), at);
                                let hi = _mm512_maskz_loadu_ps(mask(16), at.add(16));
                                *v = std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(
                                    hi, lo,
                                ));
                            }
                        }
                        let rows = crate::kernels::cpu::avx512::transpose16(&v);
                        for (pp, row) in rows.iter().enumerate().take(pairs - p0) {
                            // SAFETY: 16 words of panel row p0 + pp < pairs, columns 16 half..
                            unsafe {
                                let at = panel.as_mut_ptr().add((p0 + pp) * NP + 16 * half);
                                _mm512_storeu_ps(at as *mut f32, *row)
                            };
                        }
                    }
                }
            });
    }

    /// One 8 x 32 tile: rows `a` (8 rows of `pairs` words at stride `pairs`) times one panel,
    /// plus `bias` and the residual rows, into the first `rows` rows and `cols` columns of
    /// `c` (row stride `n`).
    ///
    /// # Safety
    /// `a` holds 8 * pairs words, `panel` pairs * 32; `c` (and `residual`, same layout) is
    /// writable (readable) for `rows` rows of `cols` values at stride `n`; `bias` holds `cols`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        a: *const u32,
        pairs: usize,
        panel: *const u32,
        c: *mut f32,
        n: usize,
        rows: usize,
        cols: usize,
        bias: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        // SAFETY: every access stays inside the ranges of the contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for p in 0..pairs {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(panel.add(p * NP) as *const __m512i));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    panel.add(p * NP + 16) as *const __m512i
                ));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(r * pairs + p) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                for (h, &v) in acc.iter().enumerate() {
                    let c0 = 16 * h;
                    if c0 >= cols {
                        break;
                    }
                    let live = (cols - c0).min(16);
                    let mask: __mmask16 = if live == 16 {
                        0xffff
                    } else {
                        (1u16 << live) - 1
                    };
                    let mut y = v;
                    if let Some(b) = bias {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, b.add(c0)));
                    }
                    if let Some(res) = residual {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, res.add(r * n + c0)));
                    }
                    _mm512_mask_storeu_ps(c.add(r * n + c0), mask, y);
                }
            }
        }
    }

    /// The product on AVX512-BF16 (see [`super::linear`]).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; the shapes fit (checked by the caller).
    pub(super) unsafe fn linear(
        x: &[f32],
        m: usize,
        w: &Bf16Weight,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        // SAFETY: the caller's contract; both functions need exactly these CPU features.
        unsafe { packed_linear(x, m, w, bias, residual, pack_row, tile) }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx_tiles {
    use super::*;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Depth of one tile step (32 bf16 values, 64 bytes a row).
    pub(super) const K_STEP: usize = 32;
    /// Rows of one block of C: two tiles of 16.
    const BM: usize = 32;
    /// Rows of A per parallel task (whole blocks).
    const ROWS_PER_TASK: usize = 4 * BM;

    /// The tile configuration (`ldtilecfg`'s 64-byte operand): palette 1, tiles 0..8 each 16
    /// rows of 64 bytes (C: 16 x 16 f32; A: 16 rows x 32 bf16; B: 16 pairs x 16 columns).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    impl Config {
        fn new() -> Self {
            let mut c = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            for t in 0..8 {
                c.colsb[t] = 64;
                c.rows[t] = 16;
            }
            c
        }
    }

    /// Runs `f` with the tiles configured on this thread ([`Config`]), releasing them after.
    ///
    /// # Safety
    /// AMX usable in this process ([`super::amx`]).
    unsafe fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
        let cfg = Config::new();
        // SAFETY: AMX usable (the caller's contract); the configuration is 64 valid bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
        let r = f();
        // SAFETY: as above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
        r
    }

    /// One block of 32 rows of C: `c[r, j] = sum_p A[r, p] B[p, j] (+ bias[j] + residual[r, j])`
    /// (with `accumulate`, `c[r, j] += sum_p A[r, p] B[p, j]`) for `r < rows` (at most 32) and
    /// `j < n`, from A's 32 rows of `pairs` words (bf16 pairs, rows past `rows` zero) at `a`
    /// and the 32-column panels of B (`pairs` rows of 32 words each, zero past `n`) at
    /// `panels`. Each panel takes four accumulator tiles (tmm0..4) fed by two A tiles (tmm4,
    /// tmm5: rows 0..16 and 16..32 of 32 steps) and two B tiles (tmm6, tmm7: the panel's left
    /// and right 16 columns), stored through `ctile`.
    ///
    /// # Safety
    /// The tiles configured on this thread ([`with_tiles`]); `pairs` a multiple of 16; `a`
    /// readable for 32 * pairs words, `panels` for `ceil(n / 32) * pairs * 32`; `c` (and the
    /// residual, at its own row stride) writable (readable) for `rows` rows of `n` values at
    /// row stride `c_rs`; `bias` holds `n`; with `accumulate`, neither bias nor residual.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        a: *const u32,
        pairs: usize,
        rows: usize,
        panels: *const u32,
        n: usize,
        (c, c_rs): (*mut f32, usize),
        bias: Option<*const f32>,
        residual: Option<(*const f32, usize)>,
        accumulate: bool,
        ctile: &mut [f32; BM * NP],
    ) {
        debug_assert!(!accumulate || (bias.is_none() && residual.is_none()));
        let a1 = a.wrapping_add(16 * pairs);
        // SAFETY: every tile load reads 16 rows of 64 bytes inside A's 32 rows, inside a
        // panel (pairs rows of 128 bytes) or inside C's block, every store writes inside
        // `ctile` or C's block, the epilogue inside the caller's rows and columns (the
        // contract).
        unsafe {
            for j in 0..n.div_ceil(NP) {
                let panel = panels.add(j * pairs * NP);
                let c0 = j * NP;
                let whole_cols = c0 + NP <= n;
                // Where the panel is whole, the accumulators start from C's sums (a whole
                // block) or from the bias (a load with row stride 0 repeats it down the
                // tile); elsewhere the epilogue adds them.
                let preload = match (accumulate, bias) {
                    (true, _) => {
                        (whole_cols && rows == BM).then(|| (c.add(c0) as *const f32, c_rs))
                    }
                    (false, Some(b)) => whole_cols.then(|| (b.add(c0), 0)),
                    (false, None) => None,
                };
                match preload {
                    Some((s, s_rs)) => asm!(
                        "tileloadd tmm0, [{s0} + {ss}*1]",
                        "tileloadd tmm1, [{s1} + {ss}*1]",
                        "tileloadd tmm2, [{s2} + {ss}*1]",
                        "tileloadd tmm3, [{s3} + {ss}*1]",
                        s0 = in(reg) s,
                        s1 = in(reg) s.add(16),
                        s2 = in(reg) s.add(16 * s_rs),
                        s3 = in(reg) s.add(16 * s_rs + 16),
                        ss = in(reg) s_rs * 4,
                        options(nostack, readonly)
                    ),
                    None => asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    ),
                }
                for p in (0..pairs).step_by(K_STEP / 2) {
                    // The next step's B rows (32 lines) and A rows (32 lines) into L1.
                    let next = p + K_STEP / 2;
                    if next < pairs {
                        let bn = panel.add(next * NP) as *const i8;
                        for line in 0..32 {
                            _mm_prefetch::<_MM_HINT_T0>(bn.add(64 * line));
                        }
                        for r in 0..16 {
                            _mm_prefetch::<_MM_HINT_T0>(a.add(r * pairs + next) as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(a1.add(r * pairs + next) as *const i8);
                        }
                    }
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a.add(p),
                        a1 = in(reg) a1.add(p),
                        b0 = in(reg) panel.add(p * NP),
                        b1 = in(reg) panel.add(p * NP + 16),
                        sa = in(reg) pairs * 4,
                        sb = in(reg) NP * 4,
                        options(nostack, readonly)
                    );
                }
                // A whole block with nothing left to add goes straight to C; any other
                // through `ctile` and the epilogue (C's own sums its residual).
                let residual = match accumulate {
                    true => preload.is_none().then_some((c.add(c0) as *const f32, c_rs)),
                    false => residual.map(|(r, rs)| (r.add(c0), rs)),
                };
                let direct = rows == BM && whole_cols && residual.is_none();
                let (t, ts) = if direct {
                    (c.add(c0), c_rs)
                } else {
                    (ctile.as_mut_ptr(), NP)
                };
                asm!(
                    "tilestored [{c} + {sc}*1], tmm0",
                    "tilestored [{c1} + {sc}*1], tmm1",
                    "tilestored [{c2} + {sc}*1], tmm2",
                    "tilestored [{c3} + {sc}*1], tmm3",
                    c = in(reg) t,
                    c1 = in(reg) t.add(16),
                    c2 = in(reg) t.add(16 * ts),
                    c3 = in(reg) t.add(16 * ts + 16),
                    sc = in(reg) ts * 4,
                    options(nostack)
                );
                if !direct {
                    epilogue(
                        ctile,
                        (c.add(c0), c_rs),
                        rows,
                        NP.min(n - c0),
                        bias.filter(|_| preload.is_none()).map(|b| b.add(c0)),
                        residual,
                    );
                }
            }
        }
    }

    /// `C = A B` for `rows` rows of A (packed as for [`block`], zero past `rows` to a whole
    /// block) and B's panels, block by block.
    ///
    /// # Safety
    /// As [`block`], for `ceil(rows / 32)` blocks of A and `rows` rows of C.
    unsafe fn product(
        a: *const u32,
        pairs: usize,
        rows: usize,
        panels: *const u32,
        n: usize,
        (c, c_rs): (*mut f32, usize),
        ctile: &mut [f32; BM * NP],
    ) {
        for blk in 0..rows.div_ceil(BM) {
            let live = BM.min(rows - blk * BM);
            // SAFETY: the caller's contract, block by block.
            unsafe {
                let (a, c) = (a.add(blk * BM * pairs), c.add(blk * BM * c_rs));
                block(
                    a,
                    pairs,
                    live,
                    panels,
                    n,
                    (c, c_rs),
                    None,
                    None,
                    false,
                    ctile,
                );
            }
        }
    }

    /// The product on AMX (see [`super::linear`]): row tasks of four 32-row [`block`]s; with
    /// `swiglu`, each block's rows go through SwiGLU (see [`super::linear_swiglu`]) while
    /// they are in cache, and the output is `n / 2` wide.
    ///
    /// # Safety
    /// AMX usable in this process ([`super::amx`]) with AVX512-BF16; `w.k` a multiple of
    /// [`K_STEP`]; the shapes fit (checked by the caller; with `swiglu`, n even and no
    /// residual); `w` holds panels.
    pub(super) unsafe fn linear(
        x: &[f32],
        m: usize,
        w: &Bf16Weight,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        swiglu: bool,
    ) -> Vec<f32> {
        let (k, n) = (w.k, w.n);
        let pairs = k / 2;
        assert_eq!(
            w.panels.len(),
            n.div_ceil(NP) * pairs * NP,
            "bf16 linear: panels"
        );
        let width = if swiglu { n / 2 } else { n };
        let mut y: Vec<f32> = Vec::with_capacity(m * width);
        let out = SendPtr(y.as_mut_ptr());
        (0..m.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(abuf, rows_buf): &mut (Vec<u32>, Vec<f32>), t| {
                    let i0 = t * ROWS_PER_TASK;
                    let rows = ROWS_PER_TASK.min(m - i0);
                    let blocks = rows.div_ceil(BM);
                    // Every live row is packed whole below; only the padding rows are zeroed.
                    abuf.resize(blocks * BM * pairs, 0);
                    abuf[rows * pairs..].fill(0);
                    for (r, dst) in abuf.chunks_exact_mut(pairs).take(rows).enumerate() {
                        // SAFETY: AVX512-BF16 present (the caller's contract).
                        unsafe { avx512::pack_row(&x[(i0 + r) * k..(i0 + r + 1) * k], dst) };
                    }
                    if swiglu {
                        rows_buf.resize(BM * n, 0.0);
                    }
                    let mut ctile = [0f32; BM * NP];
                    // SAFETY: AMX usable (the caller's contract); each block reads its 32 rows of
                    // abuf and the panels, and writes rows of the output that belong to this task
                    // (directly, or through `rows_buf` and SwiGLU).
                    unsafe {
                        with_tiles(|| {
                            for blk in 0..blocks {
                                let r0 = i0 + blk * BM;
                                let live = BM.min(rows - blk * BM);
                                let dst = if swiglu {
                                    rows_buf.as_mut_ptr()
                                } else {
                                    out.get().add(r0 * n)
                                };
                                block(
                                    abuf.as_ptr().add(blk * BM * pairs),
                                    pairs,
                                    live,
                                    w.panels.as_ptr(),
                                    n,
                                    (dst, n),
                                    bias.map(|b| b.as_ptr()),
                                    residual.map(|r| (r.as_ptr().add(r0 * n), n)),
                                    false,
                                    &mut ctile,
                                );
                                if swiglu {
                                    let h = std::slice::from_raw_parts_mut(
                                        out.get().add(r0 * width),
                                        live * width,
                                    );
                                    crate::kernels::cpu::simd::swiglu_rows(
                                        &rows_buf[..live * n],
                                        h,
                                        width,
                                    );
                                }
                            }
                        })
                    };
                },
            );
        // SAFETY: the tasks together wrote every row and column of the m x width output.
        unsafe { y.set_len(m * width) };
        y
    }

    /// Tokens summed in one step of [`weight_grad`]: a 32-row block of A and a panel of B
    /// for this many tokens (32 KiB each) stay in L1 while the block's panels go by.
    const GRAD_DEPTH: usize = 512;

    thread_local! {
        /// [`weight_grad`]'s packed `x` (B), kept by the calling thread from one call to
        /// the next (fresh pages each time cost as much as the packing).
        static GRAD_PANELS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// `dW = g^T x` (`[n, k]` row-major) for `g` `[m, n]` and `x` `[m, k]` (see
    /// [`super::weight_grad`]): `x`'s pairs of rows packed as panels (B) once, then tasks
    /// of 32 rows of dW, each summing [`GRAD_DEPTH`] tokens at a time: its 32 columns of
    /// `g` for those tokens packed as rows of token pairs (A), then multiplied while they
    /// are in cache, on AMX tiles (`on_tiles`) or in AVX512-BF16 register tiles. The packing
    /// needs only AVX512-BF16.
    ///
    /// # Safety
    /// AVX512-BF16 present, and with `on_tiles` AMX usable in this process
    /// ([`super::amx`]); `x` holds `m * k` values and `g` `m * n`.
    pub(super) unsafe fn weight_grad(
        x: &[f32],
        g: &[f32],
        (m, n, k): (usize, usize, usize),
        on_tiles: bool,
    ) -> Vec<f32> {
        assert!(
            x.len() == m * k && g.len() == m * n,
            "bf16 weight gradient: shapes"
        );
        // Tokens padded with zeros to whole tile steps, then cut into steps of GRAD_DEPTH
        // (the last may be shorter); B is laid out step after step.
        let tokens = m.div_ceil(K_STEP) * K_STEP;
        let npanels = k.div_ceil(NP);
        let mut b = GRAD_PANELS.take();
        // Written whole below (padding included), whatever it held.
        b.resize(tokens / 2 * npanels * NP, 0);
        pack_row_pairs(x, (m, k), tokens, &mut b);
        let mut dw: Vec<f32> = Vec::with_capacity(n * k);
        let out = SendPtr(dw.as_mut_ptr());
        let panels = &b;
        (0..n.div_ceil(BM)).into_par_iter().for_each_init(
            || (vec![0u32; BM * GRAD_DEPTH / 2], [0f32; BM * NP]),
            |(a, ctile), blk| {
                let o0 = blk * BM;
                let live = BM.min(n - o0);
                for (si, t0) in (0..tokens).step_by(GRAD_DEPTH).enumerate() {
                    let pairs = GRAD_DEPTH.min(tokens - t0) / 2;
                    // SAFETY: AVX512-BF16 present; g's columns o0..o0 + live into this
                    // step's 32 rows of A (32 x pairs words).
                    unsafe { pack_gradient_columns(g, (m, n), (o0, t0), &mut a[..BM * pairs]) };
                    // Those rows and the step's panels (npanels x pairs x 32 words) into rows
                    // o0..o0 + live of dW, this task's own, the first step writing them whole
                    // before the others add to them.
                    let b = panels[t0 / 2 * npanels * NP..].as_ptr();
                    let c = out.get().wrapping_add(o0 * k);
                    if on_tiles {
                        // SAFETY: AMX usable; the ranges above.
                        unsafe {
                            with_tiles(|| {
                                block(
                                    a.as_ptr(),
                                    pairs,
                                    live,
                                    b,
                                    k,
                                    (c, k),
                                    None,
                                    None,
                                    si > 0,
                                    ctile,
                                )
                            })
                        };
                        continue;
                    }
                    for j in 0..npanels {
                        for r0 in (0..live).step_by(MR) {
                            // SAFETY: AVX512-BF16 present; 8 rows of A from r0, panel j of
                            // the step, and rows r0.. (at most 8) and columns 32 j.. of this
                            // task's rows of dW (row stride k), read back to add to them
                            // after the first step.
                            unsafe {
                                let cr = c.add(r0 * k + j * NP);
                                avx512::tile(
                                    a.as_ptr().add(r0 * pairs),
                                    pairs,
                                    b.add(j * pairs * NP),
                                    cr,
                                    k,
                                    MR.min(live - r0),
                                    NP.min(k - j * NP),
                                    None,
                                    (si > 0).then_some(cr as *const f32),
                                )
                            };
                        }
                    }
                }
            },
        );
        GRAD_PANELS.set(b);
        // SAFETY: the row blocks together wrote all n rows of k values.
        unsafe { dw.set_len(n * k) };
        dw
    }

    /// `x` (`[m, k]`) as B for [`weight_grad`]: step by step ([`GRAD_DEPTH`] tokens of the
    /// padded `tokens`), panel by panel (32 columns), each row of a panel a pair of tokens
    /// `bf16(x[2p, j]) | bf16(x[2p + 1, j]) << 16`; zero past `m` and `k`. Writes all of `b`.
    fn pack_row_pairs(x: &[f32], (m, k): (usize, usize), tokens: usize, b: &mut [u32]) {
        let npanels = k.div_ceil(NP);
        b.par_chunks_mut(GRAD_DEPTH / 2 * npanels * NP)
            .enumerate()
            .for_each(|(si, step)| {
                let pairs = GRAD_DEPTH.min(tokens - si * GRAD_DEPTH) / 2;
                step.par_chunks_mut(pairs * NP)
                    .enumerate()
                    .for_each(|(j, panel)| {
                        let cols = NP.min(k - j * NP);
                        for (pp, row) in panel.chunks_exact_mut(NP).enumerate() {
                            let t = si * GRAD_DEPTH + 2 * pp;
                            row[cols..].fill(0);
                            if t >= m {
                                row.fill(0);
                                continue;
                            }
                            let r1 = (t + 1 < m).then(|| x[(t + 1) * k + j * NP..].as_ptr());
                            // SAFETY: AVX512-BF16 present; rows t (and t + 1) < m of x hold
                            // `cols` values from column 32 j.
                            unsafe {
                                avx512::pack_pair_rows(
                                    x[t * k + j * NP..].as_ptr(),
                                    r1,
                                    cols,
                                    &mut row[..cols],
                                )
                            };
                        }
                    });
            });
    }

    /// Columns `o0..o0 + 32` of `g` (`[m, n]`) for the tokens from `t0` as A for
    /// [`weight_grad`]: 32 rows of `a.len() / 32` words, each a column's token pairs
    /// `bf16(g[2p, o]) | bf16(g[2p + 1, o]) << 16`; zero past `m` and `n`. Sixteen tokens'
    /// pairs by sixteen columns at a time, turned into rows by a 16 x 16 register transpose.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 present; `g` holds `m * n` values; `a.len()` a multiple of
    /// 32 x 16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_gradient_columns(
        g: &[f32],
        (m, n): (usize, usize),
        (o0, t0): (usize, usize),
        a: &mut [u32],
    ) {
        let width = a.len() / BM;
        assert!(width.is_multiple_of(16), "bf16 weight gradient: A");
        for half in 0..2 {
            let o = o0 + 16 * half;
            let cols = n.saturating_sub(o).min(16);
            let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
            // Sixteen columns of token t, as bf16 in the low halves of sixteen words.
            let word = |t: usize| {
                if t >= m || cols == 0 {
                    return _mm512_setzero_si512();
                }
                // SAFETY: row t < m of g; the masked columns o.. lie below n; the transmute
                // reinterprets 256 bits.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(t * n + o));
                    let v = _mm512_cvtneps_pbh(v);
                    _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(v))
                }
            };
            for p0 in (0..width).step_by(16) {
                let mut w = [_mm512_setzero_ps(); 16];
                for (pp, v) in w.iter_mut().enumerate() {
                    let t = t0 + 2 * (p0 + pp);
                    let pair = _mm512_or_si512(word(t), _mm512_slli_epi32::<16>(word(t + 1)));
                    *v = _mm512_castsi512_ps(pair);
                }
                let rows = crate::kernels::cpu::avx512::transpose16(&w);
                for (r, row) in rows.iter().enumerate() {
                    let at = (16 * half + r) * width + p0;
                    // SAFETY: 16 words of row 16 half + r (a holds 32 rows of width).
                    unsafe { _mm512_storeu_ps(a.as_mut_ptr().add(at) as *mut f32, *row) };
                }
            }
        }
    }

    /// Multi-head attention with RoPE (see [`crate::kernels::cpu::attention_forward`]) with
    /// both products in bf16 on AMX tiles, summed in f32: the roped, scaled q against the roped
    /// k, then the f32 softmax's probabilities against v, each operand rounded to bf16 (as
    /// PyTorch's autocast computes them); tokens padded with zeros to a multiple of 32. With
    /// `keep`, also the f32 probabilities `[b, heads, t, t]` (else an empty vector).
    ///
    /// # Safety
    /// AMX usable in this process ([`super::amx`]) with AVX512-BF16; the head width `c /
    /// heads` a multiple of 32; the shape checked against `qkv`
    /// ([`crate::kernels::cpu::AttentionShape::check`]).
    pub(super) unsafe fn attention(
        qkv: &[f32],
        shape: &AttentionShape,
        keep: bool,
    ) -> AttentionKept {
        let AttentionShape {
            b, t, c, heads: h, ..
        } = *shape;
        let d = c / h;
        // SAFETY: the (image, head) tasks together write all of both below.
        let (mut out, mut probs): (Vec<f32>, Vec<f32>) = unsafe {
            (
                crate::kernels::unfilled(b * t * c),
                crate::kernels::unfilled(if keep { b * h * t * t } else { 0 }),
            )
        };
        let (dst, kept) = (SendPtr(out.as_mut_ptr()), SendPtr(probs.as_mut_ptr()));
        (0..b * h).into_par_iter().for_each_init(
            || HeadBuffers::new(t, d),
            |buf, bh| {
                let (bi, hi) = (bh / h, bh % h);
                shape.prepare(qkv, bi, hi, &mut buf.q, &mut buf.k);
                // SAFETY: AMX usable; the buffers are this task's and sized for (t, d).
                unsafe { buf.probabilities(t, d) };
                if keep {
                    // SAFETY: this task's own t * t probabilities of b * heads * t * t.
                    let own = unsafe {
                        std::slice::from_raw_parts_mut(kept.get().add(bh * t * t), t * t)
                    };
                    own.copy_from_slice(&buf.p);
                }
                let v = shape.v_start(qkv, bi, hi);
                // SAFETY: AVX512-BF16 and AMX usable; v holds t rows of d values at stride
                // 3c (the shape's check); the product writes this (image, head)'s own d
                // columns of its image's t rows of `out` (b * t * c values).
                unsafe {
                    let (tpairs, panels) = buf.operands(t, d);
                    pack_rows(
                        (buf.p.as_ptr(), t),
                        t,
                        t,
                        &mut buf.rows[..t.div_ceil(BM) * BM * tpairs],
                    );
                    pack_row_pair_panels((v, 3 * c), t, d, &mut buf.panels[..panels]);
                    let own = (dst.get().add(bi * t * c + hi * d), c);
                    with_tiles(|| {
                        product(
                            buf.rows.as_ptr(),
                            tpairs,
                            t,
                            buf.panels.as_ptr(),
                            d,
                            own,
                            &mut buf.ctile,
                        )
                    });
                }
            },
        );
        (out, probs)
    }

    /// The gradient of [`attention`] with respect to `qkv` (see
    /// [`crate::kernels::cpu::attention_backward`]), its four products in bf16 on AMX tiles
    /// summed in f32 (`dV = P^T dO`, `dP = dO V^T`, `dQ = dS K`, `dK = dS^T Q`), the softmax's
    /// backward in f32; the probabilities those kept by [`attention`], or made again as it
    /// makes them.
    ///
    /// # Safety
    /// As [`attention`]; `dy` `[b, t, c]` and the kept probabilities `[b, heads, t, t]`
    /// (checked by [`crate::kernels::cpu::AttentionShape::check_backward`]).
    pub(super) unsafe fn attention_backward(
        qkv: &[f32],
        dy: &[f32],
        shape: &AttentionShape,
        probs: Option<&[f32]>,
    ) -> Vec<f32> {
        let AttentionShape {
            b, t, c, heads: h, ..
        } = *shape;
        let d = c / h;
        // SAFETY: every (image, head) task writes its q, k and v columns of every token.
        let mut dqkv: Vec<f32> = unsafe { crate::kernels::unfilled(b * t * 3 * c) };
        let dst = SendPtr(dqkv.as_mut_ptr());
        (0..b * h).into_par_iter().for_each_init(
            || {
                (
                    HeadBuffers::new(t, d),
                    vec![0f32; t * t],
                    [vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]],
                )
            },
            |(buf, ds, [dq, dk, dv]), bh| {
                let (bi, hi) = (bh / h, bh % h);
                shape.prepare(qkv, bi, hi, &mut buf.q, &mut buf.k);
                match probs {
                    Some(kept) => buf.p.copy_from_slice(&kept[bh * t * t..(bh + 1) * t * t]),
                    // SAFETY: AMX usable; the buffers are this task's and sized for (t, d).
                    None => unsafe { buf.probabilities(t, d) },
                }
                let v = shape.v_start(qkv, bi, hi);
                let dout = dy[bi * t * c + hi * d..].as_ptr();
                let (tpairs, panels) = buf.operands(t, d);
                let (rows_t, rows_d) = (t.div_ceil(BM) * BM * tpairs, t.div_ceil(BM) * BM * d / 2);
                // SAFETY: AVX512-BF16 and AMX usable; dout and v hold t rows of d values at
                // strides c and 3c (the shape's check); every operand is packed whole into
                // this task's buffers before a product reads it, and every product writes
                // this task's own t x d or t x t buffer.
                unsafe {
                    let HeadBuffers {
                        q,
                        k,
                        p,
                        rows,
                        panels: b_buf,
                        ctile,
                    } = buf;
                    let (a, b) = (rows.as_mut_ptr(), b_buf.as_mut_ptr());
                    // Each operand packed whole, then read by its product, one at a time.
                    let a_rows = |len: usize| std::slice::from_raw_parts_mut(a, len);
                    let b_panels = || std::slice::from_raw_parts_mut(b, panels);
                    with_tiles(|| {
                        // dV = P^T dO.
                        pack_columns(p, t, a_rows(rows_t));
                        pack_row_pair_panels((dout, c), t, d, b_panels());
                        product(a, tpairs, t, b, d, (dv.as_mut_ptr(), d), ctile);
                        // dP = dO V^T, then dS in place.
                        pack_rows((dout, c), t, d, a_rows(rows_d));
                        pack_column_panels((v, 3 * c), t, d, b_panels());
                        product(a, d / 2, t, b, t, (ds.as_mut_ptr(), t), ctile);
                        crate::kernels::cpu::softmax_backward_rows(ds, p, t);
                        // dQ = dS K (q's scale and RoPE are undone by `write_gradients`).
                        pack_rows((ds.as_ptr(), t), t, t, a_rows(rows_t));
                        pack_row_pair_panels((k.as_ptr(), d), t, d, b_panels());
                        product(a, tpairs, t, b, d, (dq.as_mut_ptr(), d), ctile);
                        // dK = dS^T Q.
                        pack_columns(ds, t, a_rows(rows_t));
                        pack_row_pair_panels((q.as_ptr(), d), t, d, b_panels());
                        product(a, tpairs, t, b, d, (dk.as_mut_ptr(), d), ctile);
                    });
                    shape.write_gradients(dst.get(), (bi, hi), (dq, dk, dv));
                }
            },
        );
        dqkv
    }

    /// One (image, head) task's working memory for [`attention`] and
    /// [`attention_backward`]: q and k prepared, the probabilities, and room for any of the
    /// packed operands (tokens padded to whole blocks of 32).
    struct HeadBuffers {
        q: Vec<f32>,
        k: Vec<f32>,
        p: Vec<f32>,
        rows: Vec<u32>,
        panels: Vec<u32>,
        ctile: [f32; BM * NP],
    }

    impl HeadBuffers {
        fn new(t: usize, d: usize) -> Self {
            let tp = t.div_ceil(BM) * BM;
            HeadBuffers {
                q: vec![0f32; t * d],
                k: vec![0f32; t * d],
                p: vec![0f32; t * t],
                rows: vec![0u32; tp * tp.max(d) / 2],
                panels: vec![0u32; tp * d.div_ceil(NP) * NP / 2],
                ctile: [0f32; BM * NP],
            }
        }

        /// The depth in pairs of a product over the tokens, and the words of one set of
        /// panels (tokens by d, or d by tokens: the same count).
        fn operands(&self, t: usize, d: usize) -> (usize, usize) {
            let tp = t.div_ceil(BM) * BM;
            (tp / 2, tp * d / 2)
        }

        /// The probabilities `softmax(q k^T)` into `p` from the prepared q and k, the scores
        /// a bf16 product (see [`attention`]).
        ///
        /// # Safety
        /// AMX usable with AVX512-BF16; `d` a multiple of 32; the buffers from [`Self::new`]
        /// for (t, d).
        unsafe fn probabilities(&mut self, t: usize, d: usize) {
            let (_, panels) = self.operands(t, d);
            let rows_d = t.div_ceil(BM) * BM * d / 2;
            // SAFETY: the contract; q and k hold t rows of d values, the buffers their
            // packings, p the t x t scores.
            unsafe {
                pack_rows((self.q.as_ptr(), d), t, d, &mut self.rows[..rows_d]);
                pack_column_panels((self.k.as_ptr(), d), t, d, &mut self.panels[..panels]);
                let (a, b, c) = (
                    self.rows.as_ptr(),
                    self.panels.as_ptr(),
                    self.p.as_mut_ptr(),
                );
                let ctile = &mut self.ctile;
                with_tiles(|| product(a, d / 2, t, b, t, (c, t), ctile));
            }
            crate::kernels::cpu::simd::softmax_rows(&mut self.p, t, t);
        }
    }

    /// `rows` rows of `len` values (at `src`, row stride `rs`) as A rows of bf16 pairs, each
    /// `ceil(len / 2)` words padded with zeros to whole tile steps; the rows past `rows` (to
    /// the end of `out`) zero. Writes all of `out`.
    ///
    /// # Safety
    /// AVX512-BF16 present; `src` readable for `rows` rows of `len` values at stride `rs`.
    unsafe fn pack_rows((src, rs): (*const f32, usize), rows: usize, len: usize, out: &mut [u32]) {
        let pairs = len.div_ceil(2).div_ceil(K_STEP / 2) * (K_STEP / 2);
        for (r, dst) in out.chunks_exact_mut(pairs).enumerate() {
            if r < rows {
                // SAFETY: row r < rows of the source (the contract).
                unsafe { avx512::pack_row(std::slice::from_raw_parts(src.add(r * rs), len), dst) };
            } else {
                dst.fill(0);
            }
        }
    }

    /// `rows` rows of `cols` values (at `src`, row stride `rs`) as B panels whose steps are
    /// the rows: 32 columns a panel, each panel row the pair of source rows `(2p, 2p + 1)`;
    /// `out.len() / (32 * ceil(cols / 32))` pairs, zero past `rows`. Writes all of `out`.
    ///
    /// # Safety
    /// AVX512-BF16 present; `src` readable for `rows` rows of `cols` values at stride `rs`.
    unsafe fn pack_row_pair_panels(
        (src, rs): (*const f32, usize),
        rows: usize,
        cols: usize,
        out: &mut [u32],
    ) {
        let npanels = cols.div_ceil(NP);
        let pairs = out.len() / (npanels * NP);
        for (j, panel) in out.chunks_exact_mut(pairs * NP).enumerate() {
            let (c0, live) = (j * NP, NP.min(cols - j * NP));
            for (p, row) in panel.chunks_exact_mut(NP).enumerate() {
                row[live..].fill(0);
                if 2 * p >= rows {
                    row.fill(0);
                    continue;
                }
                // SAFETY: rows 2p (and 2p + 1) < rows of the source, `live` values from c0.
                unsafe {
                    let r1 = (2 * p + 1 < rows).then(|| src.add((2 * p + 1) * rs + c0));
                    avx512::pack_pair_rows(src.add(2 * p * rs + c0), r1, live, &mut row[..live]);
                }
            }
        }
    }

    /// `rows` rows of `len` values (at `src`, row stride `rs`) as B panels whose columns are
    /// the rows (as k for `q k^T`): 32 source rows a panel, each panel row a pair of values
    /// along the source rows; `out.len() / (len / 2 * 32)` panels, zero past `rows`. Writes
    /// all of `out`.
    ///
    /// # Safety
    /// AVX512-BF16 present; `len` even; `src` readable for `rows` rows of `len` values at
    /// stride `rs`.
    unsafe fn pack_column_panels(
        (src, rs): (*const f32, usize),
        rows: usize,
        len: usize,
        out: &mut [u32],
    ) {
        let pairs = len / 2;
        let mut words = [0u32; 512];
        for (j, panel) in out.chunks_exact_mut(pairs * NP).enumerate() {
            for l in 0..NP {
                let r = j * NP + l;
                let word = &mut words[..pairs];
                if r < rows {
                    // SAFETY: row r < rows of the source (the contract).
                    unsafe {
                        avx512::pack_row(std::slice::from_raw_parts(src.add(r * rs), len), word)
                    };
                } else {
                    word.fill(0);
                }
                for (p, &w) in word.iter().enumerate() {
                    panel[p * NP + l] = w;
                }
            }
        }
    }

    /// The columns of `src` (`t` x `t`) as A rows of pairs along its rows (the A of `P^T dO`
    /// and `dS^T Q`): blocks of 32 columns by [`pack_gradient_columns`], zero past `t`.
    /// Writes all of `out` (whole blocks of 32 rows).
    ///
    /// # Safety
    /// AVX512-BF16 present; `src` holds `t * t` values.
    unsafe fn pack_columns(src: &[f32], t: usize, out: &mut [u32]) {
        let width = out.len() / (t.div_ceil(BM) * BM);
        for (blk, a) in out.chunks_exact_mut(BM * width).enumerate() {
            // SAFETY: the contract.
            unsafe { pack_gradient_columns(src, (t, t), (blk * BM, 0), a) };
        }
    }

    /// Writes the first `rows` x `cols` of a 32 x 32 block, plus `bias` and the residual rows
    /// (at their own row stride), to `c` (at row stride `c_rs`).
    ///
    /// # Safety
    /// `c` (`residual`) writable (readable) for `rows` rows of `cols` values at its stride;
    /// `bias` holds `cols`; AVX-512 present.
    #[target_feature(enable = "avx512f")]
    unsafe fn epilogue(
        block: &[f32; BM * NP],
        (c, c_rs): (*mut f32, usize),
        rows: usize,
        cols: usize,
        bias: Option<*const f32>,
        residual: Option<(*const f32, usize)>,
    ) {
        // SAFETY: every access stays inside the ranges of the contract.
        unsafe {
            for r in 0..rows {
                for c0 in (0..cols).step_by(16) {
                    let live = (cols - c0).min(16);
                    let mask: __mmask16 = if live == 16 {
                        0xffff
                    } else {
                        (1u16 << live) - 1
                    };
                    let mut v = _mm512_loadu_ps(block.as_ptr().add(r * NP + c0));
                    if let Some(b) = bias {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, b.add(c0)));
                    }
                    if let Some((res, rs)) = residual {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res.add(r * rs + c0)));
                    }
                    _mm512_mask_storeu_ps(c.add(r * c_rs + c0), mask, v);
                }
            }
        }
    }
}

/// Packs one row of A (see `avx512::pack_row`).
type PackRow = unsafe fn(&[f32], &mut [u32]);
/// One register tile (see `avx512::tile`).
type Tile = unsafe fn(
    *const u32,
    usize,
    *const u32,
    *mut f32,
    usize,
    usize,
    usize,
    Option<*const f32>,
    Option<*const f32>,
);

/// The packed product: row blocks of A in parallel, each packed into bf16 pairs by
/// `pack_row`, times every panel of `w` in 8 x 32 tiles by `tile`.
///
/// # Safety
/// `pack_row` and `tile` must be callable on this CPU and keep their contracts; `x` is
/// `m x w.k`, `bias` `w.n`, `residual` `m x w.n`; `w` holds panels.
unsafe fn packed_linear(
    x: &[f32],
    m: usize,
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    pack_row: PackRow,
    tile: Tile,
) -> Vec<f32> {
    let (k, n) = (w.k, w.n);
    let pairs = k.div_ceil(2);
    let npanels = n.div_ceil(NP);
    assert_eq!(w.panels.len(), npanels * pairs * NP, "bf16 linear: panels");
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = SendPtr(y.as_mut_ptr());
    (0..m.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each_init(Vec::new, |abuf: &mut Vec<u32>, t| {
            let i0 = t * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(m - i0);
            let slivers = rows.div_ceil(MR);
            abuf.clear();
            abuf.resize(slivers * MR * pairs, 0);
            for (r, dst) in abuf.chunks_exact_mut(pairs).take(rows).enumerate() {
                // SAFETY: the caller's contract for pack_row.
                unsafe { pack_row(&x[(i0 + r) * k..(i0 + r + 1) * k], dst) };
            }
            for j in 0..npanels {
                let panel = w.panels[j * pairs * NP..(j + 1) * pairs * NP].as_ptr();
                let c0 = j * NP;
                let cols = NP.min(n - c0);
                for s in 0..slivers {
                    let r0 = i0 + s * MR;
                    let live = MR.min(m - r0);
                    // SAFETY: rows r0..r0 + live and columns c0..c0 + cols of the m x n
                    // output, written by this task only (its rows); the A sliver and the
                    // panel hold 8 * pairs and pairs * 32 words; bias and residual are n and
                    // m x n values (the caller's contract).
                    unsafe {
                        tile(
                            abuf[s * MR * pairs..].as_ptr(),
                            pairs,
                            panel,
                            out.get().add(r0 * n + c0),
                            n,
                            live,
                            cols,
                            bias.map(|b| b.as_ptr().add(c0)),
                            residual.map(|r| r.as_ptr().add(r0 * n + c0)),
                        )
                    };
                }
            }
        });
    // SAFETY: the tasks together wrote every row and column of the m x n output.
    unsafe { y.set_len(m * n) };
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention with bf16 products against its definition in f64 from the same bf16-rounded
    /// operands (q scaled then rounded, k, v, and the probabilities rounded after an f64
    /// softmax), on 2 images of 45 tokens (not a whole tile) and 2 heads of 64: within 5e-4
    /// (a probability's rounding can differ by one bf16 step where the f32 and f64 softmax
    /// straddle a rounding boundary; measured 1.2e-4). Skipped, with a message, without AMX.
    #[test]
    fn attention_matches_the_definition() {
        let (b, t, heads, d) = (2, 45, 2, 64);
        let c = heads * d;
        let qkv = data(b * t * 3 * c, 5);
        let shape = AttentionShape {
            b,
            t,
            c,
            heads,
            cos: &[],
            sin: &[],
            roped: false,
        };
        let Some(got) = attention(&qkv, &shape).unwrap() else {
            eprintln!("attention_matches_the_definition: no AMX here, skipped");
            return;
        };
        assert_eq!(got.len(), b * t * c);
        let scale = 1.0 / (d as f32).sqrt();
        let at = |bi: usize, ti: usize, part: usize, hi: usize, e: usize| {
            qkv[(bi * t + ti) * 3 * c + part * c + hi * d + e]
        };
        let (mut compared, mut worst) = (0, 0f64);
        for bi in 0..b {
            for hi in 0..heads {
                for i in 0..t {
                    let scores: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..d)
                                .map(|e| {
                                    round_bf16(at(bi, i, 0, hi, e) * scale) as f64
                                        * round_bf16(at(bi, j, 1, hi, e)) as f64
                                })
                                .sum()
                        })
                        .collect();
                    let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for col in 0..d {
                        let want: f64 = (0..t)
                            .map(|j| {
                                round_bf16((e[j] / sum) as f32) as f64
                                    * round_bf16(at(bi, j, 2, hi, col)) as f64
                            })
                            .sum();
                        let g = got[(bi * t + i) * c + hi * d + col] as f64;
                        worst = worst.max((g - want).abs());
                        assert!(
                            (g - want).abs() <= 5e-4,
                            "image {bi} head {hi} token {i} column {col}: {g} vs {want}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, b * t * c);
        eprintln!("attention_matches_the_definition: largest difference {worst:.2e}");
        let bad = AttentionShape { t: 44, ..shape };
        assert!(attention(&qkv, &bad).is_err());
    }

    /// Training attention in bf16 products against the f32 kernels on 2 images of 45 tokens
    /// (not a whole tile), 2 heads of 64 and RoPE: the kept probabilities within 1e-2 of
    /// f32's (bf16 scores), the output and the gradient with respect to qkv within 2e-2 of
    /// their largest values (bf16 operands: 2^-9 relative each); the backward from kept
    /// probabilities and from probabilities made again bit for bit the same. Skipped, with a
    /// message, without AMX.
    #[test]
    fn training_attention_agrees_with_f32() {
        let (b, t, heads, d) = (2, 45, 2, 64);
        let c = heads * d;
        let (qkv, dy) = (data(b * t * 3 * c, 11), data(b * t * c, 12));
        let angles: Vec<f32> = (0..(t - 1) * d).map(|i| i as f32 * 0.37).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
        let shape = AttentionShape {
            b,
            t,
            c,
            heads,
            cos: &cos,
            sin: &sin,
            roped: false,
        };
        let Some((out, probs)) = attention_keeping(&qkv, &shape, true).unwrap() else {
            eprintln!("training_attention_agrees_with_f32: no AMX here, skipped");
            return;
        };
        let (out32, probs32) =
            crate::kernels::cpu::attention_forward_keeping(&qkv, &shape, true).unwrap();
        let kept = attention_backward(&qkv, &dy, &shape, Some(&probs))
            .unwrap()
            .unwrap();
        let again = attention_backward(&qkv, &dy, &shape, None)
            .unwrap()
            .unwrap();
        let grad32 = crate::kernels::cpu::attention_backward(&qkv, &dy, &shape, None).unwrap();
        assert_eq!(kept, again, "kept and recomputed probabilities");
        let relative = |got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len());
            let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            got.iter()
                .zip(want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
                / top
        };
        let (p, o, g) = (
            relative(&probs, &probs32),
            relative(&out, &out32),
            relative(&kept, &grad32),
        );
        eprintln!(
            "training attention in bf16: probabilities {p:.2e}, output {o:.2e}, gradient {g:.2e}"
        );
        assert_eq!(
            (probs.len(), out.len(), kept.len()),
            (b * heads * t * t, b * t * c, b * t * 3 * c)
        );
        assert!(p <= 1e-2 && o <= 2e-2 && g <= 2e-2, "{p} {o} {g}");
        assert!(attention_backward(&qkv, &dy[1..], &shape, None).is_err());
    }

    /// SwiGLU after the product (fused per block of rows on AMX, after the whole product
    /// elsewhere) against SwiGLU of the definition, on row counts across task and block edges:
    /// within f32 summation error (scaled by the gate's slope, at most 1.1).
    #[test]
    fn swiglu_after_the_product_matches_the_definition() {
        let (k, n) = (64, 2 * 40);
        let mut compared = 0;
        for m in [1, 33, 200] {
            let (x, wt, b) = (data(m * k, 6), data(k * n, 7), data(n, 8));
            let want = definition(&x, &wt, k, n, &b, &vec![0.0; m * n]);
            let w = Bf16Weight::new(&wt, k, n);
            let got = linear_swiglu(&x, &w, Some(&b)).unwrap();
            assert_eq!(got.len(), m * n / 2);
            let h = n / 2;
            for (i, g) in got.iter().enumerate() {
                let (r, j) = (i / h, i % h);
                let (a, v) = (want[r * n + j] as f64, want[r * n + h + j] as f64);
                let e = a / (1.0 + (-a).exp()) * v;
                let tol = 1.1 * 1e-5 * (k as f64).sqrt() * (1.0 + v.abs() + a.abs());
                assert!((*g as f64 - e).abs() <= tol, "{m} rows [{i}]: {g} vs {e}");
                compared += 1;
            }
        }
        assert_eq!(compared, (1 + 33 + 200) * n / 2);
        let odd = Bf16Weight::new(&data(k * 3, 7), k, 3);
        assert!(linear_swiglu(&data(k, 6), &odd, None).is_err());
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
    }

    /// `avx512::pack_row` in scalar code: word `p` is `bf16(x[2p]) | bf16(x[2p + 1]) << 16`
    /// (zero past the end).
    unsafe fn pack_row_scalar(x: &[f32], out: &mut [u32]) {
        for (p, o) in out.iter_mut().enumerate() {
            let lo = x.get(2 * p).map_or(0, |&v| bf16_bits(v) as u32);
            let hi = x.get(2 * p + 1).map_or(0, |&v| bf16_bits(v) as u32);
            *o = lo | (hi << 16);
        }
    }

    /// `avx512::tile` in scalar code: lane by lane what `vdpbf16ps` computes (the low
    /// halves' product plus the high halves', added to the f32 lane).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_scalar(
        a: *const u32,
        pairs: usize,
        panel: *const u32,
        c: *mut f32,
        n: usize,
        rows: usize,
        cols: usize,
        bias: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        let half = |w: u32, hi: bool| f32::from_bits(if hi { w & 0xffff_0000 } else { w << 16 });
        unsafe {
            for r in 0..rows {
                for l in 0..cols {
                    let mut acc = 0f32;
                    for p in 0..pairs {
                        let (av, bv) = (*a.add(r * pairs + p), *panel.add(p * NP + l));
                        acc += half(av, false) * half(bv, false) + half(av, true) * half(bv, true);
                    }
                    let b = bias.map_or(0.0, |b| *b.add(l));
                    let res = residual.map_or(0.0, |x| *x.add(r * n + l));
                    *c.add(r * n + l) = acc + b + res;
                }
            }
        }
    }

    /// The bf16 convolution against its definition in f64 on bf16-rounded input and weight
    /// (so every product is exact and only the f32 sums differ): 3x3 with padding at stride 1
    /// and 2, and 1x1, with depths that fill AMX tile steps (32 channels a tap) and that do
    /// not (5), over pixel blocks with a partial last one.
    #[test]
    fn convolution_matches_the_definition() {
        let mut compared = 0;
        for (i, &(b, cin, h, w, cout, k, stride, relu)) in [
            (2, 32, 23, 25, 40, 3, 1, true),
            (1, 5, 9, 7, 3, 3, 2, false),
            (1, 64, 30, 20, 33, 1, 1, false),
        ]
        .iter()
        .enumerate()
        {
            let s = super::super::conv::ConvShape::square((b, cin, h, w), cout, k, (stride, k / 2));
            let seed = 50 + 10 * i as u64;
            let x: Vec<f32> = data(b * cin * h * w, seed)
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            let wt: Vec<f32> = data(cout * cin * k * k, seed + 1)
                .iter()
                .map(|&v| round_bf16(v))
                .collect();
            let bias = data(cout, seed + 2);
            let y =
                conv_forward(&x, &conv_weight(&wt, cout, (k, k)), Some(&bias), relu, &s).unwrap();
            let (ho, wo) = s.out().unwrap();
            assert_eq!(y.len(), b * cout * ho * wo);
            for (at, got) in y.iter().enumerate() {
                let (bi, co, oy, ox) = (
                    at / (cout * ho * wo),
                    at / (ho * wo) % cout,
                    at / wo % ho,
                    at % wo,
                );
                let mut want = bias[co] as f64;
                for (ci, ky, kx) in (0..cin)
                    .flat_map(|ci| (0..k).flat_map(move |ky| (0..k).map(move |kx| (ci, ky, kx))))
                {
                    let iy = (oy * stride + ky) as isize - (k / 2) as isize;
                    let ix = (ox * stride + kx) as isize - (k / 2) as isize;
                    if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                        let xv = x[((bi * cin + ci) * h + iy as usize) * w + ix as usize];
                        want += xv as f64 * wt[((co * cin + ci) * k + ky) * k + kx] as f64;
                    }
                }
                if relu {
                    want = want.max(0.0);
                }
                assert!(
                    (*got as f64 - want).abs() < 1e-4,
                    "case {i} at {at}: {got} vs {want}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 2 * 40 * 23 * 25 + 3 * 5 * 4 + 33 * 30 * 20);
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..len).map(|_| r.unit() as f32 * 2.0 - 1.0).collect()
    }

    /// The definition in f64 from the bf16-rounded operands.
    fn definition(x: &[f32], wt: &[f32], k: usize, n: usize, b: &[f32], r: &[f32]) -> Vec<f32> {
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += round_bf16(x[i * k + p]) as f64 * round_bf16(wt[p * n + j]) as f64;
                }
                y[i * n + j] = (s + b[j] as f64 + r[i * n + j] as f64) as f32;
            }
        }
        y
    }

    /// Every way against the definition on shapes with every kind of edge (odd k, k not a
    /// multiple of 16, n not a multiple of 32 or 16, m not a multiple of 8, 32 or 64): within
    /// f32 summation error. The packed panels go through the scalar emulation of the tile on
    /// every CPU, through `vdpbf16ps` where the CPU has AVX512-BF16, and through AMX tiles
    /// (for k a multiple of 32) where it has those (each skipped, with a message, elsewhere).
    #[test]
    fn products_match_the_definition() {
        let shapes = [
            (1, 1, 1),
            (7, 33, 17),
            (9, 40, 31),
            (70, 385, 50),
            (130, 64, 100),
            (37, 96, 33),
            (200, 384, 64),
        ];
        // Rounded f32, the scalar emulation, AVX512-BF16, AMX.
        let mut checked = [0usize; 4];
        for &(m, k, n) in &shapes {
            let (x, wt) = (data(m * k, 1), data(k * n, 2));
            let (b, r) = (data(n, 3), data(m * n, 4));
            let want = definition(&x, &wt, k, n, &b, &r);
            for (way, count) in checked.iter_mut().enumerate() {
                let w = Bf16Weight::with_panels(&wt, k, n, way > 0);
                // SAFETY (every arm): the features each way needs are checked; shapes as above.
                let got = match way {
                    0 => linear(&x, &w, Some(&b), Some(&r)).unwrap(),
                    1 => unsafe {
                        packed_linear(&x, m, &w, Some(&b), Some(&r), pack_row_scalar, tile_scalar)
                    },
                    #[cfg(target_arch = "x86_64")]
                    2 if native() => unsafe { avx512::linear(&x, m, &w, Some(&b), Some(&r)) },
                    #[cfg(target_arch = "x86_64")]
                    3 if amx() && k % amx_tiles::K_STEP == 0 => unsafe {
                        amx_tiles::linear(&x, m, &w, Some(&b), Some(&r), false)
                    },
                    _ => continue,
                };
                assert_eq!(got.len(), want.len());
                let tol = 1e-5 * (k as f32).sqrt();
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{m}x{k}x{n} way {way} [{i}]: {g} vs {e}"
                    );
                }
                *count += 1;
            }
        }
        let n = shapes.len();
        assert_eq!(checked[..2], [n, n]);
        if native() {
            assert_eq!(checked[2], n);
        } else {
            eprintln!("products_match_the_definition: no AVX512-BF16 here, its tile skipped");
        }
        if amx() {
            assert_eq!(checked[3], 3, "the shapes with k a multiple of 32");
        } else {
            eprintln!("products_match_the_definition: no AMX here, its tiles skipped");
        }
        let w = Bf16Weight::with_panels(&data(6, 1), 3, 2, false);
        assert!(linear(&data(5, 1), &w, None, None).is_err());
        assert!(linear(&data(6, 1), &w, Some(&[0.0]), None).is_err());
    }

    /// The AVX-512 packings of a weight (from `W^T` and from `W` as stored) give the scalar
    /// packing's panels word for word, on shapes with odd k, k not a multiple of 32, and n
    /// not a multiple of 16 or 32. Skipped, with a message, without AVX512-BF16.
    #[test]
    fn weights_are_packed_as_the_scalar_packing() {
        if !native() {
            eprintln!("weights_are_packed_as_the_scalar_packing: no AVX512-BF16 here, skipped");
            return;
        }
        let shapes = [(1, 1), (3, 5), (33, 17), (64, 48), (100, 70), (384, 1152)];
        let mut words = 0;
        for &(k, n) in &shapes {
            let wt = data(k * n, 9);
            let w: Vec<f32> = (0..n * k).map(|i| wt[(i % k) * n + i / k]).collect();
            let scalar = Bf16Weight::packed(k, n, true, |r, c| wt[r * n + c]);
            let len = n.div_ceil(NP) * k.div_ceil(2) * NP;
            assert_eq!(scalar.panels.len(), len, "{k}x{n}");
            let rows = Bf16Weight::with_panels(&wt, k, n, true);
            let stored = Bf16Weight::from_stored(&w, n, k);
            assert_eq!(rows.panels.len(), len, "{k}x{n}");
            assert_eq!(stored.panels.len(), len, "{k}x{n}");
            for (i, want) in scalar.panels.iter().enumerate() {
                assert_eq!(rows.panels[i], *want, "{k}x{n} from W^T, word {i}");
                assert_eq!(stored.panels[i], *want, "{k}x{n} from W, word {i}");
            }
            words += len;
        }
        assert_eq!(
            words,
            32 + 2 * 32 + 17 * 32 + 2 * 32 * 32 + 3 * 50 * 32 + 36 * 192 * 32
        );
    }

    /// The probe of the two product rates measures plausible figures for one core (between
    /// 1 GFLOP/s and 10 TFLOP/s each), and AMX always counts as faster than f32.
    #[test]
    fn product_rates_are_measured() {
        let (f32_rate, bf16_rate) = measured_rates();
        if !native() {
            assert_eq!((f32_rate, bf16_rate), (0.0, 0.0));
            assert!(!faster_than_f32());
            return;
        }
        eprintln!("product rates: f32 {f32_rate:.0}, bf16 {bf16_rate:.0} GFLOP/s a core");
        for rate in [f32_rate, bf16_rate] {
            assert!((1.0..1e4).contains(&rate), "{rate}");
        }
        assert!(!amx() || faster_than_f32());
    }

    /// The weight gradient against its definition in f64 from the bf16-rounded operands, on
    /// shapes with every kind of edge (tokens not a whole tile step, several summation steps
    /// and a short last one, n not a multiple of 32 or 16, k not a multiple of 32 or 16):
    /// within f32 summation error. Skipped, with a message, without AMX; bad shapes are an
    /// error everywhere.
    #[test]
    fn weight_gradient_matches_the_definition() {
        assert!(weight_grad(&data(6, 1), &data(4, 2), 4, 3).is_err());
        assert!(weight_grad(&data(6, 1), &data(6, 2), 3, 4).is_err());
        if !native() {
            eprintln!("weight_gradient_matches_the_definition: no AVX512-BF16 here, skipped");
            return;
        }
        if !amx() {
            eprintln!("weight_gradient_matches_the_definition: no AMX here, its tiles skipped");
        }
        let shapes = [
            (1, 1, 1),
            (33, 40, 48),
            (77, 16, 20),
            (1100, 70, 96),
            (1576, 64, 32),
        ];
        let units: &[bool] = if amx() { &[true, false] } else { &[false] };
        let mut values = 0;
        for (&(m, n, k), &on_tiles) in shapes
            .iter()
            .flat_map(|s| units.iter().map(move |u| (s, u)))
        {
            let (x, g) = (data(m * k, 7), data(m * n, 8));
            // SAFETY: AVX512-BF16 present, AMX where asked for (both checked above).
            let got = unsafe { amx_tiles::weight_grad(&x, &g, (m, n, k), on_tiles) };
            assert_eq!(got.len(), n * k, "{m}x{n}x{k}");
            let tol = 1e-5 * (m as f32).sqrt();
            for o in 0..n {
                for i in 0..k {
                    let want: f64 = (0..m)
                        .map(|t| round_bf16(g[t * n + o]) as f64 * round_bf16(x[t * k + i]) as f64)
                        .sum();
                    let have = got[o * k + i];
                    assert!(
                        (have as f64 - want).abs() <= tol as f64,
                        "{m}x{n}x{k} [{o}, {i}] (AMX {on_tiles}): {have} vs {want}"
                    );
                    values += 1;
                }
            }
        }
        let per_unit = 1 + 40 * 48 + 16 * 20 + 70 * 96 + 64 * 32;
        assert_eq!(values, per_unit * units.len());
        assert!(
            weight_grad(&data(6, 1), &data(4, 1), 2, 3)
                .unwrap()
                .is_some()
        );
    }
}
