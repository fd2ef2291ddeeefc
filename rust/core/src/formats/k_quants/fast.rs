//! Fast paths of the q4_K / q5_K reference quantizers (placeholder: the references).

use super::{q4_k, q5_k};

pub fn quantize_row_q4_k(x: &[f32], out: &mut [u8]) {
    q4_k::quantize_row_q4_k_ref(x, out)
}

pub fn quantize_row_q5_k(x: &[f32], out: &mut [u8]) {
    q5_k::quantize_row_q5_k_ref(x, out)
}
