//! `KvLayerState`: one layer of ferroquant.kv's transformers cache as a native object, so that
//! a decode step costs two short calls (`push` from the cache's `update`, `attend` from the
//! `ferroquant_kv` attention function) instead of Python bookkeeping, numpy views and argument
//! parsing around `kv_attend_decode`.
//!
//! The state holds the layer's geometry and the numpy views of its buffers (the quantized parts'
//! full-capacity byte buffers and the float32 sinks + residual buffers), checked once when the
//! state is built; the Python layer builds a new state whenever it replaces a buffer (growth,
//! batch reorder). Per step it reads the torch tensors of the step (keys, values, query) through
//! their data pointers after checking dtype, device, contiguity and shape, and writes the
//! attention output into an output tensor it owns (returned to the caller, overwritten by the
//! layer's next step, like the cache's decode workspace).

use ferroquant_core as core;
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::{to_py, QuantizeError};
use core::runtime::kv::rotate::wht_heads_checked;
use core::runtime::kv_tensor::group::{quantize_group, GroupStep, PartsMut, Scratch};
use core::runtime::kv_tensor::{
    attend_decode, attend_decode_rotated, check_layer, Kind, Layer, Parts,
};

/// A decode step's view of one layer (see the module docs). Not thread-safe across Python
/// threads sharing one cache (no transformers cache is).
#[pyclass(module = "ferroquant._native")]
pub struct KvLayerState {
    kind: Kind,
    group: usize,
    batch: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_head: usize,
    sinks: usize,
    k_cap: usize,
    v_cap: usize,
    tail_cap: usize,
    rotate: bool,
    k_parts: [Py<PyArrayDyn<u8>>; 3],
    v_parts: [Py<PyArrayDyn<u8>>; 3],
    tail_k: Py<PyArrayDyn<f32>>,
    tail_v: Py<PyArrayDyn<f32>>,
    /// torch.float32, compared by identity with the step tensors' dtype
    float32: Py<PyAny>,
    /// (batch, n_head_kv, 1, head_dim) and (batch, n_head, 1, head_dim): the shapes of a step's
    /// keys / values and query
    step_shape: Py<PyTuple>,
    query_shape: Py<PyTuple>,
    /// the attention output, a contiguous float32 (batch, 1, n_head, head_dim) tensor
    out: Py<PyAny>,
    /// what the last `push` left: (quantized positions, tail positions)
    ready: Option<(usize, usize)>,
    mask: Vec<u8>,
    scratch: Vec<f32>,
    group_scratch: Scratch,
}

fn err(msg: String) -> PyErr {
    QuantizeError::new_err(format!("kv layer state: {msg}"))
}

/// A read-only numpy array's contiguous data (checked when the state was built; read again here
/// from the array object, whose data pointer and size never change).
fn bytes<'a>(a: &'a Bound<'_, PyArrayDyn<u8>>) -> PyResult<&'a [u8]> {
    // SAFETY: the slice lives while `a` is borrowed; the array views a cache buffer that only the
    // cache's own Python code writes, never during a call of this object (one thread per cache).
    unsafe { a.as_slice() }.map_err(|_| err("a buffer is not contiguous".into()))
}

impl KvLayerState {
    /// The data pointer of torch tensor `t` if it is a CPU float32 contiguous tensor of `shape`
    /// that needs no gradient; None otherwise (the caller's slower path takes it).
    fn tensor_ptr(
        &self,
        py: Python<'_>,
        t: &Bound<'_, PyAny>,
        shape: &Py<PyTuple>,
    ) -> PyResult<Option<usize>> {
        let ok = t.getattr(intern!(py, "dtype"))?.is(self.float32.bind(py))
            && t.getattr(intern!(py, "is_cpu"))?.is_truthy()?
            && !t.getattr(intern!(py, "requires_grad"))?.is_truthy()?
            && t.call_method0(intern!(py, "is_contiguous"))?.is_truthy()?
            && t.getattr(intern!(py, "shape"))?.eq(shape.bind(py))?;
        if !ok {
            return Ok(None);
        }
        Ok(Some(t.call_method0(intern!(py, "data_ptr"))?.extract()?))
    }

    /// The step's keys and values (torch tensors `push` takes) into tail row `slot`, rotated
    /// when the cache rotates; false (nothing written) for other tensors.
    fn write_token(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        slot: usize,
    ) -> PyResult<bool> {
        let (Some(kp), Some(vp)) = (
            self.tensor_ptr(py, k, &self.step_shape)?,
            self.tensor_ptr(py, v, &self.step_shape)?,
        ) else {
            return Ok(false);
        };
        let (d, cap) = (self.head_dim, self.tail_cap);
        let bh = self.batch * self.n_head_kv;
        for (ptr, tail) in [(kp, &self.tail_k), (vp, &self.tail_v)] {
            let step = &mut self.scratch[..bh * d];
            // SAFETY: `ptr` is the data of a live (bound by the caller) contiguous CPU float32
            // tensor of bh * d values (checked by tensor_ptr); `step` is this object's own buffer,
            // so the two do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr as *const f32, step.as_mut_ptr(), bh * d) };
            let tail = tail.bind(py);
            // SAFETY: the tail is a writable contiguous float32 array (checked when built) that
            // no other reference reads or writes during this call.
            let buf = unsafe { tail.as_slice_mut() }
                .map_err(|_| err("a tail buffer is not contiguous".into()))?;
            if buf.len() != bh * cap * d {
                return Err(err("a tail buffer changed size".into()));
            }
            for (i, row) in step.chunks_exact(d).enumerate() {
                let at = (i * cap + slot) * d;
                let dst = &mut buf[at..at + d];
                dst.copy_from_slice(row);
                if self.rotate {
                    wht_heads_checked(dst, d).map_err(to_py)?;
                }
            }
        }
        Ok(true)
    }
}

#[pymethods]
impl KvLayerState {
    /// `geometry` = (group, batch, n_head_kv, head_dim, n_head, k_cap, v_cap, tail_cap, sinks);
    /// the parts as in `kv_attend_decode` (flat uint8 views of the full-capacity buffers), the
    /// tails the float32 (batch, n_head_kv, tail_cap, head_dim) sinks + residual buffers
    /// (writable: `push` writes the step's token there); `float32` is torch.float32; `out` the
    /// contiguous float32 (batch, 1, n_head, head_dim) tensor `attend` writes and returns.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        kv_type: &str,
        geometry: [usize; 9],
        k_parts: [Bound<'_, PyArrayDyn<u8>>; 3],
        v_parts: [Bound<'_, PyArrayDyn<u8>>; 3],
        tail_k: Bound<'_, PyArrayDyn<f32>>,
        tail_v: Bound<'_, PyArrayDyn<f32>>,
        rotate: bool,
        float32: Bound<'_, PyAny>,
        out: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let kind = Kind::parse(kv_type).map_err(to_py)?;
        let [group, batch, n_head_kv, head_dim, n_head, k_cap, v_cap, tail_cap, sinks] = geometry;
        if n_head_kv == 0 || n_head == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(err(format!(
                "{n_head} query heads are not a multiple of {n_head_kv} key/value heads"
            )));
        }
        if sinks > tail_cap {
            return Err(err(format!("{sinks} sinks but a tail of {tail_cap} rows")));
        }
        if rotate && !head_dim.is_power_of_two() {
            return Err(err(format!(
                "rotation needs a power-of-two head_dim, got {head_dim}"
            )));
        }
        {
            // the borrows check contiguity (and writability of the tails) once
            let kr: Vec<PyReadonlyArrayDyn<'_, u8>> = k_parts
                .iter()
                .map(|a| a.try_readonly())
                .collect::<Result<_, _>>()?;
            let vr: Vec<PyReadonlyArrayDyn<'_, u8>> = v_parts
                .iter()
                .map(|a| a.try_readonly())
                .collect::<Result<_, _>>()?;
            let tk: PyReadwriteArrayDyn<'_, f32> = tail_k.try_readwrite()?;
            let tv: PyReadwriteArrayDyn<'_, f32> = tail_v.try_readwrite()?;
            let layer = Layer {
                kind,
                group,
                batch,
                n_head_kv,
                head_dim,
                n_quant: 0,
                k: Parts {
                    main: kr[0].as_slice()?,
                    scale: kr[1].as_slice()?,
                    zero: kr[2].as_slice()?,
                    cap: k_cap,
                },
                v: Parts {
                    main: vr[0].as_slice()?,
                    scale: vr[1].as_slice()?,
                    zero: vr[2].as_slice()?,
                    cap: v_cap,
                },
                tail_k: tk.as_slice()?,
                tail_v: tv.as_slice()?,
                tail_cap,
                n_tail: 0,
            };
            check_layer(&layer).map_err(to_py)?;
        }
        let n = batch * n_head * head_dim;
        let step_shape = PyTuple::new(py, [batch, n_head_kv, 1, head_dim])?.unbind();
        let query_shape = PyTuple::new(py, [batch, n_head, 1, head_dim])?.unbind();
        let out_shape = PyTuple::new(py, [batch, 1, n_head, head_dim])?;
        let out_ok = out.getattr("dtype")?.is(&float32)
            && out.getattr("is_cpu")?.is_truthy()?
            && out.call_method0("is_contiguous")?.is_truthy()?
            && out.getattr("shape")?.eq(&out_shape)?;
        if !out_ok {
            return Err(err(format!(
                "the output must be a contiguous float32 CPU tensor of shape {out_shape}"
            )));
        }
        let [k0, k1, k2] = k_parts;
        let [v0, v1, v2] = v_parts;
        Ok(KvLayerState {
            kind,
            group,
            batch,
            n_head_kv,
            head_dim,
            n_head,
            sinks,
            k_cap,
            v_cap,
            tail_cap,
            rotate,
            k_parts: [k0.unbind(), k1.unbind(), k2.unbind()],
            v_parts: [v0.unbind(), v1.unbind(), v2.unbind()],
            tail_k: tail_k.unbind(),
            tail_v: tail_v.unbind(),
            float32: float32.unbind(),
            step_shape,
            query_shape,
            out: out.unbind(),
            ready: None,
            mask: Vec::new(),
            scratch: vec![0f32; n.max(batch * n_head_kv * head_dim)],
            group_scratch: Scratch::default(),
        })
    }

    /// A decode step's keys and values (torch, (batch, n_head_kv, 1, head_dim) float32) written
    /// into tail row `slot` of every (batch, head), rotated in place when the cache rotates;
    /// `attend` then reads `n_quant` quantized positions and `slot + 1` tail positions. False
    /// (nothing written) when the tensors are not of that kind: the caller's path takes them.
    fn push(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        n_quant: usize,
        slot: usize,
    ) -> PyResult<bool> {
        self.ready = None;
        if slot >= self.tail_cap || slot < self.sinks || !self.write_token(py, k, v, slot)? {
            return Ok(false);
        }
        self.ready = Some((n_quant, slot + 1));
        Ok(true)
    }

    /// The decode step that completes a KIVI group (docs/kv.md, "the group step"): the token
    /// written after the `n_res` residual rows as `push` does, then the group (the residual's
    /// first `group` rows, tokens `n_quant ..`) quantized into the next free rows of the key and
    /// value buffers (`kv_tensor::group`: the encoder of `codecs.encode`, the same bytes as the
    /// Python path) and the newer rows moved down; `attend` then reads `n_quant + group`
    /// quantized positions and the residual (without a residual window: `n_quant + group - 1`
    /// and the step's own token in full precision). False (nothing written) when the step is
    /// not that case: another type, group 0 under sinks, no allocated rows left for the group,
    /// or tensors `push` does not take; the caller's path then quantizes the group.
    fn push_group(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        n_quant: usize,
        n_res: usize,
    ) -> PyResult<bool> {
        self.ready = None;
        let (g, sinks) = (self.group, self.sinks);
        let Kind::Kivi(bits) = self.kind else {
            return Ok(false);
        };
        let (rows, slot) = (n_res + 1, sinks + n_res);
        let fits = g > 0
            && n_quant.is_multiple_of(g)
            && n_quant >= sinks
            && rows >= g
            && slot < self.tail_cap
            && n_quant / g < self.k_cap
            && n_quant + g <= self.v_cap;
        if !fits || !self.write_token(py, k, v, slot)? {
            return Ok(false);
        }
        let step = GroupStep {
            bits,
            group: g,
            bh: self.batch * self.n_head_kv,
            head_dim: self.head_dim,
            sinks,
            rows,
            n_quant,
        };
        let [km, ks, kz] = self.k_parts.each_ref().map(|a| a.bind(py));
        let [vm, vs, vz] = self.v_parts.each_ref().map(|a| a.bind(py));
        let (tk, tv) = (self.tail_k.bind(py), self.tail_v.bind(py));
        let nc = |_| err("a buffer is not contiguous".into());
        // SAFETY: the buffers are contiguous arrays (checked when built) viewing the cache's own
        // torch tensors (writable numpy views): the KIVI types have all three parts, so with
        // rows allocated (`fits`) these are six distinct allocations, plus the two tails; no
        // other reference reads or writes them during this call (one thread per cache).
        let (km, ks, kz, vm, vs, vz, tail_k, tail_v) = unsafe {
            (
                km.as_slice_mut().map_err(nc)?,
                ks.as_slice_mut().map_err(nc)?,
                kz.as_slice_mut().map_err(nc)?,
                vm.as_slice_mut().map_err(nc)?,
                vs.as_slice_mut().map_err(nc)?,
                vz.as_slice_mut().map_err(nc)?,
                tk.as_slice_mut().map_err(nc)?,
                tv.as_slice_mut().map_err(nc)?,
            )
        };
        let kp = PartsMut {
            main: km,
            scale: ks,
            zero: kz,
            cap: self.k_cap,
        };
        let vp = PartsMut {
            main: vm,
            scale: vs,
            zero: vz,
            cap: self.v_cap,
        };
        let (cap, scratch) = (self.tail_cap, &mut self.group_scratch);
        quantize_group(&step, tail_k, tail_v, cap, kp, vp, scratch).map_err(to_py)?;
        let r = rows - g;
        self.ready = Some(if r > 0 {
            (n_quant + g, sinks + r)
        } else {
            (n_quant + g - 1, sinks + 1)
        });
        Ok(true)
    }

    /// Make `attend` read `n_quant` quantized and `n_tail` tail positions without a `push`: the
    /// step's token is already in the buffers (the cache's Python path wrote it, e.g. the step
    /// that quantized a group). False when the tail has fewer rows.
    fn ready(&mut self, n_quant: usize, n_tail: usize) -> bool {
        self.ready = (n_tail <= self.tail_cap).then_some((n_quant, n_tail));
        self.ready.is_some()
    }

    /// The attention output of the step `push` (or `ready`) prepared, for `query` (torch, (batch, n_head, 1,
    /// head_dim) float32, no gradient): the output tensor (batch, 1, n_head, head_dim), or None
    /// when the query is not of that kind or no push preceded (the caller's path takes it).
    /// With sinks and quantized rows the rows' sink slots are masked out (their codes are token
    /// S's), as `QuantizedLayer.attend_decode` does.
    fn attend(
        &mut self,
        py: Python<'_>,
        query: &Bound<'_, PyAny>,
        scale: f32,
    ) -> PyResult<Option<Py<PyAny>>> {
        let Some((n_quant, n_tail)) = self.ready.take() else {
            return Ok(None);
        };
        let Some(qp) = self.tensor_ptr(py, query, &self.query_shape)? else {
            return Ok(None);
        };
        let out = self.out.bind(py);
        let n = self.batch * self.n_head * self.head_dim;
        let op: usize = out.call_method0(intern!(py, "data_ptr"))?.extract()?;
        let on: usize = out.call_method0(intern!(py, "numel"))?.extract()?;
        if on != n {
            return Err(err("the output tensor changed size".into()));
        }
        let q = &mut self.scratch[..n];
        // SAFETY: `qp` is the data of the live contiguous float32 query of n values (checked by
        // tensor_ptr); `q` is this object's own buffer.
        unsafe { std::ptr::copy_nonoverlapping(qp as *const f32, q.as_mut_ptr(), n) };
        let total = n_quant + n_tail;
        let s = self.sinks.min(n_tail);
        let masked = s > 0 && n_quant > 0;
        if masked {
            self.mask.clear();
            for _ in 0..self.batch {
                self.mask.extend((0..total).map(|p| (p >= s) as u8));
            }
        }
        let [km, ks, kz] = self.k_parts.each_ref().map(|a| a.bind(py));
        let [vm, vs, vz] = self.v_parts.each_ref().map(|a| a.bind(py));
        let (tk, tv) = (self.tail_k.bind(py), self.tail_v.bind(py));
        // SAFETY: see `bytes`; the tails are only read here.
        let (tail_k, tail_v) = unsafe { (tk.as_slice(), tv.as_slice()) };
        let (tail_k, tail_v) = (
            tail_k.map_err(|_| err("a tail buffer is not contiguous".into()))?,
            tail_v.map_err(|_| err("a tail buffer is not contiguous".into()))?,
        );
        let layer = Layer {
            kind: self.kind,
            group: self.group,
            batch: self.batch,
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            n_quant,
            k: Parts {
                main: bytes(km)?,
                scale: bytes(ks)?,
                zero: bytes(kz)?,
                cap: self.k_cap,
            },
            v: Parts {
                main: bytes(vm)?,
                scale: bytes(vs)?,
                zero: bytes(vz)?,
                cap: self.v_cap,
            },
            tail_k,
            tail_v,
            tail_cap: self.tail_cap,
            n_tail,
        };
        // SAFETY: the output tensor is ours (made by the cache for this state, contiguous float32,
        // n values, checked when built and its size above); nothing else borrows its memory
        // during the call, and it does not overlap the query copy or the cache buffers.
        let dst = unsafe { std::slice::from_raw_parts_mut(op as *mut f32, n) };
        let (q, mask) = (&*q, masked.then_some(&self.mask[..]));
        let (n_head, rotate) = (self.n_head, self.rotate);
        py.detach(|| {
            if rotate {
                attend_decode_rotated(&layer, n_head, q, scale, mask, dst, false)
            } else {
                attend_decode(&layer, n_head, q, scale, mask, dst, false)
            }
        })
        .map_err(to_py)?;
        Ok(Some(self.out.clone_ref(py)))
    }
}
