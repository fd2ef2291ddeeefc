//! GGUF reader (versions 2 and 3). The header is parsed from a byte slice with every count,
//! length, dimension, type and offset checked against the bytes left and the limits in
//! `limits.rs` (checked arithmetic, before any allocation); tensor data is handed out as slices
//! of the memory map, never copied. Every failure is `Error::Format { field, offset, message }`.
//!
//! Compared with llama.cpp's `gguf.cpp` the reader is stricter on two points (strings must be
//! valid UTF-8, as gguf-py requires; bools must be 0 or 1) and, like gguf-py, more lenient on one:
//! tensors may leave aligned gaps between them (llama.cpp requires them packed in order). Tensors
//! must be aligned, inside the file and must not overlap. Nested arrays are read (gguf-py writes
//! them; llama.cpp refuses them).

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use super::cursor::{align_up, bad, fits, read_value, Cursor};
use super::limits::*;
use super::types::{GgmlType, Value};
use crate::error::{Error, Result};

/// The magic bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// One metadata key/value pair, with the byte offset where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Value,
    pub offset: u64,
}

/// One tensor's header entry, checked against the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order (innermost first); numpy's shape is the reverse.
    pub dims: Vec<u64>,
    pub ggml_type: &'static GgmlType,
    /// Offset of the data from the start of the data section (as stored in the file).
    pub offset: u64,
    pub n_elements: u64,
    pub nbytes: u64,
    /// Byte offset of this tensor info in the file.
    pub info_offset: u64,
}

/// A parsed and checked GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    pub metadata: Vec<Kv>,
    pub tensors: Vec<TensorInfo>,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| &kv.value)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Parse and check the header of a GGUF file held in `buf` (the whole file).
pub fn parse_header(buf: &[u8]) -> Result<Header> {
    let mut cur = Cursor { buf, pos: 0 };
    let magic = cur.array::<4>(&|| "header.magic".into())?;
    if &magic != MAGIC {
        return Err(bad(
            "header.magic",
            0,
            format!(
                "expected b\"GGUF\", found {:?}",
                String::from_utf8_lossy(&magic)
            ),
        ));
    }
    let version = cur.u32(&|| "header.version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(bad(
                "header.version",
                4,
                "GGUF version 1 (32-bit counts) is not supported; convert the file to v3",
            ))
        }
        v if v != 0 && v & 0xffff == 0 => {
            return Err(bad(
                "header.version",
                4,
                format!("version {v:#x} looks like a big-endian GGUF file, which is not supported"),
            ))
        }
        v => {
            return Err(bad(
                "header.version",
                4,
                format!("unsupported GGUF version {v} (supported: 2, 3)"),
            ))
        }
    }
    let n_tensors = cur.u64(&|| "header.tensor_count".into())?;
    let n_kv = cur.u64(&|| "header.kv_count".into())?;
    let left = cur.left();
    if n_kv > MAX_KV || !fits(n_kv.checked_mul(MIN_KV_BYTES), left) {
        return Err(bad(
            "header.kv_count",
            16,
            format!("{n_kv} key/value pairs cannot fit in the {left} bytes left (limit {MAX_KV})"),
        ));
    }
    let min_ti = n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES);
    let min_kv = n_kv * MIN_KV_BYTES; // checked above
    if n_tensors > MAX_TENSORS || !fits(min_ti.map(|b| b.saturating_add(min_kv)), left) {
        return Err(bad(
            "header.tensor_count",
            8,
            format!(
                "{n_tensors} tensor infos cannot fit in the {left} bytes left (limit {MAX_TENSORS})"
            ),
        ));
    }

    let mut metadata: Vec<Kv> = Vec::with_capacity(prealloc(n_kv));
    let mut keys: HashSet<String> = HashSet::with_capacity(prealloc(n_kv));
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..n_kv {
        let offset = cur.offset();
        let key = cur.string(MAX_KEY_LEN, &|| format!("metadata[{i}].key"))?;
        if keys.contains(&key) {
            return Err(bad(
                format!("metadata[{i}].key"),
                offset,
                format!("duplicate key {key:?}"),
            ));
        }
        let kfield = || format!("metadata {key:?}");
        let type_at = cur.offset();
        let ty = cur.value_type(&|| format!("{}.type", kfield()))?;
        let value = read_value(&mut cur, ty, 0, &kfield)?;
        if key == "general.alignment" {
            alignment = match value {
                Value::U32(a) if a != 0 && a.is_power_of_two() && a as u64 <= MAX_ALIGNMENT => {
                    a as u64
                }
                Value::U32(a) => {
                    return Err(bad(
                        kfield(),
                        type_at + 4,
                        format!("alignment {a} is not a non-zero power of two <= {MAX_ALIGNMENT}"),
                    ))
                }
                ref v => {
                    return Err(bad(
                        format!("{}.type", kfield()),
                        type_at,
                        format!(
                            "general.alignment must be uint32, found {}",
                            v.value_type().name()
                        ),
                    ))
                }
            };
        }
        keys.insert(key.clone());
        metadata.push(Kv { key, value, offset });
    }
    drop(keys);

    let left = cur.left();
    if n_tensors * MIN_TENSOR_INFO_BYTES > left {
        return Err(bad(
            "header.tensor_count",
            8,
            format!("{n_tensors} tensor infos cannot fit in the {left} bytes left"),
        ));
    }
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(prealloc(n_tensors));
    let mut names: HashSet<String> = HashSet::with_capacity(prealloc(n_tensors));
    for i in 0..n_tensors {
        let info_offset = cur.offset();
        let name = cur.string(MAX_TENSOR_NAME, &|| format!("tensor_info[{i}].name"))?;
        if names.contains(&name) {
            return Err(bad(
                format!("tensor_info[{i}].name"),
                info_offset,
                format!("duplicate tensor name {name:?}"),
            ));
        }
        let tf = |what: &str| format!("tensor_info[{i}] {name:?}.{what}");
        let at = cur.offset();
        let n_dims = cur.u32(&|| tf("n_dims"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(bad(
                tf("n_dims"),
                at,
                format!("{n_dims} dimensions; ggml allows at most {MAX_DIMS}"),
            ));
        }
        let dims_at = cur.offset();
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(cur.u64(&|| tf("dims"))?);
        }
        let mut n_elements: u64 = 1;
        for &d in &dims {
            n_elements = match n_elements.checked_mul(d) {
                Some(n) if n <= MAX_ELEMENTS => n,
                _ => {
                    return Err(bad(
                        tf("dims"),
                        dims_at,
                        format!("dimensions {dims:?} overflow: more than {MAX_ELEMENTS} elements"),
                    ))
                }
            };
        }
        let type_at = cur.offset();
        let type_id = cur.u32(&|| tf("type"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            bad(
                tf("type"),
                type_at,
                format!("unknown ggml tensor type {type_id}"),
            )
        })?;
        let nbytes = ggml_type.nbytes(&dims).ok_or_else(|| {
            bad(
                tf("dims"),
                dims_at,
                if dims.first().copied().unwrap_or(1) % ggml_type.block_size != 0 {
                    format!(
                        "dimensions {dims:?}: the first is not a multiple of {}'s block size {}",
                        ggml_type.name, ggml_type.block_size
                    )
                } else {
                    format!("dimensions {dims:?}: the byte size overflows 64 bits")
                },
            )
        })?;
        let off_at = cur.offset();
        let offset = cur.u64(&|| tf("offset"))?;
        if offset % alignment != 0 {
            return Err(bad(
                tf("offset"),
                off_at,
                format!("data offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        names.insert(name.clone());
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            nbytes,
            info_offset,
        });
    }

    let data_offset = align_up(cur.offset(), alignment)
        .ok_or_else(|| bad("data section", cur.offset(), "data offset overflows"))?;
    let file_len = buf.len() as u64;
    let data_len = file_len.saturating_sub(data_offset);
    // Every tensor lies inside the data section...
    for (i, t) in tensors.iter().enumerate() {
        let end = t.offset.checked_add(t.nbytes);
        if !fits(end, data_len) {
            return Err(bad(
                format!("tensor_info[{i}] {:?}.offset", t.name),
                t.info_offset,
                format!(
                    "data [{}, +{}) runs past the end of the data section ({data_len} bytes \
                     from offset {data_offset}; file size {file_len})",
                    t.offset, t.nbytes
                ),
            ));
        }
    }
    // ... and no two overlap.
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].nbytes > 0)
        .collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.nbytes > b.offset {
            return Err(bad(
                format!("tensor_info[{}] {:?}.offset", w[1], b.name),
                b.info_offset,
                format!(
                    "data [{}, +{}) overlaps tensor {:?} at [{}, +{})",
                    b.offset, b.nbytes, a.name, a.offset, a.nbytes
                ),
            ));
        }
    }
    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

enum Backing {
    Map(memmap2::Mmap),
    Bytes(Vec<u8>),
}

/// An open GGUF file: the checked header and the mapped bytes.
pub struct GgufFile {
    header: Header,
    backing: Backing,
}

impl GgufFile {
    /// Map `path` read-only and parse its header.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_BYTES {
            // Parse what is there so the error names the first missing field.
            let bytes = std::fs::read(path).map_err(io)?;
            return Self::from_bytes(bytes);
        }
        // SAFETY: the map is read-only (PROT_READ, MAP_PRIVATE semantics for reads) and lives
        // inside `GgufFile`, so every slice handed out borrows from it. memmap2's one caveat is
        // that another process truncating or rewriting the file while it is mapped changes the
        // bytes under us or raises SIGBUS; that is the usual contract of memory-mapped readers
        // (safetensors, llama.cpp) and ferroquant's own writer never modifies a file in place
        // (it writes a new file and renames it over the old one).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&map)?;
        Ok(GgufFile {
            header,
            backing: Backing::Map(map),
        })
    }

    /// Parse a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        let header = parse_header(&bytes)?;
        Ok(GgufFile {
            header,
            backing: Backing::Bytes(bytes),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Map(m) => m,
            Backing::Bytes(b) => b,
        }
    }

    /// Absolute byte offset of a tensor's data in the file.
    pub fn data_start(&self, t: &TensorInfo) -> u64 {
        self.header.data_offset.saturating_add(t.offset)
    }

    /// The tensor's bytes, borrowed from the map. Bounds were checked when the header was
    /// parsed, so this only fails for a `TensorInfo` that does not come from this file.
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8]> {
        let range = self.data_start(t).checked_add(t.nbytes).and_then(|end| {
            Some(usize::try_from(self.data_start(t)).ok()?..usize::try_from(end).ok()?)
        });
        range.and_then(|r| self.bytes().get(r)).ok_or_else(|| {
            bad(
                format!("tensor {:?}", t.name),
                t.info_offset,
                "not a tensor of this file",
            )
        })
    }
}
