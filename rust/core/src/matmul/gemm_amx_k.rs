//! The K-quants' GEMM on AMX int8 tiles (`x86::amx_k`), for M >= `min_m(qtype)` where
//! `amx::amx_int8_usable()`: each panel of 16 weight rows of the task is decoded once
//! (`gemm_k::decode`, then `amx_k::expand`), then every block of 16 activation rows (packed once per
//! call by `pack`, in `plan`) passes the task's panels. A partial last panel (N not a multiple
//! of 16) decodes zero blocks into lanes that are never written out. Every output has the bits
//! of `reference::dot_block_k`, as on the VNNI K-quant GEMM (`gemm_k.rs`).

use std::cell::RefCell;

use super::x86::amx_k::{self, AmxXK, KSb, Tiles, MT, NT};
use super::x86::gemm_k::{self, Acc, DecodeK, SbBuf};
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

/// From how many activation rows `qtype` takes the AMX path at K = `k` (where usable; None:
/// never): `k_route`'s table, where the measurements are. (Session 16, 4096x4096 against the
/// VNNI GEMM: q6_k / q2_k / iq4_xs win from 32 rows, q3_k / q4_k / q5_k from 64; the panels'
/// decode and `expand` are paid once per task, so the tiles win only with enough rows.)
pub(super) fn min_m(qtype: QType, k: usize) -> Option<usize> {
    super::k_route::k_route(qtype, k).and_then(|r| r.tiles)
}

#[cfg(test)]
thread_local! {
    /// (tests) Some(on): plans made on this thread take the AMX path from `GEMM_K_MIN_M` rows
    /// (true) or never (false), wherever AMX int8 is usable (`Force`).
    static FORCE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// (tests) While it lives, plans made on this thread take (`on`) or leave the AMX path at
/// every M where AMX int8 is usable, so both K-quant GEMMs are tested on a CPU with AMX.
#[cfg(test)]
pub(crate) struct Force(());

#[cfg(test)]
impl Force {
    pub(crate) fn new(on: bool) -> Self {
        FORCE.with(|c| c.set(Some(on)));
        Self(())
    }
}

#[cfg(test)]
impl Drop for Force {
    fn drop(&mut self) {
        FORCE.with(|c| c.set(None));
    }
}

/// Whether the AMX path runs for `qtype` weights, `m` activation rows and K = `k` (`min_m`,
/// `amx::amx_int8_usable`), where the K-quant GEMM runs.
pub(super) fn takes(qtype: QType, m: usize, k: usize) -> bool {
    #[cfg(test)]
    if let Some(on) = FORCE.with(|c| c.get()) {
        return on && super::gemm_k::takes(qtype) && crate::amx::amx_int8_usable();
    }
    // FERROQUANT_K_TILES=n (benchmarks): from n rows instead of the table's; 0: never.
    let from = match crate::config::k_tiles() {
        Some(0) => None,
        Some(n) if super::gemm_k::takes(qtype) => Some(n.max(super::gemm_k::GEMM_K_MIN_M)),
        _ => min_m(qtype, k),
    };
    from.is_some_and(|t| m >= t) && crate::amx::amx_int8_usable()
}

/// The q8_K activations packed for the A tiles, or None for other activations.
pub(super) fn pack(acts: &Acts<'_>, m: usize, k: usize) -> Option<AmxXK> {
    match acts {
        Acts::Q8K { blocks, .. } => Some(AmxXK::pack(blocks, m, k / QK_K)),
        _ => None,
    }
}

/// Super-blocks of K a task decodes (every panel) before its blocks of rows pass them: the
/// planes of 4 panels (8 KiB a super-block, q2_k's min plane aside) and 64 rows' packed chunk
/// (4 KiB a super-block per 16 rows) stay in L2. K = 4096 is one chunk of 16; K = 14336 four
/// of 14 (evenly split). Unchunked, K = 14336 decoded 1.8 MB of planes per task that left L2
/// beside the activations: 1.5-1.7x slower than the VNNI GEMM (session 16).
pub(super) const KC_SB: usize = 16;

thread_local! {
    /// Each pool thread's decoded panel chunks and float accumulators (reused across calls).
    static PANELS: RefCell<(SbBuf, Vec<KSb>, Vec<[Acc; MT]>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row into `out` on the tiles; false
    /// (nothing done) when the AMX path is off for this plan.
    pub(super) fn fill_amx_k(&self, n0: usize, rows: usize, out: &OutPtr) -> bool {
        let Some(x) = &self.amx_k else {
            return false;
        };
        match self.w.qtype {
            QType::Q4K => self.amx_k_rows::<BlockQ4K>(x, n0, rows, out),
            QType::Q6K => self.amx_k_rows::<BlockQ6K>(x, n0, rows, out),
            QType::Q5K => self.amx_k_rows::<BlockQ5K>(x, n0, rows, out),
            QType::Q2K => self.amx_k_rows::<BlockQ2K>(x, n0, rows, out),
            QType::Q3K => self.amx_k_rows::<BlockQ3K>(x, n0, rows, out),
            QType::IQ4XS => self.amx_k_rows::<BlockIQ4XS>(x, n0, rows, out),
            _ => return false,
        }
        true
    }

    fn amx_k_rows<W: DecodeK>(&self, x: &AmxXK, n0: usize, rows: usize, out: &OutPtr) {
        let nb = self.k / QK_K;
        let rb = self.row_bytes;
        let m = self.m;
        let np = rows.div_ceil(NT);
        let mbs = m.div_ceil(MT);
        let rows_of = |mb: usize| MT.min(m - mb * MT);
        let chunks = nb.div_ceil(KC_SB).max(1);
        let kc = nb.div_ceil(chunks);
        let zero = W::zeroed();
        // Super-block b of the task's weight row i, or a zero block past its rows.
        let blk = |i: usize, b: usize| -> &W {
            if i < rows {
                &bytemuck::cast_slice::<u8, W>(&self.w.data[(n0 + i) * rb..][..rb])[b]
            } else {
                &zero
            }
        };
        PANELS.with_borrow_mut(|(buf, panels, acc)| {
            if panels.len() < np * kc {
                panels.resize(np * kc, KSb::default());
            }
            // acc[pi * mbs + mb][i]: panel pi, activation row mb * 16 + i
            // SAFETY: `self.amx_k` is set only with `amx::amx_int8_usable()`, which implies
            // AVX2, F16C and AVX-512 F/BW/VL/VNNI.
            unsafe { amx_k::zero_accs(acc, np * mbs) };
            // SAFETY: AMX int8 usable (above); `_tiles` drops on this thread at the end of this
            // task, so no tile state outlives it.
            let _tiles = unsafe { Tiles::new() };
            for c in 0..chunks {
                let b0 = c * kc;
                let kn = kc.min(nb - b0);
                for pi in 0..np {
                    for j in 0..kn {
                        let ws: [&W; NT] = std::array::from_fn(|i| blk(pi * NT + i, b0 + j));
                        // SAFETY: AMX int8 usable (above).
                        unsafe {
                            gemm_k::decode(&ws, buf);
                            amx_k::expand::<W>(buf, &mut panels[pi * kc + j]);
                        }
                    }
                }
                // Blocks of rows (one or two at a time, `amx_k::blocks_of_rows`) over the
                // chunk of the task's panels: the blocks' packed chunk and the panels stay in L2.
                let mut mb = 0;
                while mb < mbs {
                    let two = amx_k::blocks_of_rows::<W>() == 2 && mb + 1 < mbs;
                    for pi in 0..np {
                        let p = &panels[pi * kc..][..kn];
                        let a = &mut acc[pi * mbs + mb..];
                        // SAFETY: AMX int8 usable with the tiles configured on this thread
                        // (`_tiles`); b0 + kn <= nb; x was packed for this plan (nb
                        // super-blocks a row, blocks of rows mb (and mb + 1) exist); two
                        // blocks of rows only where the planes allow (`blocks_of_rows`).
                        unsafe {
                            if two {
                                let a: &mut [_; 2] = (&mut a[..2]).try_into().expect("2");
                                amx_k::rows_x_panel::<W, 2>(p, b0, nb, x, mb, a);
                            } else {
                                let a: &mut [_; 1] = (&mut a[..1]).try_into().expect("1");
                                amx_k::rows_x_panel::<W, 1>(p, b0, nb, x, mb, a);
                            }
                        }
                    }
                    mb += 1 + two as usize;
                }
            }
            for pi in 0..np {
                let c0 = n0 + pi * NT;
                let valid = (rows - pi * NT).min(NT);
                for mb in 0..mbs {
                    for (i, a) in acc[pi * mbs + mb].iter().enumerate().take(rows_of(mb)) {
                        // SAFETY: AVX-512 F (above).
                        let y = unsafe { amx_k::finish(a) };
                        let mi = mb * MT + i;
                        if valid == NT {
                            out.set8(mi, c0, y[..8].try_into().expect("8"));
                            out.set8(mi, c0 + 8, y[8..].try_into().expect("8"));
                        } else {
                            for (j, &v) in y[..valid].iter().enumerate() {
                                out.set(mi, c0 + j, v);
                            }
                        }
                    }
                }
            }
        });
    }
}
