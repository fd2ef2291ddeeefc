//! Binding of core::runtime::kv_tensor (the decode-step attention of ferroquant.kv's
//! transformers cache): borrow the numpy views of the torch buffers, release the GIL.

use ferroquant_core as core;
use numpy::ndarray::Axis;
use numpy::{
    PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::{to_py, QuantizeError};
use core::runtime::kv::rotate::wht_heads_checked;
use core::runtime::kv_tensor::encode::{kivi_encode, States};
use core::runtime::kv_tensor::{attend_decode, attend_decode_rotated, Kind, Layer, Parts};

/// Attention of one decode step over one layer's cache in ferroquant.kv's torch layout, written
/// into `out` (`(batch, n_head, head_dim)` float32). `geometry` = (group, batch, n_head_kv,
/// head_dim, n_head, n_quant, k_cap, v_cap, tail_cap, n_tail); the parts are the contiguous
/// full-capacity buffers viewed as bytes (empty where a type has no such part); `mask`:
/// (batch, positions) uint8, 0 = not attended; `reference`: the scalar reference kernel instead
/// of the SIMD one (bit-identical; for tests); `rotate`: the cache is stored Walsh-Hadamard
/// rotated, so `q` is rotated (a copy) before and `out` rotated back after.
#[pyfunction]
#[pyo3(signature = (kv_type, geometry, k_parts, v_parts, tail_k, tail_v, q, scale, out, mask=None, reference=false, rotate=false))]
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
    rotate: bool,
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
    py.detach(|| {
        if rotate {
            attend_decode_rotated(&layer, n_head, q, scale, mask, out, reference)
        } else {
            attend_decode(&layer, n_head, q, scale, mask, out, reference)
        }
    })
    .map_err(to_py)
}

/// The cache's rotation in place (`runtime::kv::rotate`, bit-exact with `kv/reference.py`'s
/// `wht`): every row of each writable float32 array's last axis (a power of two, contiguous;
/// the other axes may be strided, e.g. one token's slot of a cache buffer) becomes
/// H x / sqrt(n). Several arrays in one call (a step's keys and values).
#[pyfunction]
#[pyo3(signature = (*xs))]
pub fn kv_wht(py: Python<'_>, xs: &Bound<'_, PyTuple>) -> PyResult<()> {
    let mut arrays = Vec::with_capacity(xs.len());
    for x in xs.iter() {
        let a = x.extract::<PyReadwriteArrayDyn<'_, f32>>().map_err(|_| {
            let msg = if x.cast::<PyArrayDyn<f32>>().is_ok() {
                "a float32 array that is read-only or overlaps another array of the call".into()
            } else {
                let what = match x.cast::<PyUntypedArray>() {
                    Ok(a) => format!("a {} array", a.dtype()),
                    Err(_) => format!("{}", x.get_type()),
                };
                format!("expected a writable float32 numpy array, got {what}")
            };
            QuantizeError::new_err(format!("kv rotation: {msg}"))
        })?;
        if a.ndim() == 0 {
            return Err(QuantizeError::new_err(
                "kv rotation: expected an array with a last axis, got a 0-d array",
            ));
        }
        arrays.push(a);
    }
    let mut views: Vec<_> = arrays.iter_mut().map(|a| a.as_array_mut()).collect();
    py.detach(|| {
        views.iter_mut().try_for_each(|v| {
            let n = *v.shape().last().expect("ndim checked above");
            if let Some(all) = v.as_slice_mut() {
                return wht_heads_checked(all, n);
            }
            let last = Axis(v.ndim() - 1);
            v.lanes_mut(last)
                .into_iter()
                .try_for_each(|mut lane| match lane.as_slice_mut() {
                    Some(row) => wht_heads_checked(row, n),
                    None => Err(core::Error::InvalidArgument(format!(
                        "kv rotation: the last axis ({n} values) is not contiguous"
                    ))),
                })
        })
    })
    .map_err(to_py)
}

/// KIVI's group encoder in ferroquant.kv's torch layout (`core::runtime::kv_tensor::encode`):
/// float32 states `x` (batch, heads, tokens, head_dim), contiguous, quantized per channel over
/// `group` tokens (`role` "k") or per token over `group` channels ("v") into the contiguous
/// byte buffers `q`, `scale`, `zero` (f16 little endian), as codecs.encode lays them out.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn kv_kivi_encode(
    py: Python<'_>,
    kv_type: &str,
    group: usize,
    role: &str,
    x: PyReadonlyArrayDyn<'_, f32>,
    mut q: PyReadwriteArrayDyn<'_, u8>,
    mut scale: PyReadwriteArrayDyn<'_, u8>,
    mut zero: PyReadwriteArrayDyn<'_, u8>,
) -> PyResult<()> {
    let bits = match kv_type {
        "int4" => 4,
        "int2" => 2,
        _ => {
            return Err(QuantizeError::new_err(format!(
                "kv KIVI encode: kv_type {kv_type:?} is not a KIVI type (int4, int2)"
            )))
        }
    };
    let keys = match role {
        "k" => true,
        "v" => false,
        _ => {
            return Err(QuantizeError::new_err(format!(
                "kv KIVI encode: role {role:?} (expected \"k\" or \"v\")"
            )))
        }
    };
    let &[b, h, n, d] = x.shape() else {
        return Err(QuantizeError::new_err(format!(
            "kv KIVI encode: states of shape {:?}, expected (batch, heads, tokens, head_dim)",
            x.shape()
        )));
    };
    let shape = States { bh: b * h, n, d };
    let x = x.as_slice()?;
    let (q, scale, zero) = (
        q.as_slice_mut()?,
        scale.as_slice_mut()?,
        zero.as_slice_mut()?,
    );
    py.detach(|| kivi_encode(bits, group, keys, shape, x, q, scale, zero))
        .map_err(to_py)
}
