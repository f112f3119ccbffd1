//! A decoder of our own for 12-bit JPEG Extended (ITU-T T.81 sequential DCT, Huffman coded:
//! DICOM's "JPEG Extended (Process 2 & 4)" with 12-bit samples), which the pure-Rust JPEG
//! crates refuse. Grey images (one component), any number of restart intervals.
//!
//! Lossy JPEG leaves the inverse DCT's rounding to the decoder, so decoders differ by a grey
//! level here and there. pydicom decodes this transfer syntax with pylibjpeg-libjpeg (its GDCM
//! plugin refuses 12-bit JPEG Extended), so this decoder reproduces that library's integer
//! arithmetic: a separable fixed-point inverse DCT with 9 fractional bits over rows then
//! columns, data pre-scaled by 4 colour bits, the level shift folded into the DC term, and
//! `(x + 8) >> 4` clamped to the sample range at the end. Tested pixel for pixel against
//! pydicom on files made by an independent encoder (libjpeg-turbo through imagecodecs).

use std::fmt;

/// Why a stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jpeg12Error(pub String);

impl fmt::Display for Jpeg12Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JPEG: {}", self.0)
    }
}

impl std::error::Error for Jpeg12Error {}

fn err<T>(what: impl Into<String>) -> Result<T, Jpeg12Error> {
    Err(Jpeg12Error(what.into()))
}

/// A decoded grey image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Sample precision in bits (8 or 12).
    pub precision: u8,
    /// Samples, row-major.
    pub samples: Vec<u16>,
}

/// The sample precision declared by a stream's frame header (SOF0..SOF15), if it has one.
pub fn frame_precision(data: &[u8]) -> Option<u8> {
    let mut pos = 2;
    if data.get(..2)? != [0xff, 0xd8] {
        return None;
    }
    while pos + 4 <= data.len() {
        if data[pos] != 0xff {
            return None;
        }
        let marker = data[pos + 1];
        if marker == 0xff {
            pos += 1;
            continue;
        }
        let len = u16::from_be_bytes([data[pos + 2], data[pos + 3]]) as usize;
        if matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc) {
            return data.get(pos + 4).copied();
        }
        if marker == 0xda {
            return None;
        }
        pos += 2 + len;
    }
    None
}

/// One Huffman table in the canonical form of T.81 Annex F.2.2.3.
#[derive(Debug, Clone)]
struct Huffman {
    /// Largest code of each length (-1: none), lengths 1..=16.
    max_code: [i32; 17],
    /// Index into `values` of the first code of each length, minus that code.
    offset: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self, Jpeg12Error> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total != values.len() || total > 256 {
            return err("Huffman table: code counts do not match the values");
        }
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut code = 0i32;
        let mut k = 0i32;
        for len in 1..=16 {
            let n = counts[len - 1] as i32;
            offset[len] = k - code;
            if n > 0 {
                code += n;
                k += n;
                max_code[len] = code - 1;
            }
            if code > (1 << len) {
                return err("Huffman table: more codes than their lengths allow");
            }
            code <<= 1;
        }
        Ok(Huffman {
            max_code,
            offset,
            values,
        })
    }
}

/// Reads entropy-coded bits, removing stuffed zero bytes; at a marker or the end it supplies
/// zero bits (as the reference decoders do) and counts them.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    /// Zero bits supplied past the data (or ahead of a marker).
    padded: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits {
            data,
            pos,
            acc: 0,
            n: 0,
            padded: 0,
        }
    }

    fn fill(&mut self) {
        while self.n <= 56 {
            let byte = match self.data.get(self.pos) {
                Some(&0xff) => match self.data.get(self.pos + 1) {
                    Some(0x00) => {
                        self.pos += 2;
                        0xff
                    }
                    _ => {
                        self.padded += 8;
                        0
                    }
                },
                Some(&b) => {
                    self.pos += 1;
                    b
                }
                None => {
                    self.padded += 8;
                    0
                }
            };
            self.acc |= (byte as u64) << (56 - self.n);
            self.n += 8;
        }
    }

    /// Whether any supplied zero bit was consumed (the buffered bits end with the supplied
    /// ones, so those still buffered were not).
    fn padding_used(&self) -> bool {
        self.padded > self.n
    }

    fn bit(&mut self) -> u32 {
        if self.n == 0 {
            self.fill();
        }
        let b = (self.acc >> 63) as u32;
        self.acc <<= 1;
        self.n -= 1;
        b
    }

    fn bits(&mut self, count: u32) -> u32 {
        if count == 0 {
            return 0;
        }
        if self.n < count {
            self.fill();
        }
        let v = (self.acc >> (64 - count)) as u32;
        self.acc <<= count;
        self.n -= count;
        v
    }

    fn decode(&mut self, h: &Huffman) -> Result<u8, Jpeg12Error> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | self.bit() as i32;
            if code <= h.max_code[len] {
                let i = (code + h.offset[len]) as usize;
                return h
                    .values
                    .get(i)
                    .copied()
                    .ok_or_else(|| Jpeg12Error("bad Huffman code".into()));
            }
        }
        err("bad Huffman code in the entropy-coded data")
    }

    /// A value of `size` bits in T.81's one's-complement-like code (F.2.2.1 EXTEND).
    fn signed(&mut self, size: u32) -> i32 {
        if size == 0 {
            return 0;
        }
        let v = self.bits(size) as i32;
        if v < 1 << (size - 1) {
            v - (1 << size) + 1
        } else {
            v
        }
    }

    /// Skip to the next byte boundary and past a restart marker RSTn.
    fn restart(&mut self) -> Result<(), Jpeg12Error> {
        // Bits already buffered belong to bytes before the marker: drop them.
        self.acc = 0;
        self.n = 0;
        // Padding counted while buffering ahead of a marker was not real.
        self.padded = 0;
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] == 0xff && (0xd0..=0xd7).contains(&self.data[self.pos + 1]) {
                self.pos += 2;
                return Ok(());
            }
            if self.data[self.pos] == 0xff && self.data[self.pos + 1] != 0 {
                return err("a restart marker is missing");
            }
            self.pos += 1;
        }
        err("a restart marker is missing (the data ends)")
    }
}

const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Fractional bits of the fixed-point constants.
const FIX_BITS: u32 = 9;
/// Bits the data is scaled up by before the transform (the reference's colour bits).
const PRESHIFT: u32 = 4;

/// `x` in fixed point with [`FIX_BITS`] fractional bits, rounded.
const fn fix(x: f64) -> i32 {
    (x * (1 << FIX_BITS) as f64 + 0.5) as i32
}

const C0_541: i32 = fix(0.541196100);
const C0_765: i32 = fix(0.765366865);
const C1_847: i32 = fix(1.847759065);
const C1_175: i32 = fix(1.175875602);
const C0_298: i32 = fix(0.298631336);
const C2_053: i32 = fix(2.053119869);
const C3_072: i32 = fix(3.072711026);
const C1_501: i32 = fix(1.501321110);
const C0_899: i32 = fix(0.899976223);
const C2_562: i32 = fix(2.562915447);
const C1_961: i32 = fix(1.961570560);
const C0_390: i32 = fix(0.390180644);

/// One 8-point inverse DCT (the Loeffler-Ligtenberg-Moschytz factorisation) of the values
/// `v[0..8]` (already scaled), in fixed point, 32-bit wrapping arithmetic like the reference;
/// returns the eight sums before the final descaling.
#[inline]
fn idct8(v: [i32; 8]) -> [i32; 8] {
    // Even part.
    let z1 = v[2].wrapping_add(v[6]).wrapping_mul(C0_541);
    let t2 = z1.wrapping_add(v[6].wrapping_mul(-C1_847));
    let t3 = z1.wrapping_add(v[2].wrapping_mul(C0_765));
    let t0 = v[0].wrapping_add(v[4]).wrapping_shl(FIX_BITS);
    let t1 = v[0].wrapping_sub(v[4]).wrapping_shl(FIX_BITS);
    let e10 = t0.wrapping_add(t3);
    let e13 = t0.wrapping_sub(t3);
    let e11 = t1.wrapping_add(t2);
    let e12 = t1.wrapping_sub(t2);
    // Odd part.
    let (o0, o1, o2, o3) = (v[7], v[5], v[3], v[1]);
    let z1 = o0.wrapping_add(o3);
    let z2 = o1.wrapping_add(o2);
    let z3 = o0.wrapping_add(o2);
    let z4 = o1.wrapping_add(o3);
    let z5 = z3.wrapping_add(z4).wrapping_mul(C1_175);
    let z1 = z1.wrapping_mul(-C0_899);
    let z2 = z2.wrapping_mul(-C2_562);
    let z3 = z3.wrapping_mul(-C1_961).wrapping_add(z5);
    let z4 = z4.wrapping_mul(-C0_390).wrapping_add(z5);
    let p0 = o0.wrapping_mul(C0_298).wrapping_add(z1).wrapping_add(z3);
    let p1 = o1.wrapping_mul(C2_053).wrapping_add(z2).wrapping_add(z4);
    let p2 = o2.wrapping_mul(C3_072).wrapping_add(z2).wrapping_add(z3);
    let p3 = o3.wrapping_mul(C1_501).wrapping_add(z1).wrapping_add(z4);
    [
        e10.wrapping_add(p3),
        e11.wrapping_add(p2),
        e12.wrapping_add(p1),
        e13.wrapping_add(p0),
        e13.wrapping_sub(p0),
        e12.wrapping_sub(p1),
        e11.wrapping_sub(p2),
        e10.wrapping_sub(p3),
    ]
}

/// `(x + half) >> bits`, arithmetic.
#[inline]
fn descale(x: i32, bits: u32) -> i32 {
    x.wrapping_add(1 << (bits - 1)) >> bits
}

/// The samples of one block from its coefficients (natural order) and quantisation table:
/// rows first, then columns, then `(x + 8) >> 4` clamped to `0..=max`.
fn inverse_dct(coef: &[i32; 64], quant: &[i32; 64], max: i32, out: &mut [i32; 64]) {
    let dc_offset = ((max + 1) >> 1) << (PRESHIFT + 3);
    let mut ws = [0i32; 64];
    for r in 0..8 {
        let mut v = [0i32; 8];
        for c in 0..8 {
            v[c] = coef[r * 8 + c].wrapping_mul(quant[r * 8 + c] << PRESHIFT);
        }
        if r == 0 {
            v[0] = v[0].wrapping_add(dc_offset);
        }
        let y = idct8(v);
        for c in 0..8 {
            ws[r * 8 + c] = descale(y[c], FIX_BITS);
        }
    }
    for c in 0..8 {
        let v: [i32; 8] = std::array::from_fn(|r| ws[r * 8 + c]);
        let y = idct8(v);
        for r in 0..8 {
            let x = descale(y[r], FIX_BITS + 3);
            out[r * 8 + c] = descale(x, PRESHIFT).clamp(0, max);
        }
    }
}

/// Decode a 12-bit (or 8-bit) sequential-DCT Huffman JPEG stream of one grey component.
pub fn decode(data: &[u8]) -> Result<Decoded, Jpeg12Error> {
    if data.get(..2) != Some(&[0xff, 0xd8]) {
        return err("no SOI marker: not a JPEG stream");
    }
    let mut quant: [Option<[i32; 64]>; 4] = [None; 4];
    let mut dc: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac: [Option<Huffman>; 4] = [None, None, None, None];
    let mut restart = 0usize;
    // (width, height, precision, component id, quant table)
    let mut frame: Option<(usize, usize, u8, u8, usize)> = None;
    let mut pos = 2;
    loop {
        // Find the next marker (fill bytes allowed).
        while pos < data.len() && data[pos] != 0xff {
            pos += 1;
        }
        while pos < data.len() && data[pos] == 0xff {
            pos += 1;
        }
        let Some(&marker) = data.get(pos) else {
            return err("the stream ends before a scan");
        };
        pos += 1;
        if marker == 0xd9 {
            return err("EOI before any scan");
        }
        if (0xd0..=0xd7).contains(&marker) || marker == 0x01 {
            continue;
        }
        let len = match data.get(pos..pos + 2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
            None => return err("a marker segment is cut off"),
        };
        let seg = match data.get(pos + 2..pos + len) {
            Some(s) if len >= 2 => s,
            _ => return err(format!("marker 0xFF{marker:02X}: its segment is cut off")),
        };
        let next = pos + len;
        match marker {
            0xdb => {
                let mut s = seg;
                while !s.is_empty() {
                    let (pq, tq) = (s[0] >> 4, (s[0] & 15) as usize);
                    let size = if pq == 0 { 64 } else { 128 };
                    if tq > 3 || s.len() < 1 + size {
                        return err("DQT: bad table");
                    }
                    let mut t = [0i32; 64];
                    for (k, &z) in ZIGZAG.iter().enumerate() {
                        t[z] = if pq == 0 {
                            s[1 + k] as i32
                        } else {
                            u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]]) as i32
                        };
                    }
                    quant[tq] = Some(t);
                    s = &s[1 + size..];
                }
            }
            0xc4 => {
                let mut s = seg;
                while !s.is_empty() {
                    if s.len() < 17 {
                        return err("DHT: cut off");
                    }
                    let (class, th) = (s[0] >> 4, (s[0] & 15) as usize);
                    let counts: [u8; 16] = s[1..17].try_into().unwrap_or([0; 16]);
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    if th > 3 || class > 1 || s.len() < 17 + n {
                        return err("DHT: bad table");
                    }
                    let h = Huffman::new(&counts, s[17..17 + n].to_vec())?;
                    if class == 0 {
                        dc[th] = Some(h);
                    } else {
                        ac[th] = Some(h);
                    }
                    s = &s[17 + n..];
                }
            }
            0xdd => {
                if seg.len() < 2 {
                    return err("DRI: cut off");
                }
                restart = u16::from_be_bytes([seg[0], seg[1]]) as usize;
            }
            0xc0 | 0xc1 => {
                if seg.len() < 6 {
                    return err("SOF: cut off");
                }
                let precision = seg[0];
                let height = u16::from_be_bytes([seg[1], seg[2]]) as usize;
                let width = u16::from_be_bytes([seg[3], seg[4]]) as usize;
                let n = seg[5] as usize;
                if precision != 8 && precision != 12 {
                    return err(format!("{precision}-bit samples (8 or 12 expected)"));
                }
                if n != 1 {
                    return err(format!(
                        "{n} components: only grey 12-bit JPEG Extended is supported"
                    ));
                }
                if seg.len() < 9 {
                    return err("SOF: cut off");
                }
                if width == 0 || height == 0 {
                    return err("SOF: zero width or height (DNL is not supported)");
                }
                crate::preprocess::check_pixel_count(width as u64, height as u64, 1)
                    .map_err(Jpeg12Error)?;
                frame = Some((width, height, precision, seg[6], (seg[8] & 15) as usize));
            }
            0xc2 | 0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => {
                return err(format!(
                    "SOF{}: only sequential Huffman-coded DCT (SOF0, SOF1) is supported",
                    marker - 0xc0
                ));
            }
            0xda => {
                let Some((width, height, precision, id, tq)) = frame else {
                    return err("a scan before the frame header");
                };
                if seg.len() < 6 || seg[0] != 1 || seg[1] != id {
                    return err("the scan does not cover the frame's one component");
                }
                let (td, ta) = ((seg[2] >> 4) as usize, (seg[2] & 15) as usize);
                let (Some(Some(dch)), Some(Some(ach))) = (dc.get(td), ac.get(ta)) else {
                    return err("the scan uses an undefined Huffman table");
                };
                let Some(q) = quant.get(tq).copied().flatten() else {
                    return err("the frame uses an undefined quantisation table");
                };
                let samples =
                    decode_scan(data, next, width, height, precision, &q, dch, ach, restart)?;
                return Ok(Decoded {
                    width,
                    height,
                    precision,
                    samples,
                });
            }
            _ => {} // APPn, COM and others: skipped.
        }
        pos = next;
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_scan(
    data: &[u8],
    start: usize,
    width: usize,
    height: usize,
    precision: u8,
    quant: &[i32; 64],
    dc: &Huffman,
    ac: &Huffman,
    restart: usize,
) -> Result<Vec<u16>, Jpeg12Error> {
    let max = (1i32 << precision) - 1;
    let (bw, bh) = (width.div_ceil(8), height.div_ceil(8));
    let mut out = vec![0u16; width * height];
    let mut bits = Bits::new(data, start);
    let mut pred = 0i32;
    let mut coef = [0i32; 64];
    let mut block = [0i32; 64];
    for b in 0..bw * bh {
        if restart > 0 && b > 0 && b % restart == 0 {
            bits.restart()?;
            pred = 0;
        }
        coef.fill(0);
        let s = bits.decode(dc)? as u32;
        if s > 16 {
            return err("DC difference category over 16");
        }
        pred = pred.wrapping_add(bits.signed(s));
        coef[0] = pred;
        let mut k = 1;
        while k < 64 {
            let rs = bits.decode(ac)?;
            let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
            if s == 0 {
                if r == 15 {
                    k += 16;
                    continue;
                }
                break;
            }
            k += r;
            if k > 63 {
                return err("AC coefficients run past the block");
            }
            coef[ZIGZAG[k]] = bits.signed(s);
            k += 1;
        }
        if bits.padding_used() {
            return err("the entropy-coded data ends early (truncated image)");
        }
        inverse_dct(&coef, quant, max, &mut block);
        let (bx, by) = (b % bw * 8, b / bw * 8);
        for r in 0..8.min(height - by) {
            let row = (by + r) * width + bx;
            for c in 0..8.min(width - bx) {
                out[row + c] = block[r * 8 + c] as u16;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_block_decodes_to_its_level() {
        // DC only: coefficient d with quantiser q is a flat block at 2048 + d * q / 8.
        let mut coef = [0i32; 64];
        let quant = [1i32; 64];
        let mut out = [0i32; 64];
        for (d, want) in [(0, 2048), (80, 2058), (-16384, 0), (16376, 4095)] {
            coef[0] = d;
            inverse_dct(&coef, &quant, 4095, &mut out);
            assert!(out.iter().all(|&v| v == want), "{d}: {:?}", &out[..8]);
        }
    }

    #[test]
    fn huffman_codes_are_canonical() {
        // Two codes of length 1 ... would overflow; one of length 1 and two of length 2 fit.
        let mut counts = [0u8; 16];
        counts[0] = 1;
        counts[1] = 2;
        let h = Huffman::new(&counts, vec![7, 8, 9]).unwrap();
        // Codes: 0 -> 7, 10 -> 8, 11 -> 9.
        let data = [0b0101_1000u8, 0];
        let mut b = Bits::new(&data, 0);
        assert_eq!(b.decode(&h).unwrap(), 7);
        assert_eq!(b.decode(&h).unwrap(), 8);
        assert_eq!(b.decode(&h).unwrap(), 9);
        counts[0] = 3;
        assert!(Huffman::new(&counts, vec![1, 2, 3, 4, 5]).is_err());
    }

    #[test]
    fn precision_is_read_from_the_frame_header() {
        let s = [
            0xff, 0xd8, 0xff, 0xe0, 0, 4, 0, 0, 0xff, 0xc1, 0, 11, 12, 0, 8, 0, 8, 1, 1, 0x11, 0,
        ];
        assert_eq!(frame_precision(&s), Some(12));
        assert_eq!(frame_precision(&[0x89, b'P']), None);
    }
}
