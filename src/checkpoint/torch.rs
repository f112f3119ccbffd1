//! PyTorch `torch.save` files: the zip archive format and the legacy (pre-1.6) stream format.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use super::pickle::{self, PersistentLoader, StorageDtype, TensorRef, Value};

/// Magic number at the start of the legacy format (`0x1950a86a20f9469cfc6c`).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// A decoded `torch.save` file: the pickled object and the raw bytes of its storages.
pub struct TorchFile {
    /// The top-level unpickled object.
    pub root: Value,
    /// Storage key -> raw little-endian bytes.
    pub storages: HashMap<String, Vec<u8>>,
}

/// True when `head` starts like PyTorch's legacy format (pickle protocol 2 + LONG1 magic).
pub fn is_legacy(head: &[u8]) -> bool {
    head.len() >= 13 && head[0] == 0x80 && head[2] == 0x8a && head[3] == 10
}

/// Read the zip archive format (`archive/data.pkl`, `archive/data/<key>`).
pub(crate) fn read_zip(bytes: &[u8]) -> Result<TorchFile, String> {
    let mut zip =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("unreadable zip: {e}"))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("unreadable zip: {e}"))?;
    let pkl = names
        .iter()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or("zip archive has no data.pkl: not a PyTorch checkpoint")?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_owned();
    let read = |zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>, String> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| format!("zip entry {name}: {e}"))?;
        let mut buf = Vec::with_capacity(f.size().min(bytes.len() as u64) as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| format!("zip entry {name} is truncated or corrupt: {e}"))?;
        Ok(buf)
    };
    let big_endian = match names.iter().find(|n| **n == format!("{prefix}byteorder")) {
        Some(n) => read(&mut zip, n)?.trim_ascii() == b"big",
        None => false,
    };
    let pickle_bytes = read(&mut zip, &pkl)?;
    let mut loader = Storages::default();
    let (root, _) =
        pickle::unpickle(&pickle_bytes, 0, &mut loader).map_err(|e| format!("{pkl}: {e}"))?;
    let mut storages = HashMap::new();
    for (key, (dtype, len)) in loader.wanted {
        let name = format!("{prefix}data/{key}");
        if !names.contains(&name) {
            return Err(format!(
                "storage {key} is missing from the archive ({name})"
            ));
        }
        let mut data = read(&mut zip, &name)?;
        let need = len * dtype.size();
        if data.len() < need {
            return Err(format!(
                "storage {key} holds {} bytes, {need} expected: file truncated",
                data.len()
            ));
        }
        data.truncate(need);
        if big_endian {
            swap_bytes(&mut data, dtype.size());
        }
        storages.insert(key, data);
    }
    Ok(TorchFile { root, storages })
}

/// Read the legacy stream format: magic, protocol, sys info, the object, storage keys, then each
/// storage as an 8-byte element count followed by its bytes.
pub(crate) fn read_legacy(bytes: &[u8]) -> Result<TorchFile, String> {
    let mut keep = pickle::KeepPersistent;
    let (magic, pos) =
        pickle::unpickle(bytes, 0, &mut keep).map_err(|e| format!("legacy header: {e}"))?;
    match magic {
        Value::BigInt(b) if b == LEGACY_MAGIC => {}
        _ => return Err("not a PyTorch legacy file (wrong magic number)".into()),
    }
    let (_protocol, pos) =
        pickle::unpickle(bytes, pos, &mut keep).map_err(|e| format!("legacy header: {e}"))?;
    let (sys_info, pos) =
        pickle::unpickle(bytes, pos, &mut keep).map_err(|e| format!("legacy header: {e}"))?;
    let big_endian = sys_info.get("little_endian") == Some(&Value::Bool(false));
    let mut loader = Storages::default();
    let (root, pos) = pickle::unpickle(bytes, pos, &mut loader).map_err(|e| e.to_string())?;
    let (keys, mut pos) =
        pickle::unpickle(bytes, pos, &mut keep).map_err(|e| format!("storage key list: {e}"))?;
    let keys: Vec<String> = match keys {
        Value::List(k) => k
            .into_iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s),
                other => Err(format!("storage key is a {}", other.kind())),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("storage key list is a {}", other.kind())),
    };
    let mut storages = HashMap::new();
    for key in keys {
        let header = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("storage {key}: file truncated"))?;
        let numel = u64::from_le_bytes(header.try_into().unwrap());
        pos += 8;
        let dtype = match loader.wanted.get(&key) {
            Some((d, _)) => *d,
            None => return Err(format!("storage {key} is not referenced by any tensor")),
        };
        let n = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| pos + n <= bytes.len())
            .ok_or_else(|| format!("storage {key} ({numel} elements): file truncated"))?;
        let mut data = bytes[pos..pos + n].to_vec();
        pos += n;
        if big_endian {
            swap_bytes(&mut data, dtype.size());
        }
        storages.insert(key, data);
    }
    for (key, (_, len)) in &loader.wanted {
        match storages.get(key) {
            None => return Err(format!("storage {key} is missing: file truncated")),
            Some(d) if d.len() < len * loader.wanted[key].0.size() => {
                return Err(format!("storage {key} is shorter than its tensors need"));
            }
            _ => {}
        }
    }
    Ok(TorchFile { root, storages })
}

fn swap_bytes(data: &mut [u8], size: usize) {
    if size > 1 {
        data.chunks_exact_mut(size).for_each(|c| c.reverse());
    }
}

/// Records which storages the pickle references (and their dtype and length).
#[derive(Default)]
struct Storages {
    wanted: HashMap<String, (StorageDtype, usize)>,
}

impl PersistentLoader for Storages {
    fn load(&mut self, pid: &Value) -> Result<Value, String> {
        if let Value::Tuple(f) = pid
            && f.len() >= 5
            && f[0].as_str() == Some("storage")
        {
            let dtype = match &f[1] {
                Value::Global(_, n) => StorageDtype::from_storage_class(n)
                    .ok_or_else(|| format!("unsupported storage type {n}"))?,
                _ => return Err("storage type is not a class".into()),
            };
            let key = match &f[2] {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => return Err("storage key is not a string".into()),
            };
            let len = match &f[4] {
                Value::Int(n) if *n >= 0 => *n as usize,
                _ => return Err("storage size is not an integer".into()),
            };
            let e = self.wanted.entry(key).or_insert((dtype, len));
            e.1 = e.1.max(len);
        }
        Ok(Value::Persistent(Box::new(pid.clone())))
    }
}

/// Copy a tensor view out of its storage into a contiguous `f32` vector, checking every bound.
pub(crate) fn materialize(t: &TensorRef, storage: &[u8]) -> Result<Vec<f32>, String> {
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("tensor size overflows")?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            a.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or("tensor strides overflow")?;
    let avail = storage.len() / t.dtype.size();
    if numel > avail {
        return Err(format!(
            "tensor of {numel} elements is larger than its storage of {avail} (broadcast views are not supported)"
        ));
    }
    if last >= avail {
        return Err(format!(
            "tensor view reaches element {last} of a storage holding {avail}"
        ));
    }
    let read = |i: usize| -> f32 {
        let s = t.dtype.size();
        let b = &storage[i * s..(i + 1) * s];
        match t.dtype {
            StorageDtype::F32 => f32::from_le_bytes(b.try_into().unwrap()),
            StorageDtype::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            StorageDtype::BF16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            StorageDtype::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I16 => i16::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::U16 => u16::from_le_bytes(b.try_into().unwrap()) as f32,
            StorageDtype::I8 => b[0] as i8 as f32,
            StorageDtype::U8 | StorageDtype::Bool => b[0] as f32,
        }
    };
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; t.shape.len()];
    let mut off = t.offset;
    for _ in 0..numel {
        out.push(read(off));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            off += t.stride[d];
            if idx[d] < t.shape[d] {
                break;
            }
            off -= t.stride[d] * t.shape[d];
            idx[d] = 0;
        }
    }
    Ok(out)
}
