//! The GEMM path of the 32-weight formats on AMX int8 tiles (`x86::amx32`), for M >=
//! `min_m(qtype)` where `amx::amx_int8_usable()`: each panel of 16 weight rows of the task is
//! decoded once into the B-tile layout, then every block of 16 activation rows passes it (the
//! rows packed once per call by `pack`, in `plan`). Weight rows past the last whole panel of 16 go through the
//! AVX-512 GEMM (`gemm.rs`): the same bits either way (both are the reference's).

use std::cell::RefCell;

use super::x86::amx32::{self, AmxPanel, AmxX, Tiles, MT, NT};
use super::x86::Load32;
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

/// From how many activation rows `qtype` takes the AMX path (where usable; None: never).
/// Measured one thread, CPU time, 4096x4096, AMX against `FERROQUANT_MAX_ISA=avx512` in
/// alternating processes, 2026-12-07 01:44-01:47 UTC, load 6-7 (ms, AMX / AVX-512): q8_0
/// M = 16 1.95 / 1.87, 32 2.95 / 3.00, 64 5.09 / 5.41, 256 18.3 / 21.9; q4_0 M = 128
/// 9.93 / 9.59, 256 18.6 / 20.8; q5_0 and iq4_nl M = 128 0.89-0.95x the time, M = 512
/// 0.81-0.86x; q4_1 / q5_1 (the `m·s` term in the float part) M = 128 1.09-1.14x, M = 512
/// 0.92-0.99x. The panel decode (once per call) weighs at small M, the per-block float part
/// and the tile loads and stores at large M (`x86::amx32`).
pub(super) fn min_m(qtype: QType) -> Option<usize> {
    match qtype {
        QType::Q8_0 => Some(64),
        QType::Q5_0 | QType::IQ4NL => Some(128),
        QType::Q4_0 => Some(256),
        QType::Q4_1 | QType::Q5_1 => Some(512),
        _ => None,
    }
}

thread_local! {
    /// Each pool thread's decoded panels of its task (reused across calls).
    static PANELS: RefCell<Vec<AmxPanel>> = const { RefCell::new(Vec::new()) };
}

/// Whether the AMX path runs for `qtype` weights and `m` activation rows (`min_m`,
/// `amx::amx_int8_usable`).
pub(super) fn takes(qtype: QType, m: usize) -> bool {
    min_m(qtype).is_some_and(|t| m >= t) && crate::amx::amx_int8_usable()
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
            for mb in 0..m.div_ceil(MT) {
                let mr = MT.min(m - mb * MT);
                for (pi, panel) in panels[..np].iter().enumerate() {
                    let col = n0 + pi * NT;
                    let put = |i: usize, y: &[f32; NT]| {
                        let (lo, hi) = y.split_at(8);
                        out.set8(mb * MT + i, col, lo.try_into().unwrap());
                        out.set8(mb * MT + i, col + 8, hi.try_into().unwrap());
                    };
                    // SAFETY: AMX int8 usable (as above), the tiles configured on this thread
                    // (`_tiles`); the panel has nb blocks; x was packed for this plan (m rows
                    // of nb blocks, q8_1's s with q4_1 / q5_1).
                    unsafe {
                        if W::HAS_MIN {
                            amx32::rows_x_panel::<true>(panel, nb, x, mb, mr, put);
                        } else {
                            amx32::rows_x_panel::<false>(panel, nb, x, mb, mr, put);
                        }
                    }
                }
            }
        });
    }
}
