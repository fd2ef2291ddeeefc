//! Streaming GGUF v3 writer. The header, the metadata and every tensor info are written first
//! (their offsets are known from the shapes alone); then the tensors are written one at a time,
//! in the declared order, as they are produced, each padded to the alignment, so writing a model
//! never needs the whole model in memory.
//!
//! Writes are atomic: everything goes to a temporary file in the target folder, which is
//! fsynced and renamed over the target only by `finish`. A writer dropped or aborted before
//! `finish` (an error, a panic, a Python exception) removes its temporary file and leaves any
//! existing file under the target name untouched.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::limits::*;
use super::reader::MAGIC;
use super::types::{Array, GgmlType, Value};
use crate::error::{Error, Result};

/// The GGUF version this writer produces.
pub const VERSION: u32 = 3;

/// A tensor to be written: name, ggml dimensions (innermost first) and type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: &'static GgmlType,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_array(out: &mut Vec<u8>, a: &Array, depth: usize, key: &str) -> Result<()> {
    if depth > MAX_NESTING {
        return Err(invalid(format!(
            "metadata {key:?}: arrays nested more than {MAX_NESTING} deep"
        )));
    }
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => le!(v),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        Array::String(v) => {
            for s in v {
                check_len(s.len(), MAX_STRING_LEN, key, "string")?;
                put_str(out, s);
            }
        }
        Array::Array(v) => {
            for inner in v {
                put_array(out, inner, depth + 1, key)?;
            }
        }
    }
    Ok(())
}

fn check_len(len: usize, max: u64, key: &str, what: &str) -> Result<()> {
    if len as u64 > max {
        return Err(invalid(format!(
            "{key:?}: {what} of {len} bytes exceeds the limit of {max}"
        )));
    }
    Ok(())
}

/// Append one value (type id and payload) in GGUF encoding.
pub fn encode_value(out: &mut Vec<u8>, v: &Value, key: &str) -> Result<()> {
    out.extend_from_slice(&v.value_type().id().to_le_bytes());
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => {
            check_len(s.len(), MAX_STRING_LEN, key, "string")?;
            put_str(out, s);
        }
        Value::Array(a) => put_array(out, a, 1, key)?,
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
    Ok(())
}

/// An encoded header and where the tensors go.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedHeader {
    /// Header, metadata and tensor infos, without the padding before the data section.
    pub bytes: Vec<u8>,
    /// (byte size, offset in the data section) of each tensor.
    pub layout: Vec<(u64, u64)>,
    pub alignment: u64,
}

/// Encode the header, metadata and tensor infos of a v3 file. Checks everything the reader
/// would check.
pub fn encode_header(
    metadata: &[(String, Value)],
    tensors: &[TensorDesc],
) -> Result<EncodedHeader> {
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = HashSet::new();
    for (k, v) in metadata {
        check_len(k.len(), MAX_KEY_LEN, k, "key")?;
        if !keys.insert(k.as_str()) {
            return Err(invalid(format!("duplicate metadata key {k:?}")));
        }
        if k == "general.alignment" {
            alignment = match v {
                Value::U32(a) if *a != 0 && a.is_power_of_two() && *a as u64 <= MAX_ALIGNMENT => {
                    *a as u64
                }
                _ => {
                    return Err(invalid(format!(
                        "general.alignment must be a uint32 power of two <= {MAX_ALIGNMENT}, \
                         got {v:?}"
                    )))
                }
            };
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        encode_value(&mut out, v, k)?;
    }
    let mut names = HashSet::new();
    let mut layout = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        check_len(t.name.len(), MAX_TENSOR_NAME, &t.name, "tensor name")?;
        if !names.insert(t.name.as_str()) {
            return Err(invalid(format!("duplicate tensor name {:?}", t.name)));
        }
        if t.dims.len() > MAX_DIMS {
            return Err(invalid(format!(
                "tensor {:?} has {} dimensions; GGUF allows at most {MAX_DIMS}",
                t.name,
                t.dims.len()
            )));
        }
        let n_elements = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let nbytes = t.ggml_type.nbytes(&t.dims);
        let (Some(n), Some(nbytes)) = (n_elements, nbytes) else {
            return Err(invalid(format!(
                "tensor {:?}: dimensions {:?} (ggml order) do not fit {}: the first must be a \
                 multiple of {} and the size must not overflow",
                t.name, t.dims, t.ggml_type.name, t.ggml_type.block_size
            )));
        };
        if n > MAX_ELEMENTS {
            return Err(invalid(format!(
                "tensor {:?} has too many elements",
                t.name
            )));
        }
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.id.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        layout.push((nbytes, offset));
        offset = nbytes
            .checked_next_multiple_of(alignment)
            .and_then(|p| offset.checked_add(p))
            .ok_or_else(|| invalid("total tensor size overflows".into()))?;
    }
    Ok(EncodedHeader {
        bytes: out,
        layout,
        alignment,
    })
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{name}.{}.{n}.tmp", std::process::id());
    target.with_file_name(tmp)
}

/// A GGUF v3 file being written.
pub struct Writer {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    names: Vec<String>,
    layout: Vec<(u64, u64)>,
    alignment: u64,
    next: usize,
}

impl Writer {
    /// Start writing `path`: checks the metadata and tensor descriptions, creates the temporary
    /// file and writes the header, metadata, tensor infos and the padding before the data.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, Value)],
        tensors: &[TensorDesc],
    ) -> Result<Writer> {
        let target = path.as_ref().to_path_buf();
        let EncodedHeader {
            bytes: mut head,
            layout,
            alignment,
        } = encode_header(metadata, tensors)?;
        let pad = (head.len() as u64).next_multiple_of(alignment) - head.len() as u64;
        head.resize(head.len() + pad as usize, 0);
        let tmp = temp_path(&target);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        let mut w = Writer {
            target,
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            layout,
            alignment,
            next: 0,
        };
        w.write_all(&head)?;
        Ok(w)
    }

    /// Name of the next tensor `write_tensor` expects, or None when all are written.
    pub fn next_tensor(&self) -> Option<&str> {
        self.names.get(self.next).map(|s| s.as_str())
    }

    /// Bytes the next tensor must have.
    pub fn next_nbytes(&self) -> Option<u64> {
        self.layout.get(self.next).map(|l| l.0)
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| invalid("the writer is already finished or aborted".into()))?;
        file.write_all(bytes).map_err(|e| io_err(&self.tmp, e))
    }

    /// Write the next tensor's data (exactly its byte size) and the padding after it.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(&(nbytes, _)) = self.layout.get(self.next) else {
            return Err(invalid(format!(
                "all {} declared tensors are already written",
                self.names.len()
            )));
        };
        if data.len() as u64 != nbytes {
            return Err(invalid(format!(
                "tensor {:?} needs {nbytes} bytes, got {}",
                self.names[self.next],
                data.len()
            )));
        }
        self.write_all(data)?;
        let pad = nbytes.next_multiple_of(self.alignment) - nbytes;
        self.write_all(&vec![0u8; pad as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Hand the buffered bytes to the operating system (no fsync): what is written so far
    /// survives this process being killed (the resume side file of `convert --ray` counts on it).
    pub fn flush(&mut self) -> Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| invalid("the writer is already finished or aborted".into()))?;
        file.flush().map_err(|e| io_err(&self.tmp, e))
    }

    /// Check every tensor was written, flush, fsync and rename the file into place.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.names.len() {
            return Err(invalid(format!(
                "{} of {} tensors written; next missing: {:?}",
                self.next,
                self.names.len(),
                self.names[self.next]
            )));
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| invalid("the writer is already finished or aborted".into()))?;
        let tmp = self.tmp.clone();
        let done = file
            .into_inner()
            .map_err(|e| io_err(&tmp, e.into_error()))
            .and_then(|f| f.sync_all().map_err(|e| io_err(&tmp, e)))
            .and_then(|_| fs::rename(&tmp, &self.target).map_err(|e| io_err(&self.target, e)));
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // Make the rename itself durable (directories cannot be opened this way on Windows).
        #[cfg(unix)]
        if let Some(dir) = self.target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Give up: remove the temporary file; an existing target file is left as it was.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.discard();
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Write a whole file at once (metadata and in-memory tensors), atomically.
pub fn write_file(
    path: impl AsRef<Path>,
    metadata: &[(String, Value)],
    tensors: &[(TensorDesc, &[u8])],
) -> Result<()> {
    let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = Writer::create(path, metadata, &descs)?;
    for (_, data) in tensors {
        w.write_tensor(data)?;
    }
    w.finish()
}
