//! Our single-precision matrix product for AVX2 + FMA CPUs (no AVX-512), where the `gemm`
//! crate's AVX2 kernels ran at about 58 GFLOP/s a core inside the models (peak about 100 on
//! this Zen 3): the BLIS scheme, with B packed in `KC x 16` slivers shared by the threads, A in
//! `6 x KC` slivers per task (a row-major A read in place when C is at most 64 columns wide:
//! the attention's products), and a 6 x 16 register tile of 12 accumulators, unrolled by four
//! (94 GFLOP/s a core on data in L1). CPUs with AVX-512 keep the `gemm` crate's AVX-512
//! kernels; see `examples/gemm_speed.rs` to compare the two.
//!
//! `C[m, n] (+)= A[m, k] B[k, n]`, C row-major with unit column stride, A at any strides, B
//! at any strides (optionally through a per-row BatchNorm + ReLU) or made row by row by a
//! function as it is packed (a convolution's im2col matrix, never whole): [`BOperand`].

use std::cell::Cell;

use rayon::prelude::*;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two AVX vectors).
const NR: usize = 16;
/// Depth of one packed block (a B sliver `KC x NR` is 16 KiB: L1).
const KC: usize = 256;
/// Rows of one packed A block (`MC x KC`, 144 KiB: L2).
const MC: usize = 144;
/// At most this many columns of C read a row-major A in place (no packing).
const DIRECT_A_MAX_N: usize = 64;
/// Columns of one packed B block (`KC x NC`, 4 MiB: L3).
const NC: usize = 4096;

/// A raw pointer handed to the worker threads of a product; every task writes a disjoint part
/// of its output (also used by the bf16 product).
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub(super) T);
// SAFETY: the tasks of one product touch disjoint parts of its output and only read its
// inputs.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T: Copy> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole wrapper).
    pub(super) fn get(self) -> T {
        self.0
    }
}

thread_local! {
    /// Each thread's packing buffer for A (taken out while in use, so a nested product on the
    /// same thread, as rayon may run one while a task waits, gets its own).
    static A_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's packing buffer for B.
    static B_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Whether this CPU takes our kernels (AVX2 + FMA without AVX-512), unless `EVAX_GEMM=crate`
/// asks for the `gemm` crate's everywhere (to compare the two).
pub fn ours() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OURS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OURS.get_or_init(|| {
            super::dispatch::has_v3()
                && !super::dispatch::has_v4()
                && std::env::var("EVAX_GEMM").as_deref() != Ok("crate")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m, n] (+)= A[m, k] B[k, n]` (`accumulate` keeps what C holds) on up to `threads`
/// threads: our kernels on AVX2 CPUs, the `gemm` crate's elsewhere.
///
/// # Safety
/// `c` must be valid for writes of `m` rows at row stride `c_rs` (`n` contiguous values each),
/// `a` for reads of `m x k` values at strides `(a_rs, a_cs)`, `b` of `k x n` at `(b_rs, b_cs)`;
/// C must overlap neither A nor B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    threads: usize,
) {
    let b = BOperand::Strided {
        ptr: b,
        rs: b_rs,
        cs: b_cs,
        pre: None,
    };
    // SAFETY: the caller's contract.
    unsafe { sgemm_b((m, n, k), c, c_rs, accumulate, a, (a_rs, a_cs), b, threads) }
}

/// A BatchNorm + ReLU on each row `p` of B, applied as B is read: `max(b * scale[p] +
/// shift[p], 0)` (the pre-activation of a 1x1 convolution's input channels).
#[derive(Clone, Copy)]
pub struct RowAffineRelu {
    /// `k` scales.
    pub scale: *const f32,
    /// `k` shifts.
    pub shift: *const f32,
}

impl RowAffineRelu {
    /// Row `p`'s scale and shift.
    ///
    /// # Safety
    /// Row `p` must exist.
    unsafe fn at(self, p: usize) -> (f32, f32) {
        // SAFETY: the caller's contract.
        unsafe { (*self.scale.add(p), *self.shift.add(p)) }
    }
}

/// Where B's values come from.
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    /// Stored at row stride `rs` and column stride `cs`, each row optionally through `pre`.
    Strided {
        /// B's first value.
        ptr: *const f32,
        /// Row stride.
        rs: usize,
        /// Column stride.
        cs: usize,
        /// A per-row BatchNorm + ReLU.
        pre: Option<RowAffineRelu>,
    },
    /// Made row by row: `row(p, j0, out)` writes `B[p, j0..j0 + out.len()]` into `out` (an
    /// im2col matrix made as it is packed, never whole).
    Rows(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
}

// SAFETY: B is only read, by the tasks of one product.
unsafe impl Send for BOperand<'_> {}
// SAFETY: as above.
unsafe impl Sync for BOperand<'_> {}

/// [`sgemm`] with B given as a [`BOperand`].
///
/// # Safety
/// As [`sgemm`] for C and A; a strided B (and its `pre`, `k` values each) must be readable
/// over `k x n`; a row function must fill every value it is given.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_b(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: BOperand,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: C is zero (or kept), on both paths.
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of C holds n values (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(c.add(i * c_rs), n).fill(0.0) };
            }
        }
        return;
    }
    // Our tiles are 16 columns wide: a width that wastes more than a tenth of the last one
    // (a 7 x 7 feature map's 49) goes to the `gemm` crate, which tiles the other way.
    #[cfg(target_arch = "x86_64")]
    if ours() && n.div_ceil(NR) * NR * 10 <= n * 11 {
        // SAFETY: the caller's contract; AVX2 and FMA checked by `ours`.
        unsafe { avx2::sgemm((m, n, k), c, c_rs, accumulate, a, (a_rs, a_cs), b, threads) };
        return;
    }
    // On AVX-512, a B made or transformed on the way goes block by block through the
    // micro-kernel of the prepacked layers, where it is wide enough to repay packing A for
    // this call (below 1024 columns, as ResNet-50's later stages, it measured slower than
    // making B whole, which is small there).
    #[cfg(target_arch = "x86_64")]
    if super::prepacked::available()
        && n >= 1024
        && !matches!(b, BOperand::Strided { pre: None, .. })
    {
        let row = |p: usize, j0: usize, out: &mut [f32]| {
            // SAFETY: the caller's contract for B (rows p < k, columns below n).
            unsafe { b_row(b, p, j0, out) }
        };
        // SAFETY: the caller's contract for A and C; AVX-512 checked by `available`.
        unsafe {
            super::prepacked::product_made_b(
                (m, n, k),
                (c, c_rs),
                accumulate,
                (a, a_rs, a_cs),
                &row,
                threads,
            )
        };
        return;
    }
    // The `gemm` crate reads B as stored: a B made or transformed on the way is made whole.
    let made: Vec<f32>;
    let (b, (b_rs, b_cs)) = match b {
        BOperand::Strided {
            ptr,
            rs,
            cs,
            pre: None,
        } => (ptr, (rs, cs)),
        b => {
            let mut whole = vec![0f32; k * n];
            for (p, row) in whole.chunks_exact_mut(n).enumerate() {
                // SAFETY: row p < k of B (the caller's contract).
                unsafe { b_row(b, p, 0, row) };
            }
            made = whole;
            (made.as_ptr(), (n, 1))
        }
    };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract covers every element gemm touches.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Takes a thread's buffer out, grown to `len` values plus room to align to 64 bytes.
fn take_buf(key: &'static std::thread::LocalKey<Cell<Vec<f32>>>, len: usize) -> Vec<f32> {
    let mut v = key.with(|c| c.take());
    if v.len() < len + 16 {
        v = vec![0f32; len + 16];
    }
    v
}

/// The 64-byte aligned start of a buffer from [`take_buf`].
fn aligned(v: &mut [f32]) -> &mut [f32] {
    let off = v.as_ptr().align_offset(64).min(16);
    &mut v[off..]
}

/// Writes `B[p, j0..j0 + out.len()]` into `out`.
///
/// # Safety
/// That part of B must exist (for a strided B: be readable).
unsafe fn b_row(b: BOperand, p: usize, j0: usize, out: &mut [f32]) {
    match b {
        BOperand::Strided { ptr, rs, cs, pre } => {
            for (j, o) in out.iter_mut().enumerate() {
                // SAFETY: the caller's contract.
                *o = unsafe { *ptr.add(p * rs + (j0 + j) * cs) };
            }
            if let Some(pre) = pre {
                // SAFETY: row p exists.
                let (sc, sh) = unsafe { pre.at(p) };
                out.iter_mut().for_each(|v| *v = (*v * sc + sh).max(0.0));
            }
        }
        BOperand::Rows(row) => row(p, j0, out),
    }
}

/// Copies row `p` of a block, `row` (its `nc` values), into the `NR`-column slivers of `dst`
/// (each `kc x NR`), zero-padding the last; with `pre`, through `max(v * scale + shift, 0)`.
fn scatter_row(dst: &mut [f32], row: &[f32], p: usize, kc: usize, pre: Option<(f32, f32)>) {
    for (s, piece) in row.chunks(NR).enumerate() {
        let at = s * kc * NR + p * NR;
        let out = &mut dst[at..at + NR];
        match pre {
            None if piece.len() == NR => out.copy_from_slice(piece),
            None => {
                out[..piece.len()].copy_from_slice(piece);
                out[piece.len()..].fill(0.0);
            }
            Some((sc, sh)) => {
                for (d, v) in out.iter_mut().zip(piece) {
                    *d = (v * sc + sh).max(0.0);
                }
                out[piece.len()..].fill(0.0);
            }
        }
    }
}

thread_local! {
    /// Each thread's row buffer for a B made row by row.
    static ROW_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Packs `B[p0..p0 + kc, j0..j0 + nc]` into `NR`-column slivers, each `kc x NR`, zero-padded.
///
/// # Safety
/// That block of B must exist (for a strided B: be readable); `dst` holds
/// `ceil(nc / NR) * kc * NR` values.
unsafe fn pack_b(dst: &mut [f32], b: BOperand, (p0, j0): (usize, usize), kc: usize, nc: usize) {
    match b {
        BOperand::Strided {
            ptr,
            rs,
            cs: 1,
            pre,
        } => {
            // Row by row: B is read in order, each row's 16-value pieces go to their slivers.
            for p in 0..kc {
                // SAFETY: row p0 + p of B holds the block's nc values from column j0.
                let row = unsafe { std::slice::from_raw_parts(ptr.add((p0 + p) * rs + j0), nc) };
                // SAFETY: row p0 + p exists.
                let pre = pre.map(|r| unsafe { r.at(p0 + p) });
                scatter_row(dst, row, p, kc, pre);
            }
        }
        BOperand::Strided { ptr, rs, cs, pre } => {
            for (s, sliver) in dst.chunks_exact_mut(kc * NR).enumerate() {
                let jj = s * NR;
                if jj >= nc {
                    break;
                }
                // SAFETY: columns j0 + jj.. (at most nc - jj of them), rows p0..p0 + kc.
                let src = unsafe { ptr.add(p0 * rs + (j0 + jj) * cs) };
                unsafe { pack_panel::<NR>(sliver, src, (cs, rs), kc, nc - jj) };
                if let Some(pre) = pre {
                    // The padding lanes change too, but their columns are never stored.
                    for (p, row) in sliver.chunks_exact_mut(NR).enumerate() {
                        // SAFETY: row p0 + p exists.
                        let (sc, sh) = unsafe { pre.at(p0 + p) };
                        row.iter_mut().for_each(|v| *v = (*v * sc + sh).max(0.0));
                    }
                }
            }
        }
        BOperand::Rows(make) => {
            let mut buf = ROW_BUF.with(|c| c.take());
            if buf.len() < nc {
                buf.resize(nc, 0.0);
            }
            for p in 0..kc {
                make(p0 + p, j0, &mut buf[..nc]);
                scatter_row(dst, &buf[..nc], p, kc, None);
            }
            ROW_BUF.with(|c| c.set(buf));
        }
    }
}

/// Packs `A[i0.., p0..]` (`mc x kc`) into `MR`-row slivers, each `kc x MR`, zero-padded.
///
/// # Safety
/// A must be readable over the block at its strides; `dst` holds `ceil(mc / MR) * kc * MR`.
unsafe fn pack_a(
    dst: &mut [f32],
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    mc: usize,
    kc: usize,
) {
    for (s, sliver) in dst.chunks_exact_mut(kc * MR).enumerate() {
        let i0 = s * MR;
        if i0 >= mc {
            break;
        }
        // SAFETY: rows i0.. (at most mc - i0 of them) and columns < kc lie inside the block.
        unsafe { pack_panel::<MR>(sliver, a.add(i0 * a_rs), (a_rs, a_cs), kc, mc - i0) };
    }
}

/// Packs one panel of `W` lanes (rows of A, columns of B) over `kc` steps:
/// `dst[p * W + l] = src[l * lane_s + p * step_s]` for the first `lanes` lanes, zeros after.
///
/// # Safety
/// `src` must be readable at those offsets for `l < min(lanes, W)`, `p < kc`; `dst` holds
/// `kc * W` values.
unsafe fn pack_panel<const W: usize>(
    dst: &mut [f32],
    src: *const f32,
    (lane_s, step_s): (usize, usize),
    kc: usize,
    lanes: usize,
) {
    let dst = &mut dst[..kc * W];
    // SAFETY: every read is one the caller allows; writes stay inside dst (checked above).
    unsafe {
        if lanes >= W && lane_s == 1 {
            for (p, out) in dst.chunks_exact_mut(W).enumerate() {
                out.copy_from_slice(std::slice::from_raw_parts(src.add(p * step_s), W));
            }
        } else if lanes >= W && step_s == 1 && cfg!(target_arch = "x86_64") && ours() {
            // A row-major A (or column-major B): transposed eight steps at a time in registers.
            #[cfg(target_arch = "x86_64")]
            avx2::pack_transposed::<W>(dst, src, lane_s, kc);
        } else if lanes >= W && step_s == 1 {
            let lane: [*const f32; W] = std::array::from_fn(|l| src.add(l * lane_s));
            for (p, out) in dst.chunks_exact_mut(W).enumerate() {
                for l in 0..W {
                    out[l] = *lane[l].add(p);
                }
            }
        } else {
            let w = lanes.min(W);
            for (p, out) in dst.chunks_exact_mut(W).enumerate() {
                for (l, o) in out.iter_mut().enumerate() {
                    *o = if l < w {
                        *src.add(l * lane_s + p * step_s)
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Where a tile's six rows of A come from.
    #[derive(Clone, Copy)]
    enum ASliver {
        /// A packed sliver (`kc x 6`, step-major).
        Packed(*const f32),
        /// Six rows of a row-major A read in place, at this row stride.
        Rows(*const f32, usize),
    }

    /// The product on AVX2 (see [`super::sgemm`]).
    ///
    /// # Safety
    /// As [`super::sgemm`], on a CPU with AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sgemm(
        (m, n, k): (usize, usize, usize),
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
        a: *const f32,
        (a_rs, a_cs): (usize, usize),
        b: BOperand,
        threads: usize,
    ) {
        let threads = threads.max(1);
        let (c, a) = (SendPtr(c), SendPtr(a));
        // A row-major A that only a few columns of C use is read in place, not packed.
        let direct_a = a_cs == 1 && n <= DIRECT_A_MAX_N;
        let mut bbuf = take_buf(&B_BUF, KC * NC.min(n.div_ceil(NR) * NR));
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            let slivers = nc.div_ceil(NR);
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                let bp = &mut aligned(&mut bbuf)[..slivers * kc * NR];
                if threads > 1 && slivers >= 2 * threads {
                    let per = slivers.div_ceil(threads);
                    bp.par_chunks_mut(per * kc * NR)
                        .enumerate()
                        .for_each(|(t, chunk)| {
                            let jj = t * per * NR;
                            let w = (per * NR).min(nc - jj);
                            // SAFETY: columns jj..jj + w of the block.
                            unsafe { pack_b(chunk, b, (p0, j0 + jj), kc, w) };
                        });
                } else {
                    // SAFETY: the whole block.
                    unsafe { pack_b(bp, b, (p0, j0), kc, nc) };
                }
                let overwrite = p0 == 0 && !accumulate;
                let bp: &[f32] = bp;
                // Tasks: row blocks of at most MC, as many as a multiple of the threads (11
                // blocks on 2 threads would leave one idle for a twelfth of the time), and
                // column chunks when there are too few of those.
                let row_block = if threads > 1 {
                    let blocks = m.div_ceil(MC * threads) * threads;
                    m.div_ceil(blocks).div_ceil(MR) * MR
                } else {
                    MC
                };
                let row_blocks = m.div_ceil(row_block);
                let col_chunks = if threads > 1 {
                    (2 * threads).div_ceil(row_blocks).min(slivers)
                } else {
                    1
                };
                let per = slivers.div_ceil(col_chunks);
                let col_chunks = slivers.div_ceil(per);
                let task = |t: usize| {
                    let (ib, cb) = (t / col_chunks, t % col_chunks);
                    let i0 = ib * row_block;
                    let mc = row_block.min(m - i0);
                    let (s0, s1) = (cb * per, ((cb + 1) * per).min(slivers));
                    let mut abuf = take_buf(&A_BUF, MC * KC);
                    let ap = &mut aligned(&mut abuf)[..mc.div_ceil(MR) * kc * MR];
                    let a_full = mc / MR;
                    // SAFETY: rows i0..i0 + mc, columns p0..p0 + kc of A.
                    let ablock = unsafe { a.get().add(i0 * a_rs + p0 * a_cs) };
                    if !direct_a {
                        // SAFETY: as above.
                        unsafe { pack_a(ap, ablock, (a_rs, a_cs), mc, kc) };
                    } else if a_full * MR < mc {
                        // Only a last, partial sliver is packed (into the first place).
                        // SAFETY: rows a_full * MR..mc of the block.
                        let rest = unsafe { ablock.add(a_full * MR * a_rs) };
                        unsafe { pack_a(ap, rest, (a_rs, a_cs), mc - a_full * MR, kc) };
                    }
                    let ap: &[f32] = ap;
                    for s in s0..s1 {
                        let bs = bp[s * kc * NR..(s + 1) * kc * NR].as_ptr();
                        let jj = j0 + s * NR;
                        let nr = NR.min(n - jj);
                        for r in 0..mc.div_ceil(MR) {
                            let ii = i0 + r * MR;
                            let mr = MR.min(m - ii);
                            let asl = if direct_a && r < a_full {
                                // SAFETY: rows ii..ii + MR of the block, read in place.
                                ASliver::Rows(unsafe { ablock.add(r * MR * a_rs) }, a_rs)
                            } else {
                                let at = if direct_a { 0 } else { r * kc * MR };
                                ASliver::Packed(ap[at..at + kc * MR].as_ptr())
                            };
                            // SAFETY: the tile rows ii..ii + mr, columns jj..jj + nr of C;
                            // the slivers hold kc * MR and kc * NR values.
                            unsafe {
                                tile(
                                    kc,
                                    asl,
                                    bs,
                                    c.get().add(ii * c_rs + jj),
                                    c_rs,
                                    mr,
                                    nr,
                                    overwrite,
                                )
                            };
                        }
                    }
                    A_BUF.with(|b| b.set(abuf));
                };
                let tasks = row_blocks * col_chunks;
                if threads > 1 && tasks > 1 {
                    (0..tasks).into_par_iter().for_each(task);
                } else {
                    (0..tasks).for_each(task);
                }
            }
        }
        B_BUF.with(|b| b.set(bbuf));
    }

    /// One `mr x nr` tile of C (at most 6 x 16) from a packed A and B sliver.
    ///
    /// # Safety
    /// `a` holds `kc * MR`, `b` `kc * NR` values; C's tile is writable at row stride `c_rs`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile(
        kc: usize,
        a: ASliver,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        mr: usize,
        nr: usize,
        overwrite: bool,
    ) {
        // SAFETY: the caller's contract; a full tile goes straight to C, a partial one
        // through a local 6 x 16 buffer.
        unsafe {
            if mr == MR && nr == NR {
                match a {
                    ASliver::Packed(a) => kernel::<true>(kc, a, 0, b, c, c_rs, overwrite),
                    ASliver::Rows(a, rs) => kernel::<false>(kc, a, rs, b, c, c_rs, overwrite),
                }
            } else {
                let mut tmp = [0f32; MR * NR];
                let t = tmp.as_mut_ptr();
                match a {
                    ASliver::Packed(a) => kernel::<true>(kc, a, 0, b, t, NR, true),
                    ASliver::Rows(a, rs) => kernel::<false>(kc, a, rs, b, t, NR, true),
                }
                for i in 0..mr {
                    let row = std::slice::from_raw_parts_mut(c.add(i * c_rs), nr);
                    let t = &tmp[i * NR..i * NR + nr];
                    if overwrite {
                        row.copy_from_slice(t);
                    } else {
                        row.iter_mut().zip(t).for_each(|(d, v)| *d += v);
                    }
                }
            }
        }
    }

    /// `dst[p * W + l] = src[l * lane_s + p]` for `l < W`, `p < kc`: eight lanes and eight
    /// steps at a time loaded as rows, transposed in registers and stored as steps.
    ///
    /// # Safety
    /// `src` readable at those offsets; `dst` holds `kc * W` values; AVX2 present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_transposed<const W: usize>(
        dst: &mut [f32],
        src: *const f32,
        lane_s: usize,
        kc: usize,
    ) {
        assert!(dst.len() >= kc * W, "packed panel too small");
        let d = dst.as_mut_ptr();
        // SAFETY: reads at l * lane_s + p for l < W, p < kc (the caller's contract); writes
        // at p * W + l < kc * W (checked above).
        unsafe {
            for l0 in (0..W).step_by(8) {
                let nl = (W - l0).min(8);
                let row = |l: usize| src.add((l0 + l) * lane_s);
                let mut p = 0;
                while p + 8 <= kc {
                    let r: [__m256; 8] = std::array::from_fn(|l| {
                        if l < nl {
                            _mm256_loadu_ps(row(l).add(p))
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    let t = [
                        _mm256_unpacklo_ps(r[0], r[1]),
                        _mm256_unpackhi_ps(r[0], r[1]),
                        _mm256_unpacklo_ps(r[2], r[3]),
                        _mm256_unpackhi_ps(r[2], r[3]),
                        _mm256_unpacklo_ps(r[4], r[5]),
                        _mm256_unpackhi_ps(r[4], r[5]),
                        _mm256_unpacklo_ps(r[6], r[7]),
                        _mm256_unpackhi_ps(r[6], r[7]),
                    ];
                    let u = [
                        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                    ];
                    // Step q's eight lanes: the low halves give steps 0..4, the high 4..8.
                    let steps = [
                        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
                        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
                        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
                        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
                        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
                        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
                        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
                        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
                    ];
                    for (q, v) in steps.iter().enumerate() {
                        let out = d.add((p + q) * W + l0);
                        if nl == 8 {
                            _mm256_storeu_ps(out, *v);
                        } else {
                            let mut lanes = [0f32; 8];
                            _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out, nl);
                        }
                    }
                    p += 8;
                }
                for p in p..kc {
                    for l in 0..nl {
                        *d.add(p * W + l0 + l) = *row(l).add(p);
                    }
                }
            }
        }
    }

    /// The 6 x 16 register tile: `C (+)= A_sliver B_sliver` over `kc` steps.
    ///
    /// # Safety
    /// `a` holds `kc * 6`, `b` `kc * 16` values; six rows of 16 values at stride `c_rs` are
    /// writable at `c`; AVX2 and FMA present.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const PACKED: bool>(
        kc: usize,
        a: *const f32,
        a_rs: usize,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        overwrite: bool,
    ) {
        // SAFETY: every load stays inside the slivers, every store inside the tile.
        unsafe {
            for i in 0..MR {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_rs) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_rs + NR - 1) as *const i8);
            }
            let z = _mm256_setzero_ps();
            let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
            let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
            let (mut a, mut b) = (a, b);
            // Where A's value of step o (from the current position), row i lies.
            let at = |o: usize, i: usize| if PACKED { o * MR + i } else { o + i * a_rs };
            let a_step = if PACKED { MR } else { 1 };
            macro_rules! step {
                ($o:expr) => {{
                    let b0 = _mm256_loadu_ps(b.add($o * NR));
                    let b1 = _mm256_loadu_ps(b.add($o * NR + 8));
                    let x = _mm256_broadcast_ss(&*a.add(at($o, 0)));
                    c00 = _mm256_fmadd_ps(x, b0, c00);
                    c01 = _mm256_fmadd_ps(x, b1, c01);
                    let x = _mm256_broadcast_ss(&*a.add(at($o, 1)));
                    c10 = _mm256_fmadd_ps(x, b0, c10);
                    c11 = _mm256_fmadd_ps(x, b1, c11);
                    let x = _mm256_broadcast_ss(&*a.add(at($o, 2)));
                    c20 = _mm256_fmadd_ps(x, b0, c20);
                    c21 = _mm256_fmadd_ps(x, b1, c21);
                    let x = _mm256_broadcast_ss(&*a.add(at($o, 3)));
                    c30 = _mm256_fmadd_ps(x, b0, c30);
                    c31 = _mm256_fmadd_ps(x, b1, c31);
                    let x = _mm256_broadcast_ss(&*a.add(at($o, 4)));
                    c40 = _mm256_fmadd_ps(x, b0, c40);
                    c41 = _mm256_fmadd_ps(x, b1, c41);
                    let x = _mm256_broadcast_ss(&*a.add(at($o, 5)));
                    c50 = _mm256_fmadd_ps(x, b0, c50);
                    c51 = _mm256_fmadd_ps(x, b1, c51);
                }};
            }
            for _ in 0..kc / 4 {
                step!(0);
                step!(1);
                step!(2);
                step!(3);
                a = a.add(4 * a_step);
                b = b.add(4 * NR);
            }
            for _ in 0..kc % 4 {
                step!(0);
                a = a.add(a_step);
                b = b.add(NR);
            }
            let rows = [
                (c00, c01),
                (c10, c11),
                (c20, c21),
                (c30, c31),
                (c40, c41),
                (c50, c51),
            ];
            for (i, (lo, hi)) in rows.into_iter().enumerate() {
                let p = c.add(i * c_rs);
                if overwrite {
                    _mm256_storeu_ps(p, lo);
                    _mm256_storeu_ps(p.add(8), hi);
                } else {
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), lo));
                    _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), hi));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product in f64 by the definition.
    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        (ar, ac): (usize, usize),
        b: &[f32],
        (br, bc): (usize, usize),
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * ar + p * ac] as f64 * b[p * br + j * bc] as f64)
                    .sum();
            }
        }
        c
    }

    /// Every layout, edge sizes on each side of the tiles and blocks, overwrite and accumulate,
    /// one and two threads: within float32 rounding of the f64 product.
    #[test]
    fn products_match_the_definition() {
        let mut r = crate::rng::Rng::new(7);
        let shapes = [
            (1, 1, 1),
            (3, 20, 0),
            (6, 16, 1),
            (7, 17, 3),
            (13, 33, 257),
            (150, 40, 300),
            (5, 4200, 20),
            (200, 70, 513),
        ];
        let mut checked = 0;
        for &(m, n, k) in &shapes {
            let a: Vec<f32> = (0..m * k).map(|_| r.unit() as f32 - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| r.unit() as f32 - 0.5).collect();
            for (sa, sb) in [
                ((k, 1), (n, 1)),
                ((1, m), (1, k)),
                ((k, 1), (1, k)),
                ((1, m), (n, 1)),
            ] {
                let want = naive(m, n, k, &a, sa, &b, sb);
                for threads in [1, 2] {
                    for accumulate in [false, true] {
                        let mut c = vec![if accumulate { 1.0f32 } else { f32::NAN }; m * n];
                        // SAFETY: the slices hold the shapes at these strides.
                        unsafe {
                            sgemm(
                                (m, n, k),
                                c.as_mut_ptr(),
                                n,
                                accumulate,
                                a.as_ptr(),
                                sa,
                                b.as_ptr(),
                                sb,
                                threads,
                            )
                        };
                        let base = if accumulate { 1.0 } else { 0.0 };
                        assert_eq!(c.len(), want.len());
                        for (g, w) in c.iter().zip(&want) {
                            let tol = 1e-5 * (k as f64).sqrt() + 1e-6;
                            assert!(
                                (*g as f64 - base - w).abs() <= tol,
                                "{m}x{n}x{k} {sa:?} {sb:?}: {g} vs {w}"
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, shapes.len() * 16);
    }

    /// A per-row BatchNorm + ReLU on a stored B, and a B made row by row, give the product
    /// with the B they stand for, on both paths (n = 49 goes to the `gemm` crate), both
    /// layouts of the stored B, one and two threads.
    #[test]
    fn products_with_made_or_transformed_b_match_the_definition() {
        let mut r = crate::rng::Rng::new(11);
        let shapes = [(7, 17, 3), (32, 64, 300), (13, 49, 40), (20, 150, 513)];
        let mut checked = 0;
        for &(m, n, k) in &shapes {
            let a: Vec<f32> = (0..m * k).map(|_| r.unit() as f32 - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| r.unit() as f32 - 0.5).collect();
            let scale: Vec<f32> = (0..k).map(|_| r.unit() as f32 * 2.0 - 1.0).collect();
            let shift: Vec<f32> = (0..k).map(|_| r.unit() as f32 - 0.5).collect();
            for sb in [(n, 1), (1, k)] {
                let tb: Vec<f32> = (0..k * n)
                    .map(|i| {
                        let (p, j) = (i / n, i % n);
                        (b[p * sb.0 + j * sb.1] * scale[p] + shift[p]).max(0.0)
                    })
                    .collect();
                let want = naive(m, n, k, &a, (k, 1), &tb, (n, 1));
                let make = |p: usize, j0: usize, out: &mut [f32]| {
                    out.copy_from_slice(&tb[p * n + j0..p * n + j0 + out.len()]);
                };
                let strided = BOperand::Strided {
                    ptr: b.as_ptr(),
                    rs: sb.0,
                    cs: sb.1,
                    pre: Some(RowAffineRelu {
                        scale: scale.as_ptr(),
                        shift: shift.as_ptr(),
                    }),
                };
                for operand in [strided, BOperand::Rows(&make)] {
                    for threads in [1, 2] {
                        let mut c = vec![f32::NAN; m * n];
                        // SAFETY: the slices hold the shapes at these strides.
                        unsafe {
                            sgemm_b(
                                (m, n, k),
                                c.as_mut_ptr(),
                                n,
                                false,
                                a.as_ptr(),
                                (k, 1),
                                operand,
                                threads,
                            )
                        };
                        assert_eq!(c.len(), want.len());
                        for (g, w) in c.iter().zip(&want) {
                            let tol = 1e-5 * (k as f64).sqrt() + 1e-6;
                            assert!(
                                (*g as f64 - w).abs() <= tol,
                                "{m}x{n}x{k} {sb:?}: {g} vs {w}"
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, shapes.len() * 8);
    }
}
