//! STUB: to be written.

use crate::error::Result;
use crate::input::Matrix;
use crate::qtype::QType;
use crate::quantize::{Quantized, QuantizedView};

/// nf4 / fp4 with bitsandbytes' layout; `block_size` already validated.
pub fn quantize(
    _m: &Matrix<'_>,
    _qtype: QType,
    _block_size: usize,
    _double_quant: bool,
) -> Result<Quantized> {
    todo!("bnb4")
}

pub fn dequantize(_q: &QuantizedView<'_>, _out: &mut [f32]) -> Result<()> {
    todo!("bnb4")
}
