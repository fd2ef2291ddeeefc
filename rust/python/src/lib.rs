//! ferroquant._native: thin PyO3 bindings over ferroquant-core. Only conversion, GIL release
//! and error mapping live here; no numerics.

// Every `unsafe` block says why it is sound (`// SAFETY: ...`), every `unsafe fn` what its
// caller must guarantee (`# Safety`): `cargo clippy -- -D warnings` refuses a missing one.
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

use ferroquant_core as core;

mod cuda_sources;
mod gguf;
mod gptq;
mod hqq;
mod kv_state;
mod kv_tensor;
mod matmul;
mod runtime;
use numpy::{
    IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1,
    PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(
    _native,
    QuantizeError,
    PyValueError,
    "Bad input to quantize/dequantize."
);
create_exception!(
    _native,
    FormatError,
    PyValueError,
    "A malformed or unsupported file."
);

pub(crate) fn to_py(e: core::Error) -> PyErr {
    if e.is_format() {
        FormatError::new_err(e.to_string())
    } else {
        QuantizeError::new_err(e.to_string())
    }
}

fn not_contiguous(what: &str) -> PyErr {
    QuantizeError::new_err(format!("{what} is not C-contiguous"))
}

/// Quantize a 2-D C-contiguous array (float32, or uint16 holding float16/bfloat16 bits).
#[pyfunction]
#[pyo3(signature = (x, src_dtype, qtype, imatrix=None, block_size=None, double_quant=false, scale_mode=None))]
#[allow(clippy::too_many_arguments)]
fn quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    src_dtype: &str,
    qtype: &str,
    imatrix: Option<PyReadonlyArray1<'py, f32>>,
    block_size: Option<usize>,
    double_quant: bool,
    scale_mode: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let qtype = core::QType::parse(qtype).map_err(to_py)?;
    let scale_mode = scale_mode
        .map(core::ScaleMode::parse)
        .transpose()
        .map_err(to_py)?;
    let imatrix_slice = match &imatrix {
        Some(a) => Some(a.as_slice().map_err(|_| not_contiguous("imatrix"))?),
        None => None,
    };
    let opts = core::Options {
        imatrix: imatrix_slice,
        block_size,
        double_quant,
        scale_mode,
    };
    let q = match src_dtype {
        "float32" => {
            let a: PyReadonlyArray2<'py, f32> = x.extract()?;
            let (rows, cols) = (a.shape()[0], a.shape()[1]);
            let s = a.as_slice().map_err(|_| not_contiguous("input"))?;
            py.detach(|| {
                core::Matrix::from_f32(s, rows, cols).and_then(|m| core::quantize(&m, qtype, &opts))
            })
        }
        "float16" | "bfloat16" => {
            let a: PyReadonlyArray2<'py, u16> = x.extract()?;
            let (rows, cols) = (a.shape()[0], a.shape()[1]);
            let s = a.as_slice().map_err(|_| not_contiguous("input"))?;
            let elems = if src_dtype == "float16" {
                core::Elems::F16(s)
            } else {
                core::Elems::BF16(s)
            };
            py.detach(|| {
                core::Matrix::new(elems, rows, cols).and_then(|m| core::quantize(&m, qtype, &opts))
            })
        }
        other => {
            return Err(QuantizeError::new_err(format!(
                "unsupported input dtype {other}; expected float32, float16 or bfloat16"
            )))
        }
    }
    .map_err(to_py)?;
    let out = PyDict::new(py);
    out.set_item("block_size", q.block_size)?;
    out.set_item("scale_mode", q.scale_mode.map(|s| s.name()))?;
    out.set_item("data", q.data.into_pyarray(py))?;
    out.set_item("stats", q.stats.into_pyarray(py))?;
    match q.double_quant {
        Some(dq) => {
            let d = PyDict::new(py);
            d.set_item("offset", dq.offset)?;
            d.set_item("qabsmax", dq.qabsmax.into_pyarray(py))?;
            d.set_item("absmax2", dq.absmax2.into_pyarray(py))?;
            d.set_item("code", dq.code.into_pyarray(py))?;
            d.set_item("block_size", dq.block_size)?;
            out.set_item("double_quant", d)?;
        }
        None => out.set_item("double_quant", py.None())?,
    }
    Ok(out)
}

fn extract_double_quant(d: &Bound<'_, PyDict>) -> PyResult<core::DoubleQuant> {
    let get = |k: &str| {
        d.get_item(k)?
            .ok_or_else(|| QuantizeError::new_err(format!("double_quant state lacks {k:?}")))
    };
    let vec_f32 = |k: &str| -> PyResult<Vec<f32>> {
        let a: PyReadonlyArray1<'_, f32> = get(k)?.extract()?;
        Ok(a.as_array().to_vec())
    };
    let qabsmax: PyReadonlyArray1<'_, u8> = get("qabsmax")?.extract()?;
    Ok(core::DoubleQuant {
        offset: get("offset")?.extract()?,
        qabsmax: qabsmax.as_array().to_vec(),
        absmax2: vec_f32("absmax2")?,
        code: vec_f32("code")?,
        block_size: get("block_size")?.extract()?,
    })
}

/// Dequantize raw data (+ statistics) to a float32 array of shape (rows, cols).
/// `quantize` then `dequantize` of a float32 2-D C-contiguous array in a grouped integer
/// format with integer zeros (`int{b}_g*`), value for value, without the bytes between.
/// With `scale` (one finite positive f32 per column): `qdq(x · scale) / scale`, the scaled
/// columns' round trip scaled back (AWQ's candidate weights).
#[pyfunction]
#[pyo3(signature = (x, qtype, scale=None))]
fn gint_qdq<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    qtype: &str,
    scale: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    let qt = core::QType::parse(qtype).map_err(to_py)?;
    let g = qt.gint().ok_or_else(|| {
        QuantizeError::new_err(format!("gint_qdq: {qtype} is not a grouped integer format"))
    })?;
    let (rows, cols) = (x.shape()[0], x.shape()[1]);
    let s = x.as_slice().map_err(|_| not_contiguous("input"))?;
    let sc = match &scale {
        Some(a) => Some(a.as_slice().map_err(|_| not_contiguous("scale"))?),
        None => None,
    };
    let out = py
        .detach(|| {
            core::Matrix::from_f32(s, rows, cols).and_then(|m| match sc {
                Some(sc) => core::formats::gint::qdq_scaled(&m, qt, g, sc),
                None => core::formats::gint::qdq(&m, qt, g),
            })
        })
        .map_err(to_py)?;
    numpy::PyArrayMethods::reshape(&out.into_pyarray(py), [rows, cols])
}

#[pyfunction]
#[pyo3(signature = (data, qtype, rows, cols, block_size, stats=None, scale_mode=None, double_quant=None))]
#[allow(clippy::too_many_arguments)]
fn dequantize<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
    qtype: &str,
    rows: usize,
    cols: usize,
    block_size: usize,
    stats: Option<PyReadonlyArray1<'py, f32>>,
    scale_mode: Option<&str>,
    double_quant: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let qtype = core::QType::parse(qtype).map_err(to_py)?;
    let scale_mode = scale_mode
        .map(core::ScaleMode::parse)
        .transpose()
        .map_err(to_py)?;
    let dq = double_quant
        .as_ref()
        .map(extract_double_quant)
        .transpose()?;
    let data_s = data.as_slice().map_err(|_| not_contiguous("data"))?;
    let stats_s: &[f32] = match &stats {
        Some(s) => s.as_slice().map_err(|_| not_contiguous("stats"))?,
        None => &[],
    };
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| QuantizeError::new_err(format!("shape {rows}x{cols} overflows")))?;
    let view = core::QuantizedView {
        qtype,
        rows,
        cols,
        block_size,
        scale_mode,
        data: data_s,
        stats: stats_s,
        double_quant: dq.as_ref(),
    };
    core::formats::tensor::validate_view(&view).map_err(to_py)?;
    let out = py.detach(|| {
        let mut out = vec![0f32; n];
        core::dequantize(&view, &mut out).map(|_| out)
    });
    Ok(out.map_err(to_py)?.into_pyarray(py))
}

/// Dequantize into `out`, a preallocated C-contiguous array of rows * cols elements: float32
/// (the values of `dequantize`) or uint16 (bfloat16 bits, each value rounded to nearest even as
/// torch's cast does). The QLoRA training forward reuses one buffer per shape and dtype.
#[pyfunction]
#[pyo3(signature = (data, qtype, rows, cols, block_size, stats, scale_mode, out))]
#[allow(clippy::too_many_arguments)]
fn dequantize_into<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
    qtype: &str,
    rows: usize,
    cols: usize,
    block_size: usize,
    stats: PyReadonlyArray1<'py, f32>,
    scale_mode: Option<&str>,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    let qtype = core::QType::parse(qtype).map_err(to_py)?;
    let scale_mode = scale_mode
        .map(core::ScaleMode::parse)
        .transpose()
        .map_err(to_py)?;
    let view = core::QuantizedView {
        qtype,
        rows,
        cols,
        block_size,
        scale_mode,
        data: data.as_slice().map_err(|_| not_contiguous("data"))?,
        stats: stats.as_slice().map_err(|_| not_contiguous("stats"))?,
        double_quant: None,
    };
    if let Ok(mut o) = out.extract::<PyReadwriteArray1<'py, f32>>() {
        let o = o.as_slice_mut().map_err(|_| not_contiguous("out"))?;
        py.detach(|| core::dequantize(&view, o)).map_err(to_py)
    } else if let Ok(mut o) = out.extract::<PyReadwriteArray1<'py, u16>>() {
        let o = o.as_slice_mut().map_err(|_| not_contiguous("out"))?;
        py.detach(|| core::quantize::dequantize_bf16(&view, o))
            .map_err(to_py)
    } else {
        Err(QuantizeError::new_err(
            "out must be a 1-D numpy array of float32 or uint16 (bfloat16 bits)",
        ))
    }
}

/// One row of the qtype table: (name, block_size, type_size, bits_per_weight, ggml_id, peer).
type QTypeRow = (&'static str, usize, usize, f64, Option<u32>, &'static str);

/// The qtype table, one row per format.
#[pyfunction]
fn qtypes() -> Vec<QTypeRow> {
    core::QTYPES
        .iter()
        .map(|i| {
            (
                i.name,
                i.block_size,
                i.type_size,
                i.bits_per_weight,
                i.ggml_id,
                i.peer,
            )
        })
        .collect()
}

/// ggml block struct sizes (name, bytes), for the test against the CUDA headers.
#[pyfunction]
fn block_struct_sizes() -> Vec<(&'static str, usize)> {
    core::formats::blocks::BLOCK_SIZES.to_vec()
}

/// (qtype, byte offset, byte length) of each ggml block's quantized values (the rest is scales).
#[pyfunction]
fn block_quant_spans() -> Vec<(&'static str, usize, usize)> {
    core::formats::blocks::QUANT_SPANS.to_vec()
}

/// The instruction set the quantizers use here ("avx2", "neon+dotprod", "neon" or "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    core::cpu::level()
}

/// The widest instruction set the matmul kernels and the runtime use here ("amx-int8",
/// "avx512-vnni", "avx512", "avx2", "neon-i8mm", "neon-dotprod", "neon" or "scalar").
#[pyfunction]
fn kernel_simd_level() -> &'static str {
    core::cpu::kernel_level()
}

/// Whether the AMX tile kernels run here, and if not why ("yes (int8 tiles, ...)" / "no (...)").
#[pyfunction]
fn amx_status() -> String {
    core::amx::status()
}

#[pyfunction]
fn set_num_threads(n: usize) {
    core::parallel::set_num_threads(n)
}

#[pyfunction]
fn num_threads() -> usize {
    core::parallel::num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("QuantizeError", m.py().get_type::<QuantizeError>())?;
    m.add("FormatError", m.py().get_type::<FormatError>())?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(gint_qdq, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_into, m)?)?;
    m.add_function(wrap_pyfunction!(qtypes, m)?)?;
    m.add_function(wrap_pyfunction!(block_struct_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(block_quant_spans, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(amx_status, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_sources::cuda_sources, m)?)?;
    m.add_function(wrap_pyfunction!(kv_tensor::kv_attend_decode, m)?)?;
    m.add_function(wrap_pyfunction!(kv_tensor::kv_wht, m)?)?;
    m.add_function(wrap_pyfunction!(kv_tensor::kv_kivi_encode, m)?)?;
    m.add_class::<kv_state::KvLayerState>()?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul_bf16_split, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul_qtypes, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul_bf16_min_m, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul_bf16_amx_min_m, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::qmatmul_bf16_ggml_min_m, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::stream_read, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::openmp_attach, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::openmp_detach, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::openmp_attached, m)?)?;
    m.add_function(wrap_pyfunction!(matmul::openmp_regions, m)?)?;
    gguf::register(m)?;
    hqq::register(m)?;
    gptq::register(m)?;
    runtime::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
