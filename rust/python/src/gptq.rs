//! Binding of GPTQ's column loop (`core::gptq`) and the bf16 x^T x of its Hessians
//! (`core::gram`): convert, release the GIL, map errors. No numerics.

use ferroquant_core as core;
use numpy::{
    IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::{not_contiguous, to_py, QuantizeError};

fn slice<'a>(a: &'a Option<PyReadonlyArray1<'_, f32>>, what: &str) -> PyResult<&'a [f32]> {
    match a {
        None => Ok(&[]),
        Some(a) => a.as_slice().map_err(|_| not_contiguous(what)),
    }
}

#[allow(clippy::too_many_arguments)]
fn rule(
    name: &str,
    offset: f32,
    center: i64,
    top: i64,
    table: &[f32],
    bounds: &[f32],
    order: &[i64],
) -> PyResult<core::gptq::Rule> {
    use core::gptq::Rule;
    Ok(match name {
        "legacy_sym" => Rule::LegacySym {
            offset,
            center,
            top,
        },
        "legacy_affine" => Rule::LegacyAffine { top },
        "q8" => Rule::Q8,
        "zero" => Rule::Zero { maxq: top as f32 },
        "int8" => Rule::Int8,
        "bnb" => Rule::Bnb {
            bounds: bounds.to_vec(),
            order: order.to_vec(),
            table: table.to_vec(),
        },
        "sym" => Rule::Sym { center, top },
        "table" => Rule::Table {
            table: table.to_vec(),
        },
        "nearest" => Rule::Nearest,
        _ => {
            return Err(QuantizeError::new_err(format!(
                "gptq: unknown rounding rule {name:?}"
            )))
        }
    })
}

/// GPTQ's columns `start..end` of one lazy batch, in place: `w`, `err`, `values` (float32) and
/// `levels` (uint8) are `[n, rows]` (the batch transposed), `hinv` `[n, n]`; the parameter
/// arrays are flat `[end - start, rows]` (`grid`: `[end - start, rows, levels]`), or with `map`
/// (`[end - start]` int64) flat `[k, rows]` and column `start + c` reads parameter column
/// `map[c]`. `from_original`: the LDL form (`core::gptq`): `err` holds the original weights
/// on entry and `hinv` is -V diag(V)^-1.
#[pyfunction]
#[pyo3(signature = (rule_name, w, hinv, err, levels, values, start, end, propagate=true,
    scale=None, inv=None, low=None, zero=None, rscale=None, grid=None, grid_levels=0,
    offset=0.0, center=0, top=0, table=None, bounds=None, order=None, map=None,
    from_original=false))]
#[allow(clippy::too_many_arguments)]
pub fn gptq_columns<'py>(
    py: Python<'py>,
    rule_name: &str,
    mut w: PyReadwriteArray2<'py, f32>,
    hinv: PyReadonlyArray2<'py, f32>,
    mut err: PyReadwriteArray2<'py, f32>,
    mut levels: PyReadwriteArray2<'py, u8>,
    mut values: PyReadwriteArray2<'py, f32>,
    start: usize,
    end: usize,
    propagate: bool,
    scale: Option<PyReadonlyArray1<'py, f32>>,
    inv: Option<PyReadonlyArray1<'py, f32>>,
    low: Option<PyReadonlyArray1<'py, f32>>,
    zero: Option<PyReadonlyArray1<'py, f32>>,
    rscale: Option<PyReadonlyArray1<'py, f32>>,
    grid: Option<PyReadonlyArray1<'py, f32>>,
    grid_levels: usize,
    offset: f32,
    center: i64,
    top: i64,
    table: Option<PyReadonlyArray1<'py, f32>>,
    bounds: Option<PyReadonlyArray1<'py, f32>>,
    order: Option<PyReadonlyArray1<'py, i64>>,
    map: Option<PyReadonlyArray1<'py, i64>>,
    from_original: bool,
) -> PyResult<()> {
    let map: Vec<usize> = match &map {
        None => Vec::new(),
        Some(a) => a
            .as_slice()
            .map_err(|_| not_contiguous("map"))?
            .iter()
            .map(|&m| usize::try_from(m))
            .collect::<Result<_, _>>()
            .map_err(|_| QuantizeError::new_err("gptq: a negative parameter column in map"))?,
    };
    let rows = w.shape()[1];
    let order = match &order {
        None => &[][..],
        Some(a) => a.as_slice().map_err(|_| not_contiguous("order"))?,
    };
    let rule = rule(
        rule_name,
        offset,
        center,
        top,
        slice(&table, "table")?,
        slice(&bounds, "bounds")?,
        order,
    )?;
    let params = core::gptq::ColumnParams {
        map: &map,
        scale: slice(&scale, "scale")?,
        inv: slice(&inv, "inv")?,
        low: slice(&low, "low")?,
        zero: slice(&zero, "zero")?,
        rscale: slice(&rscale, "rscale")?,
        grid: slice(&grid, "grid")?,
        levels: grid_levels,
    };
    // as_slice also takes Fortran order; every buffer here is read as row-major
    for (name, c) in [
        ("w", w.is_c_contiguous()),
        ("hinv", hinv.is_c_contiguous()),
        ("err", err.is_c_contiguous()),
        ("levels", levels.is_c_contiguous()),
        ("values", values.is_c_contiguous()),
    ] {
        if !c {
            return Err(not_contiguous(name));
        }
    }
    let hinv = hinv.as_slice().map_err(|_| not_contiguous("hinv"))?;
    let w = w.as_slice_mut().map_err(|_| not_contiguous("w"))?;
    let err = err.as_slice_mut().map_err(|_| not_contiguous("err"))?;
    let levels = levels
        .as_slice_mut()
        .map_err(|_| not_contiguous("levels"))?;
    let values = values
        .as_slice_mut()
        .map_err(|_| not_contiguous("values"))?;
    py.detach(|| {
        let mut batch = core::gptq::Batch {
            rows,
            w,
            hinv,
            err,
            levels,
            values,
            from_original,
        };
        core::gptq::solve_columns(&mut batch, start, end, &rule, &params, propagate)
    })
    .map_err(to_py)
}

/// GPTQ's codes `levels` (`[cols, rows]` uint8, solve order: row `p` is natural column
/// `perm[p]`) into the block bytes `data` (`[rows, cols / block * nbytes]` uint8, in place) by
/// the format's bit map (`byte` / `shift`: `[block * bits]`, stored code `level ^ xor`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn gptq_pack<'py>(
    py: Python<'py>,
    mut data: PyReadwriteArray2<'py, u8>,
    levels: PyReadonlyArray2<'py, u8>,
    perm: PyReadonlyArray1<'py, i64>,
    block: usize,
    nbytes: usize,
    bits: usize,
    byte: PyReadonlyArray1<'py, i64>,
    shift: PyReadonlyArray1<'py, i64>,
    xor: u8,
) -> PyResult<()> {
    let rows = levels.shape()[1];
    if !levels.is_c_contiguous() || !data.is_c_contiguous() {
        return Err(not_contiguous(if data.is_c_contiguous() {
            "levels"
        } else {
            "data"
        }));
    }
    let index = |a: &PyReadonlyArray1<'py, i64>, what: &str| -> PyResult<Vec<usize>> {
        a.as_slice()
            .map_err(|_| not_contiguous(what))?
            .iter()
            .map(|&v| usize::try_from(v))
            .collect::<Result<_, _>>()
            .map_err(|_| QuantizeError::new_err(format!("gptq pack: a negative entry in {what}")))
    };
    let perm = index(&perm, "perm")?;
    let byte = index(&byte, "byte")?;
    let shift: Vec<u8> = index(&shift, "shift")?
        .into_iter()
        .map(|s| s.min(255) as u8)
        .collect();
    let levels = levels.as_slice().map_err(|_| not_contiguous("levels"))?;
    let data = data.as_slice_mut().map_err(|_| not_contiguous("data"))?;
    let plan = core::gptq::BitPlan {
        block,
        nbytes,
        bits,
        byte: &byte,
        shift: &shift,
        xor,
    };
    py.detach(|| core::gptq::pack_codes(data, levels, rows, &perm, &plan))
        .map_err(to_py)
}

/// `src` (`[r, c]` float32) transposed with `idx` gathering its columns (`rows=False`:
/// `out[a, b] = src[b, idx[a]]`, `[c, r]`, `idx` a permutation of `0..c`) or its rows (`rows=True`:
/// `out[a, b] = src[idx[b], a]`, `[c, len(idx)]`), in one cache-blocked pass.
#[pyfunction]
#[pyo3(signature = (src, idx, rows=false))]
pub fn gptq_gather_t<'py>(
    py: Python<'py>,
    src: PyReadonlyArray2<'py, f32>,
    idx: PyReadonlyArray1<'py, i64>,
    rows: bool,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (r, c) = (src.shape()[0], src.shape()[1]);
    if !src.is_c_contiguous() {
        return Err(not_contiguous("src"));
    }
    let idx: Vec<usize> = idx
        .as_slice()
        .map_err(|_| not_contiguous("idx"))?
        .iter()
        .map(|&v| usize::try_from(v))
        .collect::<Result<_, _>>()
        .map_err(|_| QuantizeError::new_err("gptq_gather_t: a negative index"))?;
    let (how, shape) = if rows {
        (core::gptq::Gather::Rows, [c, idx.len()])
    } else {
        (core::gptq::Gather::Columns, [idx.len(), r])
    };
    let src = src.as_slice().map_err(|_| not_contiguous("src"))?;
    let out = py
        .detach(|| {
            let mut out = vec![0.0f32; shape[0] * shape[1]];
            core::gptq::gather_transpose(src, r, c, &idx, how, &mut out).map(|_| out)
        })
        .map_err(to_py)?;
    out.into_pyarray(py).reshape(shape)
}

/// `src` (`[n, n]` float64) with rows and columns gathered by `idx` (a permutation of
/// `0..n`), rounded to float32: `out[a, b] = f32(src[idx[a], idx[b]])`, in one pass.
#[pyfunction]
pub fn gptq_permute_f32<'py>(
    py: Python<'py>,
    src: PyReadonlyArray2<'py, f64>,
    idx: PyReadonlyArray1<'py, i64>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let n = src.shape()[0];
    if src.shape()[1] != n {
        return Err(QuantizeError::new_err(format!(
            "gptq_permute_f32: a [{n}, {}] matrix is not square",
            src.shape()[1]
        )));
    }
    if !src.is_c_contiguous() {
        return Err(not_contiguous("src"));
    }
    let idx: Vec<usize> = idx
        .as_slice()
        .map_err(|_| not_contiguous("idx"))?
        .iter()
        .map(|&v| usize::try_from(v))
        .collect::<Result<_, _>>()
        .map_err(|_| QuantizeError::new_err("gptq_permute_f32: a negative index"))?;
    let src = src.as_slice().map_err(|_| not_contiguous("src"))?;
    let out = py
        .detach(|| {
            let mut out = vec![0.0f32; n * n];
            core::gptq::permute_to_f32(src, n, &idx, &mut out).map(|_| out)
        })
        .map_err(to_py)?;
    out.into_pyarray(py).reshape([n, n])
}

/// x^T x (`[d, d]` float32) of `x` `[n, d]`: bf16 bits as uint16, row-major; `path` one of
/// "amx", "avx512bf16", "scalar" (None: the fastest here).
#[pyfunction]
#[pyo3(signature = (x, path=None))]
pub fn gram_bf16<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, u16>,
    path: Option<&str>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (n, d) = (x.shape()[0], x.shape()[1]);
    if !x.is_c_contiguous() {
        return Err(not_contiguous("x"));
    }
    let path = match path {
        None => core::gram::Path::best(),
        Some("amx") => core::gram::Path::Amx,
        Some("avx512bf16") => core::gram::Path::Avx512Bf16,
        Some("scalar") => core::gram::Path::Scalar,
        Some(other) => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "gram_bf16: path {other:?} is not one of \"amx\", \"avx512bf16\", \"scalar\""
            )))
        }
    };
    let bits = x.as_slice().map_err(|_| not_contiguous("x"))?;
    let out = py
        .detach(|| core::gram::gram_bf16_on(bits, n, d, path))
        .map_err(to_py)?;
    out.into_pyarray(py).reshape([d, d])
}

/// Whether `gram_bf16` runs a fast kernel (AMX or AVX-512 BF16) on this CPU.
#[pyfunction]
pub fn gram_bf16_fast() -> bool {
    core::gram::fast()
}

/// The paths `gram_bf16` can run here, fastest (its default) first.
#[pyfunction]
pub fn gram_bf16_paths() -> Vec<&'static str> {
    use core::gram::Path;
    [Path::Amx, Path::Avx512Bf16, Path::Scalar]
        .into_iter()
        .filter(|p| p.usable())
        .map(|p| p.name())
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gptq_columns, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_pack, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_gather_t, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_permute_f32, m)?)?;
    m.add_function(wrap_pyfunction!(gram_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(gram_bf16_fast, m)?)?;
    m.add_function(wrap_pyfunction!(gram_bf16_paths, m)?)?;
    Ok(())
}
