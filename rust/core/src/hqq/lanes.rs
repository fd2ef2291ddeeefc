//! Group-major blocks: 16 groups side by side, one group per vector lane, so that every per-group
//! quantity (scale, zero, the sums) is one vector and the loops over a group's weights need no
//! horizontal reduction and no broadcast. A block stores weight `j` of lane `l` at `j * 16 + l`.
//! Each lane runs exactly the scalar code's operations on its own group, in the same order (the
//! 8 interleaved partial sums of the module comment included), so a lane's results are the
//! scalar results bit for bit; only the layout differs.

/// Groups per block (one 512-bit vector of f32).
pub const LANES: usize = 16;

/// A value per lane.
pub type V = [f32; LANES];

/// Groups `[first, first + 16)` of `w` (groups of `group`) transposed into `out`
/// (`group * 16`); lanes past the last group repeat it (finite data whose results are dropped).
pub fn transpose_block(w: &[f32], group: usize, first: usize, out: &mut [f32]) {
    let n = w.len() / group;
    for l in 0..LANES {
        let k = (first + l).min(n - 1);
        let x = &w[k * group..(k + 1) * group];
        for (j, &v) in x.iter().enumerate() {
            out[j * LANES + l] = v;
        }
    }
}

/// Per lane, groups `[first, first + 16)` of a per-group vector (repeating the last one).
#[inline(always)]
pub fn gather(v: &[f32], first: usize) -> V {
    let mut o = [0f32; LANES];
    for (l, x) in o.iter_mut().enumerate() {
        *x = v[(first + l).min(v.len() - 1)];
    }
    o
}

/// The 8 interleaved partial sums combined in the module comment's tree, per lane.
#[inline(always)]
pub fn tree_sum(a: &[V; 8]) -> V {
    let mut o = [0f32; LANES];
    for (l, x) in o.iter_mut().enumerate() {
        *x = ((a[0][l] + a[1][l]) + (a[2][l] + a[3][l]))
            + ((a[4][l] + a[5][l]) + (a[6][l] + a[7][l]));
    }
    o
}
