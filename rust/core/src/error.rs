//! The one error type of the core. Every variant names what was wrong and where.

/// Errors raised by quantization, dequantization and file handling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A qtype name that is not in the table.
    #[error("unknown qtype {0:?}; known qtypes: {1}")]
    UnknownQType(String, String),
    /// The row length does not split into whole blocks.
    #[error("row length {cols} is not a multiple of {qtype}'s block size {block_size} (shape {rows}x{cols})")]
    RowLength {
        qtype: &'static str,
        rows: usize,
        cols: usize,
        block_size: usize,
    },
    /// An input with no elements.
    #[error("empty input: shape {rows}x{cols} has no elements")]
    Empty { rows: usize, cols: usize },
    /// NaN or Inf in the input.
    #[error("non-finite value {value} at row {row}, column {col}")]
    NonFinite { row: usize, col: usize, value: f32 },
    /// A finite value too large for the format (e.g. beyond the float16 range of its scales).
    #[error("value {value} at row {row}, column {col} is beyond {what}'s range (|x| <= {limit})")]
    OutOfRange {
        row: usize,
        col: usize,
        value: f32,
        limit: f32,
        what: &'static str,
    },
    /// An importance matrix whose length is not the row length.
    #[error("imatrix has {got} values but rows have {expected} columns")]
    ImatrixLength { got: usize, expected: usize },
    /// An importance matrix with a negative or non-finite weight.
    #[error("imatrix value {value} at index {index} is not a finite non-negative number")]
    ImatrixValue { index: usize, value: f32 },
    /// A block size the format does not allow.
    #[error("block size {got} not allowed for {qtype}: {allowed}")]
    BlockSize {
        qtype: &'static str,
        got: usize,
        allowed: &'static str,
    },
    /// Raw data or statistics whose length does not match the shape.
    #[error("{what} has {got} elements but shape {rows}x{cols} of {qtype} needs {expected}")]
    DataSize {
        what: &'static str,
        qtype: &'static str,
        rows: usize,
        cols: usize,
        got: usize,
        expected: usize,
    },
    /// An option that does not apply to this qtype or is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A malformed or unsupported file (GGUF): names the field and the byte offset.
    #[error("{field} at byte offset {offset}: {message}")]
    Format {
        field: String,
        offset: u64,
        message: String,
    },
    /// An operating-system error while reading or writing a file.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

impl Error {
    /// True for errors about a file's contents (mapped to `ferroquant.FormatError`).
    pub fn is_format(&self) -> bool {
        matches!(self, Error::Format { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
