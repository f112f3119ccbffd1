//! Output files: atomic writes and NumPy `.npy` arrays.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A file's stem (`image` when it has none).
pub fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Output names from input stems, unique within a run: the second `a.png` of a run (from
/// another folder) becomes `a-2`.
#[derive(Debug, Default)]
pub struct UniqueStems(HashMap<String, usize>);

impl UniqueStems {
    /// The name for the outputs of `input`.
    pub fn next(&mut self, input: &Path) -> String {
        let stem = file_stem(input);
        let n = self.0.entry(stem.clone()).or_insert(0);
        *n += 1;
        if *n == 1 { stem } else { format!("{stem}-{n}") }
    }
}

/// Output names of a run's inputs, in order ([`UniqueStems`] over all of them, so that a
/// name depends on the input list alone, not on which inputs failed or which shard ran them).
pub fn output_names(inputs: &[std::path::PathBuf]) -> Vec<String> {
    let mut stems = UniqueStems::default();
    inputs.iter().map(|p| stems.next(p)).collect()
}

/// The SHA-256 of a file's bytes, as lower-case hex (how checkpoints are identified in reports
/// and server answers).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A checkpoint as reports name it: `file.pth (sha256 ...)`, or the path alone when it cannot
/// be read.
pub fn checkpoint_label(path: &Path) -> String {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    match sha256_file(path) {
        Ok(h) => format!("{name} (sha256 {h})"),
        Err(_) => name,
    }
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, then a rename, so an
/// interrupted run never leaves a half-written output.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Encode an array as `.npy` (format version 1.0): `descr` is NumPy's type string (`<f4`,
/// `<i2`, `|u1`, ...) and `data` the little-endian element bytes.
pub fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Encode an `f32` array as `.npy`.
pub fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy("<f4", shape, &bytes)
}

/// Read an `f32` `.npy` (little-endian, C order, format 1.x) as its shape and values.
pub fn read_npy_f32(path: &Path) -> crate::Result<(Vec<usize>, Vec<f32>)> {
    let bad = |m: &str| crate::Error::Invalid(format!("{}: {m}", path.display()));
    let b = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" || b[6] != 1 {
        return Err(bad("not a version-1 .npy file"));
    }
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = b
        .get(10..10 + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad("not a C-order little-endian float32 array"));
    }
    let dims = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape in the header"))?;
    let shape = dims
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<crate::Result<Vec<_>>>()?;
    let data = &b[10 + hlen..];
    let n: usize = shape.iter().product();
    if data.len() != 4 * n {
        return Err(bad(&format!(
            "{} data bytes for shape {shape:?} ({} expected)",
            data.len(),
            4 * n
        )));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    #[test]
    fn npy_header_is_aligned() {
        let b = super::npy_f32(&[2, 3], &[0.0; 6]);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(b.len(), 10 + hlen + 24);
        assert!(
            std::str::from_utf8(&b[10..10 + hlen])
                .unwrap()
                .contains("'shape': (2, 3)")
        );
    }
}
