//! A pre-parse of the element structure that checks every declared length against the bytes
//! that remain, so that no reader ever sizes a buffer from a lie in the header.

/// VRs whose explicit-VR header has a 2-byte length; every other VR, unknown ones included
/// (PS3.5 7.1.2, and as dicom-rs reads them), has 2 reserved bytes and a 4-byte length.
const SHORT_VRS: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];

fn long_form(vr: &[u8]) -> bool {
    !SHORT_VRS.iter().any(|v| &v[..] == vr)
}
const UNDEFINED: u32 = 0xFFFF_FFFF;

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    ExplicitLe,
    ImplicitLe,
    ExplicitBe,
}

struct Walker<'a> {
    b: &'a [u8],
    base: usize,
}

impl Walker<'_> {
    fn u16(&self, at: usize, big: bool) -> Option<u16> {
        let s = self.b.get(at..at + 2)?;
        Some(if big {
            u16::from_be_bytes([s[0], s[1]])
        } else {
            u16::from_le_bytes([s[0], s[1]])
        })
    }
    fn u32(&self, at: usize, big: bool) -> Option<u32> {
        let s: [u8; 4] = self.b.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    }

    /// Walk elements from `pos` to `end` (or to a delimiter when `end` is None).
    fn walk(
        &self,
        mut pos: usize,
        end: usize,
        enc: Encoding,
        depth: usize,
    ) -> Result<usize, String> {
        if depth > 64 {
            return Err("sequences nest more than 64 deep".into());
        }
        let big = enc == Encoding::ExplicitBe;
        let mut in_fragments = false;
        while pos + 8 <= end {
            let at = self.base + pos;
            let bad = |what: String| format!("byte {at}: {what}");
            let group = self
                .u16(pos, big)
                .ok_or_else(|| bad("truncated tag".into()))?;
            let element = self
                .u16(pos + 2, big)
                .ok_or_else(|| bad("truncated tag".into()))?;
            let tag = format!("({group:04X},{element:04X})");
            if group == 0xFFFE {
                // Items and delimiters: always a 4-byte length, no VR.
                let len = self
                    .u32(pos + 4, big)
                    .ok_or_else(|| bad("truncated item".into()))?;
                pos += 8;
                match element {
                    0xE0DD => {
                        if in_fragments {
                            in_fragments = false;
                            continue;
                        }
                        return Ok(pos);
                    }
                    0xE00D => return Ok(pos),
                    0xE000 if len == UNDEFINED => {
                        if in_fragments {
                            return Err(bad("pixel data fragment of undefined length".into()));
                        }
                        pos = self.walk(pos, end, enc, depth + 1)?;
                    }
                    0xE000 => {
                        let len = len as usize;
                        if len > end - pos {
                            return Err(bad(format!(
                                "item declares {len} bytes; only {} remain",
                                end - pos
                            )));
                        }
                        if !in_fragments {
                            self.walk(pos, pos + len, enc, depth + 1)?;
                        }
                        pos += len;
                    }
                    _ => return Err(bad(format!("unexpected delimiter {tag}"))),
                }
                continue;
            }
            let (len, header, is_sq) = match enc {
                Encoding::ImplicitLe => {
                    let len = self
                        .u32(pos + 4, false)
                        .ok_or_else(|| bad("truncated length".into()))?;
                    let sq = self.u16(pos + 8, false) == Some(0xFFFE)
                        && self.u16(pos + 10, false) == Some(0xE000);
                    (len, 8, sq)
                }
                _ => {
                    let vr: [u8; 2] = [self.b[pos + 4], self.b[pos + 5]];
                    if long_form(&vr) {
                        let len = self
                            .u32(pos + 8, big)
                            .ok_or_else(|| bad(format!("{tag}: truncated length")))?;
                        (len, 12, &vr == b"SQ")
                    } else {
                        (self.u16(pos + 6, big).unwrap_or(0) as u32, 8, false)
                    }
                }
            };
            pos += header;
            if len == UNDEFINED {
                if group == 0x7FE0 && element == 0x0010 {
                    in_fragments = true;
                } else {
                    pos = self.walk(pos, end, enc, depth + 1)?;
                }
                continue;
            }
            let len = len as usize;
            if len > end.saturating_sub(pos) {
                return Err(bad(format!(
                    "element {tag} declares {len} bytes; only {} remain",
                    end.saturating_sub(pos)
                )));
            }
            if is_sq {
                self.walk(pos, pos + len, enc, depth + 1)?;
            }
            pos += len;
        }
        Ok(pos)
    }
}

/// The encoding of a transfer syntax UID's data set.
fn encoding_of(ts: &str) -> Encoding {
    match ts {
        "1.2.840.10008.1.2" => Encoding::ImplicitLe,
        "1.2.840.10008.1.2.2" => Encoding::ExplicitBe,
        _ => Encoding::ExplicitLe,
    }
}

/// Check the declared lengths of a whole file (with or without preamble and meta). Deflated data
/// sets are inflated (at most `inflate_limit` bytes) and checked too.
pub(crate) fn check_lengths(bytes: &[u8], inflate_limit: usize) -> Result<(), String> {
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        // A bare data set.
        let explicit =
            bytes.len() >= 6 && bytes[4].is_ascii_uppercase() && bytes[5].is_ascii_uppercase();
        let enc = if explicit {
            Encoding::ExplicitLe
        } else {
            Encoding::ImplicitLe
        };
        Walker { b: bytes, base: 0 }.walk(0, bytes.len(), enc, 0)?;
        return Ok(());
    };
    // File meta: explicit VR little endian, group 0002 only.
    let w = Walker { b: bytes, base: 0 };
    let mut pos = start;
    let mut ts = String::new();
    while pos + 8 <= bytes.len() && w.u16(pos, false) == Some(0x0002) {
        let element = w.u16(pos + 2, false).unwrap_or(0);
        let vr = &bytes[pos + 4..pos + 6];
        let (len, header) = if long_form(vr) {
            (
                w.u32(pos + 8, false).ok_or("truncated file meta")? as usize,
                12,
            )
        } else {
            (w.u16(pos + 6, false).unwrap_or(0) as usize, 8)
        };
        if len > bytes.len().saturating_sub(pos + header) {
            return Err(format!(
                "file meta element (0002,{element:04X}) declares {len} bytes; the file is shorter"
            ));
        }
        if element == 0x0010 {
            ts = String::from_utf8_lossy(&bytes[pos + header..pos + header + len])
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        pos += header + len;
    }
    if ts == "1.2.840.10008.1.2.1.99" {
        use std::io::Read;
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&bytes[pos..])
            .take(inflate_limit as u64 + 1)
            .read_to_end(&mut inflated)
            .map_err(|e| format!("deflated data set does not inflate: {e}"))?;
        if inflated.len() > inflate_limit {
            return Err(format!(
                "deflated data set inflates beyond {inflate_limit} bytes"
            ));
        }
        Walker {
            b: &inflated,
            base: 0,
        }
        .walk(0, inflated.len(), Encoding::ExplicitLe, 0)?;
        return Ok(());
    }
    let w = Walker { b: bytes, base: 0 };
    w.walk(pos, bytes.len(), encoding_of(&ts), 0)?;
    Ok(())
}
