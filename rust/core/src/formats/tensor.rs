//! The quantized-tensor types shared by every format family, `quantize`, `matmul`, `runtime` and
//! the bindings: a leaf module (it uses only `error` and the `qtype` table), so that the formats
//! can build and read them without depending on the modules that dispatch to them.

use crate::error::{Error, Result};
use crate::qtype::QType;

/// Where the scales of int8 / fp8 come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMode {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per row (output channel).
    Row,
    /// One scale per block of `block_size` weights along the row.
    Block,
}

impl ScaleMode {
    pub fn parse(s: &str) -> Result<ScaleMode> {
        match s {
            "tensor" => Ok(ScaleMode::Tensor),
            "row" => Ok(ScaleMode::Row),
            "block" => Ok(ScaleMode::Block),
            _ => Err(Error::InvalidArgument(format!(
                "unknown scale mode {s:?}; expected 'tensor', 'row' or 'block'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScaleMode::Tensor => "tensor",
            ScaleMode::Row => "row",
            ScaleMode::Block => "block",
        }
    }
}

/// bitsandbytes' double quantization of the absmax: `absmax - offset` quantized blockwise with
/// the 8-bit dynamic map, one fp32 absmax per block of `block_size` absmax values.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    pub offset: f32,
    pub qabsmax: Vec<u8>,
    pub absmax2: Vec<f32>,
    pub code: Vec<f32>,
    pub block_size: usize,
}

/// A quantized matrix: `data` in the reference layout, plus statistics where the format keeps
/// them beside the data (absmax for nf4/fp4, scales for int8/fp8).
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub block_size: usize,
    pub scale_mode: Option<ScaleMode>,
    pub data: Vec<u8>,
    pub stats: Vec<f32>,
    pub double_quant: Option<DoubleQuant>,
}

impl Quantized {
    pub fn view(&self) -> QuantizedView<'_> {
        QuantizedView {
            qtype: self.qtype,
            rows: self.rows,
            cols: self.cols,
            block_size: self.block_size,
            scale_mode: self.scale_mode,
            data: &self.data,
            stats: &self.stats,
            double_quant: self.double_quant.as_ref(),
        }
    }
}

/// A borrowed quantized matrix (e.g. over a numpy array or a memory-mapped file).
#[derive(Clone, Copy, Debug)]
pub struct QuantizedView<'a> {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub block_size: usize,
    pub scale_mode: Option<ScaleMode>,
    pub data: &'a [u8],
    pub stats: &'a [f32],
    pub double_quant: Option<&'a DoubleQuant>,
}

/// Check that a view's buffers have the sizes its shape needs (a view may come from a file or
/// from Python, so nothing about it is trusted).
pub fn validate_view(q: &QuantizedView<'_>) -> Result<()> {
    use QType::*;
    let (rows, cols) = (q.rows, q.cols);
    if rows == 0 || cols == 0 {
        return Err(Error::Empty { rows, cols });
    }
    let size_err = |what, got, expected| Error::DataSize {
        what,
        qtype: q.qtype.name(),
        rows,
        cols,
        got,
        expected,
    };
    if let GInt(g) = q.qtype {
        if !cols.is_multiple_of(g.row_unit()) {
            return Err(Error::RowLength {
                qtype: q.qtype.name(),
                rows,
                cols,
                block_size: g.row_unit(),
            });
        }
    } else if q.block_size == 0
        || (!matches!(q.qtype, Int8 | Fp8E4M3 | Fp8E5M2) || q.scale_mode == Some(ScaleMode::Block))
            && cols % q.block_size != 0
    {
        return Err(Error::RowLength {
            qtype: q.qtype.name(),
            rows,
            cols,
            block_size: q.block_size,
        });
    }
    let expected = rows
        .checked_mul(q.qtype.row_bytes(cols, q.block_size))
        .ok_or_else(|| Error::InvalidArgument(format!("shape {rows}x{cols} overflows")))?;
    if q.data.len() != expected {
        return Err(size_err("data", q.data.len(), expected));
    }
    Ok(())
}
