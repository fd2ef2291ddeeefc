//! The GEMM path of the K-quants without AVX-512 (q2_k, q3_k, q4_k, q5_k, q6_k; AVX2, from
//! `MIN_M` activation rows): `gemm_k.rs`' loop with 256-bit vectors (`x86::gemm_k::avx2`). Per
//! block of activation rows, K goes chunk by chunk over every panel of 16 weight rows of the
//! task (the panel's chunk decoded once into L1, then the activation rows in threes, the float
//! lanes kept between chunks), then each panel's outputs go straight into `out`. A panel's
//! missing rows (N not a multiple of 16) decode a zero block into lanes never written out.
//! Every output has the bits of `reference::dot_block_k` (see `x86/gemm_k/avx2.rs`).

use std::cell::RefCell;

use super::super::gemm::{steps, PANEL_MAJOR_MAX_M};
use super::super::x86::gemm_k::avx2::{self as k2, Acc, Levels, SbBuf2, KC, MR, NV, PV};
use super::super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::matmul::reference::BlockQ8K;
use crate::qtype::QType;

/// From this many activation rows on q4_k takes this path where the CPU has AVX2 and no
/// AVX-512 VNNI (below it, the row kernels: 4 activation rows per decoded weight row); the
/// others, whose levels are decoded through the reference's scalar unpack, from `MIN_M_SCALAR`.
/// Zen 3, one thread, CPU time, 4096x14336, 2026-12-08, load 11-16, A/B against main: q4_k
/// M = 8 16.0 against 22.7 ms; q5_k / q3_k M = 8 26.6 / 34.5 against 21.0 / 26.2 (slower),
/// q6_k / q2_k equal; at M = 16 all four 1.2-1.5x faster.
pub(in crate::matmul) const MIN_M: usize = 5;
/// See `MIN_M` (M = 9..15 not measured: the row kernels stay there).
pub(in crate::matmul) const MIN_M_SCALAR: usize = 16;

/// The M from which `qtype` takes this path.
pub(in crate::matmul) fn min_m(qtype: QType) -> usize {
    if qtype == QType::Q4K {
        MIN_M
    } else {
        MIN_M_SCALAR
    }
}
/// Activation rows of one block (each panel chunk decoded once per block).
const BLOCK: usize = 64;

/// The K-quants this path takes (iq4_xs's levels would saturate `vpmaddubsw`).
pub(in crate::matmul) fn takes(qtype: QType) -> bool {
    matches!(
        qtype,
        QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K
    )
}

thread_local! {
    /// Each pool thread's decoded panel chunk and float accumulators (reused across calls).
    static SCRATCH: RefCell<(Vec<SbBuf2>, Vec<Acc>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row into `out`, when the weights are
    /// a K-quant of this path (false otherwise: nothing done).
    pub(in crate::matmul) fn fill_gemm_k2(&self, n0: usize, rows: usize, out: &OutPtr) -> bool {
        match self.w.qtype {
            QType::Q4K => self.gemm_k2_rows::<BlockQ4K>(n0, rows, out),
            QType::Q6K => self.gemm_k2_rows::<BlockQ6K>(n0, rows, out),
            QType::Q5K => self.gemm_k2_rows::<BlockQ5K>(n0, rows, out),
            QType::Q2K => self.gemm_k2_rows::<BlockQ2K>(n0, rows, out),
            QType::Q3K => self.gemm_k2_rows::<BlockQ3K>(n0, rows, out),
            _ => return false,
        }
        true
    }

    fn gemm_k2_rows<W: Levels>(&self, n0: usize, rows: usize, out: &OutPtr) {
        let Acts::Q8K { blocks, .. } = &self.acts else {
            unreachable!("the K-quant GEMM runs only with q8_K activations")
        };
        let nb = self.k / QK_K;
        let rb = self.row_bytes;
        let m = self.m;
        let panel = NV * PV;
        let panels = rows.div_ceil(panel);
        let zero = W::zeroed();
        // Super-block b of the task's weight row i, or a zero block past its rows.
        let blk = |i: usize, b: usize| -> &W {
            if i < rows {
                &bytemuck::cast_slice::<u8, W>(&self.w.data[(n0 + i) * rb..][..rb])[b]
            } else {
                &zero
            }
        };
        SCRATCH.with_borrow_mut(|(buf, acc)| {
            buf.resize(KC * PV, SbBuf2::default());
            let mut mb = 0;
            while mb < m {
                let ms = mb..(mb + BLOCK).min(m);
                let rows_m = ms.len();
                // acc[(pi * rows_m + j) * PV + p]
                // SAFETY: gemm2 is set only with AVX2 (and F16C) (`plan`).
                unsafe { k2::zeros(acc, panels * rows_m * PV) };
                let chunks = nb.div_ceil(KC);
                let chunk = |c: usize| (c * KC, KC.min(nb - c * KC));
                for (pi, c) in steps(panels, chunks, rows_m <= PANEL_MAJOR_MAX_M) {
                    let (b0, kc) = chunk(c);
                    let r0 = pi * panel;
                    let pv = (rows - r0).min(panel).div_ceil(NV);
                    for sb in 0..kc {
                        for p in 0..pv {
                            let ws: [&W; NV] =
                                std::array::from_fn(|i| blk(r0 + p * NV + i, b0 + sb));
                            // SAFETY: as above.
                            unsafe { k2::decode(&ws, &mut buf[sb * PV + p]) };
                        }
                    }
                    let a = &mut acc[pi * rows_m * PV..(pi + 1) * rows_m * PV];
                    let mut j = 0;
                    while j < rows_m {
                        let r = (rows_m - j).min(MR);
                        let x = |jj: usize| &blocks[(ms.start + j + jj) * nb + b0..][..kc];
                        let a = &mut a[j * PV..(j + r) * PV];
                        // SAFETY: as above; buf holds kc decoded super-blocks of pv vectors,
                        // x(jj) kc blocks.
                        unsafe {
                            match (r, pv) {
                                (1, 1) => run::<W, 1, 1>(buf, kc, b0, x, a),
                                (2, 1) => run::<W, 2, 1>(buf, kc, b0, x, a),
                                (_, 1) => run::<W, 3, 1>(buf, kc, b0, x, a),
                                (1, _) => run::<W, 1, 2>(buf, kc, b0, x, a),
                                (2, _) => run::<W, 2, 2>(buf, kc, b0, x, a),
                                _ => run::<W, 3, 2>(buf, kc, b0, x, a),
                            }
                        }
                        j += r;
                    }
                }
                for pi in 0..panels {
                    for j in 0..rows_m {
                        for p in 0..PV {
                            let c0 = pi * panel + p * NV;
                            if c0 >= rows {
                                break;
                            }
                            // SAFETY: as above.
                            let y = unsafe { k2::finish(&acc[(pi * rows_m + j) * PV + p]) };
                            let mi = ms.start + j;
                            let valid = (rows - c0).min(NV);
                            if valid == NV {
                                out.set8(mi, n0 + c0, &y);
                            } else {
                                for (i, &v) in y[..valid].iter().enumerate() {
                                    out.set(mi, n0 + c0 + i, v);
                                }
                            }
                        }
                    }
                }
                mb = ms.end;
            }
        });
    }
}

/// `kernel` for R activation rows (`x(j)`) with the first P vectors of the decoded chunk.
///
/// # Safety
/// As `k2::kernel`.
unsafe fn run<'a, W: Levels, const R: usize, const P: usize>(
    buf: &[SbBuf2],
    kc: usize,
    b0: usize,
    x: impl Fn(usize) -> &'a [BlockQ8K],
    a: &mut [Acc],
) {
    let xr: [&[BlockQ8K]; R] = std::array::from_fn(&x);
    // SAFETY: the caller's contract.
    unsafe { k2::kernel::<W, R, P>(buf, kc, b0, &xr, a) };
}
