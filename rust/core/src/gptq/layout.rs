//! The solve's layout changes, as one cache-blocked pass each: the weights into the column
//! loop's order (`[cols, rows]`, permuted) and its values back (`[rows, cols]`, natural).
//! Plain copies (no arithmetic): the same values whatever the path; torch's gather then
//! transposing copy took two passes, the second at a fraction of memory speed.

use crate::error::{Error, Result};

/// Tile side: a tile's source lines stay in L1 while its rows are written.
const TILE: usize = 32;

/// Which index `idx` gathers (see `gather_transpose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gather {
    /// `out[a, b] = src[b, idx[a]]`: `out` is `[c, r]`, `idx` a permutation of `0..c` (the
    /// weights into the loop's order: `idx` = perm); written by source tiles through the
    /// inverse permutation, so both sides of a tile are runs of consecutive floats
    Columns,
    /// `out[a, b] = src[idx[b], a]`: `out` is `[c, idx.len()]` (the loop's values back:
    /// `idx` = the inverse permutation)
    Rows,
}

/// `src` (`[r, c]`, row-major) transposed with `idx` gathering its columns or rows into
/// `out` (`Gather`); `idx` must be a permutation of `0..c` (`Columns`), or every entry below
/// `r` (`Rows`).
pub fn gather_transpose(
    src: &[f32],
    r: usize,
    c: usize,
    idx: &[usize],
    how: Gather,
    out: &mut [f32],
) -> Result<()> {
    let bound = if how == Gather::Columns { c } else { r };
    let (a_len, b_len) = match how {
        Gather::Columns => (idx.len(), r),
        Gather::Rows => (c, idx.len()),
    };
    if src.len() != r * c || out.len() != a_len * b_len {
        return Err(Error::InvalidArgument(format!(
            "gather_transpose: {} values for [{r}, {c}] and {} for [{a_len}, {b_len}]",
            src.len(),
            out.len()
        )));
    }
    if let Some(&bad) = idx.iter().find(|&&i| i >= bound) {
        return Err(Error::InvalidArgument(format!(
            "gather_transpose: index {bad} outside 0..{bound}"
        )));
    }
    if how == Gather::Columns {
        // out[inv[j], b] = src[b, j]: a tile of consecutive source columns and rows
        let mut inv = vec![usize::MAX; c];
        for (a, &j) in idx.iter().enumerate() {
            inv[j] = a;
        }
        if idx.len() != c || inv.contains(&usize::MAX) {
            return Err(Error::InvalidArgument(format!(
                "gather_transpose: the column index is not a permutation of 0..{c}"
            )));
        }
        for j0 in (0..c).step_by(TILE) {
            let j1 = (j0 + TILE).min(c);
            for b0 in (0..r).step_by(TILE) {
                let b1 = (b0 + TILE).min(r);
                for (j, &a) in inv.iter().enumerate().take(j1).skip(j0) {
                    let row = &mut out[a * r + b0..a * r + b1];
                    for (o, x) in row.iter_mut().zip(src[b0 * c + j..].iter().step_by(c)) {
                        *o = *x;
                    }
                }
            }
        }
        return Ok(());
    }
    for a0 in (0..a_len).step_by(TILE) {
        let a1 = (a0 + TILE).min(a_len);
        for b0 in (0..b_len).step_by(TILE) {
            let b1 = (b0 + TILE).min(b_len);
            for a in a0..a1 {
                let row = &mut out[a * b_len + b0..a * b_len + b1];
                match how {
                    Gather::Columns => {
                        let j = idx[a];
                        for (o, b) in row.iter_mut().zip(b0..b1) {
                            *o = src[b * c + j];
                        }
                    }
                    Gather::Rows => {
                        for (o, &i) in row.iter_mut().zip(&idx[b0..b1]) {
                            *o = src[i * c + a];
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// `out[a, b] = src[idx[a], idx[b]]` rounded to f32 (to nearest, ties to even: torch's
/// `.to(float32)`), for `src` `[n, n]` f64 row-major and `idx` a permutation of `0..n`: the
/// solve's Hessian in the factorization's order and precision in one pass (a source row stays
/// in L1 while its gathered row is written), where the conversion and two `index_select`s
/// took three.
pub fn permute_to_f32(src: &[f64], n: usize, idx: &[usize], out: &mut [f32]) -> Result<()> {
    if src.len() != n * n || out.len() != n * n || idx.len() != n {
        return Err(Error::InvalidArgument(format!(
            "permute_to_f32: {} values, {} outputs and {} indices for [{n}, {n}]",
            src.len(),
            out.len(),
            idx.len()
        )));
    }
    let mut seen = vec![false; n];
    for &i in idx {
        if i >= n || std::mem::replace(&mut seen[i], true) {
            return Err(Error::InvalidArgument(format!(
                "permute_to_f32: the index is not a permutation of 0..{n}"
            )));
        }
    }
    for (row, &i) in out.chunks_exact_mut(n.max(1)).zip(idx) {
        let s = &src[i * n..][..n];
        for (o, &j) in row.iter_mut().zip(idx) {
            *o = s[j] as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutes_and_rounds_as_indexing_and_a_cast_do() {
        let n = 37;
        let src: Vec<f64> = (0..n * n)
            .map(|i| (i as f64 * 0.37).sin() * 1e3 + 1e-9)
            .collect();
        let idx: Vec<usize> = (0..n).map(|a| (a * 10 + 3) % n).collect();
        let mut out = vec![0.0f32; n * n];
        permute_to_f32(&src, n, &idx, &mut out).unwrap();
        for a in 0..n {
            for b in 0..n {
                assert_eq!(out[a * n + b], src[idx[a] * n + idx[b]] as f32);
            }
        }
        let mut bad = idx.clone();
        bad[1] = bad[0];
        assert!(permute_to_f32(&src, n, &bad, &mut out).is_err());
        assert!(permute_to_f32(&src[1..], n, &idx, &mut out).is_err());
        permute_to_f32(&[], 0, &[], &mut []).unwrap();
    }

    #[test]
    fn gathers_and_transposes_as_indexing_does() {
        let mut seed = 7u64;
        for (r, c) in [(1, 1), (3, 5), (33, 70), (64, 31)] {
            let src: Vec<f32> = (0..r * c).map(|i| i as f32 * 0.5 - 3.0).collect();
            for how in [Gather::Columns, Gather::Rows] {
                let n = if how == Gather::Columns { c } else { r };
                // a permutation, and a repeating index
                let mut perm: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    perm.swap(i, (seed >> 33) as usize % (i + 1));
                }
                // a repeating index (rows only: columns take a permutation)
                let rep: Vec<usize> = (0..n + 3).map(|i| (i * 5) % n).collect();
                let idxs = if how == Gather::Rows {
                    vec![perm, rep]
                } else {
                    vec![perm]
                };
                for idx in idxs {
                    let (al, bl) = match how {
                        Gather::Columns => (idx.len(), r),
                        Gather::Rows => (c, idx.len()),
                    };
                    let mut out = vec![f32::NAN; al * bl];
                    gather_transpose(&src, r, c, &idx, how, &mut out).unwrap();
                    for a in 0..al {
                        for b in 0..bl {
                            let want = match how {
                                Gather::Columns => src[b * c + idx[a]],
                                Gather::Rows => src[idx[b] * c + a],
                            };
                            assert_eq!(out[a * bl + b].to_bits(), want.to_bits());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_and_indices_are_errors() {
        let src = [0.0f32; 6];
        let mut out = [0.0f32; 6];
        assert!(gather_transpose(&src, 2, 3, &[0, 1, 3], Gather::Columns, &mut out).is_err());
        assert!(gather_transpose(&src, 2, 3, &[0, 1, 1], Gather::Columns, &mut out).is_err());
        assert!(gather_transpose(&src, 2, 3, &[0, 2], Gather::Rows, &mut out).is_err());
        assert!(gather_transpose(&src, 2, 4, &[0, 1, 2], Gather::Columns, &mut out).is_err());
        assert!(gather_transpose(&src, 2, 3, &[0, 1], Gather::Columns, &mut out[..5]).is_err());
        gather_transpose(&src, 2, 3, &[2, 1, 0], Gather::Columns, &mut out).unwrap();
    }
}
