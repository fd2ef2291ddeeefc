//! tq1_0 and tq2_0 weights against q8_K activations (ggml's `ggml_vec_dot_tq1_0_q8_K` /
//! `ggml_vec_dot_tq2_0_q8_K`): per super-block of 256 the exact integer `Σ (q - 1)·x`, then the
//! float product `(d_w·d_x)·isum` (ggml's `(float) sum * (d_w * y.d)`: the same two roundings),
//! super-blocks summed in the reference's lanes (`dot_block_k`).

use super::{BlockK, BlockQ8K};
use crate::formats::blocks::*;
use crate::formats::ternary::{unpack_tq1_0, unpack_tq2_0};

/// Σ_e (q_e - 1)·x_e over the super-block, `q` the stored `q + 1` values in element order.
#[inline(always)]
fn isum_ternary(q: &[u8; QK_K], x: &BlockQ8K) -> i32 {
    q.iter()
        .zip(&x.qs)
        .map(|(&q, &x)| (q as i32 - 1) * x as i32)
        .sum()
}

impl BlockK for BlockTQ1_0 {
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        (isum_ternary(&unpack_tq1_0(self), x), 0)
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}

impl BlockK for BlockTQ2_0 {
    fn sums(&self, x: &BlockQ8K) -> (i32, i32) {
        (isum_ternary(&unpack_tq2_0(self), x), 0)
    }
    fn d_dmin(&self) -> (f32, f32) {
        (f16_to_f32(self.d), 0.0)
    }
}
