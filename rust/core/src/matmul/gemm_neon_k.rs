//! The GEMM path of the K-quants on aarch64 (q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs with q8_K
//! activations; `dotprod`, `i8mm` where present), from `gemm_neon::GEMM_NEON_MIN_M` activation
//! rows: as `gemm_neon.rs` for the 32-weight formats, per block of activation rows each panel
//! of `PANEL` weight rows goes chunk by chunk of K (`neon::gemm_k::KC` super-blocks) through
//! `neon::gemm_k::decode` (into an L1 buffer, once for the block's rows) and every tile of
//! `TILE` rows, the tile's float lanes kept between chunks; then `hsum8` per output, straight
//! into `out`. Every output has the reference's bits (`neon/gemm_k.rs`).

use std::cell::RefCell;

use super::neon::gemm::{NeonDot, TileAcc, TILE};
use super::neon::gemm_k::{self as g, GemmK, SbPanel, KC};
use super::neon_walk::Walk;
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::matmul::reference::BlockQ8K;
use crate::qtype::QType;

/// Activation rows of one block (each panel chunk decoded once per block; the block's chunk of
/// activations, 64 x 8 super-blocks x 292 bytes = 146 KiB, stays in L2).
const GEMM_NEON_K_BLOCK: usize = 64;

/// Whether the path takes `qtype` weights.
pub(super) fn takes(qtype: QType) -> bool {
    matches!(
        qtype,
        QType::Q4K | QType::Q5K | QType::Q6K | QType::Q2K | QType::Q3K | QType::IQ4XS
    )
}

thread_local! {
    /// Each pool thread's decoded panel chunk and tile lanes (reused across calls).
    static SCRATCH: RefCell<(Vec<SbPanel>, Vec<TileAcc>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` (K-quant weights) with every activation row, into `out`.
    pub(super) fn fill_gemm_neon_k(&self, dot: NeonDot, n0: usize, rows: usize, out: &OutPtr) {
        match self.w.qtype {
            QType::Q4K => self.gemm_neon_k_rows::<BlockQ4K>(dot, n0, rows, out),
            QType::Q5K => self.gemm_neon_k_rows::<BlockQ5K>(dot, n0, rows, out),
            QType::Q6K => self.gemm_neon_k_rows::<BlockQ6K>(dot, n0, rows, out),
            QType::Q2K => self.gemm_neon_k_rows::<BlockQ2K>(dot, n0, rows, out),
            QType::Q3K => self.gemm_neon_k_rows::<BlockQ3K>(dot, n0, rows, out),
            QType::IQ4XS => self.gemm_neon_k_rows::<BlockIQ4XS>(dot, n0, rows, out),
            q => unreachable!("{q:?} is not a K-quant of the NEON GEMM"),
        }
    }

    fn gemm_neon_k_rows<W: GemmK>(&self, dot: NeonDot, n0: usize, rows: usize, out: &OutPtr) {
        let Acts::Q8K { blocks, .. } = &self.acts else {
            unreachable!("the K-quant GEMM runs only with q8_K activations")
        };
        let nb = self.k / QK_K;
        SCRATCH.with_borrow_mut(|(buf, acc)| {
            let walk = Walk {
                n0,
                rows,
                nb,
                block: GEMM_NEON_K_BLOCK,
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
                    // the tile's rows from super-block c0 on (past r: its last row)
                    let x: [&[BlockQ8K]; TILE] = std::array::from_fn(|j| {
                        let row = (j0 + j.min(r - 1)) * nb + c0;
                        &blocks[row..row + cb]
                    });
                    // SAFETY: `gemm_neon::choose` gives Sdot only with `cpu::has_dotprod` and
                    // I8mm only with `cpu::has_i8mm` (or tests force them where the CPU has
                    // them); the kernels check the lengths.
                    unsafe { run::<W>(dot, r, buf, cb, c0, &x, a) };
                },
            );
        });
    }
}

/// The kernel for a tile of `r` rows (1..=TILE; `smmla` in pairs, the odd row with its copy).
///
/// # Safety
/// The CPU must have what `dot` needs.
unsafe fn run<W: GemmK>(
    dot: NeonDot,
    r: usize,
    buf: &[SbPanel],
    cb: usize,
    b0: usize,
    x: &[&[BlockQ8K]; TILE],
    a: &mut TileAcc,
) {
    macro_rules! kinds {
        ($p32:expr, $min:expr) => {
            match (dot, r) {
                (NeonDot::Sdot, 1) => g::chunk_sdot::<1, $p32, $min>(buf, cb, b0, x, a),
                (NeonDot::Sdot, 2) => g::chunk_sdot::<2, $p32, $min>(buf, cb, b0, x, a),
                (NeonDot::Sdot, 3) => g::chunk_sdot::<3, $p32, $min>(buf, cb, b0, x, a),
                (NeonDot::Sdot, _) => g::chunk_sdot::<4, $p32, $min>(buf, cb, b0, x, a),
                (NeonDot::I8mm, 1 | 2) => g::chunk_i8mm::<1, $p32, $min>(buf, cb, b0, x, a),
                (NeonDot::I8mm, _) => g::chunk_i8mm::<2, $p32, $min>(buf, cb, b0, x, a),
            }
        };
    }
    // SAFETY: the caller's contract.
    unsafe {
        match (W::PER32, W::MIN) {
            (true, true) => kinds!(true, true),
            (true, false) => kinds!(true, false),
            (false, true) => kinds!(false, true),
            (false, false) => kinds!(false, false),
        }
    }
}
