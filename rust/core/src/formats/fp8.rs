//! STUB: to be written.

use crate::error::Result;
use crate::input::Matrix;
use crate::qtype::QType;
use crate::quantize::{Quantized, QuantizedView, ScaleMode};

pub fn quantize(
    _m: &Matrix<'_>,
    _qtype: QType,
    _scale: ScaleMode,
    _block_size: usize,
) -> Result<Quantized> {
    todo!("fp8")
}

pub fn dequantize(_q: &QuantizedView<'_>, _out: &mut [f32]) -> Result<()> {
    todo!("fp8")
}
