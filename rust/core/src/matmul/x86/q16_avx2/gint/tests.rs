//! `dot_gint_avx2` against the decoded path's reference (`formats::gint::decode_row_i8` then
//! `reference::q16::dot_int8_q16`), bit for bit: 4 and 8 bits, symmetric, integer and float
//! zeros, groups of 32 .. 128 and of the whole row, K of one unit, odd unit counts and past
//! `LONG_K`, codes and zeros at their limits, activations at ±32767, non-finite scales.
//! Through `qmatmul` (pool and one thread) it runs in `matmul/tests/gint.rs`.

use super::{dot_gint_avx2, takes, LONG_K};
use crate::formats::gint;
use crate::matmul::reference::q16::{dot_int8_q16, q16_row_len, Q16};
use crate::qtype::GInt;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f32 {
        self.below(1 << 24) as f32 / (1 << 24) as f32
    }
}

fn want(g: GInt, row: &[u8], st: &[f32], k: usize, xq: &[i16], xd: &[f32]) -> f32 {
    let gl = gint::group_len(g, k);
    let (mut w8, mut sc) = (vec![0u8; k], vec![0f32; k / gl]);
    gint::decode_row_i8(g, row, st, k, &mut w8, &mut sc);
    dot_int8_q16(&w8, &sc, gl, xq, xd)
}

/// mode 0: random; 1: codes, zeros and activations at their limits; 2: one scale infinite.
fn case(rng: &mut Rng, g: GInt, k: usize, mode: u32) {
    let gl = gint::group_len(g, k);
    let groups = k / gl;
    let maxq = (1u64 << g.bits) - 1;
    let row: Vec<u8> = (0..k * g.bits as usize / 8)
        .map(|_| match mode {
            1 => [0u8, 255, 0xf0, 0x0f][rng.below(4) as usize],
            _ => rng.below(256) as u8,
        })
        .collect();
    let mut st: Vec<f32> = (0..groups).map(|_| 1e-3 + rng.unit() * 0.05).collect();
    if !g.sym {
        st.extend((0..groups).map(|_| {
            let z = match mode {
                1 => [0, maxq][rng.below(2) as usize] as f32,
                _ => rng.below(maxq + 1) as f32,
            };
            // float zeros: any value, rounded by `int_zero`
            if g.float_zero {
                z + rng.unit() - 0.5
            } else {
                z
            }
        }));
    }
    if mode == 2 {
        st[rng.below(groups as u64) as usize] = f32::INFINITY;
    }
    let len = q16_row_len(k);
    let xq: Vec<i16> = (0..len)
        .map(|e| match (e < k, mode) {
            (false, _) => 0,
            (true, 1) => [32767i16, -32767][rng.below(2) as usize],
            _ => (rng.below(65535) as i32 - 32767) as i16,
        })
        .collect();
    let xd: Vec<f32> = (0..len / Q16).map(|_| rng.unit() * 1e-4).collect();
    assert!(takes(g, k));
    // SAFETY: AVX2 and FMA checked by the caller; `takes` holds.
    let got = unsafe { dot_gint_avx2(g, &row, &st, k, &xq, &xd) };
    let want = want(g, &row, &st, k, &xq, &xd);
    assert!(
        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
        "{g:?} k={k} mode={mode}: {got} vs {want}"
    );
}

#[test]
fn gint_avx2_equals_the_decoded_reference() {
    if !(crate::cpu::has_avx2() && crate::cpu::has_fma()) {
        return;
    }
    let mut rng = Rng(0x5eed_0021_0000_00f1);
    let mut ran = 0;
    for bits in [4u8, 8] {
        for (group, sym, float_zero) in [
            (64u16, false, false),
            (64, true, false),
            (32, false, false),
            (128, true, false),
            (0, false, false),
            (0, true, false),
            (64, false, true),
        ] {
            let g = GInt {
                bits,
                group,
                sym,
                float_zero,
            };
            for k in [32usize, 64, 96, 128, 416, 4096, LONG_K + 128, 14336] {
                if !k.is_multiple_of(gint::group_len(g, k)) || !takes(g, k) {
                    continue;
                }
                for mode in 0..3 {
                    case(&mut rng, g, k, mode);
                    ran += 1;
                }
            }
        }
    }
    assert!(ran > 150, "{ran} cases");
}

#[test]
fn gint_avx2_takes_whole_units_inside_groups() {
    let g = |bits, group| GInt {
        bits,
        group,
        sym: true,
        float_zero: false,
    };
    assert!(takes(g(4, 64), 4096));
    assert!(takes(g(8, 0), 96));
    assert!(!takes(g(4, 0), 40)); // a partial unit
    assert!(!takes(g(2, 64), 4096)); // 2 bits: the decoded path
    assert!(!takes(g(4, 16), 4096)); // a unit over two groups
    assert!(!takes(g(4, 96), 4224)); // groups not a power of two
}
