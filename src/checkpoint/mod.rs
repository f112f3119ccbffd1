//! Checkpoint files: PyTorch (zip and legacy) and safetensors, read into one flat state dict.
//!
//! Reading never executes pickle code (see [`pickle`]). Whatever the nesting (`model`,
//! `model_ema`, `state_dict`, `module`, or a bare state dict), [`Checkpoint::load`] finds the
//! tensors and returns them with their stored dtype; architecture-specific renaming lives in
//! [`crate::model::adapt`].

pub mod pickle;
pub mod torch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use pickle::StorageDtype;
use pickle::Value;

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a checkpoint, or is damaged.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// The container format a checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` zip archive (PyTorch >= 1.6).
    TorchZip,
    /// `torch.save` legacy stream format.
    TorchLegacy,
    /// safetensors.
    Safetensors,
}

impl Format {
    /// Human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            Format::TorchZip => "pytorch-zip",
            Format::TorchLegacy => "pytorch-legacy",
            Format::Safetensors => "safetensors",
        }
    }
}

/// One stored tensor, converted to `f32` (the stored dtype is kept for reporting).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The dtype it was stored in.
    pub dtype: StorageDtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl Param {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// As a candle tensor on `device`.
    pub fn to_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(&self.data, self.shape.as_slice(), device)
    }
}

/// A checkpoint's state dict and where it came from.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its container format.
    pub format: Format,
    /// The top-level key holding the state dict (`model`, `state_dict`, ...), if nested.
    pub nesting: Option<String>,
    /// Other top-level entries (e.g. `optimizer`, `epoch`, `args`) with their types.
    pub extras: Vec<(String, String)>,
    /// A prefix removed from every key (`module.`), if any.
    pub stripped_prefix: Option<String>,
    /// The tensors, by key.
    pub tensors: BTreeMap<String, Param>,
    /// safetensors metadata (empty for PyTorch files).
    pub metadata: HashMap<String, String>,
}

/// Keys under which checkpoints in the wild nest their state dict, in order of preference.
pub const STATE_DICT_KEYS: [&str; 5] = [
    "model",
    "state_dict",
    "module",
    "model_ema",
    "state_dict_ema",
];

impl Checkpoint {
    /// A checkpoint made in memory (random weights, converted or trained tensors).
    pub fn in_memory(tensors: BTreeMap<String, Param>) -> Self {
        Checkpoint {
            path: PathBuf::from("<memory>"),
            format: Format::Safetensors,
            nesting: None,
            extras: Vec::new(),
            stripped_prefix: None,
            tensors,
            metadata: HashMap::new(),
        }
    }

    /// Read a checkpoint, choosing the state dict by the usual nesting keys.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        Self::load_with(path, None)
    }

    /// Read a checkpoint; `state_key` forces which top-level entry holds the state dict.
    pub fn load_with(
        path: impl AsRef<Path>,
        state_key: Option<&str>,
    ) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(&bytes, path, state_key)
    }

    /// Parse checkpoint bytes; `path` is used for messages.
    pub fn from_bytes(
        bytes: &[u8],
        path: PathBuf,
        state_key: Option<&str>,
    ) -> Result<Self, CheckpointError> {
        let invalid = |what: String| CheckpointError::Invalid {
            path: path.clone(),
            what,
        };
        if bytes.is_empty() {
            return Err(invalid("file is empty".into()));
        }
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            let file = torch::read_zip(bytes).map_err(invalid)?;
            Self::from_torch(file, Format::TorchZip, path.clone(), state_key).map_err(invalid)
        } else if torch::is_legacy(bytes) {
            let file = torch::read_legacy(bytes).map_err(invalid)?;
            Self::from_torch(file, Format::TorchLegacy, path.clone(), state_key).map_err(invalid)
        } else if looks_like_safetensors(bytes) {
            Self::from_safetensors(bytes, path.clone()).map_err(invalid)
        } else {
            let head: String = bytes
                .iter()
                .take(16)
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            Err(invalid(format!(
                "not a checkpoint: expected a PyTorch zip or legacy file or safetensors, \
                 file starts with {head:?}"
            )))
        }
    }

    fn from_torch(
        file: torch::TorchFile,
        format: Format,
        path: PathBuf,
        state_key: Option<&str>,
    ) -> Result<Self, String> {
        let (dict, nesting, extras) = find_state_dict(&file.root, state_key)?;
        let mut tensors = BTreeMap::new();
        for (k, v) in dict {
            let (Value::Str(key), Value::Tensor(t)) = (k, v) else {
                continue;
            };
            let storage = file
                .storages
                .get(&t.storage)
                .ok_or_else(|| format!("{key}: storage {} missing", t.storage))?;
            let data = torch::materialize(t, storage).map_err(|e| format!("{key}: {e}"))?;
            tensors.insert(
                key.clone(),
                Param {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data,
                },
            );
        }
        if tensors.is_empty() {
            return Err("no tensors found in the checkpoint".into());
        }
        let mut ck = Checkpoint {
            path,
            format,
            nesting,
            extras,
            stripped_prefix: None,
            tensors,
            metadata: HashMap::new(),
        };
        ck.strip_common_prefix();
        Ok(ck)
    }

    fn from_safetensors(bytes: &[u8], path: PathBuf) -> Result<Self, String> {
        use safetensors::Dtype;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("invalid safetensors: {e}"))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| format!("invalid safetensors: {e}"))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => StorageDtype::F32,
                Dtype::F16 => StorageDtype::F16,
                Dtype::BF16 => StorageDtype::BF16,
                Dtype::F64 => StorageDtype::F64,
                Dtype::I64 => StorageDtype::I64,
                Dtype::I32 => StorageDtype::I32,
                Dtype::I16 => StorageDtype::I16,
                Dtype::U16 => StorageDtype::U16,
                Dtype::I8 => StorageDtype::I8,
                Dtype::U8 => StorageDtype::U8,
                Dtype::BOOL => StorageDtype::Bool,
                other => return Err(format!("{name}: unsupported dtype {other:?}")),
            };
            let shape = view.shape().to_vec();
            let stride = contiguous_strides(&shape);
            let t = pickle::TensorRef {
                storage: name.clone(),
                dtype,
                storage_len: view.data().len() / dtype.size(),
                offset: 0,
                shape: shape.clone(),
                stride,
            };
            let data = torch::materialize(&t, view.data()).map_err(|e| format!("{name}: {e}"))?;
            tensors.insert(name, Param { dtype, shape, data });
        }
        let mut ck = Checkpoint {
            path,
            format: Format::Safetensors,
            nesting: None,
            extras: Vec::new(),
            stripped_prefix: None,
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        };
        ck.strip_common_prefix();
        Ok(ck)
    }

    /// Remove a `module.` prefix (DistributedDataParallel) shared by every key.
    fn strip_common_prefix(&mut self) {
        const PREFIX: &str = "module.";
        if self.tensors.keys().all(|k| k.starts_with(PREFIX)) {
            self.tensors = std::mem::take(&mut self.tensors)
                .into_iter()
                .map(|(k, v)| (k[PREFIX.len()..].to_owned(), v))
                .collect();
            self.stripped_prefix = Some(PREFIX.into());
        }
    }

    /// The dtypes the tensors were stored in, with counts, most common first.
    pub fn dtypes(&self) -> Vec<(StorageDtype, usize)> {
        let mut counts: Vec<(StorageDtype, usize)> = Vec::new();
        for p in self.tensors.values() {
            match counts.iter_mut().find(|(d, _)| *d == p.dtype) {
                Some(c) => c.1 += 1,
                None => counts.push((p.dtype, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 9
        && u64::from_le_bytes(bytes[..8].try_into().unwrap()) < bytes.len() as u64
        && bytes[8] == b'{'
}

type Found<'a> = (&'a [(Value, Value)], Option<String>, Vec<(String, String)>);

fn is_state_dict(items: &[(Value, Value)]) -> bool {
    items.iter().any(|(_, v)| matches!(v, Value::Tensor(_)))
}

/// Locate the state dict inside the unpickled root object.
fn find_state_dict<'a>(root: &'a Value, state_key: Option<&str>) -> Result<Found<'a>, String> {
    let Value::Dict(items) = root else {
        return Err(format!(
            "checkpoint holds a {} rather than a dict of tensors",
            root.kind()
        ));
    };
    let extras = |skip: &str| -> Vec<(String, String)> {
        items
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.kind())))
            .filter(|(k, _)| k != skip)
            .collect()
    };
    if let Some(key) = state_key {
        return match root.get(key) {
            Some(Value::Dict(inner)) if is_state_dict(inner) => {
                Ok((inner, Some(key.to_owned()), extras(key)))
            }
            Some(other) => Err(format!(
                "entry '{key}' is a {}, not a state dict",
                other.kind()
            )),
            None => Err(format!("checkpoint has no entry '{key}'")),
        };
    }
    if is_state_dict(items) {
        return Ok((items, None, Vec::new()));
    }
    for key in STATE_DICT_KEYS {
        if let Some(Value::Dict(inner)) = root.get(key) {
            if is_state_dict(inner) {
                return Ok((inner, Some(key.to_owned()), extras(key)));
            }
            // One more level, e.g. {'state_dict': {'model': {...}}}.
            let nested = Value::Dict(inner.clone());
            if let Ok((_, Some(k2), _)) = find_state_dict(&nested, None)
                && let Some(Value::Dict(deep)) = inner
                    .iter()
                    .find(|(k, _)| k.as_str() == Some(&k2))
                    .map(|(_, v)| v)
            {
                return Ok((deep, Some(format!("{key}.{k2}")), extras(key)));
            }
        }
    }
    let keys: Vec<String> = items
        .iter()
        .filter_map(|(k, v)| Some(format!("{} ({})", k.as_str()?, v.kind())))
        .collect();
    Err(format!(
        "no state dict found: top-level entries are [{}]",
        keys.join(", ")
    ))
}

/// Write tensors to a safetensors file atomically (temporary file, then rename).
pub fn save_safetensors(
    tensors: &BTreeMap<String, candle_core::Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| CheckpointError::Invalid {
            path: path.to_path_buf(),
            what: format!("cannot serialise: {e}"),
        })?;
    crate::io::write_atomic(path, &bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor() -> Value {
        Value::Tensor(pickle::TensorRef {
            storage: "0".into(),
            dtype: StorageDtype::F32,
            storage_len: 1,
            offset: 0,
            shape: vec![1],
            stride: vec![1],
        })
    }

    fn dict(items: Vec<(&str, Value)>) -> Value {
        Value::Dict(
            items
                .into_iter()
                .map(|(k, v)| (Value::Str(k.into()), v))
                .collect(),
        )
    }

    #[test]
    fn state_dict_is_found_under_every_usual_key() {
        let sd = || dict(vec![("w", tensor())]);
        let bare = sd();
        assert_eq!(find_state_dict(&bare, None).unwrap().1, None);
        for key in STATE_DICT_KEYS {
            let root = dict(vec![("epoch", Value::Int(3)), (key, sd())]);
            let (items, nesting, extras) = find_state_dict(&root, None).unwrap();
            assert_eq!(items.len(), 1);
            assert_eq!(nesting.as_deref(), Some(key));
            assert_eq!(extras, vec![("epoch".to_string(), "int".to_string())]);
        }
        // 'model' is preferred over 'model_ema'; --state-key picks the other.
        let both = dict(vec![("model_ema", sd()), ("model", sd())]);
        assert_eq!(
            find_state_dict(&both, None).unwrap().1.as_deref(),
            Some("model")
        );
        assert_eq!(
            find_state_dict(&both, Some("model_ema"))
                .unwrap()
                .1
                .as_deref(),
            Some("model_ema")
        );
        // Two levels: {'state_dict': {'model': {...}}}.
        let deep = dict(vec![("state_dict", dict(vec![("model", sd())]))]);
        assert_eq!(
            find_state_dict(&deep, None).unwrap().1.as_deref(),
            Some("state_dict.model")
        );
        let none = dict(vec![("epoch", Value::Int(1))]);
        let e = find_state_dict(&none, None).unwrap_err();
        assert!(e.contains("epoch (int)"), "{e}");
    }

    #[test]
    fn module_prefix_is_stripped() {
        let p = Param {
            dtype: StorageDtype::F32,
            shape: vec![1],
            data: vec![0.0],
        };
        let mut ck = Checkpoint {
            path: "x".into(),
            format: Format::TorchZip,
            nesting: None,
            extras: vec![],
            stripped_prefix: None,
            tensors: [
                ("module.a".to_string(), p.clone()),
                ("module.b".to_string(), p),
            ]
            .into(),
            metadata: HashMap::new(),
        };
        ck.strip_common_prefix();
        assert_eq!(ck.tensors.keys().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(ck.stripped_prefix.as_deref(), Some("module."));
    }

    #[test]
    fn bf16_and_f16_storages_decode() {
        let t = |dtype| pickle::TensorRef {
            storage: "0".into(),
            dtype,
            storage_len: 2,
            offset: 0,
            shape: vec![2],
            stride: vec![1],
        };
        let bf: Vec<u8> = [half::bf16::from_f32(1.5), half::bf16::from_f32(-2.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            torch::materialize(&t(StorageDtype::BF16), &bf).unwrap(),
            vec![1.5, -2.0]
        );
        let h: Vec<u8> = [half::f16::from_f32(0.25), half::f16::from_f32(3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            torch::materialize(&t(StorageDtype::F16), &h).unwrap(),
            vec![0.25, 3.0]
        );
        // A strided (transposed) view is gathered correctly.
        let f: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let tr = pickle::TensorRef {
            storage: "0".into(),
            dtype: StorageDtype::F32,
            storage_len: 6,
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(
            torch::materialize(&tr, &f).unwrap(),
            vec![1., 4., 2., 5., 3., 6.]
        );
        // A view reaching past its storage is an error, not a panic.
        let bad = pickle::TensorRef { offset: 5, ..tr };
        assert!(torch::materialize(&bad, &f).is_err());
    }

    #[test]
    fn text_file_is_not_a_checkpoint() {
        let e = Checkpoint::from_bytes(b"hello, I am a text file\n", "x.pth".into(), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.pth: not a checkpoint"), "{e}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let e = Checkpoint::from_bytes(b"", "e.pt".into(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "e.pt: file is empty");
    }
}
