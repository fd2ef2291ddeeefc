//! Bounds-checked reading of untrusted GGUF bytes: the cursor and the metadata value parser
//! (every value type, arrays nested up to `MAX_NESTING`). Counts are checked against the bytes
//! left before anything is allocated.

use super::limits::*;
use super::types::{Array, Value, ValueType};
use crate::error::{Error, Result};

pub(crate) fn bad(field: impl Into<String>, offset: u64, message: impl Into<String>) -> Error {
    Error::Format {
        field: field.into(),
        offset,
        message: message.into(),
    }
}

/// A read cursor over untrusted bytes; every read is bounds-checked.
pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn offset(&self) -> u64 {
        self.pos as u64
    }

    pub(crate) fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    pub(crate) fn take(&mut self, n: u64, field: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(bad(
                field(),
                self.offset(),
                format!(
                    "needs {n} bytes but only {} are left in the file",
                    self.left()
                ),
            ));
        }
        // n <= left <= usize::MAX, so the cast is exact.
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A u64-length UTF-8 string of at most `max` bytes.
    pub(crate) fn string(&mut self, max: u64, field: &dyn Fn() -> String) -> Result<String> {
        let at = self.offset();
        let len = self.u64(&|| format!("{}.length", field()))?;
        if len > max {
            return Err(bad(
                format!("{}.length", field()),
                at,
                format!("string length {len} exceeds the limit of {max} bytes"),
            ));
        }
        let start = self.offset();
        let bytes = self.take(len, field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(bad(
                field(),
                start + e.valid_up_to() as u64,
                "string is not valid UTF-8",
            )),
        }
    }

    /// A value type id.
    pub(crate) fn value_type(&mut self, field: &dyn Fn() -> String) -> Result<ValueType> {
        let at = self.offset();
        let id = self.u32(field)?;
        ValueType::from_id(id).ok_or_else(|| {
            bad(
                field(),
                at,
                format!("unknown metadata value type {id} (known: 0..=12)"),
            )
        })
    }
}

/// Read `n` fixed-size little-endian items (the caller checked the bytes are there).
fn read_vec<T, const N: usize>(
    cur: &mut Cursor<'_>,
    n: u64,
    field: &dyn Fn() -> String,
    conv: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    let bytes = cur.take(n * N as u64, field)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            conv(a)
        })
        .collect())
}

fn read_bool(cur: &mut Cursor<'_>, field: &dyn Fn() -> String) -> Result<bool> {
    let at = cur.offset();
    match cur.array::<1>(field)?[0] {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(bad(
            field(),
            at,
            format!("bool value {b} is neither 0 nor 1"),
        )),
    }
}

pub(crate) fn read_value(
    cur: &mut Cursor<'_>,
    ty: ValueType,
    depth: usize,
    field: &dyn Fn() -> String,
) -> Result<Value> {
    Ok(match ty {
        ValueType::U8 => Value::U8(cur.array::<1>(field)?[0]),
        ValueType::I8 => Value::I8(cur.array::<1>(field)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(cur.array(field)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(cur.array(field)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(cur.array(field)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(cur.array(field)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(cur.array(field)?)),
        ValueType::Bool => Value::Bool(read_bool(cur, field)?),
        ValueType::String => Value::String(cur.string(MAX_STRING_LEN, field)?),
        ValueType::U64 => Value::U64(u64::from_le_bytes(cur.array(field)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(cur.array(field)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(cur.array(field)?)),
        ValueType::Array => Value::Array(read_array(cur, depth + 1, field)?),
    })
}

/// An array: u32 element type, u64 count, elements. `depth` counts the arrays around it.
fn read_array(cur: &mut Cursor<'_>, depth: usize, field: &dyn Fn() -> String) -> Result<Array> {
    let at = cur.offset();
    if depth > MAX_NESTING {
        return Err(bad(
            field(),
            at,
            format!("arrays nested more than {MAX_NESTING} deep"),
        ));
    }
    let ety = cur.value_type(&|| format!("{}.element_type", field()))?;
    let count_at = cur.offset();
    let n = cur.u64(&|| format!("{}.count", field()))?;
    let need = n.checked_mul(ety.min_size());
    if n > MAX_ARRAY_LEN || !fits(need, cur.left()) {
        return Err(bad(
            format!("{}.count", field()),
            count_at,
            format!(
                "array of {n} {} elements needs at least {} bytes but only {} are left \
                 (limit {MAX_ARRAY_LEN} elements)",
                ety.name(),
                need.map_or("2^64 or more".to_string(), |b| b.to_string()),
                cur.left()
            ),
        ));
    }
    // From here on n * min_size <= bytes left, so every allocation below is bounded by a small
    // multiple of the file size.
    let elem = |i: u64| move || format!("{}[{i}]", field());
    Ok(match ety {
        ValueType::U8 => Array::U8(read_vec(cur, n, field, |a: [u8; 1]| a[0])?),
        ValueType::I8 => Array::I8(read_vec(cur, n, field, |a: [u8; 1]| a[0] as i8)?),
        ValueType::U16 => Array::U16(read_vec(cur, n, field, u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(read_vec(cur, n, field, i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(read_vec(cur, n, field, u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(read_vec(cur, n, field, i32::from_le_bytes)?),
        ValueType::F32 => Array::F32(read_vec(cur, n, field, f32::from_le_bytes)?),
        ValueType::U64 => Array::U64(read_vec(cur, n, field, u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(read_vec(cur, n, field, i64::from_le_bytes)?),
        ValueType::F64 => Array::F64(read_vec(cur, n, field, f64::from_le_bytes)?),
        ValueType::Bool => {
            let mut v = Vec::with_capacity(prealloc(n));
            for i in 0..n {
                v.push(read_bool(cur, &elem(i))?);
            }
            Array::Bool(v)
        }
        ValueType::String => {
            let mut v = Vec::with_capacity(prealloc(n));
            for i in 0..n {
                v.push(cur.string(MAX_STRING_LEN, &elem(i))?);
            }
            Array::String(v)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity(prealloc(n));
            for i in 0..n {
                v.push(read_array(cur, depth + 1, &elem(i))?);
            }
            Array::Array(v)
        }
    })
}

/// True when a checked size exists and is at most `left`.
pub(crate) fn fits(need: Option<u64>, left: u64) -> bool {
    matches!(need, Some(n) if n <= left)
}

pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v / align * align)
}
