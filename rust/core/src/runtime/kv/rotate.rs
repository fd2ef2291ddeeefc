//! The cache's rotation (docs/kv.md, "Rotation"): a normalized Walsh-Hadamard transform of each
//! head's head_dim values. It is orthogonal and its own inverse, so rotating the query and the
//! keys leaves q.k unchanged and rotating the values rotates the attention output, which one more
//! transform undoes; what changes is the quantization: a rotated row has no outlier channel, so a
//! block's scale fits all its values (llama.cpp rotates before a quantized cache for the same
//! reason). One fixed butterfly order, so the result never depends on the thread count.

use crate::{Error, Result};

/// `x` (a power-of-two length) <- H x / sqrt(len), in place.
pub fn wht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for blk in x.chunks_exact_mut(2 * h) {
            let (a, b) = blk.split_at_mut(h);
            for (a, b) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*a + *b, *a - *b);
                *a = s;
                *b = d;
            }
        }
        h *= 2;
    }
    let norm = (n as f32).sqrt().recip();
    for v in x.iter_mut() {
        *v *= norm;
    }
}

/// Rotate every head (`head_dim` values) of `rows`.
pub fn wht_heads(rows: &mut [f32], head_dim: usize) {
    for h in rows.chunks_exact_mut(head_dim) {
        wht(h);
    }
}

/// `wht_heads` for callers outside the runtime (ferroquant.kv's transformers cache): an error,
/// not a debug assertion, when `head_dim` is not a power of two or does not divide the rows.
pub fn wht_heads_checked(rows: &mut [f32], head_dim: usize) -> Result<()> {
    if !head_dim.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "kv rotation: head_dim {head_dim} is not a power of two"
        )));
    }
    if !rows.len().is_multiple_of(head_dim) {
        return Err(Error::InvalidArgument(format!(
            "kv rotation: {} values are not whole heads of {head_dim}",
            rows.len()
        )));
    }
    wht_heads(rows, head_dim);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_orthogonal_and_its_own_inverse() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.25)
            .collect();
        let mut y = x.clone();
        wht(&mut y);
        let n2 = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n2(&y) - n2(&x)).abs() <= 1e-4 * n2(&x));
        // 64 = 8^2: the normalization is a power of two, the round trip exact here.
        wht(&mut y);
        assert_eq!(x, y);
        // A single outlier spreads evenly over every channel.
        let mut e = vec![0f32; 64];
        e[5] = 8.0;
        wht(&mut e);
        assert!(e.iter().all(|v| v.abs() == 1.0));
    }

    #[test]
    fn checked_rejects_bad_head_dims() {
        let mut x = vec![1f32; 96];
        assert!(wht_heads_checked(&mut x, 48).is_err());
        assert!(wht_heads_checked(&mut x[..40], 32).is_err());
        assert!(wht_heads_checked(&mut x, 32).is_ok());
    }
}
