//! `decode` against the scalar dequantizer: every element of every format equals
//! `round_bf16(formats::ggml_dequantize_row(..))` bit for bit, on random blocks (random bytes,
//! the scales random f16 bit patterns, sane values, or extremes: ±65504, ±inf, NaN, the
//! smallest subnormal and normal, zero), for runs of 1 to 9 blocks from any block of a row
//! (the GEMM's partial chunks).

use super::*;
use crate::formats::blocks::f16_from_f32;
use crate::formats::ggml_dequantize_row;
use crate::matmul::reference::bf16::round_bf16;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Byte offsets of each format's f16 scales in a block.
fn halves(qtype: QType) -> &'static [usize] {
    match qtype {
        QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
        QType::Q2K => &[80, 82],
        QType::Q3K => &[108],
        QType::Q6K => &[208],
        _ => &[0],
    }
}

/// One f16 scale: a random bit pattern, a sane value, or an extreme.
fn scale(rng: &mut Rng) -> [u8; 2] {
    const EXTREMES: [u16; 10] = [
        0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0x0001, 0x8001, 0x0400, 0x0000, 0x8000,
    ];
    let r = rng.next();
    match r % 4 {
        0 => (r >> 16) as u16,
        1 => EXTREMES[(r >> 16) as usize % EXTREMES.len()],
        _ => u16::from_le_bytes(f16_from_f32(((r >> 20) as i32 % 2001 - 1000) as f32 * 1e-5)),
    }
    .to_le_bytes()
}

pub(crate) const FORMATS: [QType; 12] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::IQ4NL,
    QType::Q2K,
    QType::Q3K,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
    QType::IQ4XS,
];

#[test]
fn decode_equals_the_rounded_scalar_dequantizer() {
    if !crate::cpu::has_avx512_bf16() {
        return;
    }
    let mut rng = Rng(0xdec0_de16_9919_0001);
    for qtype in FORMATS {
        assert!(takes(qtype));
        let info = qtype.info();
        let (bs, ts) = (info.block_size, info.type_size);
        let nb = 24;
        for trial in 0..40 {
            let mut data: Vec<u8> = (0..nb * ts).map(|_| rng.next() as u8).collect();
            for b in 0..nb {
                for &o in halves(qtype) {
                    let h = scale(&mut rng);
                    data[b * ts + o..b * ts + o + 2].copy_from_slice(&h);
                }
            }
            let mut want = vec![0f32; nb * bs];
            ggml_dequantize_row(qtype, &data, &mut want);
            // A run of blocks from any block (every run of the row once over the trials).
            let b0 = trial % nb;
            let len = 1 + (trial * 7 + 3) % 9.min(nb - b0);
            let bytes = &data[b0 * ts..(b0 + len) * ts];
            let mut got = vec![0xa5a5u16; len * bs + 32];
            // SAFETY: AVX-512 BF16 checked above; whole blocks, room for their elements.
            unsafe { decode(qtype, bytes, &mut got) };
            for (e, (&g, &w)) in got.iter().zip(&want[b0 * bs..]).take(len * bs).enumerate() {
                assert_eq!(
                    g,
                    round_bf16(w),
                    "{qtype:?} block {} element {}: {w:e}",
                    b0 + e / bs,
                    e % bs
                );
            }
            // Nothing past the run is written.
            assert!(got[len * bs..].iter().all(|&g| g == 0xa5a5), "{qtype:?}");
        }
    }
}

/// Every code of every sub-block reaches its own table entry: blocks whose code bytes are a
/// ramp (each byte value once over the block set) with exact power-of-two scales.
#[test]
fn decode_covers_every_code() {
    if !crate::cpu::has_avx512_bf16() {
        return;
    }
    for qtype in FORMATS {
        let info = qtype.info();
        let (bs, ts) = (info.block_size, info.type_size);
        let nb = 256usize.div_ceil(ts) + 2;
        let mut data: Vec<u8> = (0..nb * ts).map(|i| (i * 37 + i / 251) as u8).collect();
        for b in 0..nb {
            for (j, &o) in halves(qtype).iter().enumerate() {
                let s = f16_from_f32(if j == 0 { 0.5 } else { -0.25 });
                data[b * ts + o..b * ts + o + 2].copy_from_slice(&s);
            }
        }
        let mut want = vec![0f32; nb * bs];
        ggml_dequantize_row(qtype, &data, &mut want);
        let mut got = vec![0u16; nb * bs];
        // SAFETY: AVX-512 BF16 checked above; whole blocks, room for their elements.
        unsafe { decode(qtype, &data, &mut got) };
        for (e, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, round_bf16(w), "{qtype:?} element {e}: {w:e}");
        }
    }
}

/// `block_geometry` is the format table's block size and byte size.
#[test]
fn block_geometry_is_the_format_table() {
    for qtype in FORMATS {
        let info = qtype.info();
        assert_eq!(
            block_geometry(qtype),
            (info.block_size, info.type_size),
            "{qtype:?}"
        );
        assert!(info.block_size.is_power_of_two());
    }
}
