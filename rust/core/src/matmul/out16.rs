//! Where the bf16 GEMM's jobs put their outputs (`Sink`): f32 `out` (`OutPtr`, through
//! its impl in `gemm_bf16.rs`), or bf16 bits straight into the caller's arrays (`Bf16Out`:
//! `qmatmul_bf16` / `qmatmul_bf16_split`, whose f32 `out` and second `narrow` pass cost 5 % and
//! more of a SmolLM2 call at M = 128). Numerics of `Bf16Out`: each output is
//! `bf16_io::f32_to_bf16` of the job's f32 chain (nearest, ties to even, subnormals kept,
//! NaN -> 0x7fc0: the rounding of `narrow`, done in integer lanes, so the same bits).

use std::arch::x86_64::*;

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
                    // (no closures over vectors here, `array::map` included: a closure is
                    // compiled without this function's target features, and where LLVM did not
                    // inline one every vector went through memory: SmolLM2 prompts 15 % slower
                    // in one build of session 18)
                    let mut tf = [_mm512_setzero_ps(); 16];
                    for (q, tq) in tf.iter_mut().enumerate().take(wide / 2) {
                        let (a, b) = (acc[at(c + 2 * q, j)], acc[at(c + 2 * q + 1, j)]);
                        // SAFETY: AVX-512 F/BW (this function's features).
                        *tq = _mm512_castsi512_ps(unsafe { pack(a, b) });
                    }
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
                        // SAFETY: AVX-512 F (this function's features); __m512i is 16 u32.
                        let r = unsafe {
                            std::mem::transmute::<__m512i, [u32; 16]>(round(acc[at(ci, j)]))
                        };
                        for (l, &y) in r.iter().enumerate().take(lanes) {
                            out.set(m0 + l, n0 + ci, (y >> 16) as u16);
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
