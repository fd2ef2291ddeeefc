//! The qtype table: one row per format with its block geometry and ggml id.

use crate::error::{Error, Result};

/// Every format ferroquant quantizes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
    TQ1_0,
    TQ2_0,
    NF4,
    FP4,
    Int8,
    Fp8E4M3,
    Fp8E5M2,
    /// The grouped integer family of GPTQ / AWQ checkpoints (`formats/gint.rs`).
    GInt(GInt),
}

/// A grouped integer format: `bits` per weight, one fp16 scale per `group` weights of a row
/// (`group` 0: one per row), and an integer zero point per group unless `sym` (then the zero is
/// `2^(bits-1)`). Named `int{bits}_g{group|ch}[_sym]`: "int4_g64", "int4_g128_sym", "int8_gch_sym".
/// `float_zero`: the zero is an fp16 value per group instead of an integer (HQQ's `(q - z) · s`),
/// named `int{bits}_g{group}_fz`: "int4_g64_fz".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GInt {
    pub bits: u8,
    pub group: u16,
    pub sym: bool,
    pub float_zero: bool,
}

impl GInt {
    /// Row lengths must be a multiple of this: the group, or (per-channel) 8, so that a row's
    /// codes fill whole bytes.
    pub fn row_unit(self) -> usize {
        if self.group == 0 {
            8
        } else {
            self.group as usize
        }
    }
}

/// How a format is laid out and which peer defines it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QTypeInfo {
    pub qtype: QType,
    /// Lower-case name used everywhere in the API.
    pub name: &'static str,
    /// Weights per block (the default block size for formats where it is a parameter).
    pub block_size: usize,
    /// Bytes per block of `data` (statistics kept beside the data are not counted here).
    pub type_size: usize,
    /// Bits per weight including per-block statistics, at the default block size.
    pub bits_per_weight: f64,
    /// GGML type id, for the formats a GGUF file can hold.
    pub ggml_id: Option<u32>,
    /// The library whose output this format matches bit for bit.
    pub peer: &'static str,
}

const fn ggml(
    qtype: QType,
    name: &'static str,
    block_size: usize,
    type_size: usize,
    id: u32,
    peer: &'static str,
) -> QTypeInfo {
    QTypeInfo {
        qtype,
        name,
        block_size,
        type_size,
        bits_per_weight: (type_size * 8) as f64 / block_size as f64,
        ggml_id: Some(id),
        peer,
    }
}

/// A grouped integer row: `block_size` is the group (32 for per-channel, the packing unit),
/// `type_size` the packed bytes of one block, bits per weight counting the fp16 scale and (not
/// `sym`) a `bits`-wide zero per group (per-channel: for a row of 4096).
const fn gint(bits: u8, group: u16, sym: bool, name: &'static str) -> QTypeInfo {
    let per = if group == 0 { 4096 } else { group as usize };
    let stat_bits = if sym { 16 } else { 16 + bits as usize };
    QTypeInfo {
        qtype: QType::GInt(GInt {
            bits,
            group,
            sym,
            float_zero: false,
        }),
        name,
        block_size: if group == 0 { 32 } else { group as usize },
        type_size: (if group == 0 { 32 } else { group as usize }) * bits as usize / 8,
        bits_per_weight: bits as f64 + stat_bits as f64 / per as f64,
        ggml_id: None,
        peer: "GPTQModel, AutoAWQ",
    }
}

/// A grouped integer row with an fp16 zero per group (`GInt::float_zero`): the hqq package's
/// `W = (q - z) · s` with fp16 scale and zero, 32 bits of statistics per group.
const fn gint_fz(bits: u8, group: u16, name: &'static str) -> QTypeInfo {
    QTypeInfo {
        qtype: QType::GInt(GInt {
            bits,
            group,
            sym: false,
            float_zero: true,
        }),
        name,
        block_size: group as usize,
        type_size: group as usize * bits as usize / 8,
        bits_per_weight: bits as f64 + 32.0 / group as f64,
        ggml_id: None,
        peer: "hqq",
    }
}

/// The table, in the order `fq.qtypes()` lists it.
pub const QTYPES: [QTypeInfo; 59] = [
    ggml(QType::F32, "f32", 1, 4, 0, "numpy"),
    ggml(QType::F16, "f16", 1, 2, 1, "numpy"),
    ggml(QType::BF16, "bf16", 1, 2, 30, "torch"),
    ggml(QType::Q4_0, "q4_0", 32, 18, 2, "gguf-py, libggml"),
    ggml(QType::Q4_1, "q4_1", 32, 20, 3, "gguf-py, libggml"),
    ggml(QType::Q5_0, "q5_0", 32, 22, 6, "gguf-py, libggml"),
    ggml(QType::Q5_1, "q5_1", 32, 24, 7, "gguf-py, libggml"),
    ggml(QType::Q8_0, "q8_0", 32, 34, 8, "gguf-py, libggml"),
    ggml(QType::Q2K, "q2_k", 256, 84, 10, "libggml"),
    ggml(QType::Q3K, "q3_k", 256, 110, 11, "libggml"),
    ggml(QType::Q4K, "q4_k", 256, 144, 12, "libggml"),
    ggml(QType::Q5K, "q5_k", 256, 176, 13, "libggml"),
    ggml(QType::Q6K, "q6_k", 256, 210, 14, "libggml"),
    ggml(QType::IQ4NL, "iq4_nl", 32, 18, 20, "libggml"),
    ggml(QType::IQ4XS, "iq4_xs", 256, 136, 23, "libggml"),
    ggml(QType::TQ1_0, "tq1_0", 256, 54, 34, "gguf-py, libggml"),
    ggml(QType::TQ2_0, "tq2_0", 256, 66, 35, "gguf-py, libggml"),
    // bitsandbytes 4-bit: 32 packed bytes per 64 weights plus an fp32 absmax per block.
    QTypeInfo {
        qtype: QType::NF4,
        name: "nf4",
        block_size: 64,
        type_size: 32,
        bits_per_weight: 4.5,
        ggml_id: None,
        peer: "bitsandbytes",
    },
    QTypeInfo {
        qtype: QType::FP4,
        name: "fp4",
        block_size: 64,
        type_size: 32,
        bits_per_weight: 4.5,
        ggml_id: None,
        peer: "bitsandbytes",
    },
    // int8 / fp8: one byte per weight plus an fp32 scale per block (default: per row, given
    // here for a block of 4096 weights).
    QTypeInfo {
        qtype: QType::Int8,
        name: "int8",
        block_size: 64,
        type_size: 64,
        bits_per_weight: 8.5,
        ggml_id: None,
        peer: "torch",
    },
    QTypeInfo {
        qtype: QType::Fp8E4M3,
        name: "fp8_e4m3",
        block_size: 1,
        type_size: 1,
        bits_per_weight: 8.0,
        ggml_id: None,
        peer: "torch",
    },
    QTypeInfo {
        qtype: QType::Fp8E5M2,
        name: "fp8_e5m2",
        block_size: 1,
        type_size: 1,
        bits_per_weight: 8.0,
        ggml_id: None,
        peer: "torch",
    },
    // Grouped integers (GPTQ / AWQ): 8 bits only symmetric (`q - zero` must fit the int8 kernel).
    gint(2, 32, false, "int2_g32"),
    gint(2, 32, true, "int2_g32_sym"),
    gint(2, 64, false, "int2_g64"),
    gint(2, 64, true, "int2_g64_sym"),
    gint(2, 128, false, "int2_g128"),
    gint(2, 128, true, "int2_g128_sym"),
    gint(2, 0, false, "int2_gch"),
    gint(2, 0, true, "int2_gch_sym"),
    gint(3, 32, false, "int3_g32"),
    gint(3, 32, true, "int3_g32_sym"),
    gint(3, 64, false, "int3_g64"),
    gint(3, 64, true, "int3_g64_sym"),
    gint(3, 128, false, "int3_g128"),
    gint(3, 128, true, "int3_g128_sym"),
    gint(3, 0, false, "int3_gch"),
    gint(3, 0, true, "int3_gch_sym"),
    gint(4, 32, false, "int4_g32"),
    gint(4, 32, true, "int4_g32_sym"),
    gint(4, 64, false, "int4_g64"),
    gint(4, 64, true, "int4_g64_sym"),
    gint(4, 128, false, "int4_g128"),
    gint(4, 128, true, "int4_g128_sym"),
    gint(4, 0, false, "int4_gch"),
    gint(4, 0, true, "int4_gch_sym"),
    gint(8, 32, true, "int8_g32_sym"),
    gint(8, 64, true, "int8_g64_sym"),
    gint(8, 128, true, "int8_g128_sym"),
    gint(8, 0, true, "int8_gch_sym"),
    // fp16 zeros (HQQ's stored form): 2-4 bits, whole groups only.
    gint_fz(2, 32, "int2_g32_fz"),
    gint_fz(2, 64, "int2_g64_fz"),
    gint_fz(2, 128, "int2_g128_fz"),
    gint_fz(3, 32, "int3_g32_fz"),
    gint_fz(3, 64, "int3_g64_fz"),
    gint_fz(3, 128, "int3_g128_fz"),
    gint_fz(4, 32, "int4_g32_fz"),
    gint_fz(4, 64, "int4_g64_fz"),
    gint_fz(4, 128, "int4_g128_fz"),
];

impl QType {
    pub fn info(self) -> &'static QTypeInfo {
        QTYPES
            .iter()
            .find(|i| i.qtype == self)
            .expect("every QType has a row in QTYPES")
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Parse a lower-case qtype name (upper case is accepted too, as llama.cpp spells them).
    pub fn parse(name: &str) -> Result<QType> {
        let lower = name.to_ascii_lowercase();
        QTYPES
            .iter()
            .find(|i| i.name == lower)
            .map(|i| i.qtype)
            .ok_or_else(|| {
                let known: Vec<&str> = QTYPES.iter().map(|i| i.name).collect();
                Error::UnknownQType(name.to_string(), known.join(" "))
            })
    }

    pub fn from_ggml_id(id: u32) -> Option<QType> {
        QTYPES
            .iter()
            .find(|i| i.ggml_id == Some(id))
            .map(|i| i.qtype)
    }

    /// The grouped integer parameters, for the `GInt` family.
    pub fn gint(self) -> Option<GInt> {
        match self {
            QType::GInt(g) => Some(g),
            _ => None,
        }
    }

    /// True for the formats whose `data` is ggml's block layout (no statistics beside it).
    pub fn is_ggml(self) -> bool {
        self.info().ggml_id.is_some()
    }

    /// Bytes of `data` for one row of `cols` weights (ggml formats and the byte-per-weight ones).
    pub fn row_bytes(self, cols: usize, block_size: usize) -> usize {
        match self {
            QType::NF4 | QType::FP4 => cols / 2,
            QType::Int8 | QType::Fp8E4M3 | QType::Fp8E5M2 => cols,
            QType::GInt(g) => cols * g.bits as usize / 8,
            _ => cols / block_size * self.info().type_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_ids_are_unique() {
        for info in QTYPES.iter() {
            assert_eq!(QType::parse(info.name).unwrap(), info.qtype);
            assert_eq!(info.qtype.info().name, info.name);
            if let Some(id) = info.ggml_id {
                assert_eq!(QType::from_ggml_id(id), Some(info.qtype));
            }
        }
        assert!(matches!(QType::parse("q9_9"), Err(Error::UnknownQType(..))));
        assert_eq!(QType::parse("Q4_K").unwrap(), QType::Q4K);
    }
}
