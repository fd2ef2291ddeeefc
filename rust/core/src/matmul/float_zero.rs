//! Float zeros (`int{b}_g{group}_fz`, `formats::gint`): the grouped int8 path runs on the row
//! decoded to `q - zi` (`zi = gint::int_zero(z)`), and this module adds the exact rest of
//! `Σ s (q - z) x`, which is `Σ_g s_g (zi_g - z_g) Σ_{j in g} x_j`.
//!
//! **Reference** (for every kernel): an output is `dot + correction(stats, sums)`, `dot` the
//! grouped integer product of the decoded row (`reference::q16::dot_int8_q16`), `sums` the f32
//! activation sums of each group (`group_sums`, elements in order), the correction summed over
//! the groups in order as `acc += (s · (zi - z)) · sum` in f32 (every operation rounded to f32
//! as written; `zi - z` is exact for 2^-9 <= |z| < 2^11 or z = 0, else rounded once). The
//! activations are the f32 inputs, not their q16 form: the term carries no
//! activation-quantization error whatever the kernel's activation format.

use super::Plan;
use crate::formats::gint;
use crate::qtype::GInt;

/// Per activation row, the f32 sum of each group of `gl` values (in order): M x K/gl.
pub fn group_sums(x: &[f32], k: usize, gl: usize) -> Vec<f32> {
    x.chunks_exact(k)
        .flat_map(|row| row.chunks_exact(gl).map(|c| c.iter().sum::<f32>()))
        .collect()
}

/// `Σ_g s_g (zi_g - z_g) sums_g` for one weight row's statistics (scales, then float zeros).
pub fn correction(g: GInt, stats: &[f32], sums: &[f32]) -> f32 {
    let groups = sums.len();
    let (scales, zeros) = stats.split_at(groups);
    let mut acc = 0f32;
    for ((&s, &z), &sum) in scales.iter().zip(zeros).zip(sums) {
        acc += (s * (gint::int_zero(g, z) as f32 - z)) * sum;
    }
    acc
}

impl Plan<'_> {
    /// Adds the float-zero rest to `y` = weight row `n` with activation rows `ms` (after the
    /// int8 kernels wrote their part).
    pub(super) fn add_float_zero(&self, n: usize, ms: std::ops::Range<usize>, y: &mut [f32]) {
        let Some(g) = self.w.qtype.gint().filter(|g| g.float_zero) else {
            return;
        };
        let groups = self.k / self.block_len;
        let st = self.stats_of(n);
        for (v, mi) in y.iter_mut().zip(ms) {
            *v += correction(g, st, &self.fz_sums[mi * groups..(mi + 1) * groups]);
        }
    }
}
