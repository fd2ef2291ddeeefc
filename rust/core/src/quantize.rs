//! The public entry points: validate the request once, then hand it to the format family.

use crate::error::{Error, Result};
use crate::formats::tensor::{validate_view, Quantized, QuantizedView, ScaleMode};
use crate::formats::{self, bnb4, fp8, gint, int8};
use crate::input::{map_rows, map_rows_out, Matrix};
use crate::qtype::QType;
use rayon::prelude::*;

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
pub(crate) const F16_MAX: f32 = 65504.0;

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

/// float32 -> bfloat16 bits, rounded to nearest even, NaN to 0x7fc0: c10's
/// `round_to_nearest_even`, i.e. torch's `Tensor.to(torch.bfloat16)` for every non-NaN value.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Dequantize into `out` (rows * cols bfloat16 bits): the values of `dequantize`, each rounded
/// by `f32_to_bf16`, so the result equals torch's cast of the float32 reference bit for bit.
/// Formats whose data and statistics split by rows (ggml types, nf4/fp4 with plain absmax) are
/// converted row by row (nf4/fp4 straight to bfloat16) with no float32 copy of the matrix, and
/// on a pool of one thread in the calling thread: the QLoRA training forward dequantizes every
/// weight twice per step, and a hand-off to the pool's thread costs a wake-up each time.
pub fn dequantize_bf16(q: &QuantizedView<'_>, out: &mut [u16]) -> Result<()> {
    use QType::*;
    validate_view(q)?;
    let (rows, cols) = (q.rows, q.cols);
    if out.len() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "output has {} elements, shape {rows}x{cols} needs {}",
            out.len(),
            rows * cols
        )));
    }
    let per_task = crate::parallel::rows_per_task(rows, cols);
    let row_bytes = q.qtype.row_bytes(cols, q.block_size);
    match q.qtype {
        NF4 | FP4 if q.double_quant.is_none() => {
            bnb4::check_row_blocks(q)?;
            let row_blocks = cols / q.block_size;
            if q.stats.len() != rows * row_blocks {
                return Err(Error::InvalidArgument(format!(
                    "{}: {} absmax values, shape {rows}x{cols} in blocks of {} needs {}",
                    q.qtype.name(),
                    q.stats.len(),
                    q.block_size,
                    rows * row_blocks
                )));
            }
            let c = bnb4::code(q.qtype);
            for_each_row_chunk(out, cols, per_task, |r0, o| {
                for (i, y) in o.chunks_exact_mut(cols).enumerate() {
                    let r = r0 + i;
                    let d = &q.data[r * row_bytes..(r + 1) * row_bytes];
                    let s = &q.stats[r * row_blocks..(r + 1) * row_blocks];
                    bnb4::dequantize_row(&c, q.block_size, d, s, y, f32_to_bf16);
                }
            });
        }
        Int8 | Fp8E4M3 | Fp8E5M2 | GInt(_) | NF4 | FP4 => {
            let mut f = vec![0f32; rows * cols];
            dequantize(q, &mut f)?;
            for_each_row_chunk(out, cols, per_task, |r0, o| {
                let x = &f[r0 * cols..r0 * cols + o.len()];
                o.iter_mut().zip(x).for_each(|(o, &x)| *o = f32_to_bf16(x));
            });
        }
        qtype => for_each_row_chunk(out, cols, per_task, |r0, o| {
            let mut y = vec![0f32; cols];
            for (i, orow) in o.chunks_exact_mut(cols).enumerate() {
                let r = r0 + i;
                formats::ggml_dequantize_row(
                    qtype,
                    &q.data[r * row_bytes..(r + 1) * row_bytes],
                    &mut y,
                );
                orow.iter_mut()
                    .zip(&y)
                    .for_each(|(o, &x)| *o = f32_to_bf16(x));
            }
        }),
    }
    Ok(())
}

/// `f(first_row, rows)` over `out` (rows of `cols`) in tasks of `per_task` rows: inline in the
/// calling thread on a pool of one thread, else on the pool.
fn for_each_row_chunk<T: Send>(
    out: &mut [T],
    cols: usize,
    per_task: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = per_task * cols;
    if crate::parallel::num_threads() == 1 {
        for (t, o) in out.chunks_mut(chunk).enumerate() {
            f(t * per_task, o);
        }
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(t, o)| f(t * per_task, o));
        });
    }
}

#[cfg(test)]
mod bf16_tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // halfway between 0x3f80 and 0x3f81: ties to the even 0x3f80; above it rounds up
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // overflows to +inf, as torch does
        assert_eq!(f32_to_bf16(f32::NAN), 0x7fc0);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
    }

    #[test]
    fn bf16_equals_rounded_reference_for_split_and_whole_paths() {
        let (rows, cols) = (37, 256);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let m = Matrix::from_f32(&x, rows, cols).unwrap();
        // nf4/fp4 straight to bf16, ggml row by row, int8/fp8 through a float32 copy; on a pool
        // of one thread (inline) and of two (tasks of 3 rows)
        let all = crate::parallel::num_threads();
        for (threads, qtype) in [1, 2]
            .into_iter()
            .flat_map(|t| ["nf4", "fp4", "q4_k", "q8_0", "int8", "fp8_e4m3"].map(|q| (t, q)))
        {
            crate::parallel::set_num_threads(threads);
            let qt = QType::parse(qtype).unwrap();
            let q = quantize(&m, qt, &Options::default()).unwrap();
            let mut f = vec![0f32; rows * cols];
            dequantize(&q.view(), &mut f).unwrap();
            let mut b = vec![0u16; rows * cols];
            dequantize_bf16(&q.view(), &mut b).unwrap();
            let want: Vec<u16> = f.iter().map(|&v| f32_to_bf16(v)).collect();
            assert_eq!(b, want, "{qtype}, {threads} thread(s)");
        }
        crate::parallel::set_num_threads(all);
    }
}
