//! Binding of the HQQ solver and of HQQ-optimised quantization: convert, release the GIL, map
//! errors. No numerics.

use ferroquant_core as core;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::{not_contiguous, to_py};

fn config(
    lp_norm: f32,
    beta: f64,
    kappa: f64,
    iters: u32,
    early_stop: bool,
) -> core::hqq::HqqConfig {
    core::hqq::HqqConfig {
        lp_norm,
        beta,
        kappa,
        iters,
        early_stop,
    }
}

/// HQQ's float parameters of `w` (float32, C-contiguous) cut into groups of `group`
/// consecutive values: (inverse scales, zeros, steps run). `reference` runs the scalar reference.
#[pyfunction]
#[pyo3(signature = (w, group, bits, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20, early_stop=true, reference=false))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn hqq_solve<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    group: usize,
    bits: u8,
    lp_norm: f32,
    beta: f64,
    kappa: f64,
    iters: u32,
    early_stop: bool,
    reference: bool,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>, u32)> {
    let s = w.as_slice().map_err(|_| not_contiguous("weight"))?;
    let cfg = config(lp_norm, beta, kappa, iters, early_stop);
    let solved = py
        .detach(|| {
            if reference {
                core::hqq::solve_reference(s, group, bits, &cfg)
            } else {
                core::hqq::solve(s, group, bits, &cfg)
            }
        })
        .map_err(to_py)?;
    Ok((
        solved.inv_scale.into_pyarray(py),
        solved.zero.into_pyarray(py),
        solved.steps,
    ))
}

/// `w` (float32 rows x cols, C-contiguous) as an HQQ-optimised tensor of `qtype`: a dict with
/// block_size, data and stats in the layout `quantize` returns.
#[pyfunction]
#[pyo3(signature = (w, qtype, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20, early_stop=true))]
#[allow(clippy::too_many_arguments)]
pub fn hqq_quantize<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    qtype: &str,
    lp_norm: f32,
    beta: f64,
    kappa: f64,
    iters: u32,
    early_stop: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let qtype = core::QType::parse(qtype).map_err(to_py)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let s = w.as_slice().map_err(|_| not_contiguous("weight"))?;
    let cfg = config(lp_norm, beta, kappa, iters, early_stop);
    let q = py
        .detach(|| {
            core::Matrix::from_f32(s, rows, cols)
                .and_then(|m| core::hqq::store::quantize(&m, qtype, &cfg))
        })
        .map_err(to_py)?;
    let out = PyDict::new(py);
    out.set_item("block_size", q.block_size)?;
    out.set_item("data", q.data.into_pyarray(py))?;
    out.set_item("stats", q.stats.into_pyarray(py))?;
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hqq_solve, m)?)?;
    m.add_function(wrap_pyfunction!(hqq_quantize, m)?)?;
    Ok(())
}
