//! q8_0 and q4_0 quantizers written with AVX2 intrinsics: the operations of `legacy.rs`'s scalar
//! references on 8 lanes at a time, so the bytes are identical (tested against the references
//! here and, through FERROQUANT_FORCE_SCALAR, against them and libggml in Python).
//!
//! Lane-wise equivalences used:
//! - `amax`: a max-reduction of |x|; the order does not matter for finite inputs.
//! - q4_0's signed extreme is the first element whose |x| equals amax (as ggml's first-wins scan).
//! - `roundf(v)` is `trunc(v + copysign(0.49999997, v))` for every finite v (LLVM lowers
//!   `f32::round` the same way).
//! - `(int8_t)f` on x86 is cvttss2si's low byte; for the finite, in-range values here
//!   `_mm256_cvttps_epi32` followed by saturating packs gives the same bytes. Blocks whose inverse
//!   scale is not finite (values near FLT_MIN) are handed to the scalar reference.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::blocks::*;
use super::legacy;

#[inline]
#[target_feature(enable = "avx2")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    _mm_cvtss_f32(m)
}

/// The 32 values of a block in four registers.
#[inline]
#[target_feature(enable = "avx2")]
fn load_block(xb: &[f32]) -> [__m256; 4] {
    assert!(xb.len() >= 32);
    // SAFETY: the assert above keeps all 32 reads inside `xb`; loadu has no alignment needs.
    unsafe { [0, 8, 16, 24].map(|o| _mm256_loadu_ps(xb.as_ptr().add(o))) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn abs4(v: &[__m256; 4]) -> [__m256; 4] {
    let sign = _mm256_set1_ps(-0.0);
    v.map(|x| _mm256_andnot_ps(sign, x))
}

/// AVX2 q8_0: identical bytes to `legacy::quantize_row_q8_0_ref`.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(out);
    let sign = _mm256_set1_ps(-0.0);
    let below_half = _mm256_set1_ps(0.499_999_97);
    let fix_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, xb) in blocks.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let v = load_block(xb);
        let a = abs4(&v);
        let amax = hmax(_mm256_max_ps(
            _mm256_max_ps(a[0], a[1]),
            _mm256_max_ps(a[2], a[3]),
        ));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            legacy::quantize_row_q8_0_ref(xb, bytemuck::bytes_of_mut(b));
            continue;
        }
        b.d = f16_from_f32(d);
        let vid = _mm256_set1_ps(id);
        let q = v.map(|xi| {
            let p = _mm256_mul_ps(xi, vid);
            let biased = _mm256_add_ps(p, _mm256_or_ps(_mm256_and_ps(p, sign), below_half));
            _mm256_cvttps_epi32(biased)
        });
        let p01 = _mm256_packs_epi32(q[0], q[1]);
        let p23 = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), fix_order);
        // SAFETY: qs is 32 bytes; storeu has no alignment needs.
        unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), bytes) };
    }
}

/// Four lanes of `c_to_i8(x * id + 8.5).min(15)`, two registers at a time.
#[inline]
#[target_feature(enable = "avx2")]
fn q4_levels(v: __m256, vid: __m256, bias: __m256, top: __m256i) -> __m256i {
    _mm256_min_epi32(
        _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, vid), bias)),
        top,
    )
}

/// AVX2 q4_0: identical bytes to `legacy::quantize_row_q4_0_ref`.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn quantize_row_q4_0(x: &[f32], out: &mut [u8]) {
    let blocks: &mut [BlockQ4_0] = bytemuck::cast_slice_mut(out);
    let bias = _mm256_set1_ps(8.5);
    let top = _mm256_set1_epi32(15);
    for (b, xb) in blocks.iter_mut().zip(x.chunks_exact(QK4_0)) {
        let v = load_block(xb);
        let a = abs4(&v);
        let amax = hmax(_mm256_max_ps(
            _mm256_max_ps(a[0], a[1]),
            _mm256_max_ps(a[2], a[3]),
        ));
        let max = if amax > 0.0 {
            let am = _mm256_set1_ps(amax);
            let mut mask = 0u32;
            for (k, ak) in a.iter().enumerate() {
                let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(*ak, am)) as u32;
                mask |= hit << (8 * k);
            }
            xb[mask.trailing_zeros() as usize]
        } else {
            0.0
        };
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            legacy::quantize_row_q4_0_ref(xb, bytemuck::bytes_of_mut(b));
            continue;
        }
        b.d = f16_from_f32(d);
        let vid = _mm256_set1_ps(id);
        let l = v.map(|xi| q4_levels(xi, vid, bias, top));
        // qs[j] = level(x[j]) | level(x[j + 16]) << 4
        let c0 = _mm256_or_si256(l[0], _mm256_slli_epi32::<4>(l[2]));
        let c1 = _mm256_or_si256(l[1], _mm256_slli_epi32::<4>(l[3]));
        let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(c0, c1));
        let bytes = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
        // SAFETY: qs is 16 bytes; storeu has no alignment needs.
        unsafe { _mm_storeu_si128(b.qs.as_mut_ptr().cast(), bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                match (i / 32) % 6 {
                    0 => 0.0,                     // all-zero block
                    1 => u * 1e-38,               // inverse scale overflows
                    2 => (u * 8.0).round() / 2.0, // ties and repeated extremes
                    3 => -0.0,
                    _ => u * 3.0,
                }
            })
            .collect()
    }

    #[test]
    fn avx2_paths_equal_the_scalar_references() {
        if !crate::cpu::has_avx2() {
            return;
        }
        for seed in 0..50 {
            let x = data(32 * 24, seed);
            let (mut a, mut b) = (vec![0u8; 24 * 34], vec![0u8; 24 * 34]);
            legacy::quantize_row_q8_0_ref(&x, &mut a);
            // SAFETY: AVX2 and F16C detected above.
            unsafe { quantize_row_q8_0(&x, &mut b) };
            assert_eq!(a, b, "q8_0 seed {seed}");
            let (mut a, mut b) = (vec![0u8; 24 * 18], vec![0u8; 24 * 18]);
            legacy::quantize_row_q4_0_ref(&x, &mut a);
            // SAFETY: as above.
            unsafe { quantize_row_q4_0(&x, &mut b) };
            assert_eq!(a, b, "q4_0 seed {seed}");
        }
    }
}
