//! GGUF file IO: a hostile-input-safe, zero-copy reader for versions 2 and 3 and a streaming,
//! atomic writer for version 3.
//!
//! Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count; the
//! key/value pairs (u64-length key, u32 value type, value); the tensor infos (name, u32 n_dims,
//! u64 dims innermost first, u32 ggml type, u64 data offset); padding to `general.alignment`
//! (default 32); the tensor data, each tensor at an aligned offset from the section start.

mod cursor;
pub mod limits;
pub mod reader;
pub mod types;
pub mod writer;

#[cfg(test)]
mod tests;

pub use reader::{parse_header, GgufFile, Header, Kv, TensorInfo};
pub use types::{Array, GgmlType, Value, ValueType, GGML_TYPES};
pub use writer::{encode_header, write_file, EncodedHeader, TensorDesc, Writer};
