//! The output array shared by `qmatmul`'s tasks, each writing only its own columns.

/// `out` (M x N, row-major) shared by the tasks of `qmatmul`, each of which writes only its own
/// columns.
pub(super) struct OutPtr {
    p: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: the tasks write disjoint columns (`set` / `scatter` of their own rows of W), so no
// element is written by two threads; `qmatmul` holds `out` mutably borrowed throughout.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(super) fn new(out: &mut [f32], n: usize) -> Self {
        Self {
            p: out.as_mut_ptr(),
            m: out.len() / n.max(1),
            n,
        }
    }

    /// out[mi][col] = v.
    #[inline(always)]
    pub(super) fn set(&self, mi: usize, col: usize, v: f32) {
        assert!(mi < self.m && col < self.n);
        // SAFETY: in bounds (asserted; out has m·n elements); only the task owning column
        // `col` writes it (see the Sync impl).
        unsafe { *self.p.add(mi * self.n + col) = v };
    }

    /// out[mi][col..col + 8] = v.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) fn set8(&self, mi: usize, col: usize, v: &[f32; 8]) {
        assert!(mi < self.m && col + 8 <= self.n);
        // SAFETY: in bounds (asserted); only the task owning these columns writes them.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.p.add(mi * self.n + col), 8) };
    }

    /// Columns `n0..` from `yt` (rows of M values, one per column).
    pub(super) fn scatter(&self, n0: usize, m: usize, yt: &[f32]) {
        let rows = yt.len() / m.max(1);
        for mi in 0..m {
            for r in 0..rows {
                self.set(mi, n0 + r, yt[r * m + mi]);
            }
        }
    }
}
