//! The GEMM path of the 32-weight formats (x86-64 with AVX-512 F/BW/VL/VNNI, M >= `GEMM_MIN_M`,
//! rows of whole groups of 8 blocks): per block of activation rows, K goes chunk by chunk over
//! every panel of 8 weight rows of the task (`x86::gemm32::chunk`: the panel's chunk decoded
//! once into L1, the rows passing it, the float lanes kept between chunks), then
//! `x86::gemm32::finish` writes the results straight into `out`.

use std::arch::x86_64::__m512;
use std::cell::RefCell;

use super::x86::gemm32::{self, PanelBuf, XRow, PANEL};
use super::x86::tile::{Tile32, GROUP_BYTES};
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::matmul::reference::LANES;
use crate::qtype::QType;

thread_local! {
    /// Each pool thread's decoded panel chunk and float accumulators (reused across calls).
    static SCRATCH: RefCell<(PanelBuf, Vec<[__m512; 2]>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row, into `out`: whole panels through
    /// the GEMM kernel, the last `rows % 8` through `fill` (the same bits either way).
    pub(super) fn fill_gemm(&self, n0: usize, rows: usize, out: &OutPtr) {
        if self.fill_gemm_k(n0, rows, out) {
            return;
        }
        let whole = rows / PANEL * PANEL;
        match self.w.qtype {
            QType::Q4_0 => self.gemm_rows::<BlockQ4_0>(n0, whole, out),
            QType::Q8_0 => self.gemm_rows::<BlockQ8_0>(n0, whole, out),
            QType::Q5_0 => self.gemm_rows::<BlockQ5_0>(n0, whole, out),
            QType::IQ4NL => self.gemm_rows::<BlockIQ4NL>(n0, whole, out),
            QType::Q4_1 => self.gemm_rows::<BlockQ4_1>(n0, whole, out),
            _ => self.gemm_rows::<BlockQ5_1>(n0, whole, out),
        }
        if whole < rows {
            let m = self.m;
            let mut yt = vec![0.0f32; (rows - whole) * m];
            self.fill(n0 + whole, &mut yt);
            out.scatter(n0 + whole, m, &yt);
        }
    }

    fn gemm_rows<W: Tile32>(&self, n0: usize, rows: usize, out: &OutPtr) {
        let (blocks_d, nbias, xt, s): (&[f32], &[i32], &[u8], &[f32]) = match &self.acts {
            Acts::Q8_0 { d, nbias, xt, .. } => (d, nbias, xt, &[]),
            Acts::Q8_1 { d, xt, s, .. } => (d, &[], xt, s),
            _ => unreachable!("the 32-weight GEMM runs only with q8_0 / q8_1 activations"),
        };
        let nb = self.k / QK8_0;
        let groups = nb / LANES;
        let gb = groups * GROUP_BYTES;
        let rb = self.row_bytes;
        let m = self.m;
        let panels = rows / PANEL;
        let w = |pi: usize| -> [&[W]; PANEL] {
            std::array::from_fn(|i| {
                bytemuck::cast_slice(&self.w.data[(n0 + pi * PANEL + i) * rb..][..rb])
            })
        };
        SCRATCH.with_borrow_mut(|(buf, acc)| {
            let mut mb = 0;
            while mb < m {
                let ms = mb..(mb + self.m_block).min(m);
                let rows_m = ms.len();
                let x = |j: usize, g0: usize| {
                    let r = ms.start + j;
                    XRow {
                        xt: &xt[r * gb + g0 * GROUP_BYTES..(r + 1) * gb],
                        nbias: nbias
                            .get(r * nb + g0 * LANES..(r + 1) * nb)
                            .unwrap_or_default(),
                        d: &blocks_d[r * nb + g0 * LANES..(r + 1) * nb],
                        s: s.get(r * nb + g0 * LANES..(r + 1) * nb).unwrap_or_default(),
                    }
                };
                // SAFETY: gemm is set only with `cpu::has_vnni_bw` (`plan`), which includes
                // AVX-512 F.
                unsafe { gemm32::zeros(acc, panels * rows_m * 2) };
                // K chunk by chunk over every panel of the task: the chunk of the block of
                // activation rows stays in L2 while the panels pass (and the panels' lanes wait
                // in `acc`).
                let mut g0 = 0;
                while g0 < groups {
                    let gc = gemm32::KC_GROUPS.min(groups - g0);
                    for pi in 0..panels {
                        let a = &mut acc[pi * rows_m * 2..(pi + 1) * rows_m * 2];
                        // SAFETY: every weight row has nb = 8 · groups blocks; x(j, g0) has the
                        // row's groups from g0 on (the activations of `plan`, interleaved for
                        // this K); gc <= KC_GROUPS.
                        unsafe { gemm32::chunk(w(pi), g0, gc, rows_m, &x, buf, a) };
                    }
                    g0 += gc;
                }
                for pi in 0..panels {
                    let col = n0 + pi * PANEL;
                    let a = &acc[pi * rows_m * 2..(pi + 1) * rows_m * 2];
                    // SAFETY: as above.
                    unsafe { gemm32::finish(a, rows_m, |j, y| out.set8(ms.start + j, col, &y)) };
                }
                mb = ms.end;
            }
        });
    }
}
