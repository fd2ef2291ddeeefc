//! Bindings of the GGUF reader and writer: conversion of metadata values, zero-copy numpy views
//! of the mapped tensor data, and error mapping. No parsing logic lives here.

use std::path::PathBuf;

use ferroquant_core as core;
use ferroquant_core::gguf::{self as g, Array, Value, ValueType};
use numpy::ndarray::ArrayView1;
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::{PyIndexError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::to_py;

fn err(e: core::Error) -> PyErr {
    match e {
        core::Error::Io { .. } => PyOSError::new_err(e.to_string()),
        core::Error::InvalidArgument(m) => PyValueError::new_err(m),
        e => to_py(e),
    }
}

fn array_to_py<'py>(py: Python<'py>, a: &Array) -> PyResult<Bound<'py, PyAny>> {
    Ok(match a {
        Array::U8(v) => v.clone().into_pyarray(py).into_any(),
        Array::I8(v) => v.clone().into_pyarray(py).into_any(),
        Array::U16(v) => v.clone().into_pyarray(py).into_any(),
        Array::I16(v) => v.clone().into_pyarray(py).into_any(),
        Array::U32(v) => v.clone().into_pyarray(py).into_any(),
        Array::I32(v) => v.clone().into_pyarray(py).into_any(),
        Array::F32(v) => v.clone().into_pyarray(py).into_any(),
        Array::U64(v) => v.clone().into_pyarray(py).into_any(),
        Array::I64(v) => v.clone().into_pyarray(py).into_any(),
        Array::F64(v) => v.clone().into_pyarray(py).into_any(),
        Array::Bool(v) => v.clone().into_pyarray(py).into_any(),
        Array::String(v) => PyList::new(py, v)?.into_any(),
        Array::Array(v) => {
            let items = v
                .iter()
                .map(|inner| array_to_py(py, inner))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
    })
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::U8(x) => x.into_pyobject(py)?.into_any(),
        Value::I8(x) => x.into_pyobject(py)?.into_any(),
        Value::U16(x) => x.into_pyobject(py)?.into_any(),
        Value::I16(x) => x.into_pyobject(py)?.into_any(),
        Value::U32(x) => x.into_pyobject(py)?.into_any(),
        Value::I32(x) => x.into_pyobject(py)?.into_any(),
        Value::U64(x) => x.into_pyobject(py)?.into_any(),
        Value::I64(x) => x.into_pyobject(py)?.into_any(),
        Value::F32(x) => (*x as f64).into_pyobject(py)?.into_any(),
        Value::F64(x) => x.into_pyobject(py)?.into_any(),
        Value::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => array_to_py(py, a)?,
    })
}

/// The type of a value as a string: "uint32", "array[string]", "array[array]".
fn type_name(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("array[{}]", a.elem_type().name()),
        v => v.value_type().name().to_string(),
    }
}

fn value_type(id: u32) -> PyResult<ValueType> {
    ValueType::from_id(id)
        .ok_or_else(|| PyValueError::new_err(format!("unknown GGUF value type {id}")))
}

fn vec_of<'py, T: numpy::Element + Clone>(items: &Bound<'py, PyAny>) -> PyResult<Vec<T>> {
    let a: PyReadonlyArray1<'py, T> = items.extract()?;
    Ok(a.as_array().to_vec())
}

/// (element type id, items): items a 1-D numpy array of the exact dtype for numbers and bools,
/// a list of str for strings, a list of (element type id, items) for nested arrays.
fn array_from_py(spec: &Bound<'_, PyAny>) -> PyResult<Array> {
    let (ety, items): (u32, Bound<'_, PyAny>) = spec.extract()?;
    Ok(match value_type(ety)? {
        ValueType::U8 => Array::U8(vec_of(&items)?),
        ValueType::I8 => Array::I8(vec_of(&items)?),
        ValueType::U16 => Array::U16(vec_of(&items)?),
        ValueType::I16 => Array::I16(vec_of(&items)?),
        ValueType::U32 => Array::U32(vec_of(&items)?),
        ValueType::I32 => Array::I32(vec_of(&items)?),
        ValueType::F32 => Array::F32(vec_of(&items)?),
        ValueType::U64 => Array::U64(vec_of(&items)?),
        ValueType::I64 => Array::I64(vec_of(&items)?),
        ValueType::F64 => Array::F64(vec_of(&items)?),
        ValueType::Bool => Array::Bool(vec_of(&items)?),
        ValueType::String => Array::String(items.extract()?),
        ValueType::Array => {
            let list: Vec<Bound<'_, PyAny>> = items.extract()?;
            Array::Array(list.iter().map(array_from_py).collect::<PyResult<_>>()?)
        }
    })
}

/// (type id, payload): a Python int/float/bool/str, or an array spec for type 9.
fn value_from_py(spec: &Bound<'_, PyAny>) -> PyResult<Value> {
    let (ty, v): (u32, Bound<'_, PyAny>) = spec.extract()?;
    Ok(match value_type(ty)? {
        ValueType::U8 => Value::U8(v.extract()?),
        ValueType::I8 => Value::I8(v.extract()?),
        ValueType::U16 => Value::U16(v.extract()?),
        ValueType::I16 => Value::I16(v.extract()?),
        ValueType::U32 => Value::U32(v.extract()?),
        ValueType::I32 => Value::I32(v.extract()?),
        ValueType::F32 => Value::F32(v.extract::<f64>()? as f32),
        ValueType::U64 => Value::U64(v.extract()?),
        ValueType::I64 => Value::I64(v.extract()?),
        ValueType::F64 => Value::F64(v.extract()?),
        ValueType::Bool => Value::Bool(v.extract()?),
        ValueType::String => Value::String(v.extract()?),
        ValueType::Array => Value::Array(array_from_py(&v)?),
    })
}

/// An open GGUF file (memory-mapped; the map lives as long as this object or any data view).
#[pyclass(frozen, name = "GgufFile", module = "ferroquant._native")]
struct GgufFile {
    inner: g::GgufFile,
}

#[pymethods]
impl GgufFile {
    #[new]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| g::GgufFile::open(&path)).map_err(err)?;
        Ok(GgufFile { inner })
    }

    #[getter]
    fn version(&self) -> u32 {
        self.inner.header().version
    }

    #[getter]
    fn alignment(&self) -> u64 {
        self.inner.header().alignment
    }

    #[getter]
    fn data_offset(&self) -> u64 {
        self.inner.header().data_offset
    }

    #[getter]
    fn file_size(&self) -> usize {
        self.inner.bytes().len()
    }

    /// [(key, type name, value, byte offset)] in file order.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.inner
            .header()
            .metadata
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    type_name(&kv.value),
                    value_to_py(py, &kv.value)?,
                    kv.offset,
                )
                    .into_pyobject(py)
            })
            .collect()
    }

    /// [(name, ggml dims innermost first, ggml type id, type name, absolute data offset,
    /// nbytes, n_elements)] in file order.
    #[allow(clippy::type_complexity)]
    fn tensors(&self) -> Vec<(String, Vec<u64>, u32, &'static str, u64, u64, u64)> {
        self.inner
            .header()
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.dims.clone(),
                    t.ggml_type.id,
                    t.ggml_type.name,
                    self.inner.data_start(t),
                    t.nbytes,
                    t.n_elements,
                )
            })
            .collect()
    }

    /// The data of tensor `index` as a read-only uint8 numpy array viewing the map (no copy).
    fn tensor_data<'py>(
        slf: &Bound<'py, Self>,
        index: usize,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let this = slf.get();
        let t =
            this.inner.header().tensors.get(index).ok_or_else(|| {
                PyIndexError::new_err(format!("tensor index {index} out of range"))
            })?;
        let bytes = this.inner.tensor_data(t).map_err(err)?;
        let view = ArrayView1::from(bytes);
        // SAFETY: `bytes` borrows the memory map (or byte buffer) owned by `this.inner`, which is
        // immutable (frozen pyclass, no method replaces or mutates it) and never reallocated.
        // `slf` becomes the numpy array's base object, so the map lives at least as long as the
        // array. The array is made read-only below before it reaches Python, and numpy refuses to
        // set WRITEABLE again because the base exposes no writable buffer; the map is PROT_READ.
        let arr = unsafe { PyArray1::<u8>::borrow_from_array(&view, slf.clone().into_any()) };
        drop(arr.readwrite().make_nonwriteable());
        Ok(arr)
    }
}

/// A streaming GGUF v3 writer (temporary file + fsync + rename on `finish`).
#[pyclass(name = "GgufWriter", module = "ferroquant._native")]
struct GgufWriter {
    inner: Option<g::Writer>,
}

fn ggml_type(id: u32) -> PyResult<&'static g::GgmlType> {
    g::GgmlType::from_id(id)
        .ok_or_else(|| PyValueError::new_err(format!("unknown ggml tensor type id {id}")))
}

impl GgufWriter {
    fn writer(&mut self) -> PyResult<&mut g::Writer> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the GGUF writer is closed"))
    }
}

#[pymethods]
impl GgufWriter {
    /// metadata: [(key, (type id, payload))]; tensors: [(name, ggml dims, ggml type id)].
    #[new]
    fn create(
        py: Python<'_>,
        path: PathBuf,
        metadata: Vec<(String, Bound<'_, PyAny>)>,
        tensors: Vec<(String, Vec<u64>, u32)>,
    ) -> PyResult<Self> {
        let md = metadata
            .iter()
            .map(|(k, v)| Ok((k.clone(), value_from_py(v)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let descs = tensors
            .into_iter()
            .map(|(name, dims, id)| {
                Ok(g::TensorDesc {
                    name,
                    dims,
                    ggml_type: ggml_type(id)?,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let w = py
            .detach(|| g::Writer::create(&path, &md, &descs))
            .map_err(err)?;
        Ok(GgufWriter { inner: Some(w) })
    }

    /// Name and byte size of the next tensor to write, or None when all are written.
    fn next_tensor(&mut self) -> PyResult<Option<(String, u64)>> {
        let w = self.writer()?;
        Ok(w.next_tensor().map(|n| n.to_string()).zip(w.next_nbytes()))
    }

    /// Write the next tensor's bytes (a C-contiguous uint8 array of exactly its size).
    fn write_tensor(&mut self, py: Python<'_>, data: PyReadonlyArray1<'_, u8>) -> PyResult<()> {
        let s = data
            .as_slice()
            .map_err(|_| PyValueError::new_err("tensor data is not C-contiguous"))?;
        let w = self.writer()?;
        py.detach(|| w.write_tensor(s)).map_err(err)
    }

    /// Hand the buffered bytes to the operating system (no fsync).
    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        let w = self.writer()?;
        py.detach(|| w.flush()).map_err(err)
    }

    /// Check all tensors were written, fsync and rename into place.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("the GGUF writer is closed"))?;
        py.detach(|| w.finish()).map_err(err)
    }

    /// Discard the temporary file; an existing file at the target path is left untouched.
    fn abort(&mut self) {
        if let Some(w) = self.inner.take() {
            w.abort();
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }
}

/// ggml tensor types: [(id, name, block size, type size)].
#[pyfunction]
fn ggml_types() -> Vec<(u32, &'static str, u64, u64)> {
    g::GGML_TYPES
        .iter()
        .map(|t| (t.id, t.name, t.block_size, t.type_size))
        .collect()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GgufFile>()?;
    m.add_class::<GgufWriter>()?;
    m.add_function(wrap_pyfunction!(ggml_types, m)?)?;
    Ok(())
}
