//! Importance-weighted q4_0 / q4_1 / q5_0 / q5_1 (ggml's `quantize_row_*_impl` with
//! quant_weights). STUB: to be written.

pub fn quantize_row_q4_0_impl(_x: &[f32], _out: &mut [u8], _qw: &[f32]) {
    todo!("q4_0 with imatrix")
}
pub fn quantize_row_q4_1_impl(_x: &[f32], _out: &mut [u8], _qw: &[f32]) {
    todo!("q4_1 with imatrix")
}
pub fn quantize_row_q5_0_impl(_x: &[f32], _out: &mut [u8], _qw: &[f32]) {
    todo!("q5_0 with imatrix")
}
pub fn quantize_row_q5_1_impl(_x: &[f32], _out: &mut [u8], _qw: &[f32]) {
    todo!("q5_1 with imatrix")
}
