//! Unquantized storage: f32, f16 (IEEE half, round to nearest even) and bf16 (round to nearest
//! even, as torch's `.to(torch.bfloat16)`).

use crate::qtype::QType;

#[inline(always)]
pub fn quantize_row(qtype: QType, x: &[f32], out: &mut [u8]) {
    match qtype {
        QType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        QType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        QType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => unreachable!("float::quantize_row called for {qtype:?}"),
    }
}

pub fn dequantize_row(qtype: QType, data: &[u8], out: &mut [f32]) {
    match qtype {
        QType::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QType::F16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        QType::BF16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => unreachable!("float::dequantize_row called for {qtype:?}"),
    }
}
