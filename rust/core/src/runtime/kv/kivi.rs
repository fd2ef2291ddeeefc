//! The KIVI pages (int4 / int2) laid out for integer dot products, and attention over them.
//!
//! A KIVI block is block.rs's: KIVI_GROUP codes of `bits` bits with an f16 scale and zero (keys:
//! one channel over the page's 64 positions; values: one token's 64 channels of a head). In a
//! page the codes are stored as *tiles* for `vpdpbusd`, which multiplies 4 consecutive bytes of
//! one operand with 4 of the other and sums them into an i32 lane: a tile holds 4 "reduction"
//! rows (keys: 4 channels; values: 4 positions) by 64 "output" entries (keys: the page's 64
//! positions; values: 64 channels), entry (r, o) in byte `vector * 64 + 4 (o % 16) + r` of the
//! tile at bit `bits * (m / nv)`, with `m = o / 16`, `nv = bits / 2` vectors of 64 bytes and
//! `vector = m % nv`. One AND (and shift) of a vector gives 16 output lanes x 4 reduction bytes.
//! Scales and zeros follow the tiles as two f16 arrays. The bytes per token are block.rs's.
//!
//! Arithmetic (scalar here, AVX-512 VNNI in `x86`, bit for bit the same; reference.rs writes it
//! element by element):
//! - keys, per page: `qs_c = q_c * s_c`; `a = max |qs_c|`; `qi_c = rne(qs_c * (QK / a))` (16 bits,
//!   fed to the dot as a signed high byte and a signed low byte), `d = a / QK`;
//!   `score_j = f32(Σ_c qi_c k_cj) * d + dot8(q, z)`;
//! - values, per page and 64-channel group: `ws_t = w_t * s_t`; `a = max ws_t`;
//!   `wi_t = rne(ws_t * (QV / a))` (16 bits unsigned: an unsigned high byte and low byte),
//!   `e = a / QV`; `out_d += f32(Σ_t wi_t v_td) * e + dot8(w, z)`.
//!
//! A page whose `a` is below f32's smallest normal (or NaN) uses integers 0 and `d = e = 0`. The
//! query's and the weights' 16-bit rounding is 2^-16 of the page's largest term: far below the
//! cache's own 4- or 2-bit rounding (tests bound it against exact f32 arithmetic).

use half::f16;

use super::super::ops;
use super::types::{Geometry, KIVI_GROUP};

/// Output entries and reduction rows of a tile.
pub const OUT: usize = KIVI_GROUP;
pub const RED: usize = 4;
/// Largest |query integer|: 127 * 256, so the high byte stays in i8.
pub const QK: f32 = 32512.0;
/// Largest weight integer (two unsigned bytes).
pub const QV: f32 = 65535.0;

/// Bytes of a tile: 4 x 64 codes.
pub const fn tile_bytes(bits: u32) -> usize {
    RED * OUT * bits as usize / 8
}

/// (byte, shift) of entry (r, o) in a tile.
#[inline(always)]
fn place(bits: u32, r: usize, o: usize) -> (usize, u32) {
    let nv = bits as usize / 2;
    let m = o / 16;
    ((m % nv) * 64 + 4 * (o % 16) + r, bits * (m / nv) as u32)
}

/// Write code `q` at (r, o) (the tile's bits there must be zero).
#[inline(always)]
pub fn put(tile: &mut [u8], bits: u32, r: usize, o: usize, q: u8) {
    let (b, s) = place(bits, r, o);
    tile[b] |= q << s;
}

/// The code at (r, o).
#[inline(always)]
pub fn get(tile: &[u8], bits: u32, r: usize, o: usize) -> u8 {
    let (b, s) = place(bits, r, o);
    (tile[b] >> s) & ((1u8 << bits) - 1)
}

/// Where a layer's key or value region keeps its parts (byte offsets inside the region).
#[derive(Clone, Copy)]
pub struct Layout {
    pub bits: u32,
    pub head_dim: usize,
    pub n_head_kv: usize,
}

impl Layout {
    pub fn new(bits: u32, geo: &Geometry) -> Layout {
        Layout {
            bits,
            head_dim: geo.head_dim,
            n_head_kv: geo.n_head_kv,
        }
    }
    fn kvd(&self) -> usize {
        self.head_dim * self.n_head_kv
    }
    fn tiles(&self) -> usize {
        self.kvd() / RED * tile_bytes(self.bits)
    }
    /// Key tile of head `h`, channels `4 cq .. 4 cq + 3`.
    pub fn key_tile(&self, h: usize, cq: usize) -> usize {
        (h * self.head_dim / RED + cq) * tile_bytes(self.bits)
    }
    /// f16 scales of head `h`'s channels (head_dim of them); the zeros follow `zeros()` later.
    pub fn key_scales(&self, h: usize) -> usize {
        self.tiles() + h * self.head_dim * 2
    }
    pub fn key_zeros(&self, h: usize) -> usize {
        self.key_scales(h) + self.kvd() * 2
    }
    /// Value groups (of KIVI_GROUP channels) per head.
    pub fn groups(&self) -> usize {
        self.head_dim / OUT
    }
    /// Value tile of head `h`, channel group `g`, positions `4 pq .. 4 pq + 3`.
    pub fn value_tile(&self, h: usize, g: usize, pq: usize) -> usize {
        ((h * self.groups() + g) * (KIVI_GROUP / RED) + pq) * tile_bytes(self.bits)
    }
    /// f16 scales of the page's KIVI_GROUP positions for head `h`, group `g`.
    pub fn value_scales(&self, h: usize, g: usize) -> usize {
        self.tiles() + (h * self.groups() + g) * KIVI_GROUP * 2
    }
    pub fn value_zeros(&self, h: usize, g: usize) -> usize {
        self.value_scales(h, g) + self.kvd() / OUT * KIVI_GROUP * 2
    }
}

/// Per-page integers of the query or the weights: `x_i * s_i` rounded to `lim / max`.
/// Returns the step (`max / lim`, or 0 when the largest product is not a normal float).
#[inline(always)]
pub fn integers(x: &[f32], s: &[f32], lim: f32, out: &mut [i32]) -> f32 {
    let mut a = 0f32;
    for (&x, &s) in x.iter().zip(s) {
        a = a.max((x * s).abs());
    }
    let normal = a.is_finite() && a >= f32::MIN_POSITIVE;
    if !normal {
        out.fill(0);
        return 0.0;
    }
    let id = lim / a;
    for ((o, &x), &s) in out.iter_mut().zip(x).zip(s) {
        *o = ((x * s) * id).round_ties_even().clamp(-lim, lim) as i32;
    }
    a / lim
}

/// Scratch of one task (reused between pages and heads).
#[derive(Default)]
pub struct Bufs {
    s: Vec<f32>,
    z: Vec<f32>,
    qi: Vec<i32>,
    hi: Vec<u8>,
    lo: Vec<u8>,
}

impl Bufs {
    fn size(&mut self, n: usize) {
        self.s.resize(n, 0.0);
        self.z.resize(n, 0.0);
        self.qi.resize(n, 0);
        self.hi.resize(n, 0);
        self.lo.resize(n, 0);
    }
}

/// Split 16-bit integers into the bytes the dot reads: keys (signed) `qi = 256 hi + lo` with both
/// in i8; weights (unsigned) `wi = 256 hi + lo` with both in u8.
#[inline(always)]
fn split(qi: &[i32], signed: bool, hi: &mut [u8], lo: &mut [u8]) {
    for ((&q, h), l) in qi.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
        let hq = if signed { (q + 128) >> 8 } else { q >> 8 };
        *h = hq as u8;
        *l = (q - 256 * hq) as u8;
    }
}

/// Scores of the 64 positions of one complete page for query head `q` (rotated if the pool
/// rotates) of key head `h`; `keys`: the layer's key region of the page.
pub fn page_scores(lay: &Layout, keys: &[u8], h: usize, q: &[f32], b: &mut Bufs, out: &mut [f32]) {
    scores_with(simd(), lay, keys, h, q, b, out)
}

/// Whether the AVX-512 VNNI kernels run (else the scalar loops; the same integers).
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::cpu::has_vnni_bw();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn scores_with(
    simd: bool,
    lay: &Layout,
    keys: &[u8],
    h: usize,
    q: &[f32],
    b: &mut Bufs,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: callers pass simd = true only where cpu::has_vnni_bw() holds.
        return unsafe { x86::scores(lay, keys, h, q, b, out) };
    }
    let _ = simd;
    scores_body::<false>(lay, keys, h, q, b, out)
}

/// The page's scores; `SIMD`: the VNNI dot and F16C conversions (only inside `x86::scores`).
#[inline(always)]
fn scores_body<const SIMD: bool>(
    lay: &Layout,
    keys: &[u8],
    h: usize,
    q: &[f32],
    b: &mut Bufs,
    out: &mut [f32],
) {
    let hd = lay.head_dim;
    b.size(hd);
    f16s::<SIMD>(keys, lay.key_scales(h), &mut b.s);
    f16s::<SIMD>(keys, lay.key_zeros(h), &mut b.z);
    let d = integers(q, &b.s, QK, &mut b.qi);
    let cst = ops::dot8(q, &b.z);
    let mut acc = [0i32; OUT];
    if SIMD {
        split(&b.qi, true, &mut b.hi, &mut b.lo);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SIMD is true only inside x86::scores (AVX-512 F/BW/VNNI enabled); the tiles of
        // head h lie inside `keys` (Layout), hi / lo hold head_dim bytes.
        unsafe {
            x86::dot_tiles(
                lay.bits,
                &keys[lay.key_tile(h, 0)..],
                &b.hi,
                &b.lo,
                &mut acc,
            )
        };
    } else {
        for cq in 0..hd / RED {
            let tile = &keys[lay.key_tile(h, cq)..][..tile_bytes(lay.bits)];
            for r in 0..RED {
                let qc = b.qi[cq * RED + r];
                for (j, a) in acc.iter_mut().enumerate() {
                    *a += qc * get(tile, lay.bits, r, j) as i32;
                }
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32 * d + cst;
    }
}

/// `out += Σ_t w_t v_t` over the 64 positions of one complete page (`w`: their softmax weights)
/// for value head `h`; `values`: the layer's value region of the page.
pub fn page_values(
    lay: &Layout,
    values: &[u8],
    h: usize,
    w: &[f32],
    b: &mut Bufs,
    out: &mut [f32],
) {
    values_with(simd(), lay, values, h, w, b, out)
}

fn values_with(
    simd: bool,
    lay: &Layout,
    values: &[u8],
    h: usize,
    w: &[f32],
    b: &mut Bufs,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: callers pass simd = true only where cpu::has_vnni_bw() holds.
        return unsafe { x86::values(lay, values, h, w, b, out) };
    }
    let _ = simd;
    values_body::<false>(lay, values, h, w, b, out)
}

#[inline(always)]
fn values_body<const SIMD: bool>(
    lay: &Layout,
    values: &[u8],
    h: usize,
    w: &[f32],
    b: &mut Bufs,
    out: &mut [f32],
) {
    b.size(KIVI_GROUP);
    for (g, o) in out.chunks_exact_mut(OUT).enumerate() {
        f16s::<SIMD>(values, lay.value_scales(h, g), &mut b.s);
        f16s::<SIMD>(values, lay.value_zeros(h, g), &mut b.z);
        let e = integers(w, &b.s, QV, &mut b.qi);
        let wz = ops::dot8(w, &b.z);
        let mut acc = [0i32; OUT];
        if SIMD {
            split(&b.qi, false, &mut b.hi, &mut b.lo);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: SIMD is true only inside x86::values (AVX-512 F/BW/VNNI enabled); the 16
            // tiles of (h, g) lie inside `values` (Layout), hi / lo hold KIVI_GROUP bytes.
            unsafe {
                x86::weigh_tiles(
                    lay.bits,
                    &values[lay.value_tile(h, g, 0)..],
                    &b.hi,
                    &b.lo,
                    &mut acc,
                )
            };
        } else {
            for pq in 0..KIVI_GROUP / RED {
                let tile = &values[lay.value_tile(h, g, pq)..][..tile_bytes(lay.bits)];
                for r in 0..RED {
                    let wt = b.qi[pq * RED + r];
                    for (d, a) in acc.iter_mut().enumerate() {
                        *a += wt * get(tile, lay.bits, r, d) as i32;
                    }
                }
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o += a as f32 * e + wz;
        }
    }
}

/// `out.len()` f16 values at `at` -> f32 (exact; F16C 16 at a time when `SIMD`).
#[inline(always)]
fn f16s<const SIMD: bool>(region: &[u8], at: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD is true only inside the x86 kernels (AVX-512 F enabled).
        return unsafe { x86::f16s(&region[at..at + 2 * out.len()], out) };
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = f16::from_le_bytes([region[at + 2 * i], region[at + 2 * i + 1]]).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{tile_bytes, Bufs, Layout, OUT, RED};

    /// super::scores_body with the VNNI dot, compiled for AVX-512.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI (cpu::has_vnni_bw).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn scores(
        lay: &Layout,
        keys: &[u8],
        h: usize,
        q: &[f32],
        b: &mut Bufs,
        out: &mut [f32],
    ) {
        super::scores_body::<true>(lay, keys, h, q, b, out)
    }

    /// super::values_body with the VNNI dot, compiled for AVX-512.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI (cpu::has_vnni_bw).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn values(
        lay: &Layout,
        values: &[u8],
        h: usize,
        w: &[f32],
        b: &mut Bufs,
        out: &mut [f32],
    ) {
        super::values_body::<true>(lay, values, h, w, b, out)
    }

    /// f16 bytes -> f32, 16 at a time (exact, like the scalar conversion).
    ///
    /// # Safety
    /// AVX-512 F; `src` holds 2 * out.len() bytes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn f16s(src: &[u8], out: &mut [f32]) {
        let n = out.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: bytes 2i .. 2i + 32 of src and floats i .. i + 16 of out exist (i + 16 <= n).
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(2 * i) as *const __m256i);
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        for i in n..out.len() {
            out[i] = half::f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32();
        }
    }

    /// The 4 code vectors of a tile (output lanes 16m..16m+15, 4 reduction bytes each).
    ///
    /// # Safety
    /// AVX-512 F/BW; `tile` holds tile_bytes(bits) bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn codes(bits: u32, tile: *const u8) -> [__m512i; 4] {
        // SAFETY: the caller guarantees the tile's bytes (one or two 64-byte vectors).
        unsafe {
            if bits == 4 {
                let m = _mm512_set1_epi8(0x0f);
                let v0 = _mm512_loadu_si512(tile as *const _);
                let v1 = _mm512_loadu_si512(tile.add(64) as *const _);
                [
                    _mm512_and_si512(v0, m),
                    _mm512_and_si512(v1, m),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v0), m),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v1), m),
                ]
            } else {
                let m = _mm512_set1_epi8(0x03);
                let v = _mm512_loadu_si512(tile as *const _);
                [
                    _mm512_and_si512(v, m),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(v), m),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), m),
                    _mm512_and_si512(_mm512_srli_epi16::<6>(v), m),
                ]
            }
        }
    }

    #[inline(always)]
    fn quad(x: &[u8], i: usize) -> i32 {
        i32::from_le_bytes([x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]])
    }

    /// `acc_j = Σ_c (256 hi_c + lo_c) k_cj` over the `hi.len() / 4` key tiles at `tiles`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; `tiles` holds hi.len() / 4 tiles; lo as long as hi.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_tiles(bits: u32, tiles: &[u8], hi: &[u8], lo: &[u8], acc: &mut [i32; OUT]) {
        let tb = tile_bytes(bits);
        let n = hi.len() / RED;
        assert!(tiles.len() >= n * tb && lo.len() >= hi.len());
        let mut ah = [_mm512_setzero_si512(); 4];
        let mut al = [_mm512_setzero_si512(); 4];
        for cq in 0..n {
            // SAFETY: tile cq lies inside `tiles` (asserted above).
            let k = unsafe { codes(bits, tiles.as_ptr().add(cq * tb)) };
            let (bh, bl) = (
                _mm512_set1_epi32(quad(hi, cq)),
                _mm512_set1_epi32(quad(lo, cq)),
            );
            for m in 0..4 {
                ah[m] = _mm512_dpbusd_epi32(ah[m], k[m], bh);
                al[m] = _mm512_dpbusd_epi32(al[m], k[m], bl);
            }
        }
        for m in 0..4 {
            let s = _mm512_add_epi32(_mm512_slli_epi32::<8>(ah[m]), al[m]);
            // SAFETY: acc holds 64 i32, m * 16 + 16 <= 64.
            unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add(16 * m) as *mut _, s) };
        }
    }

    /// `acc_d = Σ_t (256 hi_t + lo_t) v_td` over the 16 value tiles at `tiles`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; `tiles` holds 16 tiles; hi, lo hold 64 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn weigh_tiles(bits: u32, tiles: &[u8], hi: &[u8], lo: &[u8], acc: &mut [i32; OUT]) {
        let tb = tile_bytes(bits);
        let n = OUT / RED;
        assert!(tiles.len() >= n * tb && hi.len() >= OUT && lo.len() >= OUT);
        let mut ah = [_mm512_setzero_si512(); 4];
        let mut al = [_mm512_setzero_si512(); 4];
        for pq in 0..n {
            // SAFETY: tile pq lies inside `tiles` (asserted above).
            let v = unsafe { codes(bits, tiles.as_ptr().add(pq * tb)) };
            let (wh, wl) = (
                _mm512_set1_epi32(quad(hi, pq)),
                _mm512_set1_epi32(quad(lo, pq)),
            );
            for m in 0..4 {
                // unsigned weights x codes 0..2^bits-1 (valid as i8)
                ah[m] = _mm512_dpbusd_epi32(ah[m], wh, v[m]);
                al[m] = _mm512_dpbusd_epi32(al[m], wl, v[m]);
            }
        }
        for m in 0..4 {
            let s = _mm512_add_epi32(_mm512_slli_epi32::<8>(ah[m]), al[m]);
            // SAFETY: acc holds 64 i32, m * 16 + 16 <= 64.
            unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add(16 * m) as *mut _, s) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_round_trip_every_entry() {
        for bits in [4u32, 2] {
            let mut t = vec![0u8; tile_bytes(bits)];
            let code = |r: usize, o: usize| ((r * 7 + o * 3) % (1 << bits)) as u8;
            for r in 0..RED {
                for o in 0..OUT {
                    put(&mut t, bits, r, o, code(r, o));
                }
            }
            for r in 0..RED {
                for o in 0..OUT {
                    assert_eq!(get(&t, bits, r, o), code(r, o), "bits {bits} ({r}, {o})");
                }
            }
        }
    }

    /// The AVX-512 VNNI kernels give the scalar loops' floats bit for bit, for pages of random
    /// codes, scales and zeros (with a zero-scale channel and an all-zero weight run).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vnni_equals_scalar() {
        if !crate::cpu::has_vnni_bw() {
            return;
        }
        let mut st = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            (st >> 40) as f32 / (1u64 << 24) as f32
        };
        for bits in [4u32, 2] {
            let geo = Geometry {
                n_layer: 1,
                n_head_kv: 2,
                head_dim: 128,
            };
            let lay = Layout::new(bits, &geo);
            let region = geo.kv_dim() * (8 * bits as usize + 4);
            let mut page: Vec<u8> = (0..region).map(|_| (rnd() * 256.0) as u8).collect();
            let f16b = |x: f32| f16::from_f32(x).to_le_bytes();
            for h in 0..2 {
                for c in 0..128 {
                    let s = if c == 5 { 0.0 } else { rnd() * 0.5 };
                    page[lay.key_scales(h) + 2 * c..][..2].copy_from_slice(&f16b(s));
                    let z = rnd() * 4.0 - 2.0;
                    page[lay.key_zeros(h) + 2 * c..][..2].copy_from_slice(&f16b(z));
                }
                for g in 0..2 {
                    for t in 0..KIVI_GROUP {
                        let s = rnd() * 0.3;
                        page[lay.value_scales(h, g) + 2 * t..][..2].copy_from_slice(&f16b(s));
                        let z = rnd() - 0.5;
                        page[lay.value_zeros(h, g) + 2 * t..][..2].copy_from_slice(&f16b(z));
                    }
                }
            }
            let q: Vec<f32> = (0..128).map(|_| rnd() * 6.0 - 3.0).collect();
            let mut w: Vec<f32> = (0..KIVI_GROUP).map(|_| rnd().powi(6) * 0.1).collect();
            w[10..20].fill(0.0);
            let mut b = Bufs::default();
            for h in 0..2 {
                let (mut a, mut c) = (vec![0f32; OUT], vec![0f32; OUT]);
                scores_with(false, &lay, &page, h, &q, &mut b, &mut a);
                scores_with(true, &lay, &page, h, &q, &mut b, &mut c);
                assert_eq!(bits_of(&a), bits_of(&c), "scores bits {bits} head {h}");
                let (mut a, mut c) = (vec![0.5f32; 128], vec![0.5f32; 128]);
                values_with(false, &lay, &page, h, &w, &mut b, &mut a);
                values_with(true, &lay, &page, h, &w, &mut b, &mut c);
                assert_eq!(bits_of(&a), bits_of(&c), "values bits {bits} head {h}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn bits_of(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn split_bytes_rebuild_the_integers() {
        let qi: Vec<i32> = (-32512..=32512)
            .step_by(97)
            .chain([-32512, 32512, 0, -1, 255])
            .collect();
        let (mut hi, mut lo) = (vec![0u8; qi.len()], vec![0u8; qi.len()]);
        split(&qi, true, &mut hi, &mut lo);
        for ((&q, &h), &l) in qi.iter().zip(&hi).zip(&lo) {
            assert_eq!(256 * (h as i8 as i32) + l as i8 as i32, q);
        }
        let wi: Vec<i32> = (0..=65535).step_by(89).chain([65535]).collect();
        let (mut hi, mut lo) = (vec![0u8; wi.len()], vec![0u8; wi.len()]);
        split(&wi, false, &mut hi, &mut lo);
        for ((&w, &h), &l) in wi.iter().zip(&hi).zip(&lo) {
            assert_eq!(256 * h as i32 + l as i32, w);
        }
    }
}
