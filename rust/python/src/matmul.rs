//! Binding of the quantized CPU matmul: convert, release the GIL, map errors. No numerics.

use ferroquant_core as core;
use numpy::{
    IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::{not_contiguous, to_py};

/// The quantized weight of a `qmatmul*` call as a core view (N x K in `qtype`'s layout).
fn weight_view<'a>(
    data: &'a PyReadonlyArray1<'_, u8>,
    qtype: &str,
    n: usize,
    k: usize,
    block_size: usize,
    stats: &'a Option<PyReadonlyArray1<'_, f32>>,
    scale_mode: Option<&str>,
) -> PyResult<core::QuantizedView<'a>> {
    let qtype = core::QType::parse(qtype).map_err(to_py)?;
    let scale_mode = scale_mode
        .map(core::ScaleMode::parse)
        .transpose()
        .map_err(to_py)?;
    let data_s = data.as_slice().map_err(|_| not_contiguous("data"))?;
    let stats_s: &[f32] = match stats {
        Some(s) => s.as_slice().map_err(|_| not_contiguous("stats"))?,
        None => &[],
    };
    Ok(core::QuantizedView {
        qtype,
        rows: n,
        cols: k,
        block_size,
        scale_mode,
        data: data_s,
        stats: stats_s,
        double_quant: None,
    })
}

/// x's elements in row order. `as_slice` also accepts Fortran order (a transposed array), which
/// would be read wrongly, so C order is checked first.
fn rows_of<'a, T: numpy::Element>(x: &'a PyReadonlyArray2<'_, T>) -> PyResult<&'a [T]> {
    if !x.is_c_contiguous() {
        return Err(not_contiguous("x"));
    }
    x.as_slice().map_err(|_| not_contiguous("x"))
}

/// An `m x n` output's element count, or the error naming the shape that overflows.
fn output_len(m: usize, n: usize) -> core::Result<usize> {
    m.checked_mul(n)
        .ok_or_else(|| core::Error::InvalidArgument(format!("output shape {m}x{n} overflows")))
}

/// `run` with the GIL released, on the attached OpenMP team when `openmp` (else the pool).
fn detached<T: Send>(
    py: Python<'_>,
    openmp: bool,
    run: impl FnOnce() -> core::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| {
        if openmp {
            core::parallel::on_openmp(run)
        } else {
            run()
        }
    })
    .map_err(to_py)
}

/// `y = x · Wᵀ`: x (M x K float32, C-contiguous), W given as its raw quantized data (N x K in
/// `qtype`'s layout) plus statistics (nf4 absmax, int8 / fp8 scales). Returns y (M x N float32).
/// With `openmp`, the parallel work runs on the attached OpenMP team (`openmp_attach`: torch's,
/// for QuantLinear) when there is one, with the same result.
#[pyfunction]
#[pyo3(signature = (x, data, qtype, n, k, block_size, stats=None, scale_mode=None, openmp=false))]
#[allow(clippy::too_many_arguments)]
pub fn qmatmul<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    data: PyReadonlyArray1<'py, u8>,
    qtype: &str,
    n: usize,
    k: usize,
    block_size: usize,
    stats: Option<PyReadonlyArray1<'py, f32>>,
    scale_mode: Option<&str>,
    openmp: bool,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let m = x.shape()[0];
    let xs = rows_of(&x)?;
    let view = weight_view(&data, qtype, n, k, block_size, &stats, scale_mode)?;
    let y = detached(py, openmp, || {
        let mut y = vec![0f32; output_len(m, n)?];
        core::matmul::qmatmul(xs, m, &view, &mut y).map(|_| y)
    })?;
    y.into_pyarray(py).reshape([m, n])
}

/// `qmatmul` on bfloat16: x (M x K uint16 holding bf16 bits, C-contiguous), returns y (M x N
/// uint16, bf16 bits): the f32 product of the widened x, each output rounded to nearest even
/// as torch's `.to(torch.bfloat16)` (QuantLinear in a bf16 model, without the two casts).
#[pyfunction]
#[pyo3(signature = (x, data, qtype, n, k, block_size, stats=None, scale_mode=None, openmp=false))]
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_bf16<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, u16>,
    data: PyReadonlyArray1<'py, u8>,
    qtype: &str,
    n: usize,
    k: usize,
    block_size: usize,
    stats: Option<PyReadonlyArray1<'py, f32>>,
    scale_mode: Option<&str>,
    openmp: bool,
) -> PyResult<Bound<'py, PyArray2<u16>>> {
    let m = x.shape()[0];
    let xs = rows_of(&x)?;
    let view = weight_view(&data, qtype, n, k, block_size, &stats, scale_mode)?;
    output_len(m, n).map_err(to_py)?;
    // SAFETY: a new C-ordered array, not yet shared; `qmatmul_bf16` writes every element before
    // it is returned, and it is dropped unread when the call fails.
    let out = unsafe { PyArray2::<u16>::new(py, [m, n], false) };
    {
        let mut rw = out.readwrite();
        let ys = rw.as_slice_mut().map_err(|_| not_contiguous("output"))?;
        detached(py, openmp, || {
            core::matmul::bf16_io::qmatmul_bf16(xs, m, &view, ys)
        })?;
    }
    Ok(out)
}

/// `qmatmul_bf16` of weights stacked row-wise (`parts[i]` rows each, their data and statistics
/// concatenated: QuantLinear's fused q/k/v or gate/up), one output per part: a list of
/// (M x parts[i]) uint16 arrays of bf16 bits, each the bits of that weight's own call.
#[pyfunction]
#[pyo3(signature = (x, data, qtype, parts, k, block_size, stats=None, scale_mode=None, openmp=false))]
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_bf16_split<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, u16>,
    data: PyReadonlyArray1<'py, u8>,
    qtype: &str,
    parts: Vec<usize>,
    k: usize,
    block_size: usize,
    stats: Option<PyReadonlyArray1<'py, f32>>,
    scale_mode: Option<&str>,
    openmp: bool,
) -> PyResult<Vec<Bound<'py, PyArray2<u16>>>> {
    let m = x.shape()[0];
    let xs = rows_of(&x)?;
    let n = parts.iter().try_fold(0usize, |a, &p| a.checked_add(p));
    let n = n.ok_or_else(|| to_py(core::Error::InvalidArgument("parts overflow".into())))?;
    let view = weight_view(&data, qtype, n, k, block_size, &stats, scale_mode)?;
    for &p in &parts {
        output_len(m, p).map_err(to_py)?;
    }
    // SAFETY: new C-ordered arrays, not yet shared; `qmatmul_bf16_split` writes every element
    // of each before they are returned, and they are dropped unread when the call fails.
    let outs: Vec<_> = parts
        .iter()
        .map(|&p| unsafe { PyArray2::<u16>::new(py, [m, p], false) })
        .collect();
    {
        let mut rws: Vec<_> = outs.iter().map(|o| o.readwrite()).collect();
        let mut ys = rws
            .iter_mut()
            .map(|rw| rw.as_slice_mut().map_err(|_| not_contiguous("output")))
            .collect::<PyResult<Vec<&mut [u16]>>>()?;
        detached(py, openmp, || {
            core::matmul::bf16_io::qmatmul_bf16_split(xs, m, &view, &mut ys)
        })?;
    }
    Ok(outs)
}

/// Run `qmatmul(..., openmp=True)` on the OpenMP runtime that the already-loaded library `path`
/// uses (torch's `_C` extension: torch's libgomp). False when there is none; never loads one.
#[pyfunction]
pub fn openmp_attach(path: &str) -> bool {
    core::openmp::attach(path)
}

/// Forget the attached OpenMP runtime: `openmp=True` calls use the rayon pool again.
#[pyfunction]
pub fn openmp_detach() {
    core::openmp::detach()
}

/// True when an OpenMP runtime is attached.
#[pyfunction]
pub fn openmp_attached() -> bool {
    core::openmp::attached()
}

/// How many parallel regions have run on the attached OpenMP team in this process.
#[pyfunction]
pub fn openmp_regions() -> u64 {
    core::openmp::regions_run()
}

/// Names of the weight qtypes `qmatmul` has kernels for.
#[pyfunction]
pub fn qmatmul_qtypes() -> Vec<&'static str> {
    core::qtype::QTYPES
        .iter()
        .filter(|i| core::matmul::supports(i.qtype))
        .map(|i| i.name)
        .collect()
}

/// From this many activation rows (K a multiple of 32) nf4, int8, fp8 and the grouped integers
/// take the bf16 GEMM and its numerics (`reference/bf16.rs`); 0 where this CPU has no such path.
#[pyfunction]
pub fn qmatmul_bf16_min_m() -> usize {
    core::matmul::bf16_gemm_min_m()
}

/// From this many rows the bf16 GEMM runs on AMX tiles (its own summation order, within
/// `x86::amx_bf16::error_bound` instead of `reference/bf16.rs`'s bits); 0 where it does not.
#[pyfunction]
pub fn qmatmul_bf16_amx_min_m() -> usize {
    core::matmul::bf16_amx_min_m()
}

/// From this many rows the ggml format `qtype` (q4_0 .. q8_0, iq4_nl, q2_k .. q6_k, iq4_xs)
/// with rows of `k` weights takes the bf16 GEMM on AMX tiles (weights dequantized and rounded
/// to bf16, activations rounded to bf16: within `x86::amx_bf16::error_bound`, not the q8
/// activations' bits); 0 where it does not (no AMX bf16, another format,
/// `FERROQUANT_GGML_BF16=0`). The K-quants' thresholds depend on K (`matmul::k_route`).
#[pyfunction]
pub fn qmatmul_bf16_ggml_min_m(qtype: &str, k: usize) -> PyResult<usize> {
    let qtype = core::QType::parse(qtype).map_err(to_py)?;
    Ok(core::matmul::ggml_bf16_min_m(qtype, k))
}

/// Memory read bandwidth helper of the benchmarks: a streaming read of `data` (the pool's
/// threads, one contiguous part each; `streams` sub-parts a thread in lock step, 1, 2, 4 or 8,
/// each software-prefetched `ahead` bytes in front, with 512-bit loads where the CPU has
/// AVX-512 and `vector`), returning a checksum; time it from Python.
#[pyfunction]
#[pyo3(signature = (data, streams=2, ahead=0, vector=true))]
pub fn stream_read(
    py: Python<'_>,
    data: PyReadonlyArray1<'_, u8>,
    streams: usize,
    ahead: usize,
    vector: bool,
) -> PyResult<u64> {
    let d = data.as_slice().map_err(|_| not_contiguous("data"))?;
    if !matches!(streams, 1 | 2 | 4 | 8) {
        return Err(crate::QuantizeError::new_err(format!(
            "stream_read: streams must be 1, 2, 4 or 8, not {streams}"
        )));
    }
    let probe = core::matmul::bandwidth::Probe {
        vector,
        streams,
        ahead,
    };
    Ok(py.detach(|| core::matmul::bandwidth::stream_read_with(d, probe)))
}
