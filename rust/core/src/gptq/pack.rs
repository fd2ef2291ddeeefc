//! GPTQ's codes into a format's block bytes, straight from the solve's order: the compiled twin
//! of `grid.pack_levels` (python/ferroquant/methods/grid.py, the reference) fused with the
//! un-permutation and transpose of the codes (`levels[p]` is the solve's column `p`, natural
//! column `perm[p]`), so the codes are read once and no `[rows, cols]` copy is made.
//!
//! The bit map is the format's `Layout` (grid.py): bit `b` of element `e`'s stored code
//! (`level ^ xor`, its low byte) lands at bit `shift[e * bits + b]` of the block's byte
//! `byte[e * bits + b]`; every other bit of the block's bytes (its parameters) is kept.

use crate::error::{Error, Result};

/// Where a format's block keeps its codes (grid.py's `Layout`, flattened `[block, bits]`).
#[derive(Debug, Clone, Copy)]
pub struct BitPlan<'a> {
    /// weights per block
    pub block: usize,
    /// bytes per block
    pub nbytes: usize,
    /// code bits per weight
    pub bits: usize,
    pub byte: &'a [usize],
    pub shift: &'a [u8],
    /// stored code = level ^ xor
    pub xor: u8,
}

/// Rows per tile: a tile's bytes stay in cache while the codes are scattered into them.
const TILE: usize = 64;

/// Writes `levels` (`[cols, rows]` bytes, solve order) into `data` (`[rows, cols / block, nbytes]`,
/// the blocks' bytes with their parameters) by `plan`; `perm[p]` is the natural column of the
/// solve's column `p` (a permutation of `0..cols`).
pub fn pack_codes(
    data: &mut [u8],
    levels: &[u8],
    rows: usize,
    perm: &[usize],
    plan: &BitPlan,
) -> Result<()> {
    let cols = perm.len();
    let bad = |what: String| Err(Error::InvalidArgument(format!("gptq pack: {what}")));
    if plan.block == 0 || !cols.is_multiple_of(plan.block) {
        return bad(format!(
            "{cols} columns are not whole blocks of {}",
            plan.block
        ));
    }
    let row_bytes = cols / plan.block * plan.nbytes;
    if levels.len() != cols * rows || data.len() != rows * row_bytes {
        return bad(format!(
            "{} codes and {} bytes for {rows} rows of {cols} columns ({row_bytes} bytes a row)",
            levels.len(),
            data.len()
        ));
    }
    let per = plan.block * plan.bits;
    if plan.byte.len() != per || plan.shift.len() != per || plan.bits > 8 {
        return bad(format!(
            "a bit map of {} / {} entries for {} weights of {} bits",
            plan.byte.len(),
            plan.shift.len(),
            plan.block,
            plan.bits
        ));
    }
    if plan.byte.iter().any(|&b| b >= plan.nbytes) || plan.shift.iter().any(|&s| s >= 8) {
        return bad(format!(
            "a bit map outside a block of {} bytes",
            plan.nbytes
        ));
    }
    let mut seen = vec![false; cols];
    for &c in perm {
        if c >= cols || std::mem::replace(&mut seen[c], true) {
            return bad(format!("perm is not a permutation of 0..{cols}"));
        }
    }
    // the code bits of a block's bytes, cleared before the codes are or-ed in
    let mut keep = vec![0xFFu8; plan.nbytes];
    for (&b, &s) in plan.byte.iter().zip(plan.shift) {
        keep[b] &= !(1u8 << s);
    }
    for (i, x) in data.iter_mut().enumerate() {
        *x &= keep[i % plan.nbytes];
    }
    // an element whose bits sit in one byte, in order from `shift` up (every format's plain
    // codes): one shifted or per code instead of one per bit
    let field: Vec<Option<(usize, u8)>> = (0..plan.block)
        .map(|e| {
            let byte = &plan.byte[e * plan.bits..][..plan.bits];
            let shift = &plan.shift[e * plan.bits..][..plan.bits];
            let one = byte.iter().all(|&b| b == byte[0])
                && shift
                    .iter()
                    .enumerate()
                    .all(|(b, &s)| s as usize == shift[0] as usize + b);
            (plan.bits > 0 && one).then(|| (byte[0], shift[0]))
        })
        .collect();
    let mask = if plan.bits >= 8 {
        0xFF
    } else {
        (1u8 << plan.bits) - 1
    };
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for (p, &c) in perm.iter().enumerate() {
            let (blk, e) = (c / plan.block, c % plan.block);
            let base = blk * plan.nbytes;
            let codes = &levels[p * rows..][r0..r1];
            if let Some((at, sh)) = field[e] {
                let at = base + at;
                for (r, &l) in (r0..r1).zip(codes) {
                    let code = (l ^ plan.xor) & mask;
                    data[r * row_bytes + at] |= code << sh;
                }
                continue;
            }
            let byte = &plan.byte[e * plan.bits..][..plan.bits];
            let shift = &plan.shift[e * plan.bits..][..plan.bits];
            for (r, &l) in (r0..r1).zip(codes) {
                let code = l ^ plan.xor;
                let row = &mut data[r * row_bytes + base..][..plan.nbytes];
                for (b, (&at, &sh)) in byte.iter().zip(shift).enumerate() {
                    row[at] |= ((code >> b) & 1) << sh;
                }
            }
        }
    }
    Ok(())
}
