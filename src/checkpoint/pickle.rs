//! A safe interpreter for the subset of Python's pickle format that `torch.save` writes.
//!
//! Nothing is ever executed: globals become [`Value::Global`] names, calls (`REDUCE`, `NEWOBJ`)
//! become [`Value::Object`]s holding their arguments, and `BUILD` records the state. The few
//! callables a state dict needs (`OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `_rebuild_parameter`) are recognised by name and turned into plain values.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Element type of a PyTorch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// 32-bit float (`FloatStorage`).
    F32,
    /// 16-bit IEEE float (`HalfStorage`).
    F16,
    /// bfloat16 (`BFloat16Storage`).
    BF16,
    /// 64-bit float (`DoubleStorage`).
    F64,
    /// 64-bit signed integer (`LongStorage`).
    I64,
    /// 32-bit signed integer (`IntStorage`).
    I32,
    /// 16-bit signed integer (`ShortStorage`).
    I16,
    /// 16-bit unsigned integer (`UInt16Storage`; safetensors `U16`).
    U16,
    /// 8-bit signed integer (`CharStorage`).
    I8,
    /// 8-bit unsigned integer (`ByteStorage`).
    U8,
    /// Boolean, one byte each (`BoolStorage`).
    Bool,
}

impl StorageDtype {
    /// The dtype of a `torch.<Name>Storage` class name.
    pub fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "UInt16Storage" => Self::U16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Short lower-case name (`f32`, `f16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F64 => "f64",
            Self::I64 => "i64",
            Self::I32 => "i32",
            Self::I16 => "i16",
            Self::U16 => "u16",
            Self::I8 => "i8",
            Self::U8 => "u8",
            Self::Bool => "bool",
        }
    }
}

/// A tensor as the pickle describes it: a view into a named storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key (the file name under `data/` in a zip archive).
    pub storage: String,
    /// Element type of the storage.
    pub dtype: StorageDtype,
    /// Number of elements the storage holds.
    pub storage_len: usize,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Shape of the view.
    pub shape: Vec<usize>,
    /// Strides of the view, in elements.
    pub stride: Vec<usize>,
}

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// An integer too large for 64 bits (little-endian two's complement bytes).
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A bytes object.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict (insertion order kept).
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A reference to a global, never resolved.
    Global(String, String),
    /// An object of a class we do not interpret: class name, constructor args, `BUILD` state.
    Object {
        /// `module.name` of the class or callable.
        class: String,
        /// Arguments it was called with.
        args: Box<Value>,
        /// State given by `BUILD`, if any.
        state: Option<Box<Value>>,
    },
    /// A persistent id (a storage reference in torch files).
    Persistent(Box<Value>),
    /// A tensor view.
    Tensor(TensorRef),
}

impl Value {
    /// The string inside a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Look up a string key in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short description of the value's type, for error messages and `info`.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::Global(m, n) => format!("global {m}.{n}"),
            Value::Object { class, .. } => format!("object {class}"),
            Value::Persistent(_) => "persistent id".into(),
            Value::Tensor(_) => "tensor".into(),
        }
    }
}

/// Why a pickle could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The stream ended before `STOP`.
    #[error("pickle stream truncated at byte {0}")]
    Truncated(usize),
    /// An opcode we do not implement.
    #[error("unsupported pickle opcode 0x{op:02x} at byte {pos}")]
    UnsupportedOpcode {
        /// The opcode byte.
        op: u8,
        /// Its position.
        pos: usize,
    },
    /// The stream is inconsistent (stack underflow, bad memo index, wrong types).
    #[error("malformed pickle at byte {pos}: {what}")]
    Malformed {
        /// Position of the opcode.
        pos: usize,
        /// What was wrong.
        what: String,
    },
    /// Nesting deeper than any checkpoint needs (or a cycle).
    #[error("pickle nests deeper than {0} levels")]
    TooDeep(usize),
    /// Shared references that expand to more values than any checkpoint holds.
    #[error("pickle expands to more than {0} values")]
    TooLarge(usize),
}

const MAX_DEPTH: usize = 256;
/// Upper bound on values produced when shared references are expanded (guards against
/// "billion laughs" pickles).
const MAX_VALUES: usize = 5_000_000;

/// Internal value with shared, mutable containers (pickle memo semantics).
#[derive(Clone)]
enum V {
    Leaf(Value),
    List(Rc<RefCell<Seq>>),
    Tuple(Rc<Seq>),
    Dict(Rc<RefCell<Pairs>>),
    Set(Rc<RefCell<Seq>>),
    Object(Rc<RefCell<Obj>>),
}

/// Items of a list, tuple or set. Dropped without recursion (see [`dismantle`]), so a pickle
/// nested 100,000 deep cannot overflow the stack when it is freed.
#[derive(Default)]
struct Seq(Vec<V>);

/// Items of a dict, dropped without recursion.
#[derive(Default)]
struct Pairs(Vec<(V, V)>);

struct Obj {
    class: String,
    args: V,
    state: Option<V>,
}

impl std::ops::Deref for Seq {
    type Target = Vec<V>;
    fn deref(&self) -> &Vec<V> {
        &self.0
    }
}

impl std::ops::DerefMut for Seq {
    fn deref_mut(&mut self) -> &mut Vec<V> {
        &mut self.0
    }
}

impl std::ops::Deref for Pairs {
    type Target = Vec<(V, V)>;
    fn deref(&self) -> &Vec<(V, V)> {
        &self.0
    }
}

impl std::ops::DerefMut for Pairs {
    fn deref_mut(&mut self) -> &mut Vec<(V, V)> {
        &mut self.0
    }
}

/// Free a forest of values with an explicit work list: a container whose last reference this
/// is hands its children to the list instead of dropping them recursively.
fn dismantle(mut work: Vec<V>) {
    while let Some(v) = work.pop() {
        match v {
            V::Leaf(_) => {}
            V::List(rc) | V::Set(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    work.append(&mut cell.into_inner().0);
                }
            }
            V::Tuple(rc) => {
                if let Ok(mut seq) = Rc::try_unwrap(rc) {
                    work.append(&mut seq.0);
                }
            }
            V::Dict(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    for (k, v) in cell.into_inner().0.drain(..) {
                        work.push(k);
                        work.push(v);
                    }
                }
            }
            V::Object(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    let mut o = cell.into_inner();
                    work.push(std::mem::replace(&mut o.args, V::Leaf(Value::None)));
                    work.extend(o.state.take());
                }
            }
        }
    }
}

impl Drop for Seq {
    fn drop(&mut self) {
        dismantle(std::mem::take(&mut self.0));
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        let items = std::mem::take(&mut self.0);
        dismantle(items.into_iter().flat_map(|(k, v)| [k, v]).collect());
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        let mut work = vec![std::mem::replace(&mut self.args, V::Leaf(Value::None))];
        work.extend(self.state.take());
        dismantle(work);
    }
}

impl V {
    fn into_value(self, depth: usize, budget: &mut usize) -> Result<Value, PickleError> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep(MAX_DEPTH));
        }
        *budget = budget
            .checked_sub(1)
            .ok_or(PickleError::TooLarge(MAX_VALUES))?;
        let d = depth + 1;
        Ok(match self {
            V::Leaf(v) => v,
            V::List(l) => Value::List(
                l.borrow()
                    .iter()
                    .map(|v| v.clone().into_value(d, budget))
                    .collect::<Result<_, _>>()?,
            ),
            V::Set(l) => Value::Set(
                l.borrow()
                    .iter()
                    .map(|v| v.clone().into_value(d, budget))
                    .collect::<Result<_, _>>()?,
            ),
            V::Tuple(t) => Value::Tuple(
                t.iter()
                    .map(|v| v.clone().into_value(d, budget))
                    .collect::<Result<_, _>>()?,
            ),
            V::Dict(m) => Value::Dict(
                m.borrow()
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone().into_value(d, budget)?,
                            v.clone().into_value(d, budget)?,
                        ))
                    })
                    .collect::<Result<_, PickleError>>()?,
            ),
            V::Object(o) => {
                let o = o.borrow();
                Value::Object {
                    class: o.class.clone(),
                    args: Box::new(o.args.clone().into_value(d, budget)?),
                    state: match &o.state {
                        Some(s) => Some(Box::new(s.clone().into_value(d, budget)?)),
                        None => None,
                    },
                }
            }
        })
    }
}

/// Resolves persistent ids (storages) while unpickling.
pub trait PersistentLoader {
    /// Turn a persistent id into a value; torch storages become `Value::Persistent` that
    /// [`rebuild_tensor`] understands.
    fn load(&mut self, pid: &Value) -> Result<Value, String>;
}

/// The default loader: keep the id as is.
pub struct KeepPersistent;

impl PersistentLoader for KeepPersistent {
    fn load(&mut self, pid: &Value) -> Result<Value, String> {
        Ok(Value::Persistent(Box::new(pid.clone())))
    }
}

/// Interpret one pickle starting at `data[start..]`; returns the value and the position after
/// `STOP`.
pub fn unpickle(
    data: &[u8],
    start: usize,
    loader: &mut dyn PersistentLoader,
) -> Result<(Value, usize), PickleError> {
    Machine {
        data,
        pos: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run(loader)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &rest[..n];
        self.pos += n + 1;
        Ok(s)
    }
    fn bad(&self, pos: usize, what: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos,
            what: what.into(),
        }
    }
    fn pop(&mut self, pos: usize) -> Result<V, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.bad(pos, "stack underflow"))
    }
    fn top(&mut self, pos: usize) -> Result<&mut V, PickleError> {
        let err = self.bad(pos, "stack underflow");
        self.stack.last_mut().ok_or(err)
    }
    fn pop_mark(&mut self, pos: usize) -> Result<Vec<V>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.bad(pos, "no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.bad(pos, "MARK beyond the stack"));
        }
        let items = self.stack.split_off(m);
        Ok(items)
    }
    fn str(&self, pos: usize, b: &[u8]) -> Result<V, PickleError> {
        let s = std::str::from_utf8(b).map_err(|_| self.bad(pos, "string is not UTF-8"))?;
        Ok(V::Leaf(Value::Str(s.to_owned())))
    }
    fn memo_get(&self, pos: usize, idx: u32) -> Result<V, PickleError> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.bad(pos, format!("memo key {idx} not set")))
    }
    fn memo_put(&mut self, pos: usize, idx: u32) -> Result<(), PickleError> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.bad(pos, "PUT on an empty stack"))?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn run(mut self, loader: &mut dyn PersistentLoader) -> Result<(Value, usize), PickleError> {
        loop {
            let pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME: length hint only
                }
                b'.' => {
                    // STOP
                    let v = self.pop(pos)?;
                    return Ok((v.into_value(0, &mut { MAX_VALUES })?, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(V::Dict(Rc::default())),
                b']' => self.stack.push(V::List(Rc::default())),
                b')' => self.stack.push(V::Tuple(Rc::default())),
                0x8f => self.stack.push(V::Set(Rc::default())),
                b'N' => self.stack.push(V::Leaf(Value::None)),
                0x88 => self.stack.push(V::Leaf(Value::Bool(true))),
                0x89 => self.stack.push(V::Leaf(Value::Bool(false))),
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(V::Leaf(Value::Int(v)))
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(V::Leaf(Value::Int(v)))
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(V::Leaf(Value::Int(v)))
                }
                b'I' => {
                    let l = self.line()?;
                    let s = std::str::from_utf8(l).map_err(|_| self.bad(pos, "bad INT"))?;
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(s.parse().map_err(|_| self.bad(pos, "bad INT"))?),
                    };
                    self.stack.push(V::Leaf(v))
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    let v = if n <= 8 {
                        let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            [0xffu8; 8]
                        } else {
                            [0u8; 8]
                        };
                        buf[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt(b.to_vec())
                    };
                    self.stack.push(V::Leaf(v))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(V::Leaf(Value::Float(v)))
                }
                b'F' => {
                    let l = self.line()?;
                    let v: f64 = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or_else(|| self.bad(pos, "bad FLOAT"))?;
                    self.stack.push(V::Leaf(Value::Float(v)))
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let b = self.take(n)?;
                    let v = self.str(pos, b)?;
                    self.stack.push(v)
                }
                b'V' => {
                    let b = self.line()?;
                    let v = self.str(pos, b)?;
                    self.stack.push(v)
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'T' | b'B' => self.u32()? as usize,
                        b'U' | b'C' => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(V::Leaf(Value::Bytes(b)))
                }
                b'S' => {
                    let l = self.line()?;
                    let s = String::from_utf8_lossy(l)
                        .trim_matches(['\'', '"'])
                        .to_owned();
                    self.stack.push(V::Leaf(Value::Str(s)))
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(pos, i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(pos, i)?
                }
                b'p' => {
                    let l = self.line()?;
                    let i = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| self.bad(pos, "bad PUT"))?;
                    self.memo_put(pos, i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(pos, i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(pos, i)?;
                    self.stack.push(v)
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(pos, i)?;
                    self.stack.push(v)
                }
                b'g' => {
                    let l = self.line()?;
                    let i = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| self.bad(pos, "bad GET"))?;
                    let v = self.memo_get(pos, i)?;
                    self.stack.push(v)
                }
                b'0' => {
                    if self.stack.pop().is_none() {
                        return Err(self.bad(pos, "POP on an empty stack"));
                    }
                    if self.marks.last().is_some_and(|&m| m > self.stack.len()) {
                        self.marks.pop();
                    }
                }
                b'1' => {
                    self.pop_mark(pos)?;
                }
                b'2' => {
                    let v = self.top(pos)?.clone();
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark(pos)?;
                    self.stack.push(V::Tuple(Rc::new(Seq(items))))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad(pos, "stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(V::Tuple(Rc::new(Seq(items))))
                }
                b'l' => {
                    let items = self.pop_mark(pos)?;
                    self.stack.push(V::List(Rc::new(RefCell::new(Seq(items)))))
                }
                b'd' => {
                    let items = self.pop_mark(pos)?;
                    let pairs = pairs(items).ok_or_else(|| self.bad(pos, "odd DICT items"))?;
                    self.stack
                        .push(V::Dict(Rc::new(RefCell::new(Pairs(pairs)))))
                }
                0x91 => {
                    let items = self.pop_mark(pos)?;
                    self.stack.push(V::Set(Rc::new(RefCell::new(Seq(items)))))
                }
                b'a' => {
                    let v = self.pop(pos)?;
                    match self.top(pos)? {
                        V::List(l) => l.borrow_mut().push(v),
                        _ => return Err(self.bad(pos, "APPEND to a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark(pos)?;
                    match self.top(pos)? {
                        V::List(l) => l.borrow_mut().extend(items),
                        _ => return Err(self.bad(pos, "APPENDS to a non-list")),
                    }
                }
                0x90 => {
                    let items = self.pop_mark(pos)?;
                    match self.top(pos)? {
                        V::Set(l) => l.borrow_mut().extend(items),
                        _ => return Err(self.bad(pos, "ADDITEMS to a non-set")),
                    }
                }
                b's' => {
                    let v = self.pop(pos)?;
                    let k = self.pop(pos)?;
                    self.set_items(pos, vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark(pos)?;
                    let p = pairs(items).ok_or_else(|| self.bad(pos, "odd SETITEMS items"))?;
                    self.set_items(pos, p)?
                }
                b'c' => {
                    let m = String::from_utf8_lossy(self.line()?).into_owned();
                    let n = String::from_utf8_lossy(self.line()?).into_owned();
                    self.stack.push(V::Leaf(Value::Global(m, n)))
                }
                0x93 => {
                    let n = self.pop(pos)?;
                    let m = self.pop(pos)?;
                    match (m, n) {
                        (V::Leaf(Value::Str(m)), V::Leaf(Value::Str(n))) => {
                            self.stack.push(V::Leaf(Value::Global(m, n)))
                        }
                        _ => return Err(self.bad(pos, "STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' | 0x81 => {
                    // REDUCE / NEWOBJ: never call anything; record or rebuild known forms.
                    let args = self.pop(pos)?;
                    let callable = self.pop(pos)?;
                    let v = self.call(pos, callable, args)?;
                    self.stack.push(v)
                }
                0x92 => {
                    let _kwargs = self.pop(pos)?;
                    let args = self.pop(pos)?;
                    let callable = self.pop(pos)?;
                    let v = self.call(pos, callable, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    let state = self.pop(pos)?;
                    // BUILD on anything but an opaque object (a dict's __dict__ state): ignore.
                    if let V::Object(o) = self.top(pos)? {
                        o.borrow_mut().state = Some(state);
                    }
                }
                b'Q' => {
                    let pid = self.pop(pos)?.into_value(0, &mut { MAX_VALUES })?;
                    let v = loader.load(&pid).map_err(|e| self.bad(pos, e))?;
                    self.stack.push(V::Leaf(v))
                }
                b'P' => {
                    let l = String::from_utf8_lossy(self.line()?).into_owned();
                    let v = loader.load(&Value::Str(l)).map_err(|e| self.bad(pos, e))?;
                    self.stack.push(V::Leaf(v))
                }
                _ => return Err(PickleError::UnsupportedOpcode { op, pos }),
            }
        }
    }

    fn set_items(&mut self, pos: usize, items: Vec<(V, V)>) -> Result<(), PickleError> {
        match self.top(pos)? {
            V::Dict(d) => {
                d.borrow_mut().extend(items);
                Ok(())
            }
            V::Object(o) => {
                // e.g. a dict subclass we keep opaque: store items as its state.
                let mut o = o.borrow_mut();
                let d = match &o.state {
                    Some(V::Dict(d)) => d.clone(),
                    _ => {
                        let d: Rc<RefCell<Pairs>> = Rc::default();
                        o.state = Some(V::Dict(d.clone()));
                        d
                    }
                };
                d.borrow_mut().extend(items);
                Ok(())
            }
            _ => Err(self.bad(pos, "SETITEM on a non-dict")),
        }
    }

    fn call(&self, pos: usize, callable: V, args: V) -> Result<V, PickleError> {
        let (module, name) = match &callable {
            V::Leaf(Value::Global(m, n)) => (m.as_str(), n.as_str()),
            _ => {
                return Ok(V::Object(Rc::new(RefCell::new(Obj {
                    class: "<call>".into(),
                    args,
                    state: None,
                }))));
            }
        };
        let arg_list: Vec<V> = match &args {
            V::Tuple(t) => t.to_vec(),
            _ => Vec::new(),
        };
        match (module, name) {
            ("collections", "OrderedDict") | ("builtins", "dict") => Ok(V::Dict(Rc::default())),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let t = rebuild_tensor(&arg_list).map_err(|e| self.bad(pos, e))?;
                Ok(V::Leaf(Value::Tensor(t)))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => arg_list
                .into_iter()
                .next()
                .ok_or_else(|| self.bad(pos, "_rebuild_parameter without data")),
            _ => Ok(V::Object(Rc::new(RefCell::new(Obj {
                class: format!("{module}.{name}"),
                args,
                state: None,
            })))),
        }
    }
}

fn pairs(items: Vec<V>) -> Option<Vec<(V, V)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

fn as_usize(v: &V) -> Option<usize> {
    match v {
        V::Leaf(Value::Int(i)) if *i >= 0 => Some(*i as usize),
        _ => None,
    }
}

fn as_usizes(v: &V) -> Option<Vec<usize>> {
    match v {
        V::Tuple(t) => t.iter().map(as_usize).collect(),
        V::List(l) => l.borrow().iter().map(as_usize).collect(),
        _ => None,
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` where `storage` is the persistent
/// id `('storage', torch.<T>Storage, key, location, numel, ...)`.
fn rebuild_tensor(args: &[V]) -> Result<TensorRef, String> {
    if args.len() < 4 {
        return Err("_rebuild_tensor with fewer than 4 arguments".into());
    }
    let pid = match &args[0] {
        V::Leaf(Value::Persistent(p)) => p.as_ref(),
        _ => return Err("tensor storage is not a persistent id".into()),
    };
    let fields = match pid {
        Value::Tuple(f) => f,
        _ => return Err("storage id is not a tuple".into()),
    };
    if fields.len() < 5 || fields[0].as_str() != Some("storage") {
        return Err("storage id is not ('storage', type, key, location, size)".into());
    }
    let dtype = match &fields[1] {
        Value::Global(_, n) => StorageDtype::from_storage_class(n)
            .ok_or_else(|| format!("unsupported storage type {n}"))?,
        other => return Err(format!("storage type is a {}", other.kind())),
    };
    let storage = match &fields[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => return Err("storage key is not a string".into()),
    };
    let storage_len = match &fields[4] {
        Value::Int(i) if *i >= 0 => *i as usize,
        _ => return Err("storage size is not a non-negative integer".into()),
    };
    let offset = as_usize(&args[1]).ok_or("tensor offset is not an integer")?;
    let shape = as_usizes(&args[2]).ok_or("tensor size is not a tuple of integers")?;
    let stride = as_usizes(&args[3]).ok_or("tensor stride is not a tuple of integers")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "tensor has {} sizes but {} strides",
            shape.len(),
            stride.len()
        ));
    }
    Ok(TensorRef {
        storage,
        dtype,
        storage_len,
        offset,
        shape,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memoised_dict_sees_later_items() {
        // {} PUT 0, 'a' 1 SETITEM, then a list holding GET 0: the list's dict has 'a'.
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s]q\x01h\x00a.";
        let (v, _) = unpickle(p, 0, &mut KeepPersistent).unwrap();
        // STOP pops the list (the dict was consumed by SETITEM's top, then the list pushed).
        match v {
            Value::List(items) => assert_eq!(items[0].get("a"), Some(&Value::Int(1))),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_class_is_opaque_and_not_called() {
        let p = b"\x80\x02cargparse\nNamespace\nq\x00)\x81q\x01}q\x02X\x02\x00\x00\x00lrq\x03G?\xe0\x00\x00\x00\x00\x00\x00sb.";
        let (v, _) = unpickle(p, 0, &mut KeepPersistent).unwrap();
        match v {
            Value::Object { class, state, .. } => {
                assert_eq!(class, "argparse.Namespace");
                assert_eq!(state.unwrap().get("lr"), Some(&Value::Float(0.5)));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn exponential_sharing_is_refused() {
        // l = []; then 64 times: l = [l, l] (via memo), which would expand to 2^64 values.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"(h\x00h\x00lq\x00");
        }
        p.push(b'.');
        assert!(matches!(
            unpickle(&p, 0, &mut KeepPersistent),
            Err(PickleError::TooLarge(_))
        ));
    }

    /// Pickles nesting lists, tuples, dicts and calls `n` deep.
    fn nested_pickles(n: usize) -> Vec<(&'static str, Vec<u8>)> {
        let mut lists = b"\x80\x02".to_vec();
        lists.extend(std::iter::repeat_n(b']', n));
        lists.extend(std::iter::repeat_n(b'a', n - 1));
        let mut tuples = b"\x80\x02N".to_vec();
        tuples.extend(std::iter::repeat_n(0x85u8, n));
        let mut marks = b"\x80\x02".to_vec();
        marks.extend(std::iter::repeat_n(b'(', n));
        marks.extend(std::iter::repeat_n(b't', n));
        let mut dicts = b"\x80\x02".to_vec();
        for _ in 0..n {
            dicts.extend_from_slice(b"}K\x00");
        }
        dicts.push(b'}');
        dicts.extend(std::iter::repeat_n(b's', n));
        let mut calls = b"\x80\x02".to_vec();
        for _ in 0..n {
            calls.extend_from_slice(b"cevil\nf\n");
        }
        calls.push(b'N');
        for _ in 0..n {
            calls.extend_from_slice(b"\x85R");
        }
        let mut out = vec![
            ("lists", lists),
            ("tuples", tuples),
            ("marked tuples", marks),
            ("dicts", dicts),
            ("calls", calls),
        ];
        for (_, p) in &mut out {
            p.push(b'.');
        }
        out
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // Run on a small stack (test threads have 2 MiB): freeing or converting the nested
        // values must not recurse.
        let cases = nested_pickles(100_000);
        assert_eq!(cases.len(), 5);
        for (what, p) in cases {
            match unpickle(&p, 0, &mut KeepPersistent) {
                Err(PickleError::TooDeep(_)) => {}
                other => panic!("{what}: expected TooDeep, got {:?}", other.map(|_| ())),
            }
            // The same structures cut short (no STOP) are freed on the error path too.
            assert!(unpickle(&p[..p.len() - 1], 0, &mut KeepPersistent).is_err());
        }
        // Shallow enough nesting still decodes.
        for (what, p) in nested_pickles(100) {
            assert!(unpickle(&p, 0, &mut KeepPersistent).is_ok(), "{what}");
        }
    }

    #[test]
    fn self_referencing_list_is_an_error() {
        let p = b"\x80\x02]q\x00h\x00a.";
        assert!(unpickle(p, 0, &mut KeepPersistent).is_err());
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        assert!(matches!(
            unpickle(b"\x80\x02}q\x00X\x05\x00\x00", 0, &mut KeepPersistent),
            Err(PickleError::Truncated(_))
        ));
        assert!(unpickle(b"hello world", 0, &mut KeepPersistent).is_err());
        assert!(unpickle(b"", 0, &mut KeepPersistent).is_err());
        assert!(unpickle(b"s.", 0, &mut KeepPersistent).is_err());
    }
}
