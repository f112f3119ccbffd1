//! The CNN kernels on NCHW f32 slices (no candle types): convolution as a GEMM on our
//! [`super::sgemm`] whose im2col matrix is made a block of rows at a time as the product packs
//! it (1x1 stride-1 convolutions read the input in place, optionally through a BatchNorm +
//! ReLU), with bias and ReLU fused for inference and a backward for training; DenseNet's dense
//! layers in one buffer per block; BatchNorm in training mode; max pooling. Images of a batch
//! run in parallel, one GEMM per image (several side by side for small planes); a batch
//! smaller than the thread count parallelises inside the GEMM instead.

use std::cell::RefCell;

use rayon::prelude::*;

use super::sgemm::{BOperand, RowAffineRelu};
use super::unfilled;

/// A matrix operand: values and the strides of its rows and columns.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major matrix of `cols` columns.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of [`Mat::rows`]: `data`'s rows of `cols` values read as columns.
    pub(crate) fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether a `rows x cols` matrix at these strides lies inside the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m, n] (+)= a[m, k] b[k, n]` with `dst` row-major at row stride `dst_rs`; `accumulate`
/// keeps what `dst` holds. Panics when an operand does not fit its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    shape: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    matmul_b(
        shape,
        dst,
        dst_rs,
        accumulate,
        a,
        BSource::Mat(b, None),
        threads,
    )
}

/// A BatchNorm in evaluation mode + ReLU on a 1x1 convolution's input channels, applied as
/// the convolution reads them: per-channel scale and shift.
pub type PreActivation<'a> = (&'a [f32], &'a [f32]);

/// A product's B: a matrix (each row `p` optionally read as `max(b * scale[p] + shift[p],
/// 0)`), or a function that writes `B[p, j0..j0 + out.len()]` into `out`.
enum BSource<'a> {
    Mat(Mat<'a>, Option<PreActivation<'a>>),
    Rows(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
}

/// [`matmul`] with B from a [`BSource`].
#[allow(clippy::too_many_arguments)]
fn matmul_b(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: BSource,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let b_fits = match &b {
        BSource::Mat(b, pre) => {
            b.fits(k, n) && pre.is_none_or(|(s, t)| s.len() >= k && t.len() >= k)
        }
        BSource::Rows(_) => true,
    };
    assert!(
        (m - 1) * dst_rs + n <= dst.len() && a.fits(m, k) && b_fits,
        "matmul: operands do not fit their slices"
    );
    let b = match b {
        BSource::Mat(b, pre) => BOperand::Strided {
            ptr: b.data.as_ptr(),
            rs: b.rs,
            cs: b.cs,
            pre: pre.map(|(scale, shift)| RowAffineRelu {
                scale: scale.as_ptr(),
                shift: shift.as_ptr(),
            }),
        },
        BSource::Rows(make) => BOperand::Rows(make),
    };
    // SAFETY: every element read or written lies inside the slices (asserted above); dst
    // is borrowed mutably, so it overlaps neither operand.
    unsafe {
        super::sgemm::sgemm_b(
            (m, n, k),
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            a.data.as_ptr(),
            (a.rs, a.cs),
            b,
            threads,
        );
    }
}

/// The shape of a 2-D convolution over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Images.
    pub b: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub pad: usize,
}

impl ConvShape {
    /// A `k x k` convolution of `b` images of `cin` channels of `h x w` to `cout` channels.
    pub fn square(
        (b, cin, h, w): (usize, usize, usize, usize),
        cout: usize,
        k: usize,
        (stride, pad): (usize, usize),
    ) -> ConvShape {
        ConvShape {
            b,
            cin,
            h,
            w,
            cout,
            kh: k,
            kw: k,
            stride,
            pad,
        }
    }

    /// A DenseNet layer's two convolutions on `b` images of `cin` channels of `h x w`: the 1x1
    /// to `mid` channels, then the "same" `k x k` to `growth`.
    pub fn dense_layer(
        (b, cin, h, w): (usize, usize, usize, usize),
        mid: usize,
        growth: usize,
        k: usize,
    ) -> (ConvShape, ConvShape) {
        let first = ConvShape::square((b, cin, h, w), mid, 1, (1, 0));
        let second = ConvShape {
            cin: mid,
            cout: growth,
            kh: k,
            kw: k,
            pad: k / 2,
            ..first
        };
        (first, second)
    }

    /// Output height and width, or `None` when the kernel does not fit the padded input.
    pub fn out(&self) -> Option<(usize, usize)> {
        let (ph, pw) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        if self.stride == 0 || self.kh == 0 || self.kw == 0 || ph < self.kh || pw < self.kw {
            return None;
        }
        Some((
            (ph - self.kh) / self.stride + 1,
            (pw - self.kw) / self.stride + 1,
        ))
    }

    /// An error unless the input, weight and (optional) bias lengths fit this shape.
    pub fn check(&self, x: usize, w: usize, bias: Option<usize>) -> Result<(), String> {
        let ok = self.out().is_some()
            && self.cin > 0
            && self.cout > 0
            && x == self.b * self.cin * self.h * self.w
            && w == self.cout * self.col_rows()
            && bias.is_none_or(|l| l == self.cout);
        if ok {
            Ok(())
        } else {
            Err(format!("convolution: shapes do not fit ({self:?})"))
        }
    }

    /// Rows of the im2col matrix: `cin * kh * kw`.
    fn col_rows(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    fn out_plane(&self) -> usize {
        let (ho, wo) = self.out().expect("checked shape");
        ho * wo
    }

    /// A 1x1 stride-1 unpadded convolution reads its input as the im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

thread_local! {
    /// Each thread's im2col buffer, grown as needed and reused across calls.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on this thread's im2col buffer resized to `len`.
fn with_columns<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    COLUMNS.with(|c| {
        let mut buf = c.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// The output columns `lo..hi` whose input column `ox * stride + kx - pad` lies inside
/// `0..w`.
fn valid_columns(wo: usize, w: usize, stride: usize, kx: usize, pad: usize) -> (usize, usize) {
    let lo = if pad > kx {
        (pad - kx).div_ceil(stride)
    } else {
        0
    };
    let hi = if w + pad > kx {
        ((w + pad - kx - 1) / stride + 1).min(wo)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// One image `[cin, h, w]` to columns `[cin * kh * kw, ho * wo]`.
fn im2col(x: &[f32], s: &ConvShape, col: &mut [f32]) {
    let (plane_in, plane) = (s.h * s.w, s.out_plane());
    let kk = s.kh * s.kw;
    for (c, rows) in col.chunks_exact_mut(kk * plane).enumerate() {
        im2col_channel(&x[c * plane_in..(c + 1) * plane_in], s, rows, plane);
    }
}

/// The `kh * kw` im2col rows of one input channel `[h, w]`: row `r` is written to
/// `out[r * row_stride..][..ho * wo]`.
fn im2col_channel(x: &[f32], s: &ConvShape, out: &mut [f32], row_stride: usize) {
    let (ho, wo) = s.out().expect("checked shape");
    let (st, pad) = (s.stride, s.pad);
    for ky in 0..s.kh {
        for kx in 0..s.kw {
            let r = ky * s.kw + kx;
            let row = &mut out[r * row_stride..r * row_stride + ho * wo];
            let (lo, hi) = valid_columns(wo, s.w, st, kx, pad);
            for (oy, out) in row.chunks_exact_mut(wo).enumerate() {
                let iy = (oy * st + ky).wrapping_sub(pad);
                if iy >= s.h {
                    out.fill(0.0);
                    continue;
                }
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                let src = &x[iy * s.w..(iy + 1) * s.w];
                // Input column of output column lo.
                let first = lo * st + kx - pad;
                if st == 1 {
                    out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                } else {
                    for (o, &v) in out[lo..hi].iter_mut().zip(src[first..].iter().step_by(st)) {
                        *o = v;
                    }
                }
            }
        }
    }
}

/// Row `p` of one image's im2col matrix, columns `j0..j0 + out.len()`, into `out`.
fn im2col_part(x: &[f32], s: &ConvShape, p: usize, j0: usize, out: &mut [f32]) {
    let (_, wo) = s.out().expect("checked shape");
    let kk = s.kh * s.kw;
    let (c, ky, kx) = (p / kk, p % kk / s.kw, p % s.kw);
    let x = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
    let (lo, hi) = valid_columns(wo, s.w, s.stride, kx, s.pad);
    if s.stride == 1 && s.out() == Some((s.h, s.w)) {
        // A "same" convolution: the row is the plane shifted by a constant, with zeros
        // where the shifted index leaves the plane and in the columns outside lo..hi.
        let plane = s.h * s.w;
        let shift = (ky * s.w + kx) as isize - (s.pad * s.w + s.pad) as isize;
        // Input indices of the first and one past the last output column.
        let (first, last) = (j0 as isize + shift, (j0 + out.len()) as isize + shift);
        if first >= plane as isize || last <= 0 {
            out.fill(0.0);
            return;
        }
        let from = first.max(0) as usize;
        let to = last.min(plane as isize) as usize;
        let at = (from as isize - first) as usize;
        out[..at].fill(0.0);
        out[at..at + to - from].copy_from_slice(&x[from..to]);
        out[at + to - from..].fill(0.0);
        if lo > 0 || hi < wo {
            let first_row_start = j0 - j0 % wo;
            for row in (first_row_start..j0 + out.len()).step_by(wo) {
                let (a, b) = (row.max(j0), (row + lo).min(j0 + out.len()));
                if a < b {
                    out[a - j0..b - j0].fill(0.0);
                }
                let (a, b) = ((row + hi).max(j0), (row + wo).min(j0 + out.len()));
                if a < b {
                    out[a - j0..b - j0].fill(0.0);
                }
            }
        }
        return;
    }
    // Output row oy from column ox0 on; the segments after the first start at column 0.
    let (mut oy, mut ox0) = (j0 / wo, j0 % wo);
    let mut rest = out;
    while !rest.is_empty() {
        let ox1 = wo.min(ox0 + rest.len());
        let (seg, tail) = rest.split_at_mut(ox1 - ox0);
        rest = tail;
        let iy = (oy * s.stride + ky).wrapping_sub(s.pad);
        let (a, b) = (lo.clamp(ox0, ox1), hi.clamp(ox0, ox1));
        if iy >= s.h || a >= b {
            seg.fill(0.0);
        } else {
            let (head, inside) = seg.split_at_mut(a - ox0);
            let (inside, after) = inside.split_at_mut(b - a);
            head.fill(0.0);
            after.fill(0.0);
            // Input column of output column a.
            let src = &x[iy * s.w + a * s.stride + kx - s.pad..];
            if s.stride == 1 {
                inside.copy_from_slice(&src[..b - a]);
            } else if s.stride == 2 {
                for (o, pair) in inside.iter_mut().zip(src.chunks(2)) {
                    *o = pair[0];
                }
            } else {
                for (o, &v) in inside.iter_mut().zip(src.iter().step_by(s.stride)) {
                    *o = v;
                }
            }
        }
        oy += 1;
        ox0 = 0;
    }
}

/// Columns back onto one image's gradient `[cin, h, w]` (added to what it holds).
fn col2im(col: &mut [f32], s: &ConvShape, dx: &mut [f32]) {
    let (ho, wo) = s.out().expect("checked shape");
    let (st, pad) = (s.stride, s.pad);
    let kk = s.kh * s.kw;
    if st == 1 && (ho, wo) == (s.h, s.w) {
        // A "same" convolution: each row adds onto the plane shifted by a constant, once its
        // columns outside lo..hi are zeroed (they would land on the neighbouring rows).
        let n = s.h * s.w;
        for (plane, rows) in dx.chunks_exact_mut(n).zip(col.chunks_exact_mut(kk * n)) {
            for (r, row) in rows.chunks_exact_mut(n).enumerate() {
                let (ky, kx) = (r / s.kw, r % s.kw);
                let (lo, hi) = valid_columns(wo, s.w, st, kx, pad);
                if lo > 0 || hi < wo {
                    for line in row.chunks_exact_mut(wo) {
                        line[..lo].fill(0.0);
                        line[hi.max(lo)..].fill(0.0);
                    }
                }
                let shift = (ky * s.w + kx) as isize - (pad * s.w + pad) as isize;
                let from = shift.clamp(0, n as isize) as usize;
                let to = (n as isize + shift).clamp(0, n as isize) as usize;
                let src = &row[(from as isize - shift) as usize..][..to - from];
                for (d, g) in plane[from..to].iter_mut().zip(src) {
                    *d += g;
                }
            }
        }
        return;
    }
    for (plane, rows) in dx
        .chunks_exact_mut(s.h * s.w)
        .zip(col.chunks_exact(kk * ho * wo))
    {
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let r = ky * s.kw + kx;
                let row = &rows[r * ho * wo..(r + 1) * ho * wo];
                let (lo, hi) = valid_columns(wo, s.w, st, kx, pad);
                if lo >= hi {
                    continue;
                }
                for (oy, src) in row.chunks_exact(wo).enumerate() {
                    let iy = (oy * st + ky).wrapping_sub(pad);
                    if iy >= s.h {
                        continue;
                    }
                    let dst = &mut plane[iy * s.w..(iy + 1) * s.w];
                    // Input column of output column lo.
                    let first = lo * st + kx - pad;
                    if st == 1 {
                        for (d, &g) in dst[first..first + hi - lo].iter_mut().zip(&src[lo..hi]) {
                            *d += g;
                        }
                    } else {
                        for (d, &g) in dst[first..].iter_mut().step_by(st).zip(&src[lo..hi]) {
                            *d += g;
                        }
                    }
                }
            }
        }
    }
}

/// How the work of a batch is split: across images (each GEMM single-threaded) when there are
/// at least as many images as threads, otherwise inside each GEMM.
fn split(b: usize) -> (bool, usize) {
    let threads = rayon::current_num_threads();
    if b >= threads && threads > 1 {
        (true, 1)
    } else {
        (false, threads)
    }
}

/// `y = conv(x, weight) (+ bias) (then ReLU)` for `x` `[b, cin, h, w]` and `weight`
/// `[cout, cin, kh, kw]`; returns `[b, cout, ho, wo]`. Lengths must fit `s` ([`ConvShape::check`]).
/// `pre` (a 1x1 stride-1 convolution only) is applied to the input channels as they are read.
///
/// One GEMM `[cout, rows] x [rows, plane]` per image, written in place; for planes under
/// `GROUP_BELOW` (256) outputs, one per thread over its images' columns side by side.
pub fn conv_forward(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    pre: Option<PreActivation>,
    s: &ConvShape,
) -> Result<Vec<f32>, String> {
    s.check(x.len(), weight.len(), bias.map(|b| b.len()))?;
    check_pre(pre, s)?;
    let plane = s.out_plane();
    // SAFETY: every image's planes are written below (bias or a product that does not read
    // its destination, then at most a ReLU over what was written).
    let mut y = unsafe { unfilled(s.b * s.cout * plane) };
    let (across, par) = split(s.b);
    let image_in = s.cin * s.h * s.w;
    let per_thread = s.b.div_ceil(rayon::current_num_threads());
    let group = if across && pre.is_none() && plane < GROUP_BELOW {
        per_thread.min(GROUP_COLUMNS / plane).max(1)
    } else {
        1
    };
    if group > 1 {
        y.par_chunks_mut(group * s.cout * plane)
            .enumerate()
            .for_each(|(g, ys)| {
                let first = g * group;
                let images = ys.len() / (s.cout * plane);
                let xs = &x[first * image_in..(first + images) * image_in];
                conv_images(xs, weight, bias, relu, s, ys);
            });
        return Ok(y);
    }
    let image = |i: usize, yi: &mut [f32]| {
        let xi = &x[i * image_in..(i + 1) * image_in];
        conv_image(xi, weight, bias, relu, pre, s, yi, par);
    };
    if across {
        y.par_chunks_mut(s.cout * plane)
            .enumerate()
            .for_each(|(i, yi)| image(i, yi));
    } else {
        y.chunks_mut(s.cout * plane)
            .enumerate()
            .for_each(|(i, yi)| image(i, yi));
    }
    Ok(y)
}

/// Output planes smaller than this (a 7 x 7 map's 49) put several images' columns side by
/// side in one product: alone, such a plane fills its 16-column tiles badly and reuses each
/// packed operand little.
const GROUP_BELOW: usize = 256;
/// At most this many columns in one grouped product.
const GROUP_COLUMNS: usize = 1024;

thread_local! {
    /// Each thread's output buffer for a grouped product.
    static GROUPED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The convolution of the images `xs` `[n, cin, h, w]` as one product on this thread, their
/// im2col columns side by side, into `ys` `[n, cout, plane]`.
fn conv_images(
    xs: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    s: &ConvShape,
    ys: &mut [f32],
) {
    let (plane, rows) = (s.out_plane(), s.col_rows());
    let image_in = s.cin * s.h * s.w;
    let n = xs.len() / image_in * plane;
    let wm = Mat {
        data: weight,
        rs: rows,
        cs: 1,
    };
    // Row p of the grouped im2col matrix, columns j0..: each image's part of it in turn.
    let make = |p: usize, j0: usize, out: &mut [f32]| {
        let (mut j, mut o) = (j0, 0);
        while o < out.len() {
            let (img, q) = (j / plane, j % plane);
            let len = (plane - q).min(out.len() - o);
            let xi = &xs[img * image_in..(img + 1) * image_in];
            if s.pointwise() {
                out[o..o + len].copy_from_slice(&xi[p * plane + q..][..len]);
            } else {
                im2col_part(xi, s, p, q, &mut out[o..o + len]);
            }
            j += len;
            o += len;
        }
    };
    GROUPED.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < s.cout * n {
            buf.resize(s.cout * n, 0.0);
        }
        let c = &mut buf[..s.cout * n];
        if let Some(bias) = bias {
            for (row, &v) in c.chunks_exact_mut(n).zip(bias) {
                row.fill(v);
            }
        }
        let shape = (s.cout, n, rows);
        matmul_b(shape, c, n, bias.is_some(), wm, BSource::Rows(&make), 1);
        for (img, yi) in ys.chunks_exact_mut(s.cout * plane).enumerate() {
            for (co, row) in yi.chunks_exact_mut(plane).enumerate() {
                let src = &c[co * n + img * plane..][..plane];
                if relu {
                    row.iter_mut().zip(src).for_each(|(d, &v)| *d = v.max(0.0));
                } else {
                    row.copy_from_slice(src);
                }
            }
        }
    });
}

/// An error unless `pre` fits a 1x1 stride-1 convolution's input channels.
fn check_pre(pre: Option<PreActivation>, s: &ConvShape) -> Result<(), String> {
    match pre {
        Some((scale, shift)) if !s.pointwise() || scale.len() != s.cin || shift.len() != s.cin => {
            Err(format!(
                "convolution: a pre-activation of {} channels does not fit ({s:?})",
                scale.len()
            ))
        }
        _ => Ok(()),
    }
}

/// One image's convolution, `xi` `[cin, h, w]` into `yi` `[cout, plane]` (shapes checked by
/// the caller), the GEMM on `par` threads.
#[allow(clippy::too_many_arguments)]
fn conv_image(
    xi: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    pre: Option<PreActivation>,
    s: &ConvShape,
    yi: &mut [f32],
    par: usize,
) {
    let (plane, rows) = (s.out_plane(), s.col_rows());
    let wm = Mat {
        data: weight,
        rs: rows,
        cs: 1,
    };
    if let Some(bias) = bias {
        for (row, &v) in yi.chunks_exact_mut(plane).zip(bias) {
            row.fill(v);
        }
    }
    // The im2col matrix is made a block of rows at a time as the product packs it.
    let make = |p: usize, j0: usize, out: &mut [f32]| im2col_part(xi, s, p, j0, out);
    let b = if s.pointwise() {
        let x = Mat {
            data: xi,
            rs: plane,
            cs: 1,
        };
        BSource::Mat(x, pre)
    } else {
        BSource::Rows(&make)
    };
    let shape = (s.cout, plane, rows);
    matmul_b(shape, yi, plane, bias.is_some(), wm, b, par);
    if relu {
        yi.iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

/// One DenseNet layer's inference weights: `norm1` as scale and shift `[cin]`, `conv1`
/// `[mid, cin, 1, 1]` with `norm2` folded in (its bias `[mid]`, then ReLU), `conv2`
/// `[growth, mid, k, k]` (padding `k / 2`, no bias).
#[derive(Debug, Clone, Copy)]
pub struct DenseLayer<'a> {
    /// `norm1`'s scale and shift.
    pub norm1: PreActivation<'a>,
    /// `conv1`'s weight and (folded `norm2`) bias.
    pub conv1: (&'a [f32], &'a [f32]),
    /// `conv2`'s weight.
    pub conv2: &'a [f32],
    /// `conv2`'s kernel side.
    pub k: usize,
}

thread_local! {
    /// Each thread's buffer for a dense layer's bottleneck (`conv1`'s output).
    static BOTTLENECK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Dense layers over `x` `[b, c0, h, w]`: each layer's new features are written after its
/// input's channels in one output buffer (no concatenation), and its `norm1` + ReLU is
/// applied as `conv1` reads them. Returns `[b, c0 + sum of growths, h, w]` and its width.
pub fn dense_layers_forward(
    x: &[f32],
    (b, c0, h, w): (usize, usize, usize, usize),
    layers: &[DenseLayer],
) -> Result<(Vec<f32>, usize), String> {
    let plane = h * w;
    if x.len() != b * c0 * plane || plane == 0 {
        return Err(format!(
            "dense layers: input of {} values is not [{b}, {c0}, {h}, {w}]",
            x.len()
        ));
    }
    // Each layer's two convolutions, checked.
    let mut shapes = Vec::with_capacity(layers.len());
    let mut cin = c0;
    for (i, l) in layers.iter().enumerate() {
        let mid = l.conv1.1.len();
        let growth = l.conv2.len() / (mid * l.k * l.k).max(1);
        let (first, second) = ConvShape::dense_layer((1, cin, h, w), mid, growth, l.k);
        let fits = l.k % 2 == 1
            && growth > 0
            && first.check(cin * plane, l.conv1.0.len(), Some(mid)).is_ok()
            && second.check(mid * plane, l.conv2.len(), None).is_ok()
            && second.out() == Some((h, w))
            && check_pre(Some(l.norm1), &first).is_ok();
        if !fits {
            return Err(format!(
                "dense layer {i}: weights do not fit {cin} input channels"
            ));
        }
        shapes.push((first, second));
        cin += growth;
    }
    let width = cin;
    // SAFETY: each image's first `c0` channels are copied in, and each layer writes its new
    // channels before the next reads them.
    let mut y = unsafe { unfilled(b * width * plane) };
    let (across, par) = split(b);
    let image = |xi: &[f32], yi: &mut [f32]| {
        yi[..c0 * plane].copy_from_slice(xi);
        BOTTLENECK.with(|cell| {
            let mut middle = cell.borrow_mut();
            for (l, (first, second)) in layers.iter().zip(&shapes) {
                let need = first.cout * plane;
                if middle.len() < need {
                    middle.resize(need, 0.0);
                }
                let mid = &mut middle[..need];
                let (input, rest) = yi.split_at_mut(first.cin * plane);
                let (w1, b1) = l.conv1;
                conv_image(input, w1, Some(b1), true, Some(l.norm1), first, mid, par);
                let new = &mut rest[..second.cout * plane];
                conv_image(mid, l.conv2, None, false, None, second, new, par);
            }
        });
    };
    if across {
        y.par_chunks_mut(width * plane)
            .zip(x.par_chunks(c0 * plane))
            .for_each(|(yi, xi)| image(xi, yi));
    } else {
        y.chunks_mut(width * plane)
            .zip(x.chunks(c0 * plane))
            .for_each(|(yi, xi)| image(xi, yi));
    }
    Ok((y, width))
}

/// A convolution's gradients: the input's, the weight's and the bias's (each when asked for).
pub type ConvGrads = (Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>);

/// Values of im2col the backward makes at a time (32 MiB): whole input channels' rows, so a
/// large convolution (the segmentation head's, 604 MB of im2col an image) never makes it all.
/// Small in the unit tests, so that their convolutions cross the blocks' edges.
#[cfg(not(test))]
const BACKWARD_COLUMNS: usize = 8 << 20;
#[cfg(test)]
const BACKWARD_COLUMNS: usize = 1 << 10;

/// The input channels of each block of im2col rows the backward makes at a time.
fn channel_blocks(s: &ConvShape) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = (BACKWARD_COLUMNS / (s.kh * s.kw * s.out_plane()).max(1)).max(1);
    let cin = s.cin;
    (0..cin).step_by(per).map(move |c0| c0..(c0 + per).min(cin))
}

/// Gradients of a convolution for the output gradient `dy` `[b, cout, ho, wo]`: the input's
/// (when `want_dx`), the weight's and the bias's (when `want_db`; sums over images in a
/// fixed order).
pub fn conv_backward(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    s: &ConvShape,
    want_dx: bool,
    want_db: bool,
) -> Result<ConvGrads, String> {
    s.check(x.len(), weight.len(), None)?;
    let (plane, rows) = (s.out_plane(), s.col_rows());
    if dy.len() != s.b * s.cout * plane {
        return Err(format!(
            "convolution backward: gradient does not fit ({s:?})"
        ));
    }
    let (across, par) = split(s.b);
    let in_len = s.cin * s.h * s.w;
    // Weight and bias gradients: one partial sum per fixed chunk of images, added in order.
    let chunk = if across {
        s.b.div_ceil(rayon::current_num_threads())
    } else {
        s.b
    };
    // The weight gradient is summed as dW = dy col^T, or transposed as dW^T = col dy^T
    // ([rows, cout], then turned) when there are fewer output channels than im2col rows: the
    // operand read across (gathered into the packing) is then dy, the smaller one.
    let transposed = s.cout < rows;
    let partial = |c: usize| -> (Vec<f32>, Vec<f32>) {
        let mut dw = vec![0f32; rows * s.cout];
        let mut db = vec![0f32; s.cout];
        for i in c * chunk..((c + 1) * chunk).min(s.b) {
            let xi = &x[i * in_len..(i + 1) * in_len];
            let gi = &dy[i * s.cout * plane..(i + 1) * s.cout * plane];
            if want_db {
                for (d, row) in db.iter_mut().zip(gi.chunks_exact(plane)) {
                    *d += row.iter().sum::<f32>();
                }
            }
            // The rows r0..r0 + cols.len() / plane of im2col, given as `cols`.
            let run = |cols: &[f32], r0: usize, dw: &mut [f32]| {
                let n_rows = cols.len() / plane;
                let (col, col_t) = (
                    Mat {
                        data: cols,
                        rs: plane,
                        cs: 1,
                    },
                    Mat {
                        data: cols,
                        rs: 1,
                        cs: plane,
                    },
                );
                let (g, g_t) = (
                    Mat {
                        data: gi,
                        rs: plane,
                        cs: 1,
                    },
                    Mat {
                        data: gi,
                        rs: 1,
                        cs: plane,
                    },
                );
                if transposed {
                    // dW^T[r, co] += sum_p col[r, p] dy[co, p]
                    let dst = &mut dw[r0 * s.cout..(r0 + n_rows) * s.cout];
                    matmul((n_rows, s.cout, plane), dst, s.cout, true, col, g_t, par);
                } else {
                    // dW[co, r] += sum_p dy[co, p] col[r, p]
                    let dst = &mut dw[r0..(s.cout - 1) * rows + r0 + n_rows];
                    matmul((s.cout, n_rows, plane), dst, rows, true, g, col_t, par);
                }
            };
            if s.pointwise() {
                run(xi, 0, &mut dw);
            } else {
                let (kk, plane_in) = (s.kh * s.kw, s.h * s.w);
                for cs in channel_blocks(s) {
                    with_columns(cs.len() * kk * plane, |col| {
                        im2col(&xi[cs.start * plane_in..cs.end * plane_in], s, col);
                        run(col, cs.start * kk, &mut dw);
                    });
                }
            }
        }
        if transposed {
            let mut turned = vec![0f32; s.cout * rows];
            for (r, row) in dw.chunks_exact(s.cout).enumerate() {
                for (co, &v) in row.iter().enumerate() {
                    turned[co * rows + r] = v;
                }
            }
            dw = turned;
        }
        (dw, db)
    };
    let chunks = s.b.div_ceil(chunk);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = if across {
        (0..chunks).into_par_iter().map(partial).collect()
    } else {
        (0..chunks).map(partial).collect()
    };
    let (mut dw, mut db) = (vec![0f32; s.cout * rows], vec![0f32; s.cout]);
    for (pw, pb) in &parts {
        dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
    }
    let dx = want_dx.then(|| {
        // A 1x1 convolution's product writes the whole input gradient; otherwise col2im adds
        // into zeros.
        let mut dx = if s.pointwise() {
            // SAFETY: as said.
            unsafe { unfilled(s.b * in_len) }
        } else {
            vec![0f32; s.b * in_len]
        };
        // dcol[r, p] = sum_co W[co, r] dy[co, p]
        let wt = Mat {
            data: weight,
            rs: 1,
            cs: rows,
        };
        let image = |i: usize, dxi: &mut [f32]| {
            let g = Mat {
                data: &dy[i * s.cout * plane..(i + 1) * s.cout * plane],
                rs: plane,
                cs: 1,
            };
            if s.pointwise() {
                matmul((rows, plane, s.cout), dxi, plane, false, wt, g, par);
            } else {
                let (kk, plane_in) = (s.kh * s.kw, s.h * s.w);
                for cs in channel_blocks(s) {
                    let (r0, n_rows) = (cs.start * kk, cs.len() * kk);
                    let wt = Mat {
                        data: &weight[r0..],
                        rs: 1,
                        cs: rows,
                    };
                    with_columns(n_rows * plane, |col| {
                        matmul((n_rows, plane, s.cout), col, plane, false, wt, g, par);
                        col2im(col, s, &mut dxi[cs.start * plane_in..cs.end * plane_in]);
                    });
                }
            }
        };
        if across {
            dx.par_chunks_mut(in_len)
                .enumerate()
                .for_each(|(i, d)| image(i, d));
        } else {
            dx.chunks_mut(in_len)
                .enumerate()
                .for_each(|(i, d)| image(i, d));
        }
        dx
    });
    Ok((dx, dw, want_db.then_some(db)))
}

/// `b` images of `c` planes of `plane` values, each image `stride` values after the one
/// before: `c * plane` when the buffer holds only them, more in a DenseNet block's buffer,
/// whose later channels lie between a layer's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Planes<'a> {
    data: &'a [f32],
    b: usize,
    c: usize,
    plane: usize,
    stride: usize,
}

impl<'a> Planes<'a> {
    /// All of `data` as `[b, c, plane]`.
    pub fn whole(data: &'a [f32], c: usize, plane: usize) -> Self {
        Self::leading(data, c, c, plane)
    }

    /// The first `c` of the `total` channels of each image of `data` `[b, total, plane]`.
    pub fn leading(data: &'a [f32], c: usize, total: usize, plane: usize) -> Self {
        let stride = total * plane;
        let b = data.len().checked_div(stride).unwrap_or(0);
        Self {
            data,
            b: if c <= total { b } else { 0 },
            c,
            plane,
            stride,
        }
    }

    /// Plane `ch` of image `i`.
    fn get(&self, i: usize, ch: usize) -> &'a [f32] {
        &self.data[i * self.stride + ch * self.plane..][..self.plane]
    }

    /// Images, channels and values per plane.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.b, self.c, self.plane)
    }
}

/// `sum f(v)` over a plane in eight f32 lanes (vectorisable), returned in f64.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
}

/// Per-channel batch statistics of `x`: means and biased variances (each plane summed in f32
/// lanes, planes added in f64; two passes).
pub fn channel_stats(x: Planes) -> (Vec<f32>, Vec<f32>) {
    let (b, c, plane) = x.dims();
    let n = (b * plane) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..b).map(move |i| x.get(i, ch));
            let mean = planes().map(|p| lane_sum(p, |v| v)).sum::<f64>() / n;
            let m = mean as f32;
            let var = planes()
                .map(|p| lane_sum(p, |v| (v - m) * (v - m)))
                .sum::<f64>()
                / n;
            (m, var as f32)
        })
        .unzip()
}

/// BatchNorm in training mode over `x` with the batch statistics `mean`, `var` (from
/// [`channel_stats`]): `(x - mean) / sqrt(var + eps) * gamma + beta`, then ReLU if asked, as
/// the per-channel affine it is; the output is `[b, c, plane]`.
pub fn batch_norm_forward(
    x: Planes,
    (mean, var): (&[f32], &[f32]),
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
    relu: bool,
) -> Vec<f32> {
    let scale: Vec<f32> = var
        .iter()
        .zip(gamma)
        .map(|(v, g)| 1.0 / (v + eps).sqrt() * g)
        .collect();
    let shift: Vec<f32> = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    channel_affine(x, &scale, &shift, relu)
}

/// `(sum g, sum g * (v - m))` over two equal planes in eight f32 lanes each, in one pass.
fn lane_sums(g: &[f32], v: &[f32], m: f32) -> (f64, f64) {
    let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
    let (cg, cv) = (g.chunks_exact(8), v.chunks_exact(8));
    let (mut ta, mut tb) = (0f32, 0f32);
    for (&g, &v) in cg.remainder().iter().zip(cv.remainder()) {
        ta += g;
        tb += g * (v - m);
    }
    for (g8, v8) in cg.zip(cv) {
        for i in 0..8 {
            a[i] += g8[i];
            b[i] += g8[i] * (v8[i] - m);
        }
    }
    let sum = |l: [f32; 8], t: f32| l.iter().map(|&x| x as f64).sum::<f64>() + t as f64;
    (sum(a, ta), sum(b, tb))
}

/// Where [`batch_norm_backward_over`] puts the input gradient.
pub enum InputGrad<'a> {
    /// Over the output gradient it was given.
    Over,
    /// Added to the first channels of each image of a buffer laid out as the input's
    /// [`Planes`] (same images, same stride).
    AddTo(&'a mut [f32]),
}

/// Gradients of [`batch_norm_forward`] with the forward's batch statistics `(mean, var)`
/// (which depend on `x`) from the output gradient `dy` `[b, c, plane]`, which it uses as its
/// work space: the gradients of `gamma` and `beta`, and the input's in `dx`. `relu_out`: the
/// forward's output when it applied the ReLU (its zeros mask `dy`).
pub fn batch_norm_backward_over(
    x: Planes,
    dy: &mut [f32],
    gamma: &[f32],
    (mean, var): (&[f32], &[f32]),
    eps: f32,
    relu_out: Option<&[f32]>,
    dx: InputGrad,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let (b, c, plane) = x.dims();
    if dy.len() != b * c * plane
        || gamma.len() != c
        || relu_out.is_some_and(|y| y.len() != dy.len())
    {
        return Err(format!(
            "batch norm backward: gradient does not fit {:?}",
            x.dims()
        ));
    }
    // Each plane masked (while it is in cache) and summed; the planes' sums are added per
    // channel in image order.
    let planes: Vec<(f64, f64)> = dy
        .par_chunks_mut(plane)
        .enumerate()
        .map(|(j, d)| {
            if let Some(y) = relu_out {
                d.iter_mut().zip(&y[j * plane..]).for_each(|(g, &v)| {
                    let g0 = *g;
                    *g = if v > 0.0 { g0 } else { 0.0 }
                });
            }
            let (i, ch) = (j / c, j % c);
            lane_sums(d, x.get(i, ch), mean[ch])
        })
        .collect();
    let n = (b * plane) as f64;
    let dy_at = |i: usize, ch: usize| (i * c + ch) * plane;
    let (dgamma, dbeta): (Vec<f32>, Vec<f32>) = (0..c)
        .map(|ch| {
            let inv = 1.0 / (var[ch] + eps).sqrt();
            let (mut sg, mut sgx) = (0f64, 0f64);
            for i in 0..b {
                let (a, b) = planes[i * c + ch];
                sg += a;
                sgx += b;
            }
            ((sgx * inv as f64) as f32, sg as f32)
        })
        .unzip();
    // dx = k * (g - mean of g - xhat * mean of g xhat), per channel.
    let coefficients = |ch: usize| {
        let inv = 1.0 / (var[ch] + eps).sqrt();
        let (mg, mgx) = (dbeta[ch] / n as f32, dgamma[ch] / n as f32);
        (mean[ch], inv, gamma[ch] * inv, mg, mgx)
    };
    match dx {
        InputGrad::Over => dy.par_chunks_mut(plane).enumerate().for_each(|(j, d)| {
            let (i, ch) = (j / c, j % c);
            let (m, inv, k, mg, mgx) = coefficients(ch);
            for (d, &v) in d.iter_mut().zip(x.get(i, ch)) {
                let xhat = (v - m) * inv;
                *d = k * (*d - mg - xhat * mgx);
            }
        }),
        InputGrad::AddTo(grad) => {
            if grad.len() < b * x.stride || x.stride < c * plane {
                return Err("batch norm backward: the gradient buffer does not fit".into());
            }
            let dy = &*dy;
            grad.par_chunks_mut(x.stride)
                .take(b)
                .enumerate()
                .for_each(|(i, gi)| {
                    for (ch, acc) in gi[..c * plane].chunks_exact_mut(plane).enumerate() {
                        let (m, inv, k, mg, mgx) = coefficients(ch);
                        let d = &dy[dy_at(i, ch)..][..plane];
                        for ((a, &g), &v) in acc.iter_mut().zip(d).zip(x.get(i, ch)) {
                            let xhat = (v - m) * inv;
                            *a += k * (g - mg - xhat * mgx);
                        }
                    }
                });
        }
    }
    Ok((dgamma, dbeta))
}

/// A BatchNorm's gradients: the input's, the weight's and the bias's.
pub type BatchNormGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Gradients `(dx, dgamma, dbeta)` of [`batch_norm_forward`] over a whole `x` `[b, c, plane]`
/// (see [`batch_norm_backward_over`]), leaving `dy` as it is.
pub fn batch_norm_backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    stats: (&[f32], &[f32]),
    plane: usize,
    eps: f32,
    relu_out: Option<&[f32]>,
) -> Result<BatchNormGrads, String> {
    let mut dx = match relu_out {
        Some(y) if y.len() == dy.len() => dy
            .par_iter()
            .zip(y.par_iter())
            .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
            .collect::<Vec<f32>>(),
        Some(_) => return Err("batch norm backward: output does not fit the gradient".into()),
        None => dy.to_vec(),
    };
    let x = Planes::whole(x, gamma.len(), plane);
    let (dg, db) = batch_norm_backward_over(x, &mut dx, gamma, stats, eps, None, InputGrad::Over)?;
    Ok((dx, dg, db))
}

/// `x * scale[c] + shift[c]` per channel of `x`, then ReLU if asked (a BatchNorm in
/// evaluation mode); the output is `[b, c, plane]`.
pub fn channel_affine(x: Planes, scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
    let (b, c, plane) = x.dims();
    // SAFETY: every plane is written below.
    let mut y = unsafe { unfilled(b * c * plane) };
    y.par_chunks_mut(plane).enumerate().for_each(|(j, yo)| {
        let (i, ch) = (j / c, j % c);
        let (a, b) = (scale[ch], shift[ch]);
        let xi = x.get(i, ch);
        if relu {
            yo.iter_mut()
                .zip(xi)
                .for_each(|(o, &v)| *o = (v * a + b).max(0.0));
        } else {
            yo.iter_mut().zip(xi).for_each(|(o, &v)| *o = v * a + b);
        }
    });
    y
}

/// The shape of a max pooling: `planes` planes of `h x w`, a square window, stride, padding
/// (padding never wins: it is minus infinity, as in PyTorch).
#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    /// Planes (images x channels).
    pub planes: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
}

impl PoolShape {
    /// Output height and width, or `None` when the window does not fit.
    pub fn out(&self) -> Option<(usize, usize)> {
        if self.stride == 0
            || self.k == 0
            || self.pad * 2 > self.k
            || self.h + 2 * self.pad < self.k
        {
            return None;
        }
        let o = |n: usize| (n + 2 * self.pad - self.k) / self.stride + 1;
        Some((o(self.h), o(self.w)))
    }

    /// The input indices `lo..hi` along a side of `n` that output `o`'s window covers.
    fn window(&self, o: usize, n: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.pad as isize;
        let lo = start.max(0) as usize;
        let hi = (start + self.k as isize).clamp(0, n as isize) as usize;
        lo..hi
    }

    /// Index into the plane of the first maximum of each output's window (row-major order, as
    /// PyTorch picks it; a NaN wins).
    fn argmax(&self, plane: &[f32], mut f: impl FnMut(usize, usize)) {
        let (ho, wo) = self.out().expect("checked shape");
        let cols: Vec<std::ops::Range<usize>> = (0..wo).map(|o| self.window(o, self.w)).collect();
        for oy in 0..ho {
            let rows = self.window(oy, self.h);
            for (ox, xs) in cols.iter().enumerate() {
                let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                for iy in rows.clone() {
                    let row = &plane[iy * self.w..][xs.clone()];
                    for (ix, &v) in xs.clone().zip(row) {
                        if v > best || v.is_nan() || at == usize::MAX {
                            best = v;
                            at = iy * self.w + ix;
                        }
                    }
                }
                f(oy * wo + ox, at);
            }
        }
    }
}

/// Max pooling of `x` `[planes, h, w]`.
pub fn max_pool_forward(x: &[f32], s: &PoolShape) -> Result<Vec<f32>, String> {
    let (ho, wo) = s
        .out()
        .ok_or(format!("max pool: window does not fit ({s:?})"))?;
    if x.len() != s.planes * s.h * s.w {
        return Err(format!("max pool: input does not fit ({s:?})"));
    }
    // SAFETY: every output of every plane is written below.
    let mut y = unsafe { unfilled(s.planes * ho * wo) };
    y.par_chunks_mut(ho * wo)
        .zip(x.par_chunks(s.h * s.w))
        .for_each(|(yo, xi)| s.argmax(xi, |o, j| yo[o] = xi[j]));
    Ok(y)
}

/// The input gradient of [`max_pool_forward`]: each output's gradient goes to its window's
/// first maximum.
pub fn max_pool_backward(x: &[f32], dy: &[f32], s: &PoolShape) -> Result<Vec<f32>, String> {
    let (ho, wo) = s
        .out()
        .ok_or(format!("max pool: window does not fit ({s:?})"))?;
    if x.len() != s.planes * s.h * s.w || dy.len() != s.planes * ho * wo {
        return Err(format!("max pool backward: shapes do not fit ({s:?})"));
    }
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(s.h * s.w)
        .zip(x.par_chunks(s.h * s.w))
        .zip(dy.par_chunks(ho * wo))
        .for_each(|((d, xi), g)| s.argmax(xi, |o, j| d[j] += g[o]));
    Ok(dx)
}

/// The shape of a 2 x 2, stride-2 transposed convolution (the ViTDet pyramid's upsampling):
/// `[b, c, h, w]` to `[b, o, 2h, 2w]` by a weight `[c, o, 2, 2]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upsample2x {
    /// Images.
    pub b: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
}

impl Upsample2x {
    fn check(&self, x: usize, weight: usize) -> Result<(), String> {
        if self.c == 0
            || self.o == 0
            || x != self.b * self.c * self.h * self.w
            || weight != self.c * self.o * 4
        {
            return Err(format!(
                "2x2 transposed convolution: input or weight does not fit ({self:?})"
            ));
        }
        Ok(())
    }

    /// One image's products `z` `[o, 2, 2, h, w]` into its output `[o, 2h, 2w]`, plus the bias.
    fn place(&self, z: &[f32], y: &mut [f32], bias: &[f32]) {
        let (h, w) = (self.h, self.w);
        y.par_chunks_mut(4 * h * w)
            .zip(z.par_chunks(4 * h * w))
            .zip(bias)
            .for_each(|((y, z), &add)| {
                for (d, zd) in z.chunks_exact(h * w).enumerate() {
                    for (i, zr) in zd.chunks_exact(w).enumerate() {
                        let yr = &mut y[(2 * i + d / 2) * 2 * w..][..2 * w];
                        for (yv, zv) in yr.iter_mut().skip(d % 2).step_by(2).zip(zr) {
                            *yv = zv + add;
                        }
                    }
                }
            });
    }

    /// One image's output gradient `[o, 2h, 2w]` in the products' layout `[o, 2, 2, h, w]`.
    fn gather(&self, y: &[f32], z: &mut [f32]) {
        let (h, w) = (self.h, self.w);
        z.par_chunks_mut(4 * h * w)
            .zip(y.par_chunks(4 * h * w))
            .for_each(|(z, y)| {
                for (d, zd) in z.chunks_exact_mut(h * w).enumerate() {
                    for (i, zr) in zd.chunks_exact_mut(w).enumerate() {
                        let yr = &y[(2 * i + d / 2) * 2 * w..][..2 * w];
                        for (zv, yv) in zr.iter_mut().zip(yr.iter().skip(d % 2).step_by(2)) {
                            *zv = *yv;
                        }
                    }
                }
            });
    }
}

/// A 2 x 2, stride-2 transposed convolution plus `bias` `[o]`: each input pixel writes its
/// own 2 x 2 block of the output. Per image one product `W^T X` (`[4o, hw]`), then moved into
/// place with the bias.
pub fn upsample2x_forward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: &Upsample2x,
) -> Result<Vec<f32>, String> {
    s.check(x.len(), weight.len())?;
    if bias.len() != s.o {
        return Err(format!(
            "2x2 transposed convolution: bias does not fit ({s:?})"
        ));
    }
    let (plane, rows) = (s.h * s.w, 4 * s.o);
    // SAFETY: `place` writes every value of every image, and each product every value of
    // the scratch `z` (not accumulating) before `place` reads it.
    let (mut y, mut z) = unsafe { (unfilled(s.b * rows * plane), unfilled(rows * plane)) };
    for (xi, yi) in x
        .chunks_exact(s.c * plane)
        .zip(y.chunks_exact_mut(rows * plane))
    {
        // Z[(o, di, dj), p] = sum_c W[c, (o, di, dj)] X[c, p].
        let wt = Mat {
            data: weight,
            rs: 1,
            cs: rows,
        };
        let xm = Mat {
            data: xi,
            rs: plane,
            cs: 1,
        };
        let threads = rayon::current_num_threads();
        matmul((rows, plane, s.c), &mut z, plane, false, wt, xm, threads);
        s.place(&z, yi, bias);
    }
    Ok(y)
}

/// The input, weight and bias gradients of [`upsample2x_forward`].
pub type Upsample2xGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The gradients of [`upsample2x_forward`] from the output gradient `dy`: input, weight and
/// bias (the weight's summed over the images in order).
pub fn upsample2x_backward(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    s: &Upsample2x,
) -> Result<Upsample2xGrads, String> {
    s.check(x.len(), weight.len())?;
    let (plane, rows) = (s.h * s.w, 4 * s.o);
    if dy.len() != s.b * rows * plane {
        return Err(format!(
            "2x2 transposed convolution backward: gradient does not fit ({s:?})"
        ));
    }
    let threads = rayon::current_num_threads();
    let mut dx = vec![0f32; x.len()];
    let mut dw = vec![0f32; weight.len()];
    let mut g = vec![0f32; rows * plane];
    for (i, ((xi, dxi), gi)) in x
        .chunks_exact(s.c * plane)
        .zip(dx.chunks_exact_mut(s.c * plane))
        .zip(dy.chunks_exact(rows * plane))
        .enumerate()
    {
        s.gather(gi, &mut g);
        let gm = Mat {
            data: &g,
            rs: plane,
            cs: 1,
        };
        // dX[c, p] = sum_r W[c, r] G[r, p].
        let wm = Mat {
            data: weight,
            rs: rows,
            cs: 1,
        };
        matmul((s.c, plane, rows), dxi, plane, false, wm, gm, threads);
        // dW[c, r] += sum_p X[c, p] G[r, p].
        let xm = Mat {
            data: xi,
            rs: plane,
            cs: 1,
        };
        let gt = Mat {
            data: &g,
            rs: 1,
            cs: plane,
        };
        matmul((s.c, rows, plane), &mut dw, rows, i > 0, xm, gt, threads);
    }
    let db = (0..s.o)
        .into_par_iter()
        .map(|o| {
            let planes = (0..s.b).map(|i| &dy[(i * s.o + o) * 4 * plane..][..4 * plane]);
            planes.map(|p| p.iter().sum::<f32>()).sum()
        })
        .collect();
    Ok((dx, dw, db))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct convolution, the definition.
    fn naive(x: &[f32], w: &[f32], s: &ConvShape) -> Vec<f32> {
        let (ho, wo) = s.out().unwrap();
        let mut y = vec![0f32; s.b * s.cout * ho * wo];
        for b in 0..s.b {
            for co in 0..s.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = 0f64;
                        for ci in 0..s.cin {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * s.cin + ci) * s.h + iy as usize) * s.w
                                        + ix as usize];
                                    let wv = w[((co * s.cin + ci) * s.kh + ky) * s.kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((b * s.cout + co) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.unit() as f32 * 2.0 - 1.0).collect()
    }

    /// Every piece of every im2col row (any start, any length) equals that piece of the whole
    /// matrix: "same" convolutions (whose rows are shifted planes) and others.
    #[test]
    fn im2col_parts_match_the_whole_matrix() {
        let shapes = [
            (2, 5, 6, 3, 1, 1),
            (1, 7, 7, 5, 1, 2),
            (2, 6, 5, 3, 2, 1),
            (1, 4, 4, 1, 1, 0),
        ];
        let mut compared = 0;
        for (i, &(cin, h, w, k, stride, pad)) in shapes.iter().enumerate() {
            let s = ConvShape::square((1, cin, h, w), 1, k, (stride, pad));
            let plane = s.out_plane();
            let x = values(cin * h * w, 500 + i as u64);
            let mut whole = vec![0f32; s.col_rows() * plane];
            im2col(&x, &s, &mut whole);
            for p in 0..s.col_rows() {
                for j0 in 0..plane {
                    for len in [1, 2, 3, plane - j0] {
                        let len = len.min(plane - j0);
                        let mut part = vec![f32::NAN; len];
                        im2col_part(&x, &s, p, j0, &mut part);
                        assert_eq!(
                            part,
                            whole[p * plane + j0..][..len],
                            "shape {i} row {p} at {j0}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 4 * (2 * 9 * 30 + 25 * 49 + 2 * 9 * 9 + 16));
    }

    /// Dense layers in one buffer equal the definition layer by layer: BN + ReLU, a 1x1
    /// convolution + bias + ReLU, a 3x3 convolution, concatenation; across images (batch 3)
    /// and inside the products (batch 1), planes that take either product path (7 x 7, 8 x 8).
    #[test]
    fn dense_layers_match_the_definition() {
        let (mid, growth, c0) = (5, 3, 4);
        let mut compared = 0;
        for (b, h, w) in [(3, 7, 7), (1, 8, 8), (2, 5, 9)] {
            let plane = h * w;
            let owned: Vec<[Vec<f32>; 5]> = (0..3u64)
                .map(|l| {
                    let cin = c0 + l as usize * growth;
                    let seed = 10 * l;
                    [
                        values(cin, seed),
                        values(cin, seed + 1),
                        values(mid * cin, seed + 2),
                        values(mid, seed + 3),
                        values(growth * mid * 9, seed + 4),
                    ]
                })
                .collect();
            let layers: Vec<DenseLayer> = owned
                .iter()
                .map(|v| DenseLayer {
                    norm1: (&v[0], &v[1]),
                    conv1: (&v[2], &v[3]),
                    conv2: &v[4],
                    k: 3,
                })
                .collect();
            let x = values(b * c0 * plane, 99);
            let (y, width) = dense_layers_forward(&x, (b, c0, h, w), &layers).unwrap();
            assert_eq!((width, y.len()), (c0 + 3 * growth, b * width * plane));
            for i in 0..b {
                let mut feats = x[i * c0 * plane..(i + 1) * c0 * plane].to_vec();
                for (l, v) in owned.iter().enumerate() {
                    let cin = c0 + l * growth;
                    let shape =
                        |cin, cout, k| ConvShape::square((1, cin, h, w), cout, k, (1, k / 2));
                    let act: Vec<f32> = feats
                        .iter()
                        .enumerate()
                        .map(|(j, &f)| (f * v[0][j / plane] + v[1][j / plane]).max(0.0))
                        .collect();
                    let m: Vec<f32> = naive(&act, &v[2], &shape(cin, mid, 1))
                        .iter()
                        .enumerate()
                        .map(|(j, &f)| (f + v[3][j / plane]).max(0.0))
                        .collect();
                    feats.extend(naive(&m, &v[4], &shape(mid, growth, 3)));
                }
                let got = &y[i * width * plane..(i + 1) * width * plane];
                assert_eq!(got.len(), feats.len());
                for (g, f) in got.iter().zip(&feats) {
                    assert!((g - f).abs() < 1e-5, "{b}x{h}x{w}: {g} vs {f}");
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 13 * (3 * 49 + 64 + 2 * 45));
    }

    #[test]
    fn backward_by_channel_blocks_matches_the_definition() {
        let mut compared = 0;
        // Several channel blocks (1024 values of im2col at a time in the unit tests): one
        // channel a block here, with more output channels than im2col rows and fewer.
        for (i, &(b, cin, h, w, cout, k, stride, pad)) in
            [(2, 5, 9, 9, 3, 3, 1, 1), (1, 3, 24, 20, 40, 3, 2, 1)]
                .iter()
                .enumerate()
        {
            let s = ConvShape::square((b, cin, h, w), cout, k, (stride, pad));
            assert!(channel_blocks(&s).count() > 1);
            let x = values(b * cin * h * w, 400 + i as u64);
            let wt = values(cout * cin * k * k, 500 + i as u64);
            let (ho, wo) = s.out().unwrap();
            let dy = values(b * cout * ho * wo, 600 + i as u64);
            let (dx, dw, _) = conv_backward(&x, &wt, &dy, &s, true, false).unwrap();
            let dx = dx.unwrap();
            let (mut dx_want, mut dw_want) = (vec![0f64; x.len()], vec![0f64; wt.len()]);
            for bi in 0..b {
                for co in 0..cout {
                    for (oy, ox) in (0..ho).flat_map(|oy| (0..wo).map(move |ox| (oy, ox))) {
                        let g = dy[((bi * cout + co) * ho + oy) * wo + ox] as f64;
                        for (ci, ky, kx) in (0..cin).flat_map(|ci| {
                            (0..k).flat_map(move |ky| (0..k).map(move |kx| (ci, ky, kx)))
                        }) {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let xi = ((bi * cin + ci) * h + iy as usize) * w + ix as usize;
                            let wi = ((co * cin + ci) * k + ky) * k + kx;
                            dx_want[xi] += g * wt[wi] as f64;
                            dw_want[wi] += g * x[xi] as f64;
                        }
                    }
                }
            }
            assert_eq!((dx.len(), dw.len()), (dx_want.len(), dw_want.len()));
            for (got, want) in dx.iter().zip(&dx_want).chain(dw.iter().zip(&dw_want)) {
                assert!(
                    (*got as f64 - want).abs() < 1e-4,
                    "shape {i}: {got} vs {want}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 2 * 5 * 81 + 3 * 5 * 9 + 3 * 24 * 20 + 40 * 3 * 9);
    }

    #[test]
    fn convolution_matches_the_definition_and_its_adjoint() {
        let shapes = [
            (2, 3, 9, 7, 5, 3, 2, 1),
            (3, 4, 6, 6, 6, 1, 1, 0),
            (1, 2, 8, 8, 3, 7, 2, 3),
            (2, 5, 5, 5, 4, 1, 2, 0),
            (1, 3, 5, 6, 2, 3, 1, 1),
            (2, 2, 34, 34, 3, 3, 1, 1),
            (1, 2, 9, 9, 3, 3, 1, 1),
            (1, 3, 11, 10, 4, 5, 1, 2),
            (4, 3, 7, 7, 5, 3, 1, 1),
            (5, 2, 7, 7, 3, 3, 2, 1),
            (3, 6, 7, 7, 4, 1, 1, 0),
        ];
        for (i, &(b, cin, h, w, cout, k, stride, pad)) in shapes.iter().enumerate() {
            let s = ConvShape::square((b, cin, h, w), cout, k, (stride, pad));
            let x = values(b * cin * h * w, i as u64);
            let wt = values(cout * cin * k * k, 100 + i as u64);
            let y = conv_forward(&x, &wt, None, false, None, &s).unwrap();
            let want = naive(&x, &wt, &s);
            assert_eq!(y.len(), want.len());
            let worst = y
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "shape {i}: forward off by {worst}");
            // With a bias and the ReLU.
            let bias = values(cout, 300 + i as u64);
            let yb = conv_forward(&x, &wt, Some(&bias), true, None, &s).unwrap();
            let (ho, wo) = s.out().unwrap();
            assert_eq!(yb.len(), want.len());
            for (j, (g, w)) in yb.iter().zip(&want).enumerate() {
                let w = (w + bias[j / (ho * wo) % cout]).max(0.0);
                assert!((g - w).abs() < 1e-5, "shape {i}: biased forward {g} vs {w}");
            }
            // <dy, conv(x, W)> is linear in x and in W: check the gradients by the adjoint.
            let dy = values(y.len(), 200 + i as u64);
            let (dx, dw, db) = conv_backward(&x, &wt, &dy, &s, true, true).unwrap();
            let db = db.unwrap();
            let dx = dx.unwrap();
            let dot = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
            };
            let lhs = dot(&dy, &want);
            assert!((dot(&dx, &x) - lhs).abs() < 1e-3, "shape {i}: dx adjoint");
            assert!((dot(&dw, &wt) - lhs).abs() < 1e-3, "shape {i}: dW adjoint");
            let (ho, wo) = s.out().unwrap();
            let db0: f32 = (0..b)
                .map(|bi| dy[bi * cout * ho * wo..][..ho * wo].iter().sum::<f32>())
                .sum();
            assert!((db[0] - db0).abs() < 1e-4);
        }
    }

    /// The pooling's choices against the definition (every window position checked against
    /// the plane's bounds), on planes with ties and a NaN, several windows and paddings.
    #[test]
    fn upsample2x_matches_the_definition() {
        let s = Upsample2x {
            b: 2,
            c: 3,
            h: 3,
            w: 5,
            o: 4,
        };
        let (oh, ow) = (2 * s.h, 2 * s.w);
        let x = values(s.b * s.c * s.h * s.w, 700);
        let wt = values(s.c * s.o * 4, 701);
        let bias = values(s.o, 702);
        let dy = values(s.b * s.o * oh * ow, 703);
        let y = upsample2x_forward(&x, &wt, &bias, &s).unwrap();
        let (dx, dw, db) = upsample2x_backward(&x, &wt, &dy, &s).unwrap();
        // y[b, o, 2i + di, 2j + dj] = bias[o] + sum_c x[b, c, i, j] w[c, o, di, dj].
        let mut y_want = vec![0f64; y.len()];
        let (mut dx_want, mut dw_want) = (vec![0f64; x.len()], vec![0f64; wt.len()]);
        let mut db_want = vec![0f64; s.o];
        for bi in 0..s.b {
            for o in 0..s.o {
                for (yy, xx) in (0..oh).flat_map(|yy| (0..ow).map(move |xx| (yy, xx))) {
                    let at = ((bi * s.o + o) * oh + yy) * ow + xx;
                    let g = dy[at] as f64;
                    y_want[at] += bias[o] as f64;
                    db_want[o] += g;
                    for c in 0..s.c {
                        let xi = ((bi * s.c + c) * s.h + yy / 2) * s.w + xx / 2;
                        let wi = ((c * s.o + o) * 2 + yy % 2) * 2 + xx % 2;
                        y_want[at] += x[xi] as f64 * wt[wi] as f64;
                        dx_want[xi] += g * wt[wi] as f64;
                        dw_want[wi] += g * x[xi] as f64;
                    }
                }
            }
        }
        let mut compared = 0;
        for (got, want) in [
            (&y, &y_want),
            (&dx, &dx_want),
            (&dw, &dw_want),
            (&db, &db_want),
        ] {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
                compared += 1;
            }
        }
        // y, dx, dw and db.
        assert_eq!(compared, 2 * 4 * 6 * 10 + 2 * 3 * 15 + 3 * 4 * 4 + 4);
    }

    #[test]
    fn max_pool_matches_the_definition() {
        let mut r = crate::rng::Rng::new(5);
        let shapes = [
            (7, 9, 3, 2, 1),
            (8, 8, 2, 2, 0),
            (5, 6, 3, 1, 1),
            (9, 4, 5, 3, 2),
        ];
        let mut compared = 0;
        for &(h, w, k, stride, pad) in &shapes {
            let s = PoolShape {
                planes: 2,
                h,
                w,
                k,
                stride,
                pad,
            };
            // Values on a coarse grid, so windows hold ties; one NaN in the second plane.
            let mut x: Vec<f32> = (0..2 * h * w)
                .map(|_| (r.unit() * 4.0).floor() as f32)
                .collect();
            x[h * w + w + 1] = f32::NAN;
            let (ho, wo) = s.out().unwrap();
            let dy: Vec<f32> = (0..2 * ho * wo).map(|i| 1.0 + i as f32).collect();
            let mut want_y = vec![0f32; 2 * ho * wo];
            let mut want_dx = vec![0f32; x.len()];
            for p in 0..2 {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let j = p * h * w + iy as usize * w + ix as usize;
                                if x[j] > best || x[j].is_nan() || at == usize::MAX {
                                    best = x[j];
                                    at = j;
                                }
                            }
                        }
                        let o = (p * ho + oy) * wo + ox;
                        want_y[o] = x[at];
                        want_dx[at] += dy[o];
                    }
                }
            }
            let y = max_pool_forward(&x, &s).unwrap();
            let dx = max_pool_backward(&x, &dy, &s).unwrap();
            assert_eq!((y.len(), dx.len()), (want_y.len(), want_dx.len()));
            let same = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan());
            assert!(
                y.iter().zip(&want_y).all(|(a, b)| same(*a, *b)),
                "{h}x{w} k{k}: values"
            );
            assert!(
                dx.iter().zip(&want_dx).all(|(a, b)| same(*a, *b)),
                "{h}x{w} k{k}: gradient"
            );
            compared += y.len() + dx.len();
        }
        assert_eq!(
            compared,
            2 * (4 * 5 + 63 + 4 * 4 + 64 + 5 * 6 + 30 + 3 * 2 + 36)
        );
    }

    #[test]
    fn max_pool_picks_the_first_maximum() {
        let s = PoolShape {
            planes: 1,
            h: 4,
            w: 4,
            k: 3,
            stride: 2,
            pad: 1,
        };
        let x = vec![
            1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0,
        ];
        let y = max_pool_forward(&x, &s).unwrap();
        assert_eq!(y, vec![1.0, 2.0, 3.0, 2.0]);
        let dx = max_pool_backward(&x, &[1.0, 1.0, 1.0, 1.0], &s).unwrap();
        assert_eq!(dx[0], 1.0);
        assert_eq!(dx[1], 0.0);
        assert_eq!(dx[7], 2.0);
        assert_eq!(dx[12], 1.0);
        assert_eq!(dx.iter().sum::<f32>(), 4.0);
    }
}
