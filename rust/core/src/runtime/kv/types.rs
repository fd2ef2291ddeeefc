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

/// Most attention sinks a KIVI sequence keeps (they must leave page 0 positions to quantize).
pub const MAX_SINKS: usize = KIVI_GROUP - 1;

/// Most full-precision recent positions a KIVI sequence keeps before quantizing a page.
pub const MAX_RESIDUAL: usize = 1 << 20;

/// KIVI's full-precision parts of one sequence (docs/kv.md, "KIVI sinks and residual"):
/// `sinks`, its first positions, kept in f16 for good (attended in f16 and left out of page 0's
/// key range); `residual`, how many newer positions must exist before a complete page of
/// KIVI_GROUP positions is quantized (so the f16 rows hold `residual` to `residual + 63`
/// positions). Both 0 for the per-token types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub sinks: usize,
    pub residual: usize,
}

impl Window {
    /// The type's default: int2 keeps 4 sinks and 128 positions (session 11's simulation:
    /// +22.6 % -> +2.3 % perplexity at ctx 2048), int4 neither (it meets +1 % without).
    pub fn default_for(kv: KvType) -> Window {
        match kv {
            KvType::Int2 => Window {
                sinks: 4,
                residual: 128,
            },
            _ => Window::default(),
        }
    }

    /// `kv`'s window: the defaults, overridden by `sinks` / `residual` (KIVI types only).
    pub fn resolve(kv: KvType, sinks: Option<usize>, residual: Option<usize>) -> Result<Window> {
        let d = Window::default_for(kv);
        if !kv.is_kivi() && (sinks.unwrap_or(0) > 0 || residual.unwrap_or(0) > 0) {
            return Err(Error::InvalidArgument(format!(
                "kv_sinks / kv_residual apply to the KIVI types (int4, int2), not kv_type {}",
                kv.name()
            )));
        }
        let w = Window {
            sinks: sinks.unwrap_or(d.sinks),
            residual: residual.unwrap_or(d.residual),
        };
        if w.sinks > MAX_SINKS {
            return Err(Error::InvalidArgument(format!(
                "kv_sinks must be 0 to {MAX_SINKS} (page 0 needs a position to quantize), got {}",
                w.sinks
            )));
        }
        if w.residual > MAX_RESIDUAL {
            return Err(Error::InvalidArgument(format!(
                "kv_residual must be 0 to {MAX_RESIDUAL}, got {}",
                w.residual
            )));
        }
        Ok(w)
    }

    /// Positions `0..quantized(n)` of a sequence of `n` are in quantized KIVI pages: the
    /// complete pages with at least `residual` newer positions.
    pub fn quantized(&self, n: usize) -> usize {
        n.saturating_sub(self.residual) / KIVI_GROUP * KIVI_GROUP
    }
}

/// A cache type, its rotation (None: the type's default where head_dim allows it) and, for the
/// KIVI types, its sinks and residual (None: the type's default, `Window::default_for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSpec {
    pub kv: KvType,
    pub rotate: Option<Rotation>,
    pub sinks: Option<usize>,
    pub residual: Option<usize>,
}

impl From<KvType> for KvSpec {
    fn from(kv: KvType) -> KvSpec {
        KvSpec {
            kv,
            rotate: None,
            sinks: None,
            residual: None,
        }
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

    #[test]
    fn windows_resolve_and_refuse_clearly() {
        let w = |sinks, residual| Window { sinks, residual };
        assert_eq!(
            Window::resolve(KvType::Int2, None, None).unwrap(),
            w(4, 128)
        );
        assert_eq!(Window::resolve(KvType::Int4, None, None).unwrap(), w(0, 0));
        assert_eq!(
            Window::resolve(KvType::Int2, Some(0), Some(64)).unwrap(),
            w(0, 64)
        );
        assert_eq!(
            Window::resolve(KvType::F16, Some(0), None).unwrap(),
            w(0, 0)
        );
        let err = |kv, s, r| Window::resolve(kv, s, r).unwrap_err().to_string();
        assert!(err(KvType::Q8_0, Some(4), None).contains("q8_0"));
        assert!(err(KvType::Int2, Some(64), None).contains("kv_sinks"));
        assert!(err(KvType::Int4, None, Some(MAX_RESIDUAL + 1)).contains("kv_residual"));
        // Quantized positions: complete pages with `residual` newer positions.
        let d = w(4, 128);
        assert_eq!(d.quantized(191), 0);
        assert_eq!(d.quantized(192), 64);
        assert_eq!(d.quantized(255), 64);
        assert_eq!(d.quantized(256), 128);
        assert_eq!(w(0, 0).quantized(64), 64);
    }
}
