//! The K-quants' GEMM on AMX int8 tiles (`x86::amx_k`), for M >= `min_m(qtype)` where
//! `amx::amx_int8_usable()`: each panel of 16 weight rows of the task is decoded once
//! (`gemm_k::decode`, then `amx_k::expand`), then every block of 16 activation rows (packed once per
//! call by `pack`, in `plan`) passes the task's panels. A partial last panel (N not a multiple
//! of 16) decodes zero blocks into lanes that are never written out. Every output has the bits
//! of `reference::dot_block_k`, as on the VNNI K-quant GEMM (`gemm_k.rs`).

use std::cell::RefCell;

use super::x86::amx_k::{self, AmxXK, KSb, Tiles, MT, NT};
use super::x86::gemm_k::{self, DecodeK, SbBuf};
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

/// From how many activation rows `qtype` takes the AMX path (where usable; None: never).
/// Measured one thread, CPU time, 4096x4096, against the VNNI K-quant GEMM (main's build,
/// `FERROQUANT_GGML_BF16=0`) in alternating processes, 2026-12-07 10:50-11:00 UTC, load 18-30
/// (ms, AMX / VNNI): q6_k M = 16 2.24 / 2.31, 32 3.07-3.27 / 3.64-3.75, 64 4.06-4.41 /
/// 6.10-6.38; q2_k 32 2.95 / 3.29, 64 4.55 / 5.79; iq4_xs 32 2.84 / 3.00, 64 4.24 / 5.63;
/// q3_k 32 3.04-3.07 / 3.00-3.01, 64 4.31-4.39 / 5.17-5.24; q4_k 32 3.59 / 3.16, 64 5.00 /
/// 5.55; q5_k 32 3.69 / 3.42, 64 5.49 / 5.69. The panels' decode and `expand` are paid once
/// per task, so the tiles win only with enough rows. From 80 rows the bf16 route
/// (`ggml_bf16_min_m`) still takes every K-quant by default: at M = 512 it took 20-24 ms
/// against the tiles' 28-31 (q6_k, q2_k, q3_k, iq4_xs) and 36-39 (q4_k, q5_k; VNNI 47-53).
pub(super) fn min_m(qtype: QType) -> Option<usize> {
    match qtype {
        QType::Q6K | QType::Q2K | QType::IQ4XS => Some(32),
        QType::Q3K | QType::Q4K | QType::Q5K => Some(64),
        _ => None,
    }
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

/// The largest K the AMX path takes: a task decodes its panels' whole K (two i8 planes, 8 KiB
/// per super-block of 16 rows), which at K = 14336 (4 panels, 1.8 MB) no longer stays in L2
/// with the activations: `bench_matmul.py` 14336x4096, M = 64, one thread, CPU time,
/// 2026-12-07 11:17-11:21 UTC, load 12: 29-36 ms against the VNNI GEMM's 17-21 (4096x14336:
/// q6_k 15.8-19.8 against 21.0, q2_k 16.5-16.6 against 20.4-20.6).
pub(super) const AMX_K_MAX_K: usize = 4096;

/// Whether the AMX path runs for `qtype` weights, `m` activation rows and K = `k` (`min_m`,
/// `AMX_K_MAX_K`, `amx::amx_int8_usable`), where the K-quant GEMM runs.
pub(super) fn takes(qtype: QType, m: usize, k: usize) -> bool {
    #[cfg(test)]
    if let Some(on) = FORCE.with(|c| c.get()) {
        return on && super::gemm_k::takes(qtype) && crate::amx::amx_int8_usable();
    }
    min_m(qtype).is_some_and(|t| m >= t) && k <= AMX_K_MAX_K && crate::amx::amx_int8_usable()
}

/// The q8_K activations packed for the A tiles, or None for other activations.
pub(super) fn pack(acts: &Acts<'_>, m: usize, k: usize) -> Option<AmxXK> {
    match acts {
        Acts::Q8K { blocks, .. } => Some(AmxXK::pack(blocks, m, k / QK_K)),
        _ => None,
    }
}

thread_local! {
    /// Each pool thread's decoded panels of its task (reused across calls).
    static PANELS: RefCell<(SbBuf, Vec<KSb>)> = RefCell::new(Default::default());
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
        let zero = W::zeroed();
        // Super-block b of the task's weight row i, or a zero block past its rows.
        let blk = |i: usize, b: usize| -> &W {
            if i < rows {
                &bytemuck::cast_slice::<u8, W>(&self.w.data[(n0 + i) * rb..][..rb])[b]
            } else {
                &zero
            }
        };
        PANELS.with_borrow_mut(|(buf, panels)| {
            if panels.len() < np * nb {
                panels.resize(np * nb, KSb::default());
            }
            for pi in 0..np {
                for b in 0..nb {
                    let ws: [&W; NT] = std::array::from_fn(|i| blk(pi * NT + i, b));
                    // SAFETY: `self.amx_k` is set only with `amx::amx_int8_usable()`, which
                    // implies AVX2, F16C and AVX-512 F/BW/VL/VNNI.
                    unsafe {
                        gemm_k::decode(&ws, buf);
                        amx_k::expand::<W>(buf, &mut panels[pi * nb + b]);
                    }
                }
            }
            // SAFETY: AMX int8 usable (above); `_tiles` drops on this thread at the end of this
            // task, so no tile state outlives it.
            let _tiles = unsafe { Tiles::new() };
            // Blocks of rows (one or two at a time, `amx_k::blocks_of_rows`) over the task's
            // panels (all decoded above): the blocks' packed rows and the panels stay in L2.
            let mbs = m.div_ceil(MT);
            let rows_of = |mb: usize| MT.min(m - mb * MT);
            let mut mb = 0;
            while mb < mbs {
                let two = amx_k::blocks_of_rows::<W>() == 2 && mb + 1 < mbs;
                for pi in 0..np {
                    let c0 = n0 + pi * NT;
                    let valid = (rows - pi * NT).min(NT);
                    let put = |r: usize, i: usize, y: &[f32; NT]| {
                        let mi = (mb + r) * MT + i;
                        if valid == NT {
                            out.set8(mi, c0, y[..8].try_into().expect("8"));
                            out.set8(mi, c0 + 8, y[8..].try_into().expect("8"));
                        } else {
                            for (j, &v) in y[..valid].iter().enumerate() {
                                out.set(mi, c0 + j, v);
                            }
                        }
                    };
                    let p = &panels[pi * nb..][..nb];
                    // SAFETY: AMX int8 usable with the tiles configured on this thread
                    // (`_tiles`); the panel has nb decoded super-blocks; x was packed for this
                    // plan (nb super-blocks a row, blocks of rows mb (and mb + 1) exist);
                    // two blocks of rows only where the planes allow (`blocks_of_rows`).
                    unsafe {
                        if two {
                            let rs = [rows_of(mb), rows_of(mb + 1)];
                            amx_k::rows_x_panel::<W, 2>(p, nb, x, mb, rs, put);
                        } else {
                            amx_k::rows_x_panel::<W, 1>(p, nb, x, mb, [rows_of(mb)], put);
                        }
                    }
                }
                mb += 1 + two as usize;
            }
        });
    }
}
