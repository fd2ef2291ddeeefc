//! Where the bf16 GEMM's jobs put their outputs (`Sink`): f32 `out` (`OutPtr`, through
//! `gemm_bf16::write_out`), or bf16 bits straight into the caller's arrays (`Bf16Out`:
//! `qmatmul_bf16` / `qmatmul_bf16_split`, whose f32 `out` and second `narrow` pass cost 5 % and
//! more of a SmolLM2 call at M = 128). Numerics of `Bf16Out`: each output is
//! `bf16_io::f32_to_bf16` of the job's f32 chain (nearest, ties to even, subnormals kept,
//! NaN -> 0x7fc0: the rounding of `narrow`, done in integer lanes, so the same bits).

use std::arch::x86_64::*;

use super::bf16_io::f32_to_bf16;
use super::OutPtr;

/// Where a job's f32 chains go at its end: `acc[at(i, j)]` holds weight row `n0 + i` (of the
/// job's `rows`) against activation rows `16 (v0 + j) ..` (lane l: row 16 (v0 + j) + l, of M
/// rows in all; lanes past M are not written), for the job's `nv` vectors. Jobs write disjoint
/// weight rows (output columns), so the sink is shared by the pool's threads.
pub(super) trait Sink: Sync {
    #[allow(clippy::too_many_arguments)]
    fn tiles(
        &self,
        acc: &[__m512],
        rows: usize,
        nv: usize,
        v0: usize,
        m: usize,
        n0: usize,
        at: impl Fn(usize, usize) -> usize,
    );
}

impl Sink for OutPtr {
    fn tiles(
        &self,
        acc: &[__m512],
        rows: usize,
        nv: usize,
        v0: usize,
        m: usize,
        n0: usize,
        at: impl Fn(usize, usize) -> usize,
    ) {
        super::gemm_bf16::write_out(acc, rows, nv, v0, m, n0, self, at)
    }
}

/// One output array of `Bf16Out`: M rows of `cols` bf16 values, the product's columns
/// `c0..c0 + cols`.
struct Part {
    p: *mut u16,
    c0: usize,
    cols: usize,
}

/// bf16 outputs: the product's N columns split, in order, among arrays of M rows each (one
/// array: `qmatmul_bf16`; q/k/v or gate/up: `qmatmul_bf16_split`).
pub(super) struct Bf16Out {
    parts: Vec<Part>,
    m: usize,
}

// SAFETY: the jobs write disjoint columns (their own weight rows), so no element is written by
// two threads; the arrays stay mutably borrowed by the caller for the whole call (`new`'s
// borrow is held by the caller until the jobs are done: `bf16_io`).
unsafe impl Sync for Bf16Out {}

impl Bf16Out {
    /// `outs[i]` (M x `outs[i].len() / m`) takes the next `outs[i].len() / m` columns. The
    /// caller checks that each holds whole rows and that they add up to N, and keeps `outs`
    /// borrowed (unused) while the sink is written.
    pub(super) fn new(outs: &mut [&mut [u16]], m: usize) -> Self {
        let mut c0 = 0;
        let parts = outs
            .iter_mut()
            .map(|o| {
                let cols = o.len() / m.max(1);
                assert!(cols * m == o.len());
                let part = Part {
                    p: o.as_mut_ptr(),
                    c0,
                    cols,
                };
                c0 += cols;
                part
            })
            .collect();
        Self { parts, m }
    }

    /// The part holding columns `c..c + w` whole, if one does.
    #[inline(always)]
    fn whole(&self, c: usize, w: usize) -> Option<&Part> {
        self.parts
            .iter()
            .find(|p| p.c0 <= c && c + w <= p.c0 + p.cols)
    }

    /// Output (row `mi`, column `c`) = `v`, wherever column c lives.
    fn set(&self, mi: usize, c: usize, v: u16) {
        let p = self
            .whole(c, 1)
            .expect("a column of the product is in one part");
        assert!(mi < self.m);
        // SAFETY: in bounds (mi < M, c - c0 < cols: the part has M x cols values); only the
        // job owning column c writes it (see the Sync impl).
        unsafe { *p.p.add(mi * p.cols + c - p.c0) = v };
    }
}

impl Sink for Bf16Out {
    fn tiles(
        &self,
        acc: &[__m512],
        rows: usize,
        nv: usize,
        v0: usize,
        m: usize,
        n0: usize,
        at: impl Fn(usize, usize) -> usize,
    ) {
        assert!(m == self.m);
        // SAFETY: the bf16 GEMM runs only with `cpu::has_avx512_bf16` (AVX-512 F/BW included).
        unsafe { tiles_avx512(self, acc, rows, nv, v0, n0, at) }
    }
}

/// `Bf16Out::tiles`: per vector, 32 columns at a time where one part holds them (pairs of
/// columns rounded and packed into dwords, one 16 x 16 transpose, one 64-byte store per row),
/// else 16 (half of it, 32-byte stores), else value by value.
///
/// # Safety
/// AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tiles_avx512(
    out: &Bf16Out,
    acc: &[__m512],
    rows: usize,
    nv: usize,
    v0: usize,
    n0: usize,
    at: impl Fn(usize, usize) -> usize,
) {
    let m = out.m;
    for j in 0..nv {
        let m0 = (v0 + j) * 16;
        let lanes = m.saturating_sub(m0).min(16);
        let col = |c: usize| acc[at(c, j)];
        let mut c = 0;
        while c < rows {
            let fits = |w: usize| {
                (rows - c >= w)
                    .then(|| out.whole(n0 + c, w))
                    .flatten()
                    .map(|p| (p, w))
            };
            match fits(32).or_else(|| fits(16)) {
                Some((p, wide)) => {
                    let mut t = [_mm512_setzero_si512(); 16];
                    for (q, tq) in t.iter_mut().enumerate().take(wide / 2) {
                        // SAFETY: AVX-512 F/BW (this function's features).
                        *tq = unsafe { pack(col(c + 2 * q), col(c + 2 * q + 1)) };
                    }
                    let mut tf = t.map(|v| _mm512_castsi512_ps(v));
                    // SAFETY: AVX-512 F.
                    unsafe { super::x86::acts16::transpose16(&mut tf) };
                    let base = n0 + c - p.c0;
                    for (l, row) in tf.iter().enumerate().take(lanes) {
                        assert!(m0 + l < m && base + wide <= p.cols);
                        // SAFETY: row m0 + l < M of the part, columns base..base + wide inside
                        // its cols (asserted); only this job writes them (the Sync impl).
                        unsafe {
                            let d = p.p.add((m0 + l) * p.cols + base);
                            if wide == 32 {
                                _mm512_storeu_ps(d as *mut f32, *row);
                            } else {
                                let lo = _mm512_castps512_ps256(*row);
                                _mm256_storeu_ps(d as *mut f32, lo);
                            }
                        }
                    }
                    c += wide;
                }
                None => {
                    // A block of 16 columns across parts, or the job's last < 16 columns.
                    let w = (rows - c).min(16);
                    for ci in c..c + w {
                        // SAFETY: __m512 is 16 f32 (any bits).
                        let v = unsafe { std::mem::transmute::<__m512, [f32; 16]>(col(ci)) };
                        for (l, &y) in v.iter().enumerate().take(lanes) {
                            out.set(m0 + l, n0 + ci, f32_to_bf16(y));
                        }
                    }
                    c += w;
                }
            }
        }
    }
}

/// Lane l: `f32_to_bf16(b[l]) << 16 | f32_to_bf16(a[l])` (the two columns of one output row as
/// they sit in memory).
///
/// # Safety
/// AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn pack(a: __m512, b: __m512) -> __m512i {
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    _mm512_or_si512(
        _mm512_srli_epi32::<16>(round(a)),
        _mm512_and_si512(round(b), hi),
    )
}

/// `f32_to_bf16` of each lane, in the high 16 bits (the low ones are not cleared): `u + 0x7fff
/// + (bit 16 of u)`, wrapping, NaN -> 0x7fc0_0000.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn round(v: __m512) -> __m512i {
    let u = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0_0000))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Bf16Out`'s tiles = `f32_to_bf16` of `OutPtr`'s f32 tiles (`write_out`), value for value:
    /// values that round up, down, to even on ties, into the exponent, to infinity, subnormals,
    /// signed zeros, infinities and NaNs; jobs of 8-144 rows from column 0 or 40, parts that
    /// split 16- or 32-column blocks or not, M with a partial vector.
    #[test]
    fn bf16_tiles_are_the_f32_tiles_rounded() {
        if !crate::cpu::has_avx512_bf16() {
            return; // the bf16 GEMM (the only caller) does not run without it
        }
        let special = [
            0x3f80_8000u32, // a tie, even below: down
            0x3f81_8000,    // a tie, odd below: up
            0x3f80_7fff,
            0x3f80_8001,
            0x7f7f_ffff, // rounds to infinity
            0x3fff_ffff, // carries into the exponent
            0x0000_0001, // subnormals
            0x807f_ffff,
            0x0000_0000,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffff_ffff,
            0x7f80_0001,
        ];
        let mut s = 0x0b16_0007u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 32) as u32
        };
        for (m, nv, v0) in [(128usize, 8usize, 0usize), (40, 3, 0), (37, 1, 2)] {
            for (rows, n0, parts) in [
                (144usize, 0usize, vec![144usize]),
                (144, 0, vec![48, 16, 80]),
                (144, 40, vec![40, 56, 8, 7, 73]),
                (8, 0, vec![8]),
                (48, 8, vec![56]),
            ] {
                let n: usize = parts.iter().sum();
                let rows16 = rows.next_multiple_of(16);
                let acc: Vec<__m512> = (0..rows16 * nv)
                    .map(|_| {
                        let v: [u32; 16] = std::array::from_fn(|_| {
                            let r = next();
                            if r % 4 == 0 {
                                special[(r as usize >> 8) % special.len()]
                            } else {
                                r
                            }
                        });
                        // SAFETY: 16 dwords, any bits.
                        unsafe { std::mem::transmute::<[u32; 16], __m512>(v) }
                    })
                    .collect();
                let at = |i: usize, j: usize| i * nv + j;
                let mut f = vec![0f32; m * n];
                OutPtr::new(&mut f, n).tiles(&acc, rows, nv, v0, m, n0, at);
                let mut got: Vec<Vec<u16>> = parts.iter().map(|&c| vec![0x5555; m * c]).collect();
                let mut outs: Vec<&mut [u16]> = got.iter_mut().map(|g| g.as_mut_slice()).collect();
                Bf16Out::new(&mut outs, m).tiles(&acc, rows, nv, v0, m, n0, at);
                let mut c0 = 0;
                for (p, &c) in got.iter().zip(&parts) {
                    for mi in 0..m {
                        for ci in 0..c {
                            let (col, fv) = (c0 + ci, f[mi * n + c0 + ci]);
                            let written = (n0..n0 + rows).contains(&col)
                                && (16 * v0..16 * (v0 + nv)).contains(&mi);
                            let want = if written { f32_to_bf16(fv) } else { 0x5555 };
                            assert_eq!(p[mi * c + ci], want, "m={m} {parts:?} row {mi} col {col}");
                        }
                    }
                    c0 += c;
                }
            }
        }
    }
}
