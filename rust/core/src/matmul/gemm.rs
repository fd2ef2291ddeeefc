//! The GEMM path of the 32-weight formats (x86-64 with AVX-512 F/BW/VL/VNNI, M >= `GEMM_MIN_M`):
//! per block of activation rows, K goes chunk by chunk over every panel of 8 weight rows of the
//! task (`x86::gemm32::chunk`: the panel's chunk decoded once into L1, the rows passing it, the
//! float lanes kept between chunks), then `x86::gemm32::finish` writes the results straight
//! into `out`. Blocks of at most `PANEL_MAJOR_MAX_M` rows go panel by panel instead, each
//! panel through all of K (`steps`); either order adds a panel's chunks in K order, so the bits
//! are the same.
//!
//! K not a multiple of 256 (SmolLM2's 576 is 2 groups of 8 blocks and 2 blocks): the last
//! blocks run with the last chunk in the narrow layout of `x86::gemm32::decode_tail` (2 blocks
//! cost a quarter of a group, not a whole padded one), their activations interleaved once per
//! call (`Acts::*::xtail`, `plan`).

use std::cell::RefCell;

use super::x86::gemm32::{self, Acc, Pair32, PanelBuf, XRow, PANEL};
use super::x86::tile::GROUP_BYTES;
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::matmul::reference::LANES;
use crate::qtype::QType;

thread_local! {
    /// Each pool thread's decoded panel chunk and float accumulators (reused across calls).
    static SCRATCH: RefCell<(PanelBuf, Vec<Acc>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row, into `out`: whole panels through
    /// the GEMM kernel, the last `rows % 8` through `fill` (the same bits either way).
    pub(super) fn fill_gemm(&self, n0: usize, rows: usize, out: &OutPtr) {
        if self.fill_gemm_k(n0, rows, out) {
            return;
        }
        // Whole panels of 16 on AMX tiles where they run (`gemm_amx.rs`), the rest below.
        let done = self.fill_amx(n0, rows, out);
        let (n0, rows) = (n0 + done, rows - done);
        if rows == 0 {
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

    fn gemm_rows<W: Pair32>(&self, n0: usize, rows: usize, out: &OutPtr) {
        let (blocks_d, nbias, xt, s): (&[f32], &[i32], &[u8], &[f32]) = match &self.acts {
            Acts::Q8_0 { d, nbias, xt, .. } => (d, nbias, xt, &[]),
            Acts::Q8_1 { d, xt, s, .. } => (d, &[], xt, s),
            _ => unreachable!("the 32-weight GEMM runs only with q8_0 / q8_1 activations"),
        };
        // The partial last group's activations, in `gemm32::interleave_tail`'s layout.
        let xtail: &[u8] = match &self.acts {
            Acts::Q8_0 { xtail, .. } | Acts::Q8_1 { xtail, .. } => xtail,
            _ => &[],
        };
        let nb = self.k / QK8_0;
        let groups = nb / LANES;
        let tail = nb % LANES;
        let tb = if tail > 0 {
            gemm32::tail_bytes(tail)
        } else {
            0
        };
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
                let row = |j: usize, g0: usize| {
                    let r = ms.start + j;
                    XRow {
                        xt: &xt[r * gb + g0 * GROUP_BYTES..(r + 1) * gb],
                        xtail: xtail.get(r * tb..(r + 1) * tb).unwrap_or_default(),
                        nbias: nbias
                            .get(r * nb + g0 * LANES..(r + 1) * nb)
                            .unwrap_or_default(),
                        d: &blocks_d[r * nb + g0 * LANES..(r + 1) * nb],
                        s: s.get(r * nb + g0 * LANES..(r + 1) * nb).unwrap_or_default(),
                    }
                };
                // Every row's slices from every chunk's first group, made once per block of
                // rows instead of once per panel (7 % of a 576x192 q4_0 call at M = 512, perf).
                let per_chunk = groups.div_ceil(gemm32::KC_GROUPS).max(1);
                let rows_x: Vec<XRow> = (0..per_chunk)
                    .flat_map(|c| (0..rows_m).map(move |j| (j, c * gemm32::KC_GROUPS)))
                    .map(|(j, g0)| row(j, g0))
                    .collect();
                let x = |j: usize, g0: usize| rows_x[g0 / gemm32::KC_GROUPS * rows_m + j];
                // SAFETY: gemm is set only with `cpu::has_vnni_bw` (`plan`), which includes
                // AVX-512 F.
                unsafe { gemm32::room(acc, panels * rows_m) };
                // K chunk by chunk over every panel of the task (the chunk of the block of
                // activation rows stays in L2 while the panels pass, their lanes waiting in
                // `acc`), or for few rows panel by panel (`PANEL_MAJOR_MAX_M`).
                // (K < 256: one chunk of no whole groups, only the tail.)
                let chunks = groups.div_ceil(gemm32::KC_GROUPS).max(1);
                // The last chunk takes the partial group too.
                let chunk = |c: usize| {
                    let g0 = c * gemm32::KC_GROUPS;
                    let gc = gemm32::KC_GROUPS.min(groups - g0);
                    (g0, gc, if c + 1 == chunks { tail } else { 0 })
                };
                let mut it = steps(panels, chunks, rows_m <= PANEL_MAJOR_MAX_M).peekable();
                while let Some((pi, c)) = it.next() {
                    // The panel chunk decoded next, on its way from memory while this one
                    // runs (`gemm32::chunk`).
                    let next = it.peek().and_then(|&(pn, cn)| {
                        let (gn, gcn, _) = chunk(cn);
                        (gcn > 0).then(|| (w(pn), gn, gcn))
                    });
                    let (g0, gc, tc) = chunk(c);
                    let a = &mut acc[pi * rows_m..(pi + 1) * rows_m];
                    // SAFETY: every weight row has nb = 8 · groups + tail blocks; x(j, g0) has
                    // the row's groups from g0 on and its tail (the activations of `plan`,
                    // interleaved for this K); gc <= KC_GROUPS.
                    unsafe { gemm32::chunk(w(pi), g0, gc, tc, c == 0, rows_m, &x, buf, a, next) };
                }
                for pi in 0..panels {
                    let col = n0 + pi * PANEL;
                    let a = &acc[pi * rows_m..(pi + 1) * rows_m];
                    // SAFETY: as above.
                    unsafe { gemm32::finish(a, rows_m, |j, y| out.set8(ms.start + j, col, &y)) };
                }
                mb = ms.end;
            }
        });
    }
}

/// Up to this many activation rows in a block, the GEMM paths (this one and `gemm_k.rs`) run
/// panel by panel, each panel's rows read straight through K, instead of chunk by chunk of K
/// over all the task's panels (whose many short runs of bytes per row the hardware prefetcher
/// follows poorly). One thread, CPU time, 14336x4096 / 4096x14336, 2026-12-06 (load 13-15):
/// q8_0 and q5_1 6-10 % faster at M = 8, 16 and 32, q6_k 8-15 % and q5_k 5-9 % at M = 8 / 16,
/// q4_k and q6_k 3 % at M = 32, q3_k within 3 % either way; q4_0 7 % slower at M = 64 (the
/// chunk of 64 activation rows then no longer stays in cache beside the panel).
pub(super) const PANEL_MAJOR_MAX_M: usize = 32;

/// (panel, chunk of K) steps of one block of activation rows: chunk-major (every panel's chunk
/// 0, then every panel's chunk 1, ...) or panel-major.
pub(super) fn steps(
    panels: usize,
    chunks: usize,
    panel_major: bool,
) -> impl Iterator<Item = (usize, usize)> {
    (0..panels * chunks).map(move |i| {
        if panel_major {
            (i / chunks, i % chunks)
        } else {
            (i % panels, i / panels)
        }
    })
}
