//! fp8_e4m3 (torch.float8_e4m3fn) and fp8_e5m2 (torch.float8_e5m2) with a float32 scale per
//! tensor, row or block.
//!
//! Defined as this torch expression on the input converted to float32 (exact for float16 and
//! bfloat16), `fmax` = 448 (e4m3fn) or 57344 (e5m2), `amax` over the tensor / row / block:
//!
//! ```text
//! scale = amax / fmax                                  # float32 division
//! scale = torch.where(scale == 0, 1.0, scale)          # all-zero group: scale 1, stores 0
//! q     = (x / scale).to(torch.float8_e4m3fn)          # or float8_e5m2
//! x'    = q.to(torch.float32) * scale
//! ```
//!
//! The casts are c10's `fp8e4m3fn_from_fp32_value` / `fp8e5m2_from_fp32_value` of torch 2.15:
//! round to nearest even; e4m3fn has no infinity and saturates (a magnitude above 464,
//! infinity included, becomes 448; NaN stays NaN, 0x7f), while e5m2 turns 61440 or more into
//! infinity. (Older torch versions turned e4m3fn overflow into NaN.) With
//! `scale = amax / fmax` a scaled value can only exceed fmax by the rounding of the two
//! divisions (x = amax gives fmax or the next float32 above it, which rounds back to fmax),
//! except when the scale is a subnormal float32 that lost precision; the cast then behaves
//! exactly as torch's does.
//! Layout and block_size as for int8 (see int8.rs).

use super::int8::{dequantize_scaled, quantize_scaled};
use crate::error::Result;
use crate::formats::tensor::{Quantized, QuantizedView, ScaleMode};
use crate::input::Matrix;
use crate::qtype::QType;

/// Largest finite value of the format.
pub fn fmax(qtype: QType) -> f32 {
    match qtype {
        QType::Fp8E5M2 => 57344.0,
        _ => 448.0,
    }
}

/// c10::Float8_e4m3fn from float32 (torch 2.15: saturating, NaN stays NaN).
pub fn e4m3fn_from_f32(f: f32) -> u8 {
    const FP8_MAX: u32 = 1087 << 20; // 480.0, the first magnitude past the format
    const DENORM_MASK: u32 = 141 << 23;
    let mut bits = f.to_bits();
    let sign = bits & 0x8000_0000;
    bits ^= sign;
    let result = if bits >= FP8_MAX {
        if bits > 0x7f80_0000 {
            0x7f // NaN
        } else {
            0x7e // finite overflow or infinity saturates to 448
        }
    } else if bits < (121 << 23) {
        // below 2^-6, the smallest normal: let the float32 adder round to the denormal grid
        let sum = f32::from_bits(bits) + f32::from_bits(DENORM_MASK);
        (sum.to_bits() - DENORM_MASK) as u8
    } else {
        let mant_odd = (bits >> 20) & 1;
        let b = bits
            .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7ffff))
            .wrapping_add(mant_odd);
        // rounding up into the NaN pattern (values in (464, 480)) saturates to 448
        ((b >> 20) as u8).min(0x7e)
    };
    result | (sign >> 24) as u8
}

/// c10::Float8_e5m2 from float32.
pub fn e5m2_from_f32(f: f32) -> u8 {
    const FP32_INF: u32 = 255 << 23;
    const FP8_MAX: u32 = 143 << 23; // 65536.0
    const DENORM_MASK: u32 = 134 << 23;
    let mut bits = f.to_bits();
    let sign = bits & 0x8000_0000;
    bits ^= sign;
    let result = if bits >= FP8_MAX {
        if bits > FP32_INF {
            0x7f
        } else {
            0x7c
        }
    } else if bits < (113 << 23) {
        let sum = f32::from_bits(bits) + f32::from_bits(DENORM_MASK);
        (sum.to_bits() - DENORM_MASK) as u8
    } else {
        let mant_odd = (bits >> 21) & 1;
        let b = bits
            .wrapping_add(((15u32).wrapping_sub(127) << 23).wrapping_add(0xfffff))
            .wrapping_add(mant_odd);
        (b >> 21) as u8
    };
    result | (sign >> 24) as u8
}

/// float8_e4m3fn to float32 (exact; 0x7f / 0xff are NaN).
pub fn e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN.copysign(sign);
    }
    let mag = if e == 0 {
        m * (2f32).powi(-9)
    } else {
        (1.0 + m / 8.0) * (2f32).powi(e - 7)
    };
    sign * mag
}

/// float8_e5m2 to float32 (exact): the upper byte of a float16.
pub fn e5m2_to_f32(b: u8) -> f32 {
    half::f16::from_bits((b as u16) << 8).to_f32()
}

/// The scale of a group whose largest magnitude is `amax` (1 when amax / fmax is 0).
pub fn scale_of(qtype: QType, amax: f32) -> f32 {
    let s = amax / fmax(qtype);
    if s == 0.0 {
        1.0
    } else {
        s
    }
}

/// One stored byte: `(x / scale).to(float8)`.
pub fn quantize_value(qtype: QType, x: f32, scale: f32) -> u8 {
    let v = x / scale;
    match qtype {
        QType::Fp8E5M2 => e5m2_from_f32(v),
        _ => e4m3fn_from_f32(v),
    }
}

pub fn quantize(
    m: &Matrix<'_>,
    qtype: QType,
    mode: ScaleMode,
    block_size: usize,
) -> Result<Quantized> {
    quantize_scaled(
        m,
        qtype,
        mode,
        block_size,
        |a| scale_of(qtype, a),
        |x, s| quantize_value(qtype, x, s),
    )
}

pub fn dequantize(q: &QuantizedView<'_>, out: &mut [f32]) -> Result<()> {
    match q.qtype {
        QType::Fp8E5M2 => dequantize_scaled(q, out, e5m2_to_f32),
        _ => dequantize_scaled(q, out, e4m3fn_to_f32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips_through_f32() {
        for b in 0..=255u8 {
            let f = e4m3fn_to_f32(b);
            if f.is_nan() {
                assert_eq!(b & 0x7f, 0x7f);
            } else {
                assert_eq!(e4m3fn_from_f32(f), b, "e4m3 {b:#x} {f}");
            }
            let g = e5m2_to_f32(b);
            if !g.is_nan() {
                assert_eq!(e5m2_from_f32(g), b, "e5m2 {b:#x} {g}");
            }
        }
    }

    #[test]
    fn rounding_ties_even_and_overflow() {
        assert_eq!(e4m3fn_from_f32(448.0), 0x7e);
        assert_eq!(e4m3fn_from_f32(464.0), 0x7e); // tie between 448 and 480: even mantissa
        assert_eq!(e4m3fn_from_f32(479.0), 0x7e); // would round to 480: saturates
        assert_eq!(e4m3fn_from_f32(-1000.0), 0xfe);
        assert_eq!(e4m3fn_from_f32(f32::INFINITY), 0x7e);
        assert_eq!(e4m3fn_from_f32(f32::NAN), 0x7f);
        assert_eq!(e4m3fn_from_f32(1.0625), 0x38); // tie between 1 and 1.125
        assert_eq!(e4m3fn_from_f32(2f32.powi(-10)), 0x00); // half the smallest denormal
        assert_eq!(e4m3fn_from_f32(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(e5m2_from_f32(57344.0), 0x7b);
        assert_eq!(e5m2_from_f32(61440.0), 0x7c); // tie rounds to the even code: infinity
        assert_eq!(e5m2_from_f32(-0.0), 0x80);
    }

    #[test]
    fn amax_maps_to_fmax() {
        for qt in [QType::Fp8E4M3, QType::Fp8E5M2] {
            for amax in [1e-3f32, 0.7, 3.0, 1234.5, 3e30] {
                let s = scale_of(qt, amax);
                let b = quantize_value(qt, amax, s);
                let back = match qt {
                    QType::Fp8E5M2 => e5m2_to_f32(b),
                    _ => e4m3fn_to_f32(b),
                };
                assert_eq!(back, fmax(qt), "{qt:?} {amax}");
            }
            assert_eq!(scale_of(qt, 0.0), 1.0);
        }
    }
}
