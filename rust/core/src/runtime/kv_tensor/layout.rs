//! The stored layout a decode step reads: the types (`Kind`), one role's parts, one layer,
//! and the checks of their sizes against the shapes (clear errors, never an out-of-bounds read).

use crate::{Error, Result};
/// A stored type of `ferroquant.kv` (its torch layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    F32,
    F16,
    Q8_0,
    Fp8,
    Q4_0,
    /// KIVI with 2 or 4 bits: keys per channel over token groups, values per token.
    Kivi(u32),
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        Ok(match s {
            "f32" => Kind::F32,
            "f16" => Kind::F16,
            "q8_0" => Kind::Q8_0,
            "fp8_e4m3" => Kind::Fp8,
            "q4_0" => Kind::Q4_0,
            "int4" => Kind::Kivi(4),
            "int2" => Kind::Kivi(2),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown kv_type {s:?}: expected f32, f16, q8_0, fp8_e4m3, q4_0, int4, int2"
                )))
            }
        })
    }
}

/// One role's (keys' or values') stored parts as raw little-endian bytes; `scale` / `zero` are
/// empty where the type has none.
pub struct Parts<'a> {
    pub main: &'a [u8],
    pub scale: &'a [u8],
    pub zero: &'a [u8],
    /// rows allocated per (batch, head): tokens, or token groups for KIVI keys
    pub cap: usize,
}

/// One layer's cache as the decode step reads it.
pub struct Layer<'a> {
    pub kind: Kind,
    /// values per scale block along head_dim, and tokens per KIVI key group
    pub group: usize,
    pub batch: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// positions read from the quantized parts (for KIVI keys a multiple of `group` plus a
    /// partial last group is allowed)
    pub n_quant: usize,
    pub k: Parts<'a>,
    pub v: Parts<'a>,
    /// float32 `(batch, n_head_kv, tail_cap, head_dim)`: positions n_quant.. of the sequence
    pub tail_k: &'a [f32],
    pub tail_v: &'a [f32],
    pub tail_cap: usize,
    pub n_tail: usize,
}

/// Bytes per row of (main, scale, zero) for `role` ("k" rows of KIVI are token groups).
pub(super) fn row_bytes(kind: Kind, keys: bool, d: usize, g: usize) -> (usize, usize, usize) {
    let nb = d / g;
    match kind {
        Kind::F32 => (4 * d, 0, 0),
        Kind::F16 => (2 * d, 0, 0),
        Kind::Q8_0 => (d, 2 * nb, 0),
        Kind::Fp8 => (d, 4 * nb, 0),
        Kind::Q4_0 => (d / 2, 2 * nb, 0),
        Kind::Kivi(bits) if keys => (g * bits as usize / 8 * d, 2 * d, 2 * d),
        Kind::Kivi(bits) => (nb * g * bits as usize / 8, 2 * nb, 2 * nb),
    }
}

fn check_parts(l: &Layer<'_>, p: &Parts<'_>, keys: bool) -> Result<()> {
    let (m, s, z) = row_bytes(l.kind, keys, l.head_dim, l.group);
    let rows = l.batch * l.n_head_kv * p.cap;
    let role = if keys { "keys" } else { "values" };
    for (name, buf, per) in [
        ("main", p.main, m),
        ("scale", p.scale, s),
        ("zero", p.zero, z),
    ] {
        if buf.len() != rows * per {
            return Err(Error::InvalidArgument(format!(
                "kv attention: {role} part {name} has {} bytes, expected {} ({rows} rows of {per})",
                buf.len(),
                rows * per
            )));
        }
    }
    let used = if keys && matches!(l.kind, Kind::Kivi(_)) {
        l.n_quant.div_ceil(l.group)
    } else {
        l.n_quant
    };
    if used > p.cap {
        return Err(Error::InvalidArgument(format!(
            "kv attention: {used} {role} rows used but {} allocated",
            p.cap
        )));
    }
    Ok(())
}

/// The layer's own consistency: group and head_dim, the tail's and the parts' sizes against
/// the geometry, the rows used within the rows allocated (what `attend_decode` checks besides
/// the query, output and mask; `KvLayerState` checks it once when built).
pub fn check_layer(l: &Layer<'_>) -> Result<()> {
    let (d, g) = (l.head_dim, l.group);
    let bits_ok = match l.kind {
        Kind::Kivi(b) => (b == 2 || b == 4) && (g * b as usize).is_multiple_of(8),
        _ => true,
    };
    if g == 0 || d == 0 || d % g != 0 || (l.kind == Kind::Q4_0 && g % 2 != 0) || !bits_ok {
        return Err(Error::InvalidArgument(format!(
            "kv attention: head_dim {d} is not a multiple of group {g}"
        )));
    }
    if l.n_head_kv == 0 {
        return Err(Error::InvalidArgument(
            "kv attention: 0 key/value heads".into(),
        ));
    }
    let tail = l.batch * l.n_head_kv * l.tail_cap * d;
    if l.tail_k.len() != tail || l.tail_v.len() != tail || l.n_tail > l.tail_cap {
        return Err(Error::InvalidArgument(format!(
            "kv attention: the tail holds {} / {} values, expected {tail} ({} of {} rows used)",
            l.tail_k.len(),
            l.tail_v.len(),
            l.n_tail,
            l.tail_cap
        )));
    }
    check_parts(l, &l.k, true)?;
    check_parts(l, &l.v, false)
}

pub(super) fn check(
    l: &Layer<'_>,
    n_head: usize,
    q: &[f32],
    mask: Option<&[u8]>,
    out: &[f32],
) -> Result<()> {
    check_layer(l)?;
    let d = l.head_dim;
    if !n_head.is_multiple_of(l.n_head_kv) {
        return Err(Error::InvalidArgument(format!(
            "kv attention: {n_head} query heads are not a multiple of {} key/value heads",
            l.n_head_kv
        )));
    }
    let qn = l.batch * n_head * d;
    if q.len() != qn || out.len() != qn {
        return Err(Error::InvalidArgument(format!(
            "kv attention: query has {} values and output {}, expected {qn}",
            q.len(),
            out.len()
        )));
    }
    if let Some(m) = mask {
        if m.len() != l.batch * (l.n_quant + l.n_tail) {
            return Err(Error::InvalidArgument(format!(
                "kv attention: mask has {} entries, expected batch x positions = {}",
                m.len(),
                l.batch * (l.n_quant + l.n_tail)
            )));
        }
    }
    Ok(())
}
