//! int8: symmetric absmax quantization, one float32 scale per tensor, row or block.
//!
//! Defined as this torch expression on the input converted to float32 (exact for float16 and
//! bfloat16), with `amax` taken over the tensor, each row, or each block of `block_size`
//! values along the row:
//!
//! ```text
//! scale = amax / 127                                  # float32 division
//! safe  = torch.where(scale == 0, 1.0, scale)
//! q     = torch.round(x / safe).clamp(-127, 127).to(torch.int8)   # round half to even
//! x'    = q.to(torch.float32) * scale
//! ```
//!
//! An all-zero group (or one whose amax / 127 underflows to 0) has scale 0 and stores q = 0.
//! `Quantized.stats` holds the scales in row-major order (1, rows, or rows * cols / block_size
//! values); `Quantized.block_size` is the number of weights sharing one scale (rows * cols,
//! cols, or the block size), and dequantize checks it against the scale mode.

use crate::error::{Error, Result};
use crate::formats::tensor::{Quantized, QuantizedView, ScaleMode};
use crate::input::{map_rows, map_rows_out, Matrix};
use crate::qtype::QType;

/// The scale of a group whose largest magnitude is `amax`.
#[inline]
pub fn scale_of(amax: f32) -> f32 {
    amax / 127.0
}

/// One value: `round_half_even(x / scale)` clamped to [-127, 127] (scale 0 divides by 1).
#[inline]
pub fn quantize_value(x: f32, scale: f32) -> i8 {
    let d = if scale == 0.0 { 1.0 } else { scale };
    // Clamping first cannot change the result (round(v) for v in (127, 127.5) is 127, and
    // from 127.5 up it is 128, clamped to 127 either way), and for |v| <= 127 adding and
    // subtracting 1.5 * 2^23 rounds to an integer, ties to even, in two exact-or-RNE steps:
    // the same as `round_ties_even`, without a libm call on CPUs lacking SSE4.1's roundss.
    const MAGIC: f32 = 12_582_912.0;
    let v = (x / d).clamp(-127.0, 127.0);
    ((v + MAGIC) - MAGIC) as i8
}

pub fn quantize(m: &Matrix<'_>, mode: ScaleMode, block_size: usize) -> Result<Quantized> {
    quantize_scaled(m, QType::Int8, mode, block_size, scale_of, |x, s| {
        quantize_value(x, s) as u8
    })
}

pub fn dequantize(q: &QuantizedView<'_>, out: &mut [f32]) -> Result<()> {
    dequantize_scaled(q, out, |b| b as i8 as f32)
}

// ---- shared by the one-byte-per-weight formats (int8 here, fp8 in fp8.rs) ----

/// Weights sharing one scale, and scales per row (0 in tensor mode: one scale for all rows).
fn geometry(mode: ScaleMode, rows: usize, cols: usize, block_size: usize) -> (usize, usize) {
    match mode {
        ScaleMode::Tensor => (rows * cols, 0),
        ScaleMode::Row => (cols, 1),
        ScaleMode::Block => (block_size, cols / block_size),
    }
}

fn group_amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Quantize with one scale per group: `scale_of(amax)` gives the scale, `encode(x, scale)` the
/// stored byte. Tensor mode takes amax over the whole matrix first; the other modes compute it
/// per row / block inside the row loop, so results never depend on the thread count.
pub(crate) fn quantize_scaled(
    m: &Matrix<'_>,
    qtype: QType,
    mode: ScaleMode,
    block_size: usize,
    scale_of: impl Fn(f32) -> f32 + Sync,
    encode: impl Fn(f32, f32) -> u8 + Sync,
) -> Result<Quantized> {
    let (group, per_row) = geometry(mode, m.rows, m.cols, block_size);
    let tensor_scale = (mode == ScaleMode::Tensor).then(|| scale_of(m.abs_max()));
    let chunk = if mode == ScaleMode::Block {
        block_size
    } else {
        m.cols
    };
    let mut data = vec![0u8; m.rows * m.cols];
    let mut stats = vec![0f32; m.rows * per_row];
    map_rows(
        m,
        &mut data,
        m.cols,
        &mut stats,
        per_row,
        |_, x, out, st| {
            for (k, (xb, ob)) in x
                .chunks_exact(chunk)
                .zip(out.chunks_exact_mut(chunk))
                .enumerate()
            {
                let s = tensor_scale.unwrap_or_else(|| scale_of(group_amax(xb)));
                if let Some(slot) = st.get_mut(k) {
                    *slot = s;
                }
                for (o, &v) in ob.iter_mut().zip(xb) {
                    *o = encode(v, s);
                }
            }
        },
    );
    if let Some(s) = tensor_scale {
        stats = vec![s];
    }
    Ok(Quantized {
        qtype,
        rows: m.rows,
        cols: m.cols,
        block_size: group,
        scale_mode: Some(mode),
        data,
        stats,
        double_quant: None,
    })
}

/// `decode(byte) * scale`, after checking the scale mode, block size and number of scales.
pub(crate) fn dequantize_scaled(
    q: &QuantizedView<'_>,
    out: &mut [f32],
    decode: impl Fn(u8) -> f32 + Sync,
) -> Result<()> {
    let name = q.qtype.name();
    let mode = q.scale_mode.ok_or_else(|| {
        Error::InvalidArgument(format!("{name} needs a scale mode to dequantize"))
    })?;
    if mode == ScaleMode::Block && (q.block_size == 0 || !q.cols.is_multiple_of(q.block_size)) {
        return Err(Error::RowLength {
            qtype: name,
            rows: q.rows,
            cols: q.cols,
            block_size: q.block_size,
        });
    }
    let (group, per_row) = geometry(mode, q.rows, q.cols, q.block_size);
    if q.block_size != group {
        return Err(Error::InvalidArgument(format!(
            "{name} with scale mode {:?} on shape {}x{} shares a scale between {group} weights, \
             got block_size {}",
            mode.name(),
            q.rows,
            q.cols,
            q.block_size
        )));
    }
    let n_scales = if per_row == 0 { 1 } else { q.rows * per_row };
    if q.stats.len() != n_scales {
        return Err(Error::DataSize {
            what: "scales",
            qtype: name,
            rows: q.rows,
            cols: q.cols,
            got: q.stats.len(),
            expected: n_scales,
        });
    }
    let chunk = if mode == ScaleMode::Block {
        q.block_size
    } else {
        q.cols
    };
    let tensor_scale = q.stats[0];
    map_rows_out(
        q.data,
        q.cols,
        q.stats,
        per_row,
        out,
        q.cols,
        |_, d, st, y| {
            for (k, (db, yb)) in d
                .chunks_exact(chunk)
                .zip(y.chunks_exact_mut(chunk))
                .enumerate()
            {
                let s = st.get(k).copied().unwrap_or(tensor_scale);
                for (o, &b) in yb.iter_mut().zip(db) {
                    *o = decode(b) * s;
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_rounding_equals_round_ties_even() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            let expected = v.round_ties_even().clamp(-127.0, 127.0) as i8;
            assert_eq!(quantize_value(v, 1.0), expected, "{v}");
            v += 1.0 / 64.0; // every quarter, half and three-quarter point
        }
        for v in [
            0.5f32, 1.5, -0.5, -1.5, 126.5, -126.5, 127.5, 0.49999997, -0.0,
        ] {
            assert_eq!(
                quantize_value(v, 1.0),
                v.round_ties_even().clamp(-127.0, 127.0) as i8
            );
        }
    }

    #[test]
    fn values_round_half_even_and_clamp() {
        assert_eq!(quantize_value(2.5, 1.0), 2);
        assert_eq!(quantize_value(3.5, 1.0), 4);
        assert_eq!(quantize_value(-2.5, 1.0), -2);
        assert_eq!(quantize_value(500.0, 1.0), 127);
        assert_eq!(quantize_value(-500.0, 1.0), -127);
        assert_eq!(quantize_value(0.0, 0.0), 0);
        assert_eq!(quantize_value(1e-45, 0.0), 0);
    }

    #[test]
    fn modes_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.37)
            .collect();
        let m = Matrix::from_f32(&x, 4, 64).unwrap();
        for (mode, n_scales) in [
            (ScaleMode::Tensor, 1),
            (ScaleMode::Row, 4),
            (ScaleMode::Block, 8),
        ] {
            let q = quantize(&m, mode, 32).unwrap();
            assert_eq!(q.stats.len(), n_scales);
            let mut y = vec![0f32; x.len()];
            dequantize(&q.view(), &mut y).unwrap();
            let per = 256 / n_scales;
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                let s = q.stats[i / per];
                assert!((a - b).abs() <= s * 0.5 * (1.0 + 1e-5), "{mode:?} {i}");
            }
        }
    }

    #[test]
    fn zero_rows_have_zero_scale() {
        let mut x = vec![1.0f32; 64];
        x[..32].fill(0.0);
        let m = Matrix::from_f32(&x, 2, 32).unwrap();
        let q = quantize(&m, ScaleMode::Row, 64).unwrap();
        assert_eq!(q.stats, vec![0.0, 1.0 / 127.0]);
        assert!(q.data[..32].iter().all(|&b| b == 0));
        assert!(q.data[32..].iter().all(|&b| b == 127));
    }
}
