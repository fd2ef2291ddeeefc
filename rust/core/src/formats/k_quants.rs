//! ggml K-quants q2_k..q6_k. STUB: to be written.

use crate::qtype::QType;

pub fn quantize_row(_qtype: QType, _x: &[f32], _out: &mut [u8], _imatrix: Option<&[f32]>) {
    todo!("k-quants")
}

pub fn dequantize_row(_qtype: QType, _data: &[u8], _y: &mut [f32]) {
    todo!("k-quants")
}
