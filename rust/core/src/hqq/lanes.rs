//! Group-major blocks: 16 groups side by side, one group per vector lane, so that every per-group
//! quantity (scale, zero, the sums) is one vector and the loops over a group's weights need no
//! horizontal reduction and no broadcast. A block stores weight `j` of lane `l` at `j * 16 + l`.
//! Each lane runs exactly the scalar code's operations on its own group, in the same order (the
//! 8 interleaved partial sums of the module comment included), so a lane's results are the
//! scalar results bit for bit; only the layout differs.

/// Groups per block (one 512-bit vector of f32).
pub const LANES: usize = 16;

/// A value per lane.
pub type V = [f32; LANES];

/// Groups `[first, first + 16)` of `w` (groups of `group`) transposed into `out`
/// (`group * 16`); lanes past the last group repeat it (finite data whose results are dropped).
pub fn transpose_block(w: &[f32], group: usize, first: usize, out: &mut [f32]) {
    let n = w.len() / group;
    for l in 0..LANES {
        let k = (first + l).min(n - 1);
        let x = &w[k * group..(k + 1) * group];
        for (j, &v) in x.iter().enumerate() {
            out[j * LANES + l] = v;
        }
    }
}

/// Per lane, groups `[first, first + 16)` of a per-group vector (repeating the last one).
#[inline(always)]
pub fn gather(v: &[f32], first: usize) -> V {
    let mut o = [0f32; LANES];
    for (l, x) in o.iter_mut().enumerate() {
        *x = v[(first + l).min(v.len() - 1)];
    }
    o
}

/// The fp16 value of `x` as f32 (`half::f16::from_f32(x).to_f32()`, round to nearest even,
/// overflow to infinity), without a call: inlined into the lane loops it vectorises.
#[inline(always)]
pub fn f16_round(x: f32) -> f32 {
    const SUB: f32 = 16_777_216.0; // 2^24: fp16 subnormals are multiples of 2^-24
    let a = x.abs();
    let b = x.to_bits();
    // normal: round the mantissa to 10 bits (ties to even; a carry moves the exponent)
    let normal = f32::from_bits(b.wrapping_add(0x0fff + ((b >> 13) & 1)) & !0x1fff);
    // subnormal: exact scaling by powers of two around one rounding
    let sub = (x * SUB).round_ties_even() * (1.0 / SUB);
    let v = if a < 6.103_515_6e-5 { sub } else { normal };
    // 65520 is the midpoint between 65504 and 2^16: ties to even go up, to infinity
    if a >= 65520.0 {
        f32::INFINITY.copysign(x)
    } else {
        v
    }
}

/// The 8 interleaved partial sums combined in the module comment's tree, per lane.
#[inline(always)]
pub fn tree_sum(a: &[V; 8]) -> V {
    let mut o = [0f32; LANES];
    for (l, x) in o.iter_mut().enumerate() {
        *x = ((a[0][l] + a[1][l]) + (a[2][l] + a[3][l]))
            + ((a[4][l] + a[5][l]) + (a[6][l] + a[7][l]));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_is_halfs_rounding() {
        let check = |x: f32| {
            let want = half::f16::from_f32(x).to_f32();
            assert_eq!(
                f16_round(x).to_bits(),
                want.to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        };
        // every exponent, the mantissas around the rounding points, both signs
        for e in 0u32..255 {
            for m in [
                0u32, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0x7f_e000, 0x7f_f000,
                0x7f_ffff, 0x55_5555, 0x2a_aaaa,
            ] {
                for sign in [0u32, 1 << 31] {
                    check(f32::from_bits(sign | e << 23 | m));
                }
            }
        }
        for x in [
            65504.0f32,
            65519.99,
            65520.0,
            65536.0,
            6.1035156e-5,
            6.1035e-5,
            5.96e-8,
            2.98e-8,
            2.9802322e-8,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            check(x);
        }
        // and a pseudo-random sample of all finite bit patterns
        let mut s = 0x9E37_79B9u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            if x.is_finite() {
                check(x);
            }
        }
    }
}
