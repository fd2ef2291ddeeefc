//! The tile panels of the driver (`Plan::fill`, x86-64 with AVX-512 VNNI): one panel of weight
//! rows times one block of activation rows through `x86::tile` / `x86::tile_k`, and the
//! activations interleaved once per call for them.

use super::reference::{self, BlockQ8K};
use super::{x86, Acts, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

/// The q8_0 activation rows (`nb` blocks each) interleaved for `x86::tile`, row after row (over
/// the pool when `par`).
pub(super) fn interleave_q8_0_rows(blocks: &[BlockQ8_0], nb: usize, par: bool) -> Vec<u8> {
    let gb = nb / reference::LANES * x86::tile::GROUP_BYTES;
    let mut xt = vec![0u8; blocks.len() / nb.max(1) * gb];
    if par && gb > 0 {
        crate::parallel::for_each_chunk_mut(&mut xt, gb, |r, o| {
            x86::tile::interleave_q8_0(&blocks[r * nb..(r + 1) * nb], o)
        });
    } else {
        for (o, b) in xt.chunks_mut(gb.max(1)).zip(blocks.chunks(nb.max(1))) {
            x86::tile::interleave_q8_0(b, o);
        }
    }
    xt
}

/// The q8_K activation rows interleaved for `x86::tile_k`: (quants, bsums, scales).
pub(super) fn interleave_q8_k_rows(
    blocks: &[BlockQ8K],
    nb: usize,
) -> (Vec<u8>, Vec<i32>, Vec<f32>) {
    use x86::tile_k::{interleave_q8_k, GROUP_BYTES_K, GROUP_SUMS_K};
    let groups = nb / reference::LANES;
    let m = blocks.len() / nb.max(1);
    let mut xq = vec![0u8; m * groups * GROUP_BYTES_K];
    let mut xs = vec![0i32; m * groups * GROUP_SUMS_K];
    let mut xd = vec![0f32; m * groups * reference::LANES];
    if groups > 0 {
        for (((b, q), s), d) in blocks
            .chunks(nb)
            .zip(xq.chunks_mut(groups * GROUP_BYTES_K))
            .zip(xs.chunks_mut(groups * GROUP_SUMS_K))
            .zip(xd.chunks_mut(groups * reference::LANES))
        {
            interleave_q8_k(b, q, s, d);
        }
    }
    (xq, xs, xd)
}

impl Plan<'_> {
    /// One tile panel: weight rows `n0..n0 + P` with activation rows `ms`, into `yt` (P rows of
    /// M values).
    pub(super) fn panel<const P: usize>(
        &self,
        n0: usize,
        ms: std::ops::Range<usize>,
        yt: &mut [f32],
    ) {
        match self.w.qtype {
            QType::Q4_0 => self.panel_w::<BlockQ4_0, P>(n0, ms, yt),
            QType::Q8_0 => self.panel_w::<BlockQ8_0, P>(n0, ms, yt),
            QType::Q5_0 => self.panel_w::<BlockQ5_0, P>(n0, ms, yt),
            QType::IQ4NL => self.panel_w::<BlockIQ4NL, P>(n0, ms, yt),
            QType::Q4_1 => self.panel_w::<BlockQ4_1, P>(n0, ms, yt),
            QType::Q5_1 => self.panel_w::<BlockQ5_1, P>(n0, ms, yt),
            QType::Q4K => self.panel_k::<BlockQ4K, P>(n0, ms, yt),
            QType::Q5K => self.panel_k::<BlockQ5K, P>(n0, ms, yt),
            _ => self.panel_k::<BlockQ6K, P>(n0, ms, yt),
        }
    }

    fn panel_k<W: x86::tile_k::TileK, const P: usize>(
        &self,
        n0: usize,
        ms: std::ops::Range<usize>,
        yt: &mut [f32],
    ) {
        use x86::tile_k::{GROUP_BYTES_K, GROUP_SUMS_K};
        let Acts::Q8K {
            blocks, xq, xs, xd, ..
        } = &self.acts
        else {
            unreachable!("the K-quant tiles run only with q8_K activations")
        };
        let nb = self.k / QK_K;
        let groups = nb / reference::LANES;
        let rb = self.row_bytes;
        let w: [&[W]; P] =
            std::array::from_fn(|i| bytemuck::cast_slice(&self.w.data[(n0 + i) * rb..][..rb]));
        let x = x86::tile_k::RowsQ8K {
            xq: &xq[ms.start * groups * GROUP_BYTES_K..ms.end * groups * GROUP_BYTES_K],
            xs: &xs[ms.start * groups * GROUP_SUMS_K..ms.end * groups * GROUP_SUMS_K],
            xd: &xd[ms.start * groups * reference::LANES..ms.end * groups * reference::LANES],
            blocks: &blocks[ms.start * nb..ms.end * nb],
        };
        let mut out = vec![[0.0f32; P]; ms.len()];
        // SAFETY: tile is set only when AVX2, F16C and AVX-512 VNNI/VL were detected; every
        // weight row has nb super-blocks, x has ms.len() rows of nb blocks and nb / 8
        // interleaved groups; out has ms.len() entries.
        unsafe { x86::tile_k::tile_k_vnni(w, &x, &mut out) };
        let m = self.m;
        for (j, o) in out.iter().enumerate() {
            for (i, &v) in o.iter().enumerate() {
                yt[i * m + ms.start + j] = v;
            }
        }
    }

    fn panel_w<W: x86::tile::Tile32, const P: usize>(
        &self,
        n0: usize,
        ms: std::ops::Range<usize>,
        yt: &mut [f32],
    ) {
        let (blocks, d, sums, xt, s): (_, _, _, _, &[f32]) = match &self.acts {
            Acts::Q8_0 {
                blocks,
                d,
                sums,
                xt,
                ..
            } => (blocks, d, sums, xt, &[]),
            Acts::Q8_1 {
                blocks,
                d,
                sums,
                xt,
                s,
                ..
            } => (blocks, d, sums, xt, &s[..]),
            _ => unreachable!("the 32-weight tiles run only with q8_0 / q8_1 activations"),
        };
        let nb = self.k / QK8_0;
        let gb = nb / reference::LANES * x86::tile::GROUP_BYTES;
        let rb = self.row_bytes;
        let w: [&[W]; P] =
            std::array::from_fn(|i| bytemuck::cast_slice(&self.w.data[(n0 + i) * rb..][..rb]));
        let x = x86::tile::RowsQ8 {
            xt: &xt[ms.start * gb..ms.end * gb],
            blocks: &blocks[ms.start * nb..ms.end * nb],
            d: &d[ms.start * nb..ms.end * nb],
            sums: &sums[ms.start * nb..ms.end * nb],
            s: s.get(ms.start * nb..ms.end * nb).unwrap_or_default(),
        };
        let mut out = vec![[0.0f32; P]; ms.len()];
        // SAFETY: tile is set only when AVX2, F16C and AVX-512 VNNI/VL were detected; every
        // weight row has nb blocks, x has ms.len() rows of nb blocks (gb interleaved bytes),
        // out has ms.len() entries.
        unsafe {
            if P.is_multiple_of(2) && crate::cpu::has_vnni_bw() {
                // SAFETY (also): AVX-512 F/BW were detected just now; P is even. (q4_1 / q5_1
                // tile only with them: `plan`; their odd rows take the row kernels.)
                x86::tile::tile32_vnni512(w, &x, &mut out)
            } else {
                debug_assert!(!W::HAS_MIN, "q4_1 / q5_1 have no 256-bit tile kernel");
                x86::tile::tile32_vnni(w, &x, &mut out)
            }
        };
        let m = self.m;
        for (j, o) in out.iter().enumerate() {
            for (i, &v) in o.iter().enumerate() {
                yt[i * m + ms.start + j] = v;
            }
        }
    }
}
