//! STUB: to be written.

use crate::error::Result;
use crate::input::Matrix;
use crate::quantize::{Quantized, QuantizedView, ScaleMode};

pub fn quantize(_m: &Matrix<'_>, _scale: ScaleMode, _block_size: usize) -> Result<Quantized> {
    todo!("int8")
}

pub fn dequantize(_q: &QuantizedView<'_>, _out: &mut [f32]) -> Result<()> {
    todo!("int8")
}
