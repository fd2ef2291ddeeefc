//! The GEMM path of the K-quants (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs; x86-64 with AVX-512
//! F/BW/VL/VNNI, M >= `GEMM_K_MIN_M`): per block of activation rows, K goes chunk by chunk
//! (`x86::gemm_k::KC` super-blocks) over every panel of 32 weight rows of the task (the
//! panel's chunk decoded once into L1, 16 rows a vector, then the activation rows in fours
//! through `x86::gemm_k::kernel`, the float lanes kept between chunks), then each panel's
//! outputs go straight into `out` (few rows: panel by panel, as in `gemm.rs`). A panel's missing rows (N not a multiple of 32) decode a
//! zero block into lanes that are never written out. Every output has the bits of
//! `reference::dot_block_k` (see `x86/gemm_k.rs`).

use std::cell::RefCell;

use super::gemm::{steps, PANEL_MAJOR_MAX_M};
use super::x86::gemm_k::{self, Acc, DecodeK, SbBuf, KC, NV, PV};
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::matmul::reference::BlockQ8K;
use crate::qtype::QType;

/// From this many activation rows on the K-quants take this path (with AVX-512 VNNI/BW).
pub(super) const GEMM_K_MIN_M: usize = 4;
/// Activation rows of one block (each panel chunk decoded once per block; the block's
/// accumulators, 1 KiB per activation row and panel, stay in L2).
pub(super) const GEMM_K_MAX_BLOCK: usize = 64;

/// The K-quants this path takes.
pub(super) fn takes(qtype: QType) -> bool {
    matches!(
        qtype,
        QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K | QType::IQ4XS
    )
}

thread_local! {
    /// Each pool thread's decoded panel chunk and float accumulators (reused across calls).
    static SCRATCH: RefCell<(Vec<SbBuf>, Vec<Acc>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row into `out`, when the weights are
    /// a K-quant of this path (false otherwise: nothing done).
    pub(super) fn fill_gemm_k(&self, n0: usize, rows: usize, out: &OutPtr) -> bool {
        // On AMX int8 tiles where they run (`gemm_amx_k.rs`).
        if self.fill_amx_k(n0, rows, out) {
            return true;
        }
        match self.w.qtype {
            QType::Q4K => self.gemm_k_rows::<BlockQ4K>(n0, rows, out),
            QType::Q6K => self.gemm_k_rows::<BlockQ6K>(n0, rows, out),
            QType::Q5K => self.gemm_k_rows::<BlockQ5K>(n0, rows, out),
            QType::Q2K => self.gemm_k_rows::<BlockQ2K>(n0, rows, out),
            QType::Q3K => self.gemm_k_rows::<BlockQ3K>(n0, rows, out),
            QType::IQ4XS => self.gemm_k_rows::<BlockIQ4XS>(n0, rows, out),
            _ => return false,
        }
        true
    }

    fn gemm_k_rows<W: DecodeK>(&self, n0: usize, rows: usize, out: &OutPtr) {
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
            buf.resize(KC * PV, SbBuf::default());
            let mut mb = 0;
            while mb < m {
                let ms = mb..(mb + self.m_block).min(m);
                let rows_m = ms.len();
                // acc[(pi * rows_m + j) * PV + p]
                // SAFETY: gemm is set only with `cpu::has_vnni_bw` (`plan`).
                unsafe { gemm_k::zeros(acc, panels * rows_m * PV) };
                // K chunk by chunk over every panel of the task, or for few rows panel by panel
                // (`gemm::PANEL_MAJOR_MAX_M`).
                let chunks = nb.div_ceil(KC);
                let chunk = |c: usize| (c * KC, KC.min(nb - c * KC));
                let mut it = steps(panels, chunks, rows_m <= PANEL_MAJOR_MAX_M).peekable();
                while let Some((pi, c)) = it.next() {
                    // The panel chunk decoded next on its way from memory while this one runs:
                    // at M = 8 / 16 the decode otherwise waits on memory (as in `gemm.rs`).
                    // Its rows go in `parts` slices, one before the decode and one before each
                    // block of 4 activation rows: all ~180 lines at once filled the line fill
                    // buffers and stalled the core on the `prefetcht1`s (8 % of the time at
                    // M = 16, perf).
                    let next = it.peek().map(|&(pn, cn)| {
                        let (bn, kn) = chunk(cn);
                        (pn * panel..((pn + 1) * panel).min(rows), bn, kn)
                    });
                    let parts = 1 + rows_m.div_ceil(4);
                    let prefetch = |part: usize| {
                        if let Some((ref rs, bn, kn)) = next {
                            let len = rs.len();
                            let sz = std::mem::size_of::<W>();
                            let from = rs.start + part * len / parts;
                            for i in from..rs.start + (part + 1) * len / parts {
                                let row = &self.w.data[(n0 + i) * rb..][..rb];
                                prefetch_l2(&row[bn * sz..(bn + kn) * sz]);
                            }
                        }
                    };
                    prefetch(0);
                    let (b0, kc) = chunk(c);
                    let r0 = pi * panel;
                    let pv = (rows - r0).min(panel).div_ceil(NV);
                    for sb in 0..kc {
                        for p in 0..pv {
                            let ws: [&W; NV] =
                                std::array::from_fn(|i| blk(r0 + p * NV + i, b0 + sb));
                            // SAFETY: as above.
                            unsafe { gemm_k::decode(&ws, &mut buf[sb * PV + p]) };
                        }
                    }
                    let a = &mut acc[pi * rows_m * PV..(pi + 1) * rows_m * PV];
                    let mut j = 0;
                    while j < rows_m {
                        prefetch(1 + j / 4);
                        let r = (rows_m - j).min(4);
                        let x = |jj: usize| &blocks[(ms.start + j + jj) * nb + b0..][..kc];
                        let a = &mut a[j * PV..(j + r) * PV];
                        // SAFETY: as above; buf holds kc decoded super-blocks of pv vectors,
                        // x(jj) kc blocks.
                        unsafe {
                            match (r, pv) {
                                (1, 1) => run::<W, 1, 1>(buf, kc, b0, x, a),
                                (2, 1) => run::<W, 2, 1>(buf, kc, b0, x, a),
                                (3, 1) => run::<W, 3, 1>(buf, kc, b0, x, a),
                                (_, 1) => run::<W, 4, 1>(buf, kc, b0, x, a),
                                (1, _) => run::<W, 1, 2>(buf, kc, b0, x, a),
                                (2, _) => run::<W, 2, 2>(buf, kc, b0, x, a),
                                (3, _) => run::<W, 3, 2>(buf, kc, b0, x, a),
                                _ => run::<W, 4, 2>(buf, kc, b0, x, a),
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
                            let y = unsafe { gemm_k::finish(&acc[(pi * rows_m + j) * PV + p]) };
                            let mi = ms.start + j;
                            let valid = (rows - c0).min(NV);
                            if valid == NV {
                                out.set8(mi, n0 + c0, y[..8].try_into().expect("8"));
                                out.set8(mi, n0 + c0 + 8, y[8..].try_into().expect("8"));
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

/// `kernel` for R activation rows (`x(j)`) with the first P vectors of the decoded chunk, their
/// accumulators `a[j * PV + p]`.
///
/// # Safety
/// As `gemm_k::kernel`.
unsafe fn run<'a, W: DecodeK, const R: usize, const P: usize>(
    buf: &[SbBuf],
    kc: usize,
    b0: usize,
    x: impl Fn(usize) -> &'a [BlockQ8K],
    a: &mut [Acc],
) {
    let xr: [&[BlockQ8K]; R] = std::array::from_fn(&x);
    // SAFETY: the caller's contract.
    unsafe { gemm_k::kernel::<W, R, P>(buf, kc, b0, &xr, a) };
}

/// Prefetches the 64-byte lines of `b` into L2.
fn prefetch_l2(b: &[u8]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    for off in (0..b.len()).step_by(64).chain([b.len().saturating_sub(1)]) {
        // SAFETY: off < b.len() or b is empty (then off = 0 and the address is one past an
        // empty slice's start); prefetching never faults and reads nothing architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(b.as_ptr().wrapping_add(off) as *const i8) };
    }
}
