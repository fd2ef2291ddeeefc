//! The GEMM path of the 32-weight formats on AMX int8 tiles (`x86::amx32`), for M >=
//! `min_m(qtype)` where `amx::amx_int8_usable()`: each panel of 16 weight rows of the task is
//! decoded once into the A-tile layout, then the blocks of 16 activation rows (packed once per
//! call by `pack`, in `plan`) pass the panels two blocks of rows by two panels at a time. Weight rows past the last whole panel of 16 go through the
//! AVX-512 GEMM (`gemm.rs`): the same bits either way (both are the reference's).

use std::cell::RefCell;

use super::x86::amx32::{self, AmxPanel, AmxX, Tiles, MT, NT};
use super::x86::Load32;
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

/// From how many activation rows `qtype` takes the AMX path (where usable; None: never).
/// Measured one thread, CPU time, 4096x4096, the weights in the A tiles (`x86::amx32`) with
/// every format from M = 16, against `FERROQUANT_MAX_ISA=avx512` in alternating processes,
/// 2026-12-07 03:55 UTC, load 25-27 (ms, AMX / AVX-512, two runs): q8_0 M = 16 1.86 / 2.04-2.35;
/// q5_1 16 2.45-2.48 / 2.61-2.66; q5_0 16 2.12-2.27 / 2.17, 32 3.13-3.18 / 3.23-3.42; q4_0 32
/// 2.70-2.99 / 2.72-2.86, 64 4.83-5.04 / 5.24-5.32; iq4_nl 32 3.15-3.52 / 2.76-3.16, 64
/// 4.93-5.55 / 5.24-5.86; q4_1 64 6.08-6.12 / 5.95-6.16, 128 10.7-11.1 / 11.6-11.8. The panel
/// decode (once per call, `Load32::load` per row and block) weighs at small M: the cheaper the
/// format's AVX-512 decode (q4_0, iq4_nl, q4_1), the later the tiles win. Session 19 (the
/// q5 decode of `x86::pair32`, 4096x14336, one thread, CPU time, load 18-21, ms AVX-512 GEMM /
/// AMX): q5_1 M = 16 8.7-9.3 / 9.9-10.1, 32 14.0-14.5 / 14.0-14.6, so q5_1 from 32; q5_0 M = 16
/// 7.6-8.8 / 8.5-9.6, 32 stays.
pub(super) fn min_m(qtype: QType) -> Option<usize> {
    match qtype {
        QType::Q8_0 => Some(16),
        QType::Q5_0 | QType::Q5_1 => Some(32),
        QType::Q4_0 | QType::IQ4NL => Some(64),
        QType::Q4_1 => Some(128),
        _ => None,
    }
}

thread_local! {
    /// Each pool thread's decoded panels of its task (reused across calls).
    static PANELS: RefCell<Vec<AmxPanel>> = const { RefCell::new(Vec::new()) };
}

/// Whether the AMX path runs for `qtype` weights and `m` activation rows (`min_m`,
/// `amx::amx_int8_usable`; `FERROQUANT_TILES32` moves the threshold).
pub(super) fn takes(qtype: QType, m: usize) -> bool {
    from_rows(qtype, crate::config::tiles32()).is_some_and(|t| m >= t)
        && crate::amx::amx_int8_usable()
}

/// From how many rows the tiles run for `qtype` with `FERROQUANT_TILES32` = `switch`
/// (benchmarks, to find the thresholds: `Some(n)` from n rows, at least the AVX-512 GEMM's
/// `GEMM_MIN_M`; `Some(0)` never; `None` the table, `min_m`).
pub(super) fn from_rows(qtype: QType, switch: Option<usize>) -> Option<usize> {
    match switch {
        Some(0) => None,
        Some(n) => min_m(qtype).map(|_| n.max(super::GEMM_MIN_M)),
        None => min_m(qtype),
    }
}

/// The activations packed for the A tiles (`x86::amx32::AmxX`), or None for activations
/// other than q8_0 / q8_1.
pub(super) fn pack(acts: &Acts<'_>, m: usize, k: usize) -> Option<AmxX> {
    let nb = k / QK8_0;
    match acts {
        Acts::Q8_0 { blocks, d, .. } => Some(AmxX::pack(blocks, d, &[], m, nb)),
        Acts::Q8_1 { blocks, d, s, .. } => Some(AmxX::pack(blocks, d, s, m, nb)),
        _ => None,
    }
}

impl Plan<'_> {
    /// The first `rows / 16 · 16` weight rows from `n0` with every activation row, into `out`;
    /// returns how many rows it did (0 when the AMX path is off for this plan).
    pub(super) fn fill_amx(&self, n0: usize, rows: usize, out: &OutPtr) -> usize {
        let Some(x) = &self.amx else {
            return 0;
        };
        let whole = rows / NT * NT;
        if whole == 0 {
            return 0;
        }
        match self.w.qtype {
            QType::Q4_0 => self.amx_rows::<BlockQ4_0>(x, n0, whole, out),
            QType::Q8_0 => self.amx_rows::<BlockQ8_0>(x, n0, whole, out),
            QType::Q5_0 => self.amx_rows::<BlockQ5_0>(x, n0, whole, out),
            QType::IQ4NL => self.amx_rows::<BlockIQ4NL>(x, n0, whole, out),
            QType::Q4_1 => self.amx_rows::<BlockQ4_1>(x, n0, whole, out),
            _ => self.amx_rows::<BlockQ5_1>(x, n0, whole, out),
        }
        whole
    }

    fn amx_rows<W: Load32>(&self, x: &AmxX, n0: usize, rows: usize, out: &OutPtr) {
        let nb = self.k / QK8_0;
        let rb = self.row_bytes;
        let m = self.m;
        PANELS.with_borrow_mut(|panels| {
            let np = rows / NT;
            if panels.len() < np {
                panels.resize_with(np, AmxPanel::default);
            }
            for (pi, panel) in panels[..np].iter_mut().enumerate() {
                let col = n0 + pi * NT;
                let w: [&[W]; NT] = std::array::from_fn(|i| {
                    bytemuck::cast_slice(&self.w.data[(col + i) * rb..][..rb])
                });
                // SAFETY: AMX int8 usable implies AVX2 / F16C; each row has nb blocks.
                unsafe { panel.decode(w, nb) };
            }
            // SAFETY: `self.amx` is set only with `amx::amx_int8_usable()` (`plan`); `_tiles`
            // drops on this thread at the end of this task, so no tile state outlives it.
            let _tiles = unsafe { Tiles::new() };
            // Block of rows by block of rows over the task's panels (all decoded above): the
            // block's packed rows and the panels stay in L2 (panel by panel, every block of
            // rows came from L3 again for each panel: 25 % slower at M = 512, perf).
            let mbs = m.div_ceil(MT);
            let rows_of = |mb: usize| MT.min(m - mb * MT);
            let put = |mb: usize, pi: usize, i: usize, y: &[f32; NT]| {
                let (lo, hi) = y.split_at(8);
                let col = n0 + pi * NT;
                out.set8(mb * MT + i, col, lo.try_into().unwrap());
                out.set8(mb * MT + i, col + 8, hi.try_into().unwrap());
            };
            // Two blocks of rows x two panels at a time (`rows_x_panels_2x2`), the odd ones
            // out one by one (`rows_x_panel`): the same bits.
            let mut mb = 0;
            while mb < mbs {
                let pair = mb + 1 < mbs;
                let mut pi = 0;
                while pi < np {
                    if pair && pi + 1 < np {
                        // SAFETY: AMX int8 usable, the tiles configured on this thread
                        // (`_tiles`); both panels have nb blocks; x was packed for this plan
                        // (blocks of rows mb and mb + 1 exist, q8_1's s with q4_1 / q5_1).
                        unsafe {
                            let pp = [&panels[pi], &panels[pi + 1]];
                            let rs = [rows_of(mb), rows_of(mb + 1)];
                            let o = |mi: usize, pj: usize, i: usize, y: &[f32; NT]| {
                                put(mb + mi, pi + pj, i, y)
                            };
                            if W::HAS_MIN {
                                amx32::rows_x_panels_2x2::<true>(pp, nb, x, mb, rs, o);
                            } else {
                                amx32::rows_x_panels_2x2::<false>(pp, nb, x, mb, rs, o);
                            }
                        }
                        pi += 2;
                        continue;
                    }
                    for mj in mb..mb + 1 + pair as usize {
                        let o = |i: usize, y: &[f32; NT]| put(mj, pi, i, y);
                        // SAFETY: as above, one block of rows with one panel.
                        unsafe {
                            if W::HAS_MIN {
                                amx32::rows_x_panel::<true>(&panels[pi], nb, x, mj, rows_of(mj), o);
                            } else {
                                amx32::rows_x_panel::<false>(
                                    &panels[pi],
                                    nb,
                                    x,
                                    mj,
                                    rows_of(mj),
                                    o,
                                );
                            }
                        }
                    }
                    pi += 1;
                }
                mb += 1 + pair as usize;
            }
        });
    }
}
