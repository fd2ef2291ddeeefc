//! The walk both NEON GEMMs share (`gemm_neon.rs`'s 32-weight formats and `gemm_neon_k.rs`'s
//! K-quants): blocks of activation rows, panels of weight rows, chunks of K, tiles.

use super::neon::gemm::{self as g, NeonDot, TileAcc, PANEL, TILE};
use super::{OutPtr, Plan};
use crate::matmul::reference::{hsum8, LANES};

/// Where a NEON GEMM task walks: weight rows `n0..n0 + rows` of `nb` blocks each, activation
/// rows in blocks of `block`, K in chunks of `kc` blocks.
#[derive(Clone, Copy)]
pub(super) struct Walk {
    pub n0: usize,
    pub rows: usize,
    pub nb: usize,
    pub block: usize,
    pub kc: usize,
}

impl Plan<'_> {
    /// The walk both NEON GEMMs share (this file's 32-weight formats and `gemm_neon_k.rs`'s
    /// K-quants): per block of `walk.block` activation rows, per panel of `PANEL` weight rows of
    /// `walk.n0..walk.n0 + walk.rows` (rows of `nb` blocks `W`; a partial panel's missing rows
    /// are empty), per chunk of up to `walk.kc` blocks of K: `decode(buf, rows, np, c0, cb)`
    /// once, then `tile(buf, j0, r, c0, cb, lanes)` for every tile of `r <= TILE` activation
    /// rows from `j0`, its float lanes kept between chunks; at the end `hsum8` of each
    /// output's lanes, straight into `out`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn walk_neon_gemm<W: bytemuck::Pod, B>(
        &self,
        dot: NeonDot,
        walk: Walk,
        out: &OutPtr,
        buf: &mut B,
        acc: &mut Vec<TileAcc>,
        mut decode: impl FnMut(&mut B, &[&[W]; PANEL], usize, usize, usize),
        mut tile: impl FnMut(&B, usize, usize, usize, usize, &mut TileAcc),
    ) {
        let Walk {
            n0,
            rows,
            nb,
            block,
            kc,
        } = walk;
        let rb = self.row_bytes;
        let m = self.m;
        let mut mb = 0;
        while mb < m {
            let ms = mb..(mb + block).min(m);
            let tiles = ms.len().div_ceil(TILE);
            let mut p0 = 0;
            while p0 < rows {
                let np = PANEL.min(rows - p0);
                let w: [&[W]; PANEL] = std::array::from_fn(|i| {
                    if i < np {
                        bytemuck::cast_slice(&self.w.data[(n0 + p0 + i) * rb..][..rb])
                    } else {
                        &[]
                    }
                });
                acc.clear();
                acc.resize(tiles, [[[0.0; 4]; 8]; LANES]);
                let mut c0 = 0;
                while c0 < nb {
                    let cb = kc.min(nb - c0);
                    decode(buf, &w, np, c0, cb);
                    for (t, a) in acc.iter_mut().enumerate() {
                        let j0 = ms.start + t * TILE;
                        tile(buf, j0, TILE.min(ms.end - j0), c0, cb, a);
                    }
                    c0 += cb;
                }
                for (t, a) in acc.iter().enumerate() {
                    let j0 = ms.start + t * TILE;
                    for j in 0..TILE.min(ms.end - j0) {
                        for i in 0..np {
                            out.set(j0 + j, n0 + p0 + i, hsum8(&g::lanes(dot, a, i, j)));
                        }
                    }
                }
                p0 += np;
            }
            mb = ms.end;
        }
    }
}
