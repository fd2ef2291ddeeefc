//! The decode step of a rotated cache (ferroquant.kv's `kv_rotation`): the stored rows are
//! Walsh-Hadamard rotated per head, so the query goes in rotated and the output comes out
//! rotated back (the transform is orthogonal and its own inverse), with the runtime's butterfly
//! (`runtime::kv::rotate`): one native call per layer and step, no matrix product in Python.

use super::{attend_decode, Layer};
use crate::runtime::kv::rotate::wht_heads_checked;
use crate::Result;

/// `attend_decode` with `q` rotated (a copy; the caller's query is kept) and `out` rotated back.
pub fn attend_decode_rotated(
    l: &Layer<'_>,
    n_head: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    reference: bool,
) -> Result<()> {
    let mut qr = q.to_vec();
    wht_heads_checked(&mut qr, l.head_dim)?;
    attend_decode(l, n_head, &qr, scale, mask, out, reference)?;
    wht_heads_checked(out, l.head_dim)
}
