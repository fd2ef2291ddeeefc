//! The public entry points: validate the request once, then hand it to the format family.

use crate::error::{Error, Result};
use crate::formats::tensor::{validate_view, Quantized, QuantizedView, ScaleMode};
use crate::formats::{self, bnb4, fp8, gint, int8};
use crate::input::{map_rows, map_rows_out, Matrix};
use crate::qtype::QType;

/// Optional knobs of `quantize`; `Default` gives every format's defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'a> {
    /// Per-column importance (ggml's quant_weights), one value per column.
    pub imatrix: Option<&'a [f32]>,
    /// Block size for nf4/fp4 (default 64) and int8/fp8 in block mode (default 64).
    pub block_size: Option<usize>,
    /// bitsandbytes double quantization of the absmax (nf4/fp4 only).
    pub double_quant: bool,
    /// Scale granularity for int8/fp8 (default: per row).
    pub scale_mode: Option<ScaleMode>,
}

/// The largest finite float16 value.
const F16_MAX: f32 = 65504.0;

const ALLOWED_BLOCKS: &str = "a power of two from 32 to 4096";

fn check_block_size(qtype: QType, b: usize) -> Result<usize> {
    if b.is_power_of_two() && (32..=4096).contains(&b) {
        Ok(b)
    } else {
        Err(Error::BlockSize {
            qtype: qtype.name(),
            got: b,
            allowed: ALLOWED_BLOCKS,
        })
    }
}

fn reject(what: &str, qtype: QType) -> Error {
    Error::InvalidArgument(format!("{what} does not apply to {}", qtype.name()))
}

fn check_imatrix(w: &[f32], cols: usize) -> Result<()> {
    if w.len() != cols {
        return Err(Error::ImatrixLength {
            got: w.len(),
            expected: cols,
        });
    }
    if let Some((index, &value)) = w
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || **v < 0.0)
    {
        return Err(Error::ImatrixValue { index, value });
    }
    Ok(())
}

/// Quantize `m` (rows along the last axis) to `qtype`.
pub fn quantize(m: &Matrix<'_>, qtype: QType, opts: &Options<'_>) -> Result<Quantized> {
    use QType::*;
    let is_bnb = matches!(qtype, NF4 | FP4);
    let is_scaled = matches!(qtype, Int8 | Fp8E4M3 | Fp8E5M2);
    if opts.double_quant && !is_bnb {
        return Err(reject("double_quant", qtype));
    }
    if opts.scale_mode.is_some() && !is_scaled {
        return Err(reject("scale_mode", qtype));
    }
    if opts.block_size.is_some() && !(is_bnb || is_scaled) {
        return Err(reject(
            "block_size (ggml formats have a fixed block size)",
            qtype,
        ));
    }
    if opts.imatrix.is_some() && !qtype.is_ggml() {
        return Err(reject("imatrix", qtype));
    }
    if let Some(w) = opts.imatrix {
        check_imatrix(w, m.cols)?;
    }
    if let GInt(g) = qtype {
        // The group is part of the qtype's name; the check names the qtype and the row.
        m.check_range(F16_MAX, qtype.name())?;
        return gint::quantize(m, qtype, g);
    }
    let scale_mode = opts.scale_mode.unwrap_or(ScaleMode::Row);
    let block_size = match (qtype, opts.block_size) {
        (_, Some(b)) => check_block_size(qtype, b)?,
        (NF4 | FP4 | Int8 | Fp8E4M3 | Fp8E5M2, None) => 64,
        _ => qtype.info().block_size,
    };
    let needs_whole_blocks = !is_scaled || scale_mode == ScaleMode::Block;
    if needs_whole_blocks && !m.cols.is_multiple_of(block_size) {
        return Err(Error::RowLength {
            qtype: qtype.name(),
            rows: m.rows,
            cols: m.cols,
            block_size,
        });
    }
    // ggml formats store float16 (scales, minimums, or the values themselves): inputs beyond
    // the float16 range would silently become Inf/NaN on dequantization, so they are refused.
    if qtype.is_ggml() && !matches!(qtype, F32 | BF16) {
        m.check_range(F16_MAX, qtype.name())?;
    } else {
        m.check_finite()?;
    }
    match qtype {
        NF4 | FP4 => bnb4::quantize(m, qtype, block_size, opts.double_quant),
        Int8 => int8::quantize(m, scale_mode, block_size),
        Fp8E4M3 | Fp8E5M2 => fp8::quantize(m, qtype, scale_mode, block_size),
        _ => Ok(quantize_ggml(m, qtype, opts.imatrix)),
    }
}

fn quantize_ggml(m: &Matrix<'_>, qtype: QType, imatrix: Option<&[f32]>) -> Quantized {
    let block_size = qtype.info().block_size;
    let row_bytes = qtype.row_bytes(m.cols, block_size);
    let mut data = vec![0u8; m.rows * row_bytes];
    map_rows(m, &mut data, row_bytes, &mut [], 0, |_, x, out, _| {
        formats::ggml_quantize_row(qtype, x, out, imatrix)
    });
    Quantized {
        qtype,
        rows: m.rows,
        cols: m.cols,
        block_size,
        scale_mode: None,
        data,
        stats: Vec::new(),
        double_quant: None,
    }
}

/// Dequantize into `out` (rows * cols f32).
pub fn dequantize(q: &QuantizedView<'_>, out: &mut [f32]) -> Result<()> {
    use QType::*;
    validate_view(q)?;
    if out.len() != q.rows * q.cols {
        return Err(Error::InvalidArgument(format!(
            "output has {} elements, shape {}x{} needs {}",
            out.len(),
            q.rows,
            q.cols,
            q.rows * q.cols
        )));
    }
    match q.qtype {
        NF4 | FP4 => bnb4::dequantize(q, out),
        Int8 => int8::dequantize(q, out),
        Fp8E4M3 | Fp8E5M2 => fp8::dequantize(q, out),
        GInt(g) => gint::dequantize(q, g, out),
        qtype => {
            let row_bytes = qtype.row_bytes(q.cols, q.block_size);
            map_rows_out(q.data, row_bytes, &[], 0, out, q.cols, |_, d, _, y| {
                formats::ggml_dequantize_row(qtype, d, y)
            });
            Ok(())
        }
    }
}
