//! A JPEG-LS decoder (ITU-T T.87 / ISO 14495-1): lossless and near-lossless, 2 to 16 bits,
//! one component (the grey images DICOM stores as JPEG-LS Lossless `1.2.840.10008.1.2.4.80`
//! and Near-Lossless `.81`), default or preset (LSE) coding parameters.
//!
//! Written from the standard: context modelling with the three quantised local gradients
//! (365 regular contexts, two for run interruptions), median edge prediction with the
//! context's bias correction, limited-length Golomb codes, run mode with the 32-entry run-length
//! table, and the bit stuffing after every 0xFF byte.

/// A decoded image: `width x height` samples of one component, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Bits per sample (P of the frame header).
    pub precision: u8,
    /// The samples.
    pub samples: Vec<u16>,
}

/// Why a JPEG-LS stream could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("JPEG-LS: {0}")]
pub struct JlsError(String);

fn bad<T>(m: impl Into<String>) -> Result<T, JlsError> {
    Err(JlsError(m.into()))
}

/// The run-length code orders by run index (T.87 Table A.2).
const J: [u32; 32] = [
    0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13,
    14, 15,
];

/// Coding parameters of a scan.
#[derive(Debug, Clone, Copy)]
struct Params {
    maxval: i32,
    t1: i32,
    t2: i32,
    t3: i32,
    reset: i32,
    near: i32,
}

impl Params {
    /// The defaults of T.87 C.2.4.1.1 for `maxval` and `near`, with any preset values (non-zero
    /// fields of an LSE segment) applied.
    fn new(precision: u8, near: i32, preset: [i32; 5]) -> Result<Params, JlsError> {
        let maxval = if preset[0] > 0 {
            preset[0]
        } else {
            (1i32 << precision) - 1
        };
        let clamp = |v: i32, lo: i32| if v > maxval || v < lo { lo } else { v };
        // BASIC_T1..3 = 3, 7, 21.
        let (t1, t2, t3) = if maxval >= 128 {
            let f = (maxval.min(4095) + 128) / 256;
            let t1 = clamp(f + 2 + 3 * near, near + 1);
            let t2 = clamp(f * 4 + 3 + 5 * near, t1);
            let t3 = clamp(f * 17 + 4 + 7 * near, t2);
            (t1, t2, t3)
        } else {
            let f = 256 / (maxval + 1);
            let t1 = clamp((3 / f + 3 * near).max(2), near + 1);
            let t2 = clamp((7 / f + 5 * near).max(3), t1);
            let t3 = clamp((21 / f + 7 * near).max(4), t2);
            (t1, t2, t3)
        };
        let pick = |given: i32, default: i32| if given > 0 { given } else { default };
        let p = Params {
            maxval,
            t1: pick(preset[1], t1),
            t2: pick(preset[2], t2),
            t3: pick(preset[3], t3),
            reset: pick(preset[4], 64),
            near,
        };
        if near < 0 || near > maxval.min(255) / 2 {
            return bad(format!("NEAR {near} is out of range for MAXVAL {maxval}"));
        }
        if !(p.t1 <= p.t2 && p.t2 <= p.t3 && p.reset >= 3) {
            return bad("inconsistent preset coding parameters");
        }
        Ok(p)
    }
}

/// Reads the entropy-coded bits of a scan: after a 0xFF byte the next byte carries 7 bits; a
/// 0xFF followed by a byte with its top bit set is a marker, which ends the scan.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    count: u32,
    prev_ff: bool,
    at_marker: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits {
            data,
            pos: 0,
            acc: 0,
            count: 0,
            prev_ff: false,
            at_marker: false,
        }
    }

    fn fill(&mut self) {
        while self.count <= 48 {
            if self.at_marker || self.pos >= self.data.len() {
                // Past the end: zeros (a valid stream never reads them).
                self.acc <<= 8;
                self.count += 8;
                continue;
            }
            let b = self.data[self.pos];
            if self.prev_ff {
                if b & 0x80 != 0 {
                    self.at_marker = true;
                    continue;
                }
                self.pos += 1;
                self.acc = (self.acc << 7) | b as u64;
                self.count += 7;
                self.prev_ff = false;
            } else {
                if b == 0xFF && self.data.get(self.pos + 1).is_some_and(|&n| n & 0x80 != 0) {
                    self.at_marker = true;
                    continue;
                }
                self.pos += 1;
                self.acc = (self.acc << 8) | b as u64;
                self.count += 8;
                self.prev_ff = b == 0xFF;
            }
        }
    }

    fn bits(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        if self.count < n {
            self.fill();
        }
        self.count -= n;
        ((self.acc >> self.count) & ((1u64 << n) - 1)) as i32
    }

    fn bit(&mut self) -> bool {
        self.bits(1) == 1
    }

    /// Zeros before the next 1 (which is consumed), up to `max` (then an error).
    fn unary(&mut self, max: i32) -> Result<i32, JlsError> {
        let mut n = 0;
        while !self.bit() {
            n += 1;
            if n > max {
                return bad("corrupt data: a code longer than the limit");
            }
        }
        Ok(n)
    }

    /// Byte offset just after the scan's data (where the next marker starts).
    fn end(&self) -> usize {
        let mut p = self.pos;
        while p + 1 < self.data.len() && !(self.data[p] == 0xFF && self.data[p + 1] & 0x80 != 0) {
            p += 1;
        }
        p
    }
}

/// Regular-mode context: `A`, `B`, `C`, `N` of T.87 A.2.
#[derive(Debug, Clone, Copy)]
struct Context {
    a: i32,
    b: i32,
    c: i32,
    n: i32,
}

/// Run-interruption context (RItype 0 or 1): `A`, `N`, `Nn`.
#[derive(Debug, Clone, Copy)]
struct RunContext {
    a: i32,
    n: i32,
    nn: i32,
}

struct Scan<'p> {
    p: &'p Params,
    range: i32,
    qbpp: u32,
    limit: i32,
    ctx: Vec<Context>,
    run_ctx: [RunContext; 2],
    run_index: usize,
}

impl<'p> Scan<'p> {
    fn new(p: &'p Params) -> Self {
        let range = (p.maxval + 2 * p.near) / (2 * p.near + 1) + 1;
        let log2 = |v: i32| {
            let mut b = 0u32;
            while (1i64 << b) < v as i64 {
                b += 1;
            }
            b
        };
        let qbpp = log2(range);
        let bpp = log2(p.maxval + 1).max(2);
        let limit = 2 * (bpp as i32 + bpp.max(8) as i32);
        let a = ((range + 32) / 64).max(2);
        Scan {
            p,
            range,
            qbpp,
            limit,
            ctx: vec![
                Context {
                    a,
                    b: 0,
                    c: 0,
                    n: 1
                };
                365
            ],
            run_ctx: [RunContext { a, n: 1, nn: 0 }; 2],
            run_index: 0,
        }
    }

    fn quantize(&self, d: i32) -> i32 {
        let p = self.p;
        if d <= -p.t3 {
            -4
        } else if d <= -p.t2 {
            -3
        } else if d <= -p.t1 {
            -2
        } else if d < -p.near {
            -1
        } else if d <= p.near {
            0
        } else if d < p.t1 {
            1
        } else if d < p.t2 {
            2
        } else if d < p.t3 {
            3
        } else {
            4
        }
    }

    /// A limited-length Golomb code of order `k` (T.87 A.5.3).
    fn golomb(&self, bits: &mut Bits, k: u32, limit: i32) -> Result<i32, JlsError> {
        let high = bits.unary(limit)?;
        if high >= limit - (self.qbpp as i32 + 1) {
            return Ok(bits.bits(self.qbpp) + 1);
        }
        Ok((high << k) + bits.bits(k))
    }

    /// The reconstructed sample from a prediction and an error (T.87 A.4.5, modulo reduction).
    fn reconstruct(&self, px: i32, err: i32) -> i32 {
        let p = self.p;
        let q = 2 * p.near + 1;
        let mut v = px + err * q;
        if v < -p.near {
            v += self.range * q;
        } else if v > p.maxval + p.near {
            v -= self.range * q;
        }
        v.clamp(0, p.maxval)
    }

    fn regular(
        &mut self,
        bits: &mut Bits,
        qs: i32,
        ra: i32,
        rb: i32,
        rc: i32,
    ) -> Result<i32, JlsError> {
        let sign = if qs < 0 { -1 } else { 1 };
        let q = (qs * sign) as usize;
        let cx = self.ctx[q];
        let mut px = if rc >= ra.max(rb) {
            ra.min(rb)
        } else if rc <= ra.min(rb) {
            ra.max(rb)
        } else {
            ra + rb - rc
        };
        px = (px + sign * cx.c).clamp(0, self.p.maxval);
        let mut k = 0u32;
        while (cx.n << k) < cx.a && k < 24 {
            k += 1;
        }
        let m = self.golomb(bits, k, self.limit)?;
        let mut err = if m & 1 == 0 { m >> 1 } else { -((m + 1) >> 1) };
        if self.p.near == 0 && k == 0 && 2 * cx.b + cx.n <= 0 {
            err = -err - 1;
        }
        if err.abs() > 65535 {
            return bad("corrupt data: an error value out of range");
        }
        // Context update (A.6.1) and bias correction (A.6.2).
        let c = &mut self.ctx[q];
        c.a += err.abs();
        c.b += err * (2 * self.p.near + 1);
        if c.n == self.p.reset {
            c.a >>= 1;
            c.b >>= 1;
            c.n >>= 1;
        }
        c.n += 1;
        if c.b + c.n <= 0 {
            c.b += c.n;
            if c.b <= -c.n {
                c.b = -c.n + 1;
            }
            if c.c > -128 {
                c.c -= 1;
            }
        } else if c.b > 0 {
            c.b -= c.n;
            if c.b > 0 {
                c.b = 0;
            }
            if c.c < 127 {
                c.c += 1;
            }
        }
        Ok(self.reconstruct(px, err * sign))
    }

    /// The sample ending a run that stopped before the end of the line (A.7.2).
    fn interruption(&mut self, bits: &mut Bits, ra: i32, rb: i32) -> Result<i32, JlsError> {
        let ri = usize::from((ra - rb).abs() <= self.p.near);
        let cx = self.run_ctx[ri];
        let temp = if ri == 0 { cx.a } else { cx.a + (cx.n >> 1) };
        let mut k = 0u32;
        while (cx.n << k) < temp && k < 24 {
            k += 1;
        }
        let limit = self.limit - J[self.run_index] as i32 - 1;
        let em = self.golomb(bits, k, limit)?;
        if em > 2 * 65536 {
            return bad("corrupt data: an error value out of range");
        }
        let t = em + ri as i32;
        let map = t & 1 == 1;
        let abs = (t + i32::from(map)) / 2;
        let err = if (k != 0 || 2 * cx.nn >= cx.n) == map {
            -abs
        } else {
            abs
        };
        let c = &mut self.run_ctx[ri];
        if err < 0 {
            c.nn += 1;
        }
        c.a += (em + 1 - ri as i32) >> 1;
        if c.n == self.p.reset {
            c.a >>= 1;
            c.n >>= 1;
            c.nn >>= 1;
        }
        c.n += 1;
        Ok(if ri == 1 {
            self.reconstruct(ra, err)
        } else {
            let sign = if rb - ra < 0 { -1 } else { 1 };
            self.reconstruct(rb, err * sign)
        })
    }

    /// Decode one line into `cur[1..=w]`; `prev` is the line above, both with one sample of
    /// padding each side (`[0]` left of the first, `[w + 1]` right of the last).
    fn line(
        &mut self,
        bits: &mut Bits,
        prev: &[i32],
        cur: &mut [i32],
        w: usize,
    ) -> Result<(), JlsError> {
        let mut x = 1;
        while x <= w {
            let (ra, rb, rc, rd) = (cur[x - 1], prev[x], prev[x - 1], prev[x + 1]);
            let (q1, q2, q3) = (
                self.quantize(rd - rb),
                self.quantize(rb - rc),
                self.quantize(rc - ra),
            );
            let qs = (q1 * 9 + q2) * 9 + q3;
            if qs != 0 {
                cur[x] = self.regular(bits, qs, ra, rb, rc)?;
                x += 1;
                continue;
            }
            // Run mode (A.7.1): runs of Ra within NEAR, coded by the run-length table.
            let left = w + 1 - x;
            let mut n = 0usize;
            let mut full_line = false;
            while bits.bit() {
                let len = (1usize << J[self.run_index]).min(left - n);
                n += len;
                if len == 1 << J[self.run_index] && self.run_index < 31 {
                    self.run_index += 1;
                }
                if n == left {
                    full_line = true;
                    break;
                }
            }
            if !full_line {
                n += bits.bits(J[self.run_index]) as usize;
                if n > left {
                    return bad("corrupt data: a run past the end of the line");
                }
            }
            for s in &mut cur[x..x + n] {
                *s = ra;
            }
            x += n;
            if x > w {
                break;
            }
            let rb = prev[x];
            cur[x] = self.interruption(bits, ra, rb)?;
            self.run_index = self.run_index.saturating_sub(1);
            x += 1;
        }
        Ok(())
    }
}

/// Big-endian u16 at `p` of `d`.
fn be16(d: &[u8], p: usize) -> Result<usize, JlsError> {
    match d.get(p..p + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]]) as usize),
        None => bad("truncated stream"),
    }
}

/// Decode a JPEG-LS codestream (SOI ... EOI) of one component: of `expect` (columns, rows)
/// when given (checked before anything is allocated), else of at most
/// [`crate::preprocess::max_pixels`] samples.
pub fn decode(data: &[u8], expect: Option<(usize, usize)>) -> Result<Decoded, JlsError> {
    if data.get(..2) != Some(&[0xFF, 0xD8]) {
        return bad("no start-of-image marker");
    }
    let mut pos = 2;
    let mut frame: Option<(u8, usize, usize)> = None;
    let mut preset = [0i32; 5];
    loop {
        // Skip fill bytes before a marker.
        while data.get(pos) == Some(&0xFF) && data.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let marker = match data.get(pos..pos + 2) {
            Some([0xFF, m]) => *m,
            _ => return bad(format!("expected a marker at byte {pos}")),
        };
        pos += 2;
        match marker {
            0xD9 => return bad("end of image before any scan"),
            0xF7 => {
                // SOF55: P, Y, X, Nf, then per component C, H/V, Tq.
                let len = be16(data, pos)?;
                let seg = data
                    .get(pos + 2..pos + len)
                    .ok_or(JlsError("truncated frame header".into()))?;
                if seg.len() < 6 {
                    return bad("truncated frame header");
                }
                let p = seg[0];
                let h = u16::from_be_bytes([seg[1], seg[2]]) as usize;
                let w = u16::from_be_bytes([seg[3], seg[4]]) as usize;
                let nf = seg[5];
                if !(2..=16).contains(&p) {
                    return bad(format!("sample precision {p} bits (2 to 16 supported)"));
                }
                if nf != 1 {
                    return bad(format!(
                        "{nf} components: only single-component (grey) images are supported"
                    ));
                }
                if h == 0 || w == 0 {
                    return bad("zero image size (rows given by a DNL marker are not supported)");
                }
                match expect {
                    Some((ew, eh)) if (ew, eh) != (w, h) => {
                        return bad(format!("the stream is {w}x{h}, {ew}x{eh} expected"));
                    }
                    None if (w * h) as u64 > crate::preprocess::max_pixels() => {
                        return bad(format!(
                            "{w}x{h} samples exceed the limit of {} (--max-pixels)",
                            crate::preprocess::max_pixels()
                        ));
                    }
                    _ => {}
                }
                frame = Some((p, w, h));
                pos += len;
            }
            0xF8 => {
                // LSE: ID 1 holds preset coding parameters.
                let len = be16(data, pos)?;
                let seg = data
                    .get(pos + 2..pos + len)
                    .ok_or(JlsError("truncated LSE segment".into()))?;
                match seg.first() {
                    Some(1) if seg.len() >= 11 => {
                        for (i, v) in preset.iter_mut().enumerate() {
                            *v = u16::from_be_bytes([seg[1 + 2 * i], seg[2 + 2 * i]]) as i32;
                        }
                    }
                    Some(id) => {
                        return bad(format!(
                            "LSE segment type {id} (mapping tables) is not supported"
                        ));
                    }
                    None => return bad("empty LSE segment"),
                }
                pos += len;
            }
            0xDD => {
                let len = be16(data, pos)?;
                if be16(data, pos + 2)? != 0 {
                    return bad("restart intervals are not supported");
                }
                pos += len;
            }
            0xDA => {
                let (precision, w, h) =
                    frame.ok_or(JlsError("scan before the frame header".into()))?;
                let len = be16(data, pos)?;
                let seg = data
                    .get(pos + 2..pos + len)
                    .ok_or(JlsError("truncated scan header".into()))?;
                let ns = *seg
                    .first()
                    .ok_or(JlsError("truncated scan header".into()))?
                    as usize;
                if ns != 1 || seg.len() < 1 + 2 * ns + 3 {
                    return bad(format!("a scan of {ns} components is not supported"));
                }
                if seg[2] != 0 {
                    return bad("mapping tables are not supported");
                }
                let near = seg[1 + 2 * ns] as i32;
                let point_transform = seg[3 + 2 * ns] & 0x0F;
                if point_transform != 0 {
                    return bad("point transform is not supported");
                }
                let params = Params::new(precision, near, preset)?;
                pos += len;
                let mut bits = Bits::new(&data[pos..]);
                let mut scan = Scan::new(&params);
                let mut prev = vec![0i32; w + 2];
                let mut cur = vec![0i32; w + 2];
                let mut samples = Vec::with_capacity(w * h);
                for _ in 0..h {
                    cur[0] = prev[1];
                    prev[w + 1] = prev[w];
                    scan.line(&mut bits, &prev, &mut cur, w)?;
                    samples.extend(cur[1..=w].iter().map(|&v| v as u16));
                    std::mem::swap(&mut prev, &mut cur);
                }
                let _ = bits.end();
                return Ok(Decoded {
                    width: w,
                    height: h,
                    precision,
                    samples,
                });
            }
            0xE0..=0xEF | 0xFE => {
                pos += be16(data, pos)?;
            }
            m => return bad(format!("unexpected marker 0xFF{m:02X}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codestream inside one of the committed test files.
    fn stream(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/data/jpegls/{name}.dcm",
            env!("CARGO_MANIFEST_DIR")
        );
        let file = std::fs::read(path).unwrap();
        let at = file
            .windows(4)
            .position(|w| w == [0xFF, 0xD8, 0xFF, 0xF7])
            .expect("a JPEG-LS stream");
        let end = file.windows(2).rposition(|w| w == [0xFF, 0xD9]).unwrap() + 2;
        file[at..end].to_vec()
    }

    #[test]
    fn damaged_streams_fail_cleanly() {
        let good = stream("lossless12");
        let d = decode(&good, None).unwrap();
        assert!(decode(&good, Some((60, 53))).is_err());
        assert_eq!((d.width, d.height, d.precision), (61, 53, 12));
        assert_eq!(d.samples.len(), 61 * 53);
        // Truncated anywhere, or with a byte changed: an error or some image, never a panic.
        let mut outcomes = 0;
        for n in (0..good.len()).step_by(7) {
            let _ = decode(&good[..n], None);
            outcomes += 1;
        }
        for i in (0..good.len()).step_by(5) {
            let mut bad = good.clone();
            bad[i] ^= 0x5A;
            if let Ok(d) = decode(&bad, None) {
                assert_eq!(d.samples.len(), d.width * d.height);
            }
            outcomes += 1;
        }
        assert!(outcomes > 100);
        assert!(
            decode(b"not jpeg-ls", None)
                .unwrap_err()
                .to_string()
                .contains("start-of-image")
        );
    }
}
