//! Binding of core::runtime::kv_tensor (the decode-step attention of ferroquant.kv's
//! transformers cache): borrow the numpy views of the torch buffers, release the GIL.

use ferroquant_core as core;
use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use crate::to_py;
use core::runtime::kv_tensor::{attend_decode, Kind, Layer, Parts};

/// Attention of one decode step over one layer's cache in ferroquant.kv's torch layout, written
/// into `out` (`(batch, n_head, head_dim)` float32). `geometry` = (group, batch, n_head_kv,
/// head_dim, n_head, n_quant, k_cap, v_cap, tail_cap, n_tail); the parts are the contiguous
/// full-capacity buffers viewed as bytes (empty where a type has no such part); `mask`:
/// (batch, positions) uint8, 0 = not attended; `reference`: the scalar reference kernel instead
/// of the SIMD one (bit-identical; for tests).
#[pyfunction]
#[pyo3(signature = (kv_type, geometry, k_parts, v_parts, tail_k, tail_v, q, scale, out, mask=None, reference=false))]
#[allow(clippy::too_many_arguments)]
pub fn kv_attend_decode(
    py: Python<'_>,
    kv_type: &str,
    geometry: [usize; 10],
    k_parts: [PyReadonlyArrayDyn<'_, u8>; 3],
    v_parts: [PyReadonlyArrayDyn<'_, u8>; 3],
    tail_k: PyReadonlyArrayDyn<'_, f32>,
    tail_v: PyReadonlyArrayDyn<'_, f32>,
    q: PyReadonlyArrayDyn<'_, f32>,
    scale: f32,
    mut out: PyReadwriteArrayDyn<'_, f32>,
    mask: Option<PyReadonlyArrayDyn<'_, u8>>,
    reference: bool,
) -> PyResult<()> {
    let kind = Kind::parse(kv_type).map_err(to_py)?;
    let [group, batch, n_head_kv, head_dim, n_head, n_quant, k_cap, v_cap, tail_cap, n_tail] =
        geometry;
    let [km, ks, kz] = &k_parts;
    let [vm, vs, vz] = &v_parts;
    let layer = Layer {
        kind,
        group,
        batch,
        n_head_kv,
        head_dim,
        n_quant,
        k: Parts {
            main: km.as_slice()?,
            scale: ks.as_slice()?,
            zero: kz.as_slice()?,
            cap: k_cap,
        },
        v: Parts {
            main: vm.as_slice()?,
            scale: vs.as_slice()?,
            zero: vz.as_slice()?,
            cap: v_cap,
        },
        tail_k: tail_k.as_slice()?,
        tail_v: tail_v.as_slice()?,
        tail_cap,
        n_tail,
    };
    let q = q.as_slice()?;
    let mask = match &mask {
        Some(m) => Some(m.as_slice()?),
        None => None,
    };
    let out = out.as_slice_mut()?;
    py.detach(|| attend_decode(&layer, n_head, q, scale, mask, out, reference))
        .map_err(to_py)
}
