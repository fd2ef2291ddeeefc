//! The GEMM path of the 32-weight formats on aarch64 (`dotprod`, `i8mm` where present; the
//! K-quants' is `gemm_neon_k.rs`, chosen here with the same threshold), from
//! `GEMM_NEON_MIN_M` activation rows: per block of activation rows, each panel of `PANEL`
//! weight rows of the task goes chunk by chunk of K (`KC` blocks) through
//! `neon::gemm::decode` (into an L1 buffer, once for the block's rows) and every tile of
//! `TILE` rows (`chunk_sdot` / `chunk_i8mm`), the tile's float lanes kept between chunks; then
//! `hsum8` per output, straight into `out`. A task's last partial panel decodes its missing
//! rows as zeros and writes only its own. Every output has the reference's bits (the
//! kernels' module comment), so neither the panel, the tile nor the task split changes them.

use std::cell::RefCell;

use super::neon::gemm::{self as g, NeonDot, PanelBuf, TileAcc, XTile, KC};
use super::neon::Load32;
use super::neon_walk::Walk;
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::qtype::QType;

/// From this many activation rows the 32-weight formats and the K-quants take this path where
/// the CPU has `dotprod`. Not timed (no ARM hardware): executed instructions of whole
/// `qmatmul` calls under qemu (`benches/aarch64_insns/gemm.sh`, 512 x 1024, one thread,
/// 2026-12-07) favour it already at M = 2: q4_0 0.51 (`sdot`) / 0.48 (`smmla`) a weight per activation row against
/// 0.60 for the `sdot` row kernels; for the K-quants (`gemm_neon_k.rs`) q4_k 0.57 / 0.59
/// against 0.73, q6_k 0.60 / 0.62 against 0.76.
pub(super) const GEMM_NEON_MIN_M: usize = 2;
/// Activation rows of one block (each panel chunk decoded once per block; the block's chunk of
/// activations, 64 x 32 blocks x 34 bytes = 68 KiB, stays in L2).
const GEMM_NEON_BLOCK: usize = 64;

/// Whether the path takes `qtype` weights (the K-quants: `gemm_neon_k.rs`).
pub(super) fn takes(qtype: QType) -> bool {
    matches!(
        qtype,
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL | QType::Q4_1 | QType::Q5_1
    ) || super::gemm_neon_k::takes(qtype)
}

/// The product `plan` runs for `qtype` weights and `m` activation rows: the tests' forcing
/// (`FORCE`), else the CPU's best from `GEMM_NEON_MIN_M` rows unless FERROQUANT_NEON_GEMM=0;
/// `None`: the row kernels.
pub(super) fn choose(qtype: QType, m: usize) -> Option<NeonDot> {
    if !takes(qtype) || m < 2 {
        return None;
    }
    match forced() {
        Some(f) => f,
        None if m >= GEMM_NEON_MIN_M && crate::config::neon_gemm() => NeonDot::detect(),
        None => None,
    }
}

thread_local! {
    /// Each pool thread's decoded panel chunk and tile lanes (reused across calls).
    static SCRATCH: RefCell<(PanelBuf, Vec<TileAcc>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row, into `out`.
    pub(super) fn fill_gemm_neon(&self, dot: NeonDot, n0: usize, rows: usize, out: &OutPtr) {
        if super::gemm_neon_k::takes(self.w.qtype) {
            return self.fill_gemm_neon_k(dot, n0, rows, out);
        }
        match self.w.qtype {
            QType::Q4_0 => self.gemm_neon_rows::<BlockQ4_0>(dot, n0, rows, out),
            QType::Q8_0 => self.gemm_neon_rows::<BlockQ8_0>(dot, n0, rows, out),
            QType::Q5_0 => self.gemm_neon_rows::<BlockQ5_0>(dot, n0, rows, out),
            QType::IQ4NL => self.gemm_neon_rows::<BlockIQ4NL>(dot, n0, rows, out),
            QType::Q4_1 => self.gemm_neon_rows::<BlockQ4_1>(dot, n0, rows, out),
            _ => self.gemm_neon_rows::<BlockQ5_1>(dot, n0, rows, out),
        }
    }

    fn gemm_neon_rows<W: Load32>(&self, dot: NeonDot, n0: usize, rows: usize, out: &OutPtr) {
        let none: &[f32] = &[];
        let (xb, xd, xs) = match &self.acts {
            Acts::Q8_0 { blocks, d, .. } => (&blocks[..], &d[..], none),
            Acts::Q8_1 { blocks, d, s, .. } => (&blocks[..], &d[..], &s[..]),
            _ => unreachable!("the 32-weight GEMM runs only with q8_0 / q8_1 activations"),
        };
        let nb = self.k / QK8_0;
        SCRATCH.with_borrow_mut(|(buf, acc)| {
            let walk = Walk {
                n0,
                rows,
                nb,
                block: GEMM_NEON_BLOCK,
                kc: KC,
            };
            self.walk_neon_gemm::<W, _>(
                dot,
                walk,
                out,
                buf,
                acc,
                |buf, w, np, c0, cb| g::decode(dot, w, np, c0, cb, buf),
                |buf, j0, r, c0, cb, a| {
                    // the tile's rows from block c0 on (past r: its last row again)
                    let row = |j: usize| (j0 + j.min(r - 1)) * nb + c0;
                    let x = XTile {
                        q: std::array::from_fn(|j| &xb[row(j)..row(j) + cb]),
                        d: std::array::from_fn(|j| &xd[row(j)..row(j) + cb]),
                        s: std::array::from_fn(|j| xs.get(row(j)..row(j) + cb).unwrap_or_default()),
                    };
                    // SAFETY: `choose` gives Sdot only with `cpu::has_dotprod` and I8mm only
                    // with `cpu::has_i8mm` (or tests force them where the CPU has them); the
                    // kernels check the lengths.
                    unsafe { run(dot, W::HAS_MIN, r, buf, cb, &x, a) };
                },
            );
        });
    }
}

/// The kernel for a tile of `r` rows (1..=TILE; `smmla` in pairs, the odd row with its copy).
///
/// # Safety
/// The CPU must have what `dot` needs.
unsafe fn run(
    dot: NeonDot,
    min: bool,
    r: usize,
    buf: &PanelBuf,
    cb: usize,
    x: &XTile<'_>,
    a: &mut TileAcc,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match (dot, min, r) {
            (NeonDot::Sdot, false, 1) => g::chunk_sdot::<1, false>(buf, cb, x, a),
            (NeonDot::Sdot, false, 2) => g::chunk_sdot::<2, false>(buf, cb, x, a),
            (NeonDot::Sdot, false, 3) => g::chunk_sdot::<3, false>(buf, cb, x, a),
            (NeonDot::Sdot, false, _) => g::chunk_sdot::<4, false>(buf, cb, x, a),
            (NeonDot::Sdot, true, 1) => g::chunk_sdot::<1, true>(buf, cb, x, a),
            (NeonDot::Sdot, true, 2) => g::chunk_sdot::<2, true>(buf, cb, x, a),
            (NeonDot::Sdot, true, 3) => g::chunk_sdot::<3, true>(buf, cb, x, a),
            (NeonDot::Sdot, true, _) => g::chunk_sdot::<4, true>(buf, cb, x, a),
            (NeonDot::I8mm, false, 1 | 2) => g::chunk_i8mm::<1, false>(buf, cb, x, a),
            (NeonDot::I8mm, false, _) => g::chunk_i8mm::<2, false>(buf, cb, x, a),
            (NeonDot::I8mm, true, 1 | 2) => g::chunk_i8mm::<1, true>(buf, cb, x, a),
            (NeonDot::I8mm, true, _) => g::chunk_i8mm::<2, true>(buf, cb, x, a),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: `plan` on this thread takes this path with this product (`Some(Some(dot))`) or
    /// the row kernels (`Some(None)`) for the formats it takes, at M >= 2, whatever the
    /// threshold says.
    pub(super) static FORCE: std::cell::Cell<Option<Option<NeonDot>>> = const { std::cell::Cell::new(None) };
}

/// Tests: the weights' address (`w.data`) of every `qmatmul` call that ran this path, on any
/// thread (`super::neon_gemm_runs`; the runtime's forward pass runs on the pool's threads).
#[cfg(test)]
pub(super) static RAN: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// The choice tests force on this thread (`FORCE`); always `None` outside tests.
fn forced() -> Option<Option<NeonDot>> {
    #[cfg(test)]
    return FORCE.get();
    #[cfg(not(test))]
    None
}
