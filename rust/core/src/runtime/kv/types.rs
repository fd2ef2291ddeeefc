//! The cache types and the bytes each stores per token (docs/kv.md).

use crate::error::{Error, Result};

/// Values per block of the per-token types (along head_dim of one token and head), and the
/// positions of their pages.
pub const GROUP: usize = 32;

/// KIVI's group: a key block holds one channel over this many tokens, a value block one token's
/// head over this many channels; it is also the KIVI pages' positions and the residual's
/// length R. 64 makes int4 4.5 bits per value (a f16 scale and zero per 64), q4_0's size.
pub const KIVI_GROUP: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvType {
    F32,
    F16,
    Q8_0,
    Fp8E4m3,
    Q4_0,
    Int4,
    Int2,
}

pub const ALL: [KvType; 7] = [
    KvType::F32,
    KvType::F16,
    KvType::Q8_0,
    KvType::Fp8E4m3,
    KvType::Q4_0,
    KvType::Int4,
    KvType::Int2,
];

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Fp8E4m3 => "fp8_e4m3",
            KvType::Q4_0 => "q4_0",
            KvType::Int4 => "int4",
            KvType::Int2 => "int2",
        }
    }

    pub fn parse(s: &str) -> Result<KvType> {
        ALL.iter().copied().find(|t| t.name() == s).ok_or_else(|| {
            let known: Vec<&str> = ALL.iter().map(|t| t.name()).collect();
            Error::InvalidArgument(format!(
                "unknown kv_type {s:?}; known kv types: {}",
                known.join(", ")
            ))
        })
    }

    /// Values per block: 32, or KIVI_GROUP for the KIVI types.
    pub fn block_len(self) -> usize {
        if self.is_kivi() {
            KIVI_GROUP
        } else {
            GROUP
        }
    }

    /// Positions per page (and, for KIVI, of the full-precision residual).
    pub fn page_len(self) -> usize {
        self.block_len()
    }

    /// Bytes of one block of `block_len` values.
    pub fn block_bytes(self) -> usize {
        match self {
            KvType::F32 => 128,
            KvType::F16 => 64,
            KvType::Q8_0 => 34,
            KvType::Fp8E4m3 => 36,
            KvType::Q4_0 => 18,
            KvType::Int4 | KvType::Int2 => {
                KIVI_GROUP * self.kivi_bits().unwrap_or(4) as usize / 8 + 4
            }
        }
    }

    /// Whether the cache rotates K, V (and the query) per head with a Walsh-Hadamard transform
    /// by default (docs/kv.md, "Rotation"): the low-bit types.
    pub fn default_rotation(self) -> Rotation {
        match self {
            KvType::Q4_0 | KvType::Int2 => Rotation::Both,
            _ => Rotation::Off,
        }
    }

    /// Bits of the KIVI types (keys per channel over token groups, values per token).
    pub fn kivi_bits(self) -> Option<u32> {
        match self {
            KvType::Int4 => Some(4),
            KvType::Int2 => Some(2),
            _ => None,
        }
    }

    pub fn is_kivi(self) -> bool {
        self.kivi_bits().is_some()
    }

    /// `n_layer * 2 * (kv_dim / block_len) * block_bytes`: the cache's bytes per token (KIVI:
    /// without the f16 residual of the last, incomplete group).
    pub fn bytes_per_token(self, g: &Geometry) -> usize {
        g.n_layer * 2 * (g.kv_dim() / self.block_len()) * self.block_bytes()
    }
}

/// Which rows the cache rotates per head (rotate.rs, docs/kv.md "Rotation"): none, the values
/// only (the output is rotated back), or keys and values (the query is rotated too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    Off,
    Values,
    Both,
}

impl Rotation {
    pub fn keys(self) -> bool {
        self == Rotation::Both
    }
    pub fn values(self) -> bool {
        self != Rotation::Off
    }
    pub fn any(self) -> bool {
        self != Rotation::Off
    }
    pub fn name(self) -> &'static str {
        match self {
            Rotation::Off => "off",
            Rotation::Values => "values",
            Rotation::Both => "on",
        }
    }
}

impl From<bool> for Rotation {
    fn from(on: bool) -> Rotation {
        if on {
            Rotation::Both
        } else {
            Rotation::Off
        }
    }
}

/// A cache type and its rotation (None: the type's default where head_dim allows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSpec {
    pub kv: KvType,
    pub rotate: Option<Rotation>,
}

impl From<KvType> for KvSpec {
    fn from(kv: KvType) -> KvSpec {
        KvSpec { kv, rotate: None }
    }
}

/// The cache's shape: layers, key/value heads and their width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

impl Geometry {
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Every type stores whole blocks along head_dim (32 values; KIVI: KIVI_GROUP).
    pub fn check(&self, t: KvType) -> Result<()> {
        let n = t.block_len();
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(n) {
            return Err(Error::InvalidArgument(format!(
                "kv_type {} needs head_dim divisible by {n}, the model has head_dim {}",
                t.name(),
                self.head_dim
            )));
        }
        Ok(())
    }

    /// The rotation is a Walsh-Hadamard transform of each head: head_dim a power of two.
    pub fn check_rotation(&self, t: KvType) -> Result<()> {
        if !self.head_dim.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "kv_rotation for kv_type {} needs head_dim a power of two, the model has \
                 head_dim {}",
                t.name(),
                self.head_dim
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_bytes_per_token() {
        let g = Geometry {
            n_layer: 30,
            n_head_kv: 3,
            head_dim: 64,
        };
        let want = [46080, 23040, 12240, 12960, 6480, 6480, 3600];
        for (t, w) in ALL.iter().zip(want) {
            assert_eq!(t.bytes_per_token(&g), w, "{}", t.name());
            assert_eq!(KvType::parse(t.name()).unwrap(), *t);
        }
        assert!(KvType::parse("int3")
            .unwrap_err()
            .to_string()
            .contains("int3"));
    }
}
