//! Sane limits for GGUF files. A GGUF file is untrusted input: every count and length read from
//! it is checked against these limits and against the bytes left in the file (with checked
//! arithmetic) before anything is allocated, so a hostile header cannot make the reader allocate
//! much more than the file's own size, recurse without bound or loop for long.
//!
//! Memory bound: nothing is reserved for more than `MAX_PREALLOC` entries of a claimed count, so
//! memory grows only with entries actually parsed: at most about 8 bytes of memory per byte of
//! header (a `Vec<String>` entry is 24 bytes for an 8-byte empty string in the file, a key/value
//! entry about 80 bytes for a 13-byte minimal pair); tensor data is never copied.

/// Default alignment of the tensor data section when `general.alignment` is absent (ggml's
/// `GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Largest accepted `general.alignment` (it must also be a non-zero power of two, as in ggml).
pub const MAX_ALIGNMENT: u64 = 1 << 30;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Largest element count of one tensor (ggml stores dimensions as `int64_t`).
pub const MAX_ELEMENTS: u64 = i64::MAX as u64;

/// Longest tensor name in bytes. llama.cpp itself only loads names shorter than 64 bytes
/// (`GGML_MAX_NAME`); the reader is more lenient so that gguf-py files with long names can be
/// inspected.
pub const MAX_TENSOR_NAME: u64 = 1 << 16;

/// Longest metadata key in bytes.
pub const MAX_KEY_LEN: u64 = 1 << 16;

/// Longest metadata string value in bytes (chat templates are tens of kilobytes).
pub const MAX_STRING_LEN: u64 = 1 << 30;

/// Most tensors in one file (real models have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 24;

/// Most metadata key/value pairs in one file.
pub const MAX_KV: u64 = 1 << 24;

/// Most elements in one metadata array (vocabularies and merge lists have a few hundred
/// thousand entries); with `MAX_KV` it bounds the parsed metadata whatever the file size.
pub const MAX_ARRAY_LEN: u64 = 1 << 26;

/// Deepest nesting of arrays inside arrays (keeps the recursive parser's stack small).
pub const MAX_NESTING: usize = 8;

/// Smallest encoding of one key/value pair: u64 key length, u32 type, one byte of value.
pub const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// Smallest encoding of one tensor info: u64 name length, u32 n_dims, u32 type, u64 offset.
pub const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Most entries reserved up front for a list whose length comes from the file. Longer lists grow
/// as their entries are actually parsed, so memory follows the bytes really present, never a
/// claimed count (a hostile count that still fits a huge file cannot reserve gigabytes).
pub const MAX_PREALLOC: u64 = 4096;

/// Capacity to reserve for `n` claimed entries.
pub fn prealloc(n: u64) -> usize {
    n.min(MAX_PREALLOC) as usize
}

/// Size of the fixed header: magic, version, tensor count, kv count.
pub const HEADER_BYTES: u64 = 4 + 4 + 8 + 8;
