//! The GEMM path of the 32-weight formats on x86-64 without AVX-512 (AVX2, AVX-VNNI where the
//! CPU has it), from `GEMM2_MIN_M` activation rows: per block of activation rows, K goes chunk
//! by chunk over every panel of `PANEL` weight rows of the task (`x86::gemm32_avx2`: the
//! panel's chunk decoded once into L1, the rows passing it in pairs, the float lanes kept
//! between chunks), then the blocks after the last whole group of 8 (K not a multiple of 256:
//! `k2::Tail`, the reference's float operations on vector integer sums) and `hsum8`, straight
//! into `out`. The last `rows % PANEL`
//! rows of a task take the row kernels (`Plan::fill`). Every output has the reference's bits.

use std::cell::RefCell;

/// The K-quants' GEMM on the same path (`gemm_avx2/k.rs`).
pub(super) mod k;

use super::x86::gemm32_avx2::{self as k2, Acc2, Gemm2, PanelBuf, XRow2, KC_GROUPS, PANEL};
use super::x86::tile::GROUP_BYTES;
use super::{Acts, OutPtr, Plan};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, LANES};
use crate::qtype::QType;

/// From this many activation rows on the 32-weight formats take this path where the CPU has
/// no AVX-512 VNNI. At M = 4 the row kernels (4 activation rows per decoded weight row) were
/// faster (`FERROQUANT_MAX_ISA=avx2`, one thread, CPU time, 4096x4096, load 15, 2026-12-06
/// 18:43 UTC: q4_0 0.85x, q8_0 0.64x), at M = 5 (rows: 4 + 1) the GEMM (q4_0 1.21x, q8_0
/// 0.99x; 4096x14336: 1.06x, 1.15x), at 6 and 7 by 1.2-1.4x.
pub(super) const GEMM2_MIN_M: usize = 5;
/// Activation rows of one block (each panel chunk decoded once per block; the block's chunk of
/// activations, 64 x 2 KiB, and its lanes stay in L2).
const GEMM2_BLOCK: usize = 64;

/// Which integer product the kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Int8Dot {
    /// `vpmaddubsw` + `vpmaddwd` (AVX2).
    Maddubs,
    /// `vpdpbusd` on 256-bit vectors (AVX-VNNI).
    AvxVnni,
}

impl Int8Dot {
    /// The product this CPU has (AVX2 detected by the caller).
    pub(super) fn detect() -> Self {
        if crate::cpu::has_avx_vnni() {
            Int8Dot::AvxVnni
        } else {
            Int8Dot::Maddubs
        }
    }
}

/// Whether the path takes `qtype` weights (the K-quants through `k`).
pub(super) fn takes(qtype: QType) -> bool {
    k::takes(qtype)
        || matches!(
            qtype,
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 | QType::IQ4NL | QType::Q4_1 | QType::Q5_1
        )
}

/// The M from which the path runs for `qtype` (without forcing).
pub(super) fn min_m(qtype: QType) -> usize {
    if k::takes(qtype) {
        k::min_m(qtype)
    } else {
        GEMM2_MIN_M
    }
}

thread_local! {
    /// Each pool thread's decoded panel chunk and float accumulators (reused across calls).
    static SCRATCH: RefCell<(PanelBuf, Vec<Acc2>)> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// Weight rows `n0..n0 + rows` with every activation row, into `out`: whole panels here,
    /// the last `rows % PANEL` through `fill` (the same bits either way).
    pub(super) fn fill_gemm2(&self, dot: Int8Dot, n0: usize, rows: usize, out: &OutPtr) {
        if self.fill_gemm_k2(n0, rows, out) {
            return;
        }
        let whole = rows / PANEL * PANEL;
        match self.w.qtype {
            QType::Q4_0 => self.gemm2_rows::<BlockQ4_0>(dot, n0, whole, out),
            QType::Q8_0 => self.gemm2_rows::<BlockQ8_0>(dot, n0, whole, out),
            QType::Q5_0 => self.gemm2_rows::<BlockQ5_0>(dot, n0, whole, out),
            QType::IQ4NL => self.gemm2_rows::<BlockIQ4NL>(dot, n0, whole, out),
            QType::Q4_1 => self.gemm2_rows::<BlockQ4_1>(dot, n0, whole, out),
            _ => self.gemm2_rows::<BlockQ5_1>(dot, n0, whole, out),
        }
        if whole < rows {
            let m = self.m;
            let mut yt = vec![0.0f32; (rows - whole) * m];
            self.fill(n0 + whole, &mut yt);
            out.scatter(n0 + whole, m, &yt);
        }
    }

    fn gemm2_rows<W: Gemm2>(&self, dot: Int8Dot, n0: usize, rows: usize, out: &OutPtr) {
        let none: &[f32] = &[];
        let (xb, xd, sums, xt, xs) = match &self.acts {
            Acts::Q8_0 {
                blocks,
                d,
                sums,
                xt,
                ..
            } => (&blocks[..], &d[..], &sums[..], &xt[..], none),
            Acts::Q8_1 {
                blocks,
                d,
                sums,
                s,
                xt,
                ..
            } => (&blocks[..], &d[..], &sums[..], &xt[..], &s[..]),
            _ => unreachable!("the 32-weight GEMM runs only with q8_0 / q8_1 activations"),
        };
        let nb = self.k / QK8_0;
        let groups = nb / LANES;
        let gb = groups * GROUP_BYTES;
        let rb = self.row_bytes;
        let m = self.m;
        let panels = rows / PANEL;
        let wrow = |i: usize| -> &[W] { bytemuck::cast_slice(&self.w.data[(n0 + i) * rb..][..rb]) };
        let w = |pi: usize| -> [&[W]; PANEL] { std::array::from_fn(|p| wrow(pi * PANEL + p)) };
        let vnni = dot == Int8Dot::AvxVnni;
        SCRATCH.with_borrow_mut(|(buf, acc)| {
            let mut mb = 0;
            while mb < m {
                let ms = mb..(mb + GEMM2_BLOCK).min(m);
                let rows_m = ms.len();
                let x = |j: usize, g0: usize| {
                    let r = ms.start + j;
                    let b = r * nb + g0 * LANES..(r + 1) * nb;
                    XRow2 {
                        xt: &xt[r * gb + g0 * GROUP_BYTES..(r + 1) * gb],
                        sums: &sums[b.clone()],
                        d: &xd[b.clone()],
                        s: xs.get(b).unwrap_or_default(),
                    }
                };
                acc.clear();
                acc.resize(panels * rows_m, Acc2::default());
                let mut g0 = 0;
                while g0 < groups {
                    let gc = KC_GROUPS.min(groups - g0);
                    for pi in 0..panels {
                        let (pn, gn) = if pi + 1 < panels {
                            (pi + 1, g0)
                        } else {
                            (0, g0 + gc)
                        };
                        if gn < groups {
                            k2::prefetch(w(pn), gn, KC_GROUPS.min(groups - gn));
                        }
                        let a = &mut acc[pi * rows_m..(pi + 1) * rows_m];
                        // SAFETY: gemm2 is set only with `cpu::has_avx2` (and AvxVnni only with
                        // `cpu::has_avx_vnni`); every weight row has nb >= 8 (g0 + gc) blocks.
                        unsafe { k2::decode_panel(w(pi), g0, gc, vnni, buf) };
                        let mut j = 0;
                        while j < rows_m {
                            let step = if rows_m - j >= 2 { 2 } else { 1 };
                            // SAFETY: as above; x(j, g0) holds the groups g0..groups (the
                            // activations of `plan`, interleaved for this K); the kernels check
                            // the lengths.
                            unsafe {
                                match (step, vnni) {
                                    (2, false) => run::<W, 2, false>(buf, gc, j, g0, &x, a),
                                    (2, true) => run::<W, 2, true>(buf, gc, j, g0, &x, a),
                                    (_, false) => run::<W, 1, false>(buf, gc, j, g0, &x, a),
                                    (_, true) => run::<W, 1, true>(buf, gc, j, g0, &x, a),
                                }
                            }
                            j += step;
                        }
                    }
                    g0 += gc;
                }
                // The blocks past the last whole group on the same lanes (`k2::Tail`: the
                // panel's tail decoded once, the reference's float operations on exact integer
                // sums; before, the reference's scalar code per output: at K = 576, 2 blocks of
                // 18, it took longer than the 16 others, q5_0 twice q4_0's call), then `hsum8`.
                let b0 = groups * LANES;
                for pi in 0..panels {
                    let tail = if b0 < nb {
                        // SAFETY: gemm2 is set only with `cpu::has_avx2` (AVX2 and F16C); every
                        // weight row has nb < b0 + 8 blocks.
                        Some(unsafe { k2::Tail::decode(w(pi), b0) })
                    } else {
                        None
                    };
                    for (j, mi) in ms.clone().enumerate() {
                        let lanes = &acc[pi * rows_m + j].0;
                        let ys = match &tail {
                            Some(t) => {
                                let xr = mi * nb + b0..(mi + 1) * nb;
                                let xs = if W::HAS_MIN {
                                    Some(&xs[xr.clone()])
                                } else {
                                    None
                                };
                                // SAFETY: as above; the activation row's blocks from b0 on.
                                unsafe { t.finish(lanes, &xb[xr.clone()], &xd[xr], xs) }
                            }
                            None => lanes.map(|l| r::hsum8(&l)),
                        };
                        for (p, y) in ys.into_iter().enumerate() {
                            out.set(mi, n0 + pi * PANEL + p, y);
                        }
                    }
                }
                mb = ms.end;
            }
        });
    }
}

/// The kernel for activation rows `j0..j0 + R` of the block, their lanes in `acc`.
///
/// # Safety
/// As `k2::kernel` (`VNNI`: `k2::kernel_vnni`).
#[inline(always)]
unsafe fn run<'a, W: Gemm2, const R: usize, const VNNI: bool>(
    buf: &PanelBuf,
    groups: usize,
    j0: usize,
    g0: usize,
    x: &impl Fn(usize, usize) -> XRow2<'a>,
    acc: &mut [Acc2],
) {
    let xr: [XRow2<'a>; R] = std::array::from_fn(|j| x(j0 + j, g0));
    let a: &mut [Acc2; R] = (&mut acc[j0..j0 + R]).try_into().expect("R accumulators");
    // SAFETY: the caller's contract.
    unsafe {
        if VNNI {
            k2::kernel_vnni::<W, R>(buf, groups, &xr, a)
        } else {
            k2::kernel::<W, R>(buf, groups, &xr, a)
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: `plan` on this thread takes this path with this product for the formats it
    /// takes, at M >= 2, whatever the CPU has beyond it.
    pub(super) static FORCE: std::cell::Cell<Option<Int8Dot>> = const { std::cell::Cell::new(None) };
}

/// The product tests force on this thread (`FORCE`); always `None` outside tests.
pub(super) fn forced() -> Option<Int8Dot> {
    #[cfg(test)]
    return FORCE.get();
    #[cfg(not(test))]
    None
}
