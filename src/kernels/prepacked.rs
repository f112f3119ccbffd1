//! f32 dense layers on AVX-512 CPUs from weights packed once, when the model is built, into
//! the layout of the `gemm` crate's AVX-512 micro-kernel (64 output features by the whole
//! depth), with the bias, the residual or SwiGLU applied to each 64 x 6 tile while it is in
//! L1.
//!
//! Called through the crate's general entry point, the same product packs the weight again on
//! every call (a strided copy that the profile of EVA-X-S put at about a tenth of the forward)
//! and needs the output filled with the bias first (one more pass over memory). The loop here
//! is the BLIS one on already-packed panels: each task takes a run of tokens (or, for few
//! tokens, a run of panels); for each block of panels that fits in L2, the tokens go by in
//! groups of six (their rows read in place from L1), each group against every panel of the
//! block.

use rayon::prelude::*;

use super::sgemm::SendPtr;

/// Output features of one panel (four AVX-512 vectors).
const MR: usize = 64;
/// Tokens of one micro-kernel call.
const NR: usize = 6;
/// Bytes of packed panels one block keeps in L2.
const BLOCK_BYTES: usize = 1 << 20;
/// Tasks per thread (every task of a run of tokens reads the whole weight once).
const TASKS_PER_THREAD: usize = 4;
/// Bytes of input rows up to which the tasks split the panels instead of the tokens: one
/// image's 197 tokens, whose weights were otherwise read once per task (EVA-X-S at batch 1:
/// 57 -> 48 ms a forward; at batch 16, in slices of eight images, no split and no change).
const SPLIT_PANELS_UP_TO: usize = 1 << 20;

/// Whether this CPU takes the prepacked path (AVX-512), unless `EVAX_GEMM=crate` asks for the
/// `gemm` crate's general entry point everywhere (to compare the two).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            super::dispatch::has_v4() && std::env::var("EVAX_GEMM").as_deref() != Ok("crate")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A dense layer's weight packed for [`linear`]: for each 64 output features (zeros past the
/// edge), for each of the `k` inputs, the 64 weights.
pub struct PackedWeight {
    k: usize,
    n: usize,
    /// The panels, from `start` (64-byte aligned).
    values: Vec<f32>,
    start: usize,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl PackedWeight {
    /// Packs `wt` (`W^T`, `[k, n]` row-major).
    pub fn new(wt: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(wt.len(), k * n, "packed weight: shape");
        // SAFETY: wt holds the n x k values of W at strides (1, n).
        unsafe { Self::from_strided(wt.as_ptr(), (1, n), n, k) }
    }

    /// `W^T` again (`[k, n]` row-major), as given to [`PackedWeight::new`].
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut wt = vec![0f32; k * n];
        for p in 0..n.div_ceil(MR) {
            let (f0, w) = (p * MR, MR.min(n - p * MR));
            let panel = &self.values[self.start + p * MR * k..self.start + (p + 1) * MR * k];
            for (kk, row) in panel.chunks_exact(MR).enumerate() {
                wt[kk * n + f0..kk * n + f0 + w].copy_from_slice(&row[..w]);
            }
        }
        wt
    }

    /// Packs `A` (`m x k`, `A[i, p]` at `a[i * a_rs + p * a_cs]`) as the weight of `m`
    /// outputs: a copy per panel row where A's columns are contiguous, else 64 x 64 blocks
    /// at a time (so a long `k` is read in order and the panels written in L1).
    ///
    /// # Safety
    /// `a` readable over those `m x k` values.
    unsafe fn from_strided(
        a: *const f32,
        (a_rs, a_cs): (usize, usize),
        m: usize,
        k: usize,
    ) -> Self {
        let panels = m.div_ceil(MR);
        let mut values = vec![0f32; panels * MR * k + 16];
        let start = values.as_ptr().align_offset(64).min(16);
        for pi in 0..panels {
            let panel = &mut values[start + pi * MR * k..start + (pi + 1) * MR * k];
            let (i0, lanes) = (pi * MR, MR.min(m - pi * MR));
            if a_rs == 1 {
                // A's columns contiguous (W^T given row-major): each panel row is one copy.
                for (p, row) in panel.chunks_exact_mut(MR).enumerate() {
                    // SAFETY: rows i0..i0 + lanes < m of column p < k (the caller's contract).
                    let src = unsafe { std::slice::from_raw_parts(a.add(i0 + p * a_cs), lanes) };
                    row[..lanes].copy_from_slice(src);
                }
                continue;
            }
            for p0 in (0..k).step_by(MR) {
                for lane in 0..lanes {
                    for p in p0..(p0 + MR).min(k) {
                        // SAFETY: i0 + lane < m and p < k (the caller's contract).
                        panel[p * MR + lane] = unsafe { *a.add((i0 + lane) * a_rs + p * a_cs) };
                    }
                }
            }
        }
        PackedWeight {
            k,
            n: m,
            values,
            start,
        }
    }

    /// Inputs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Panel `p`'s first value.
    fn panel(&self, p: usize) -> *const f32 {
        self.values[self.start + p * MR * self.k..].as_ptr()
    }
}

/// What follows the product on each tile.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    /// `y = x W^T + b (+ residual)`.
    Plain(Option<&'a [f32]>),
    /// `silu(y1) * y2` for `[y1 | y2] = x W^T + b`, the halves 64-aligned.
    Swiglu,
    /// Attention's `[q | k | v] = x W^T + b` with q and k rotated and q scaled.
    Rope(&'a QkvRope<'a>),
}

/// What the qkv layer's epilogue applies for attention ([`linear_qkv_roped`]): RoPE on q and k
/// of every token but the class token (none with empty tables), and q's scale `1 / sqrt(64)`.
pub struct QkvRope<'a> {
    /// Tokens per image (token 0 of each is the class token).
    pub t: usize,
    /// Heads (of 64 each).
    pub heads: usize,
    /// RoPE cosines, `[(t - 1), 64]`.
    pub cos: &'a [f32],
    /// RoPE sines, as `cos`.
    pub sin: &'a [f32],
}

/// An error unless `x` is whole rows of `k`, the bias `n` wide and the residual `m x n` (the
/// checks [`linear`] and [`linear_swiglu`] assert), so a misshapen input is reported, not a
/// panic.
pub fn check(
    x: &[f32],
    w: &PackedWeight,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<(), String> {
    let (k, n) = (w.k, w.n);
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(format!(
            "linear: input of {} values is not rows of {k}",
            x.len()
        ));
    }
    if bias.is_some_and(|b| b.len() != n) || residual.is_some_and(|r| r.len() != x.len() / k * n) {
        return Err(format!("linear: bias or residual does not fit {n} outputs"));
    }
    Ok(())
}

/// `x W^T + b (+ residual)` for `x` `[m, k]` row-major, `b` `[n]`, residual `[m, n]`.
///
/// # Panics
/// If the shapes do not fit, or without AVX-512 ([`available`]).
pub fn linear(
    x: &[f32],
    w: &PackedWeight,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    run(x, w, bias, Epilogue::Plain(residual))
}

/// `silu(y1) * y2` for `[y1 | y2] = x W^T + b` (`n / 2` wide), fused when each half is a
/// whole number of panels, else as the product then [`super::cpu::swiglu_forward`].
///
/// # Panics
/// As [`linear`], and if `n` is odd.
pub fn linear_swiglu(x: &[f32], w: &PackedWeight, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(w.n.is_multiple_of(2), "swiglu: odd width {}", w.n);
    if (w.n / 2).is_multiple_of(MR) {
        run(x, w, bias, Epilogue::Swiglu)
    } else {
        super::cpu::swiglu_forward(&run(x, w, bias, Epilogue::Plain(None)), w.n / 2)
    }
}

/// Attention's `[q | k | v] = x W^T + b` for heads of 64 (`n = 3 * 64 * heads`) with RoPE and
/// q's scale applied as each tile is made, exactly as [`super::cpu::attention_forward`] would
/// apply them to the plain product (same operations, same order).
///
/// # Panics
/// As [`linear`], and if `n` is not `3 * 64 * heads`, the rows not whole images of `t` tokens
/// or the tables not `(t - 1) x 64` (or empty).
pub fn linear_qkv_roped(
    x: &[f32],
    w: &PackedWeight,
    bias: Option<&[f32]>,
    rope: &QkvRope,
) -> Vec<f32> {
    assert_eq!(w.n, 3 * MR * rope.heads, "qkv: width for heads of 64");
    assert!(
        rope.t > 0 && (x.len() / w.k.max(1)).is_multiple_of(rope.t),
        "qkv: whole images"
    );
    let table = (rope.t - 1) * MR;
    assert!(
        (rope.cos.len() == table && rope.sin.len() == table)
            || (rope.cos.is_empty() && rope.sin.is_empty()),
        "qkv: RoPE tables"
    );
    run(x, w, bias, Epilogue::Rope(rope))
}

/// The micro-kernel for 64 features by `cols` (1 to 6) tokens.
fn kernel(cols: usize) -> gemm_common::microkernel::MicroKernelFn<f32> {
    narrow_kernel(MR, cols)
}

/// The micro-kernel for the first `rows` (1 to 64, rounded up to vectors of 16) features of a
/// panel by `cols` (1 to 6) tokens.
#[cfg(target_arch = "x86_64")]
fn narrow_kernel(rows: usize, cols: usize) -> gemm_common::microkernel::MicroKernelFn<f32> {
    gemm_f32::microkernel::avx512f::f32::UKR[rows.div_ceil(16) - 1][cols - 1]
}

/// No micro-kernel off x86-64 ([`available`] is false there).
#[cfg(not(target_arch = "x86_64"))]
fn narrow_kernel(_rows: usize, _cols: usize) -> gemm_common::microkernel::MicroKernelFn<f32> {
    unreachable!("prepacked linear: x86-64 only")
}

fn run(x: &[f32], w: &PackedWeight, bias: Option<&[f32]>, epilogue: Epilogue) -> Vec<f32> {
    assert!(available(), "prepacked linear: needs AVX-512");
    let (k, n) = (w.k, w.n);
    assert!(k > 0 && x.len().is_multiple_of(k), "linear: input width");
    let m = x.len() / k;
    let width = match epilogue {
        Epilogue::Plain(_) | Epilogue::Rope(_) => n,
        Epilogue::Swiglu => n / 2,
    };
    assert!(bias.is_none_or(|b| b.len() == n), "linear: bias width");
    if let Epilogue::Plain(Some(r)) = epilogue {
        assert_eq!(r.len(), m * n, "linear: residual shape");
    }
    let mut y: Vec<f32> = Vec::with_capacity(m * width);
    if m == 0 {
        return y;
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0f32; n];
            &zeros
        }
    };
    // Panels of one step: one, or a pair (the two halves' panels at the same offset).
    let (steps, per_step) = match epilogue {
        Epilogue::Plain(_) | Epilogue::Rope(_) => (n.div_ceil(MR), 1),
        Epilogue::Swiglu => (n / 2 / MR, 2),
    };
    let block = (BLOCK_BYTES / (per_step * MR * k * 4)).max(1);
    let threads = rayon::current_num_threads();
    // Few tokens (their rows fit in L2): the tasks split the panels, each reading every row,
    // rather than the rows, each reading every panel.
    let parts = if m * k * 4 <= SPLIT_PANELS_UP_TO {
        (threads * TASKS_PER_THREAD).min(steps)
    } else {
        1
    };
    let tasks = (threads * TASKS_PER_THREAD / parts)
        .max(1)
        .min(m.div_ceil(NR));
    let rows_per_task = m.div_ceil(tasks).next_multiple_of(NR);
    let per_part = steps.div_ceil(parts);
    let out = SendPtr(y.as_mut_ptr());
    (0..m.div_ceil(rows_per_task) * parts)
        .into_par_iter()
        .for_each(|t| {
            let (t, part) = (t / parts, t % parts);
            let (sa, sb) = (part * per_part, ((part + 1) * per_part).min(steps));
            let (r0, r1) = (t * rows_per_task, ((t + 1) * rows_per_task).min(m));
            // One group's tiles: 6 rows of 64 (or of 64 + 64 for the pair of a SwiGLU step).
            let mut tile = [0f32; NR * 2 * MR + 16];
            let off = tile.as_ptr().align_offset(64).min(16);
            let tile = &mut tile[off..off + NR * 2 * MR];
            let tile_cs = per_step * MR;
            for s0 in (sa..sb).step_by(block) {
                for g in (r0..r1).step_by(NR) {
                    let cols = NR.min(r1 - g);
                    let ukr = kernel(cols);
                    for s in s0..(s0 + block).min(sb) {
                        // The residual tile this step's epilogue will read, fetched while the
                        // kernel runs (six rows 64 wide: strided, missed by the prefetchers).
                        #[cfg(target_arch = "x86_64")]
                        if let Epilogue::Plain(Some(r)) = epilogue {
                            let f0 = s * MR;
                            for j in 0..cols {
                                let at = r[(g + j) * n + f0..].as_ptr();
                                for line in 0..MR.min(n - f0).div_ceil(16) {
                                    // SAFETY: a prefetch of an address inside `r`.
                                    unsafe {
                                        std::arch::x86_64::_mm_prefetch::<
                                            { std::arch::x86_64::_MM_HINT_T0 },
                                        >(
                                            at.add(line * 16) as *const i8
                                        )
                                    };
                                }
                            }
                        }
                        for half in 0..per_step {
                            let p = s + half * steps;
                            // SAFETY: AVX-512 present (asserted); panel p holds 64 x k values, the
                            // x rows g..g + cols hold k values each, and the tile has room for
                            // `cols` columns of 64 at stride `tile_cs` from `half * 64`.
                            unsafe {
                                ukr(
                                    MR,
                                    cols,
                                    k,
                                    tile.as_mut_ptr().add(half * MR),
                                    w.panel(p),
                                    x.as_ptr().add(g * k),
                                    tile_cs as isize,
                                    1,
                                    MR as isize,
                                    1,
                                    k as isize,
                                    0.0,
                                    1.0,
                                    0,
                                    false,
                                    false,
                                    false,
                                    w.panel(p),
                                );
                            }
                        }
                        let f0 = s * MR;
                        for j in 0..cols {
                            let row = g + j;
                            let src = &mut tile[j * tile_cs..(j + 1) * tile_cs];
                            match epilogue {
                                Epilogue::Plain(residual) => {
                                    let wd = MR.min(n - f0);
                                    // SAFETY: row `row` of the output belongs to this task and
                                    // columns f0..f0 + wd lie inside it.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            out.get().add(row * n + f0),
                                            wd,
                                        )
                                    };
                                    let b = &bias[f0..f0 + wd];
                                    match residual {
                                        Some(r) => super::cpu::simd::add2_into(
                                            &src[..wd],
                                            b,
                                            &r[row * n + f0..row * n + f0 + wd],
                                            dst,
                                        ),
                                        None => super::cpu::simd::add_into(&src[..wd], b, dst),
                                    }
                                }
                                Epilogue::Rope(rope) => {
                                    super::cpu::simd::add_in_place(src, &bias[f0..f0 + MR]);
                                    // SAFETY: as above (all panels whole: n = 3 * 64 * heads).
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            out.get().add(row * n + f0),
                                            MR,
                                        )
                                    };
                                    let (head, token) = (s, row % rope.t);
                                    let scale = if head < rope.heads { 0.125 } else { 1.0 };
                                    if head >= 2 * rope.heads {
                                        dst.copy_from_slice(src);
                                    } else if token == 0 || rope.cos.is_empty() {
                                        dst.iter_mut()
                                            .zip(&*src)
                                            .for_each(|(o, &v)| *o = v * scale);
                                    } else {
                                        let at = (token - 1) * MR..token * MR;
                                        super::cpu::simd::rope_scale(
                                            src,
                                            &rope.cos[at.clone()],
                                            &rope.sin[at],
                                            scale,
                                            dst,
                                        );
                                    }
                                }
                                Epilogue::Swiglu => {
                                    let h = n / 2;
                                    let (a, g2) = src.split_at_mut(MR);
                                    super::cpu::simd::add_in_place(a, &bias[f0..f0 + MR]);
                                    super::cpu::simd::add_in_place(g2, &bias[h + f0..h + f0 + MR]);
                                    // SAFETY: as above, for the n / 2 wide output.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            out.get().add(row * h + f0),
                                            MR,
                                        )
                                    };
                                    super::cpu::simd::swiglu_rows(src, dst, MR);
                                }
                            }
                        }
                    }
                }
            }
        });
    // SAFETY: the tasks together wrote every row and column of the m x width output.
    unsafe { y.set_len(m * width) };
    y
}

/// Attention scores of one head on the micro-kernel: `s[i, j] = q[i] . k[j]` for `q` and `k`
/// given as `t` rows of `d` values at their row strides, into rows of `s` `ts` apart (`ts` a
/// multiple of 64, at least `t`; the columns from `t` are left as they were). `kp` is scratch
/// for k packed in panels of 64 keys. After each group of (up to) six rows, `each_group` gets
/// the first row's index and the group's rows (`ts` apart), still in L1.
///
/// # Panics
/// If the shapes do not fit, or without AVX-512 ([`available`]).
pub fn scores(
    (q, q_rs): (&[f32], usize),
    (k, k_rs): (&[f32], usize),
    (t, d): (usize, usize),
    (s, ts): (&mut [f32], usize),
    kp: &mut Vec<f32>,
    mut each_group: impl FnMut(usize, &mut [f32]),
) {
    assert!(available(), "prepacked scores: needs AVX-512");
    let rows = |v: &[f32], rs: usize| rs >= d && v.len() >= (t - 1) * rs + d;
    assert!(
        t > 0 && d > 0 && rows(q, q_rs) && rows(k, k_rs),
        "scores: q, k shapes"
    );
    assert!(
        ts >= t && ts.is_multiple_of(MR) && s.len() >= (t - 1) * ts + ts,
        "scores: rows"
    );
    let panels = t.div_ceil(MR);
    // Not cleared: every value the products read is written below (lanes past the last key
    // hold what an earlier call left, finite, and their scores are not stored).
    kp.resize(panels * d * MR, 0.0);
    pack_keys((k, k_rs), (t, d), kp);
    for i0 in (0..t).step_by(NR) {
        let cols = NR.min(t - i0);
        for p in 0..panels {
            // The last panel's real keys only (whole vectors of 16 computed, `keys` stored).
            let keys = MR.min(t - p * MR);
            // SAFETY: AVX-512 present (asserted); panel p of kp holds d x 64 values, q rows
            // i0..i0 + cols hold d values each, and s rows i0..i0 + cols hold columns
            // 64p..64p + 64 (ts >= 64(p + 1)).
            unsafe {
                narrow_kernel(keys, cols)(
                    keys,
                    cols,
                    d,
                    s.as_mut_ptr().add(i0 * ts + p * MR),
                    kp.as_ptr().add(p * d * MR),
                    q.as_ptr().add(i0 * q_rs),
                    ts as isize,
                    1,
                    MR as isize,
                    1,
                    q_rs as isize,
                    0.0,
                    1.0,
                    0,
                    false,
                    false,
                    false,
                    kp.as_ptr(),
                );
            }
        }
        each_group(i0, &mut s[i0 * ts..(i0 + cols) * ts]);
    }
}

/// `t` keys of `d` values (`k_rs` apart) into panels of 64 keys: for each panel, for each of
/// the `d` values, the 64 keys' (lanes past the last key of the last panel as they were).
fn pack_keys((k, k_rs): (&[f32], usize), (t, d): (usize, usize), kp: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && super::dispatch::has_v4() {
        // SAFETY: AVX-512 present (checked); k holds t rows of d values at stride k_rs (the
        // caller's check) and kp the t.div_ceil(64) panels of d x 64.
        return unsafe { pack_keys_avx512((k, k_rs), (t, d), kp) };
    }
    for (p, panel) in kp.chunks_exact_mut(d * MR).take(t.div_ceil(MR)).enumerate() {
        let keys = MR.min(t - p * MR);
        for (dd, row) in panel.chunks_exact_mut(MR).enumerate() {
            for (jj, v) in row[..keys].iter_mut().enumerate() {
                *v = k[(p * MR + jj) * k_rs + dd];
            }
        }
    }
}

/// [`pack_keys`] sixteen keys by sixteen values at a time, each block transposed in registers
/// (lanes of a block past the last key are zero).
///
/// # Safety
/// AVX-512F present; `d` a multiple of 16; `k` holds `t` rows of `d` values `k_rs` apart and
/// `kp` at least `t.div_ceil(64) * d * 64` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_keys_avx512((k, k_rs): (&[f32], usize), (t, d): (usize, usize), kp: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(t == 0 || k.len() >= (t - 1) * k_rs + d, "pack keys: k");
    assert!(kp.len() >= t.div_ceil(MR) * d * MR, "pack keys: panels");
    for key0 in (0..t).step_by(16) {
        let rows = 16.min(t - key0);
        // Where the block's first key goes: its panel, then its lane in each row of 64.
        let at = key0 / MR * d * MR + key0 % MR;
        for d0 in (0..d).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, v) in r.iter_mut().enumerate().take(rows) {
                // SAFETY: key key0 + i < t, values d0..d0 + 16 <= d (asserted above).
                *v = unsafe { _mm512_loadu_ps(k.as_ptr().add((key0 + i) * k_rs + d0)) };
            }
            for (dd, col) in super::cpu::avx512::transpose16(&r).into_iter().enumerate() {
                // SAFETY: row d0 + dd < d of the block's panel, lanes key0 % 64.. + 16 <= 64.
                unsafe { _mm512_storeu_ps(kp.as_mut_ptr().add(at + (d0 + dd) * MR), col) };
            }
        }
    }
}

/// Columns of C one task of [`product_made_b`] computes (32 groups of six).
const MADE_NB: usize = 192;
/// Rows of B made at a time in [`product_made_b`] (with `MADE_NB` columns, 192 KiB).
const MADE_KC: usize = 256;

thread_local! {
    /// Each thread's block of B and block of C for [`product_made_b`].
    static MADE_BUFS: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `C (+)= A B` for `A` `m x k` (`A[i, p]` at `a[i * a_rs + p * a_cs]`), `B` `k x n` made on the
/// way by `row(p, j0, out)` (which writes `B[p, j0..j0 + out.len()]`: an im2col matrix, or
/// activations through BatchNorm + ReLU), and `C` `m x n` at row stride `c_rs`: a convolution
/// as a product, without ever making B whole. A is packed once into the micro-kernel's
/// panels; each task makes B a block of 192 columns by 256 rows at a time (row by row, read
/// in place by the kernel: packing it into slivers of six columns measured slower), sums its
/// columns of C in a buffer of its own, then adds them in.
///
/// # Safety
/// `a` readable over `m x k` at its strides and `c` writable over `m` rows of `n` values at
/// stride `c_rs`, neither overlapping what `row` reads; AVX-512 present ([`available`]).
pub unsafe fn product_made_b(
    (m, n, k): (usize, usize, usize),
    (c, c_rs): (*mut f32, usize),
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    row: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract for A.
    let w = unsafe { PackedWeight::from_strided(a, (a_rs, a_cs), m, k) };
    let panels = m.div_ceil(MR);
    let mp = panels * MR;
    let blocks = n.div_ceil(MADE_NB);
    // Few column blocks (a small feature map): the panels split between tasks as well.
    let splits = (2 * threads).div_ceil(blocks).clamp(1, panels);
    let per_split = panels.div_ceil(splits);
    let out = SendPtr(c);
    let task = |t: usize| {
        let (bi, si) = (t / splits, t % splits);
        let (j0, nb) = (bi * MADE_NB, MADE_NB.min(n - bi * MADE_NB));
        let ps = (si * per_split).min(panels)..((si + 1) * per_split).min(panels);
        if ps.is_empty() {
            return;
        }
        let (mut bb, mut cb) = MADE_BUFS.take();
        bb.resize(MADE_KC * MADE_NB, 0.0);
        cb.resize(MADE_NB * mp, 0.0);
        for p0 in (0..k).step_by(MADE_KC) {
            let kc = MADE_KC.min(k - p0);
            for p in 0..kc {
                row(p0 + p, j0, &mut bb[p * nb..(p + 1) * nb]);
            }
            for g in (0..nb).step_by(NR) {
                let cols = NR.min(nb - g);
                for pi in ps.clone() {
                    let rows = MR.min(m - pi * MR);
                    let first = p0 == 0;
                    // SAFETY: AVX-512 present (the caller's contract); rows p0..p0 + kc of
                    // panel pi hold 64 values each; B's block holds kc rows of nb values
                    // (columns g..g + cols read); C's block holds nb columns of mp values
                    // (rows 64 pi.. of columns g..g + cols written).
                    unsafe {
                        narrow_kernel(rows, cols)(
                            rows,
                            cols,
                            kc,
                            cb.as_mut_ptr().add(g * mp + pi * MR),
                            w.panel(pi).add(p0 * MR),
                            bb.as_ptr().add(g),
                            mp as isize,
                            1,
                            MR as isize,
                            nb as isize,
                            1,
                            if first { 0.0 } else { 1.0 },
                            1.0,
                            if first { 0 } else { 1 },
                            false,
                            false,
                            false,
                            w.panel(pi),
                        );
                    }
                }
            }
        }
        for i in ps.start * MR..(ps.end * MR).min(m) {
            // SAFETY: row i < m of C holds n >= j0 + nb values at stride c_rs; this task
            // alone writes its columns j0..j0 + nb of rows in its panels.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(i * c_rs + j0), nb) };
            for (j, d) in dst.iter_mut().enumerate() {
                let v = cb[j * mp + i];
                *d = if accumulate { *d + v } else { v };
            }
        }
        MADE_BUFS.set((bb, cb));
    };
    if threads > 1 {
        (0..blocks * splits).into_par_iter().for_each(task);
    } else {
        (0..blocks * splits).for_each(task);
    }
}

/// Rows of one head's output on the micro-kernel: `out[i] = sum_j p[i, j] v[j]` for the
/// `rows` rows of probabilities `p` (`ts` apart, over `t` keys) and `v` `t` rows of 64 values
/// `v_rs` apart, into `rows` rows of 64 values `out_rs` apart.
///
/// # Safety
/// `v` readable over `t` rows and `out` writable over `rows` rows; `p` holds `rows` rows of
/// at least `t` values at stride `ts`; AVX-512 present ([`available`]).
pub unsafe fn weighted_values(
    p: &[f32],
    (rows, t, ts): (usize, usize, usize),
    (v, v_rs): (*const f32, usize),
    (out, out_rs): (*mut f32, usize),
) {
    for i0 in (0..rows).step_by(NR) {
        let cols = NR.min(rows - i0);
        // SAFETY: the caller's contract: v is t x 64 (lhs, stride v_rs), p rows i0.. hold t
        // values (rhs, column stride ts), out rows i0..i0 + cols take 64 values.
        unsafe {
            kernel(cols)(
                MR,
                cols,
                t,
                out.add(i0 * out_rs),
                v,
                p.as_ptr().add(i0 * ts),
                out_rs as isize,
                1,
                v_rs as isize,
                1,
                ts as isize,
                0.0,
                1.0,
                0,
                false,
                false,
                false,
                v,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.unit() as f32 * 2.0 - 1.0).collect()
    }

    /// `x W^T + b (+ r)` in f64, from `W^T` `[k, n]`.
    fn definition(x: &[f32], wt: &[f32], b: &[f32], r: Option<&[f32]>, k: usize) -> Vec<f64> {
        let n = b.len();
        let m = x.len() / k;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b[j] as f64 + r.map_or(0.0, |r| r[i * n + j] as f64);
                for p in 0..k {
                    s += x[i * k + p] as f64 * wt[p * n + j] as f64;
                }
                y[i * n + j] = s;
            }
        }
        y
    }

    #[test]
    fn unpacking_gives_the_weight_back() {
        let mut compared = 0;
        for &(k, n) in &[(3, 14), (384, 64), (40, 130)] {
            let wt = data(k * n, 5);
            let back = PackedWeight::new(&wt, k, n).unpack();
            assert_eq!(back.len(), wt.len());
            assert!(
                back.iter()
                    .zip(&wt)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            compared += back.len();
        }
        assert_eq!(compared, 3 * 14 + 384 * 64 + 40 * 130);
    }

    #[test]
    fn products_with_b_made_on_the_way_match_the_definition() {
        if !available() {
            eprintln!("SKIPPED prepacked made-B products: this CPU has no AVX-512");
            return;
        }
        let mut compared = 0;
        // Edges of panels (70 = 64 + 6), column blocks (200 = 192 + 8), depth blocks
        // (300 = 256 + 44); tiny; few columns (the panels split between tasks).
        for &(m, n, k) in &[(70, 200, 300), (5, 13, 7), (300, 10, 40)] {
            let (a, b, c0) = (data(m * k, 12), data(k * n, 13), data(m * n, 14));
            let row = |p: usize, j0: usize, out: &mut [f32]| {
                out.copy_from_slice(&b[p * n + j0..p * n + j0 + out.len()])
            };
            // A row-major, then A given transposed (column-major); C with a wider row stride.
            for (transposed, accumulate, threads) in [(false, false, 2), (true, true, 1)] {
                let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
                let (ap, strides) = if transposed {
                    (&at, (1, m))
                } else {
                    (&a, (k, 1))
                };
                let c_rs = n + 3;
                let mut c = vec![f32::NAN; m * c_rs];
                for i in 0..m {
                    c[i * c_rs..i * c_rs + n].copy_from_slice(&c0[i * n..(i + 1) * n]);
                }
                // SAFETY: A holds m x k at those strides, C m rows of c_rs >= n; AVX-512.
                unsafe {
                    product_made_b(
                        (m, n, k),
                        (c.as_mut_ptr(), c_rs),
                        accumulate,
                        (ap.as_ptr(), strides.0, strides.1),
                        &row,
                        threads,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 = (0..k)
                            .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                            .sum();
                        if accumulate {
                            want += c0[i * n + j] as f64;
                        }
                        let got = c[i * c_rs + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                            "{m}x{n}x{k} ({i}, {j}): {got} against {want}"
                        );
                        compared += 1;
                    }
                    assert!(c[i * c_rs + n..(i + 1) * c_rs].iter().all(|v| v.is_nan()));
                }
            }
        }
        assert_eq!(compared, 2 * (70 * 200 + 5 * 13 + 300 * 10));
    }

    #[test]
    fn products_match_the_definition() {
        if !available() {
            eprintln!("SKIPPED prepacked products: this CPU has no AVX-512");
            return;
        }
        let mut compared = 0;
        // Shapes across panel, group, block and task edges (n = 14: a classifier head).
        for &(m, k, n) in &[
            (1, 3, 14),
            (7, 384, 64),
            (13, 40, 130),
            (200, 1024, 384),
            (37, 5, 640),
        ] {
            let (x, wt, b, r) = (data(m * k, 1), data(k * n, 2), data(n, 3), data(m * n, 4));
            let w = PackedWeight::new(&wt, k, n);
            for residual in [None, Some(&r[..])] {
                let got = linear(&x, &w, Some(&b), residual);
                let want = definition(&x, &wt, &b, residual, k);
                assert_eq!(got.len(), want.len());
                for (g, e) in got.iter().zip(&want) {
                    assert!((*g as f64 - e).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + e.abs()));
                }
                compared += got.len();
            }
        }
        assert_eq!(
            compared,
            2 * (14 + 7 * 64 + 13 * 130 + 200 * 384 + 37 * 640)
        );
    }

    #[test]
    fn swiglu_after_the_product_matches_the_definition() {
        if !available() {
            eprintln!("SKIPPED prepacked SwiGLU: this CPU has no AVX-512");
            return;
        }
        let mut compared = 0;
        // Halves of two panels (fused) and of 40 features (the product, then SwiGLU).
        for &(m, k, n) in &[(31, 96, 256), (9, 20, 80)] {
            let (x, wt, b) = (data(m * k, 5), data(k * n, 6), data(n, 7));
            let w = PackedWeight::new(&wt, k, n);
            let got = linear_swiglu(&x, &w, Some(&b));
            let y = definition(&x, &wt, &b, None, k);
            let h = n / 2;
            assert_eq!(got.len(), m * h);
            for i in 0..m {
                for j in 0..h {
                    let (a, g) = (y[i * n + j], y[i * n + h + j]);
                    let want = a / (1.0 + (-a).exp()) * g;
                    let e = (got[i * h + j] as f64 - want).abs();
                    assert!(e <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()), "{e}");
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 31 * 128 + 9 * 40);
    }
    #[test]
    fn attention_products_match_the_definition() {
        if !available() {
            eprintln!("SKIPPED prepacked attention products: this CPU has no AVX-512");
            return;
        }
        // 70 tokens: two panels of keys, the second partly padding; groups of six and a tail.
        let (t, d) = (70usize, 64usize);
        let ts = t.next_multiple_of(MR);
        let (q, k) = (data(t * d, 8), data(t * d, 9));
        let (mut s, mut kp) = (vec![f32::NAN; t * ts], Vec::new());
        let mut groups = Vec::new();
        scores(
            (&q, d),
            (&k, d),
            (t, d),
            (&mut s, ts),
            &mut kp,
            |i0, rows| groups.push((i0, rows.len() / ts)),
        );
        // Groups of six rows in order, then the tail of four.
        assert_eq!(groups.len(), 12);
        assert!(
            groups
                .iter()
                .enumerate()
                .all(|(g, &(i0, n))| i0 == 6 * g && n == 6.min(t - i0))
        );
        let mut compared = 0;
        for i in 0..t {
            for j in 0..t {
                let want: f64 = (0..d)
                    .map(|p| q[i * d + p] as f64 * k[j * d + p] as f64)
                    .sum();
                assert!(
                    (s[i * ts + j] as f64 - want).abs()
                        <= 1e-5 * (d as f64).sqrt() * (1.0 + want.abs())
                );
                compared += 1;
            }
        }
        // v as the middle 64 of 3 x 64-wide rows (as inside qkv), out rows 100 apart.
        let (p, vrows) = (data(t * ts, 10), data(t * 3 * d, 11));
        let mut out = vec![f32::NAN; t * 100];
        // SAFETY: vrows holds t rows of 3d values (v at offset d), out t rows of 100, p t rows
        // of ts.
        unsafe {
            weighted_values(
                &p,
                (t, t, ts),
                (vrows[d..].as_ptr(), 3 * d),
                (out.as_mut_ptr(), 100),
            )
        };
        for i in 0..t {
            for c in 0..d {
                let want: f64 = (0..t)
                    .map(|j| p[i * ts + j] as f64 * vrows[j * 3 * d + d + c] as f64)
                    .sum();
                let got = out[i * 100 + c] as f64;
                assert!((got - want).abs() <= 1e-5 * (t as f64).sqrt() * (1.0 + want.abs()));
                compared += 1;
            }
            assert!(
                out[i * 100 + d..(i + 1) * 100].iter().all(|v| v.is_nan()),
                "wrote past 64"
            );
        }
        assert_eq!(compared, t * t + t * d);
    }
    #[test]
    fn keys_are_packed_where_the_products_read_them() {
        // Strided keys (as inside qkv) and contiguous ones, into one buffer reused across
        // calls (so stale values from the larger call lie past the smaller one's keys).
        let d = 64;
        let mut kp = Vec::new();
        let mut compared = 0;
        for (t, k_rs) in [(197usize, 3 * 384usize), (70, d), (16, d), (5, 2 * d)] {
            let k = data((t - 1) * k_rs + d, t as u64);
            kp.resize(t.div_ceil(MR) * d * MR, 0.0);
            pack_keys((&k, k_rs), (t, d), &mut kp);
            for j in 0..t {
                for dd in 0..d {
                    let got = kp[j / MR * d * MR + dd * MR + j % MR];
                    assert_eq!(got.to_bits(), k[j * k_rs + dd].to_bits(), "t {t}, key {j}");
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, (197 + 70 + 16 + 5) * d);
    }
    #[test]
    fn rope_in_the_qkv_epilogue_gives_the_same_attention() {
        if !available() {
            eprintln!("SKIPPED prepacked qkv with RoPE: this CPU has no AVX-512");
            return;
        }
        use crate::kernels::cpu::{AttentionShape, attention_forward};
        // 2 images of 9 tokens, 2 heads of 64; RoPE tables for the 8 patch tokens.
        let (b, t, heads, k) = (2, 9, 2, 48);
        let n = 3 * MR * heads;
        let (x, wt, bias) = (data(b * t * k, 12), data(k * n, 13), data(n, 14));
        let (cos, sin) = (data((t - 1) * MR, 15), data((t - 1) * MR, 16));
        let w = PackedWeight::new(&wt, k, n);
        let mut compared = 0;
        for (cos, sin) in [(&cos[..], &sin[..]), (&[][..], &[][..])] {
            let shape = |roped| AttentionShape {
                b,
                t,
                c: n / 3,
                heads,
                cos,
                sin,
                roped,
            };
            let plain = attention_forward(&linear(&x, &w, Some(&bias), None), &shape(false));
            let rope = QkvRope { t, heads, cos, sin };
            let qkv = linear_qkv_roped(&x, &w, Some(&bias), &rope);
            let fused = attention_forward(&qkv, &shape(true));
            let (plain, fused) = (plain.unwrap(), fused.unwrap());
            assert_eq!(plain.len(), b * t * n / 3);
            assert_eq!(plain, fused, "the same operations in the same order");
            compared += plain.len();
        }
        assert_eq!(compared, 2 * b * t * n / 3);
    }
    #[test]
    fn misshapen_inputs_are_errors() {
        let w = PackedWeight::new(&data(4 * 3, 17), 4, 3);
        let x = data(8, 18);
        assert!(check(&x, &w, Some(&[0.0; 3]), Some(&[0.0; 6])).is_ok());
        assert!(
            check(&x[..7], &w, None, None)
                .unwrap_err()
                .contains("rows of 4")
        );
        assert!(check(&x, &w, Some(&[0.0; 2]), None).is_err());
        assert!(check(&x, &w, None, Some(&[0.0; 5])).is_err());
    }
}
