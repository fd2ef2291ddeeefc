//! The one rayon pool of ferroquant. Its size comes from FERROQUANT_NUM_THREADS (default: all
//! cores) and can be changed at run time; results never depend on it, because work is split by
//! rows and every row is computed by the same scalar sequence.
//!
//! Inside `on_openmp` the task helpers (`for_each_index`, `for_each_chunk_mut`) run on the
//! attached OpenMP team instead (`openmp`: torch's, for calls from torch), with the same split
//! into tasks; anything else, and any thread not inside `on_openmp`, keeps the pool.
//! `for_each_chunk_mut_in_runs` hands each thread a contiguous run of the tasks (`runs.rs`).

use std::cell::Cell;
use std::sync::{Arc, OnceLock, RwLock};

use rayon::prelude::*;
use rayon::ThreadPool;

mod runs;

fn build(threads: usize) -> Arc<ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferroquant-{i}"))
            .build()
            .expect("building a rayon pool only fails when threads cannot be spawned"),
    )
}

fn default_threads() -> usize {
    crate::config::num_threads()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn slot() -> &'static RwLock<Arc<ThreadPool>> {
    static POOL: OnceLock<RwLock<Arc<ThreadPool>>> = OnceLock::new();
    POOL.get_or_init(|| RwLock::new(build(default_threads())))
}

/// The current pool.
pub fn pool() -> Arc<ThreadPool> {
    slot().read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Number of threads of the current pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Replace the pool by one of `threads` threads (0 = all cores).
pub fn set_num_threads(threads: usize) {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    *slot().write().unwrap_or_else(|e| e.into_inner()) = build(n);
}

/// Run `f` inside the pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// Rows per rayon task: enough work per task to amortise scheduling, small enough to balance.
pub fn rows_per_task(rows: usize, cols: usize) -> usize {
    const TARGET_ELEMS: usize = 1 << 16;
    let by_size = (TARGET_ELEMS / cols.max(1)).max(1);
    let by_balance = rows.div_ceil(num_threads() * 8).max(1);
    by_size.min(by_balance)
}

thread_local! {
    /// True while this thread is inside `on_openmp`.
    static OPENMP: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with this thread's task helpers on the attached OpenMP team (`openmp::attach`), when
/// there is one; without one, or on other threads (the team's own included), they keep the
/// rayon pool.
pub fn on_openmp<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OPENMP.set(self.0);
        }
    }
    let _restore = Restore(OPENMP.replace(true));
    f()
}

/// `task(t)` for every t in 0..tasks, on the OpenMP team inside `on_openmp` (when it can run
/// there), else on the pool.
pub fn for_each_index(tasks: usize, task: impl Fn(usize) + Sync + Send) {
    if OPENMP.get() && crate::openmp::run(num_threads(), tasks, &task) {
        return;
    }
    install(|| (0..tasks).into_par_iter().for_each(task));
}

/// A pointer that the tasks of `for_each_chunk_mut` share; each derives only its own chunk.
struct Shared<T>(*mut T);
// SAFETY: only used by `for_each_chunk_mut`, whose tasks touch disjoint chunks of a `&mut [T]`
// with `T: Send`.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that closures capture the whole `Shared`, not its field).
    fn get(&self) -> *mut T {
        self.0
    }

    /// Chunk `i` (`chunk_len` values, fewer for the last) of the `len` values at the pointer.
    ///
    /// # Safety
    /// The pointer is a `&mut [T]` of `len` values borrowed for the whole call, `i` is below
    /// `len.div_ceil(chunk_len)`, and no chunk is handed out twice at a time (the chunks are
    /// disjoint, so distinct i never alias).
    #[allow(clippy::mut_from_ref)]
    unsafe fn chunk<'a>(&self, i: usize, chunk_len: usize, len: usize) -> &'a mut [T] {
        let start = i * chunk_len;
        let n = chunk_len.min(len - start);
        // SAFETY: start..start + n lies in the slice (i < chunks); exclusive by the contract.
        unsafe { std::slice::from_raw_parts_mut(self.get().add(start), n) }
    }
}

/// `f(i, chunk)` for every `chunk_len`-element chunk of `data` (the last may be shorter), as
/// `data.par_chunks_mut(chunk_len).enumerate()` on the pool, or on the OpenMP team inside
/// `on_openmp`.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    assert!(chunk_len > 0, "chunk length 0");
    let len = data.len();
    let chunks = len.div_ceil(chunk_len);
    if OPENMP.get() {
        let base = Shared(data.as_mut_ptr());
        // SAFETY: `openmp::run` runs every i < chunks exactly once (`chunk`'s contract).
        let one = |i: usize| f(i, unsafe { base.chunk(i, chunk_len, len) });
        if crate::openmp::run(num_threads(), chunks, &one) {
            return;
        }
    }
    install(|| {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c))
    });
}

/// `for_each_chunk_mut` with the chunks claimed in contiguous runs, one run a thread, in
/// order (`runs.rs`: a thread's reads then stream on from chunk to chunk, as at M = 1 where a
/// chunk's rows come from memory once), a thread done with its run taking half of what another
/// has left. Same chunks and calls as `for_each_chunk_mut`; only which thread runs which differs.
pub fn for_each_chunk_mut_in_runs<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    assert!(chunk_len > 0, "chunk length 0");
    let len = data.len();
    let chunks = len.div_ceil(chunk_len);
    let threads = num_threads();
    let base = Shared(data.as_mut_ptr());
    // SAFETY: `Runs` hands out every i < chunks exactly once (`chunk`'s contract).
    let one = |i: usize| f(i, unsafe { base.chunk(i, chunk_len, len) });
    let runs = runs::Runs::new(chunks, threads);
    let member = |_: usize| runs.member(&one);
    if OPENMP.get() && crate::openmp::run(threads, runs.len(), &member) {
        return;
    }
    install(|| (0..runs.len()).into_par_iter().for_each(member));
}

/// `f(i, a_chunk, b_chunk)` for the i-th `a_len`-element chunk of `a` and `b_len`-element chunk
/// of `b`, as `a.par_chunks_mut(a_len).zip(b.par_chunks_mut(b_len)).enumerate()` (as many as
/// the shorter has) on the pool, or on the OpenMP team inside `on_openmp`.
pub fn for_each_chunk2_mut<A: Send, B: Send>(
    a: &mut [A],
    a_len: usize,
    b: &mut [B],
    b_len: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) {
    assert!(a_len > 0 && b_len > 0, "chunk length 0");
    let (la, lb) = (a.len(), b.len());
    let chunks = la.div_ceil(a_len).min(lb.div_ceil(b_len));
    if OPENMP.get() {
        let (pa, pb) = (Shared(a.as_mut_ptr()), Shared(b.as_mut_ptr()));
        let one = |i: usize| {
            let (sa, sb) = (i * a_len, i * b_len);
            // SAFETY: i < chunks, so both ranges lie in their slices; every i runs exactly once
            // and the chunks of each slice are disjoint; both are borrowed mutably for the call.
            let (ca, cb) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(sa), a_len.min(la - sa)),
                    std::slice::from_raw_parts_mut(pb.get().add(sb), b_len.min(lb - sb)),
                )
            };
            f(i, ca, cb);
        };
        if crate::openmp::run(num_threads(), chunks, &one) {
            return;
        }
    }
    install(|| {
        a.par_chunks_mut(a_len)
            .zip(b.par_chunks_mut(b_len))
            .enumerate()
            .for_each(|(i, (ca, cb))| f(i, ca, cb))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_index_and_every_element_exactly_once() {
        for (len, chunk) in [(0, 3), (1, 1), (10, 3), (64, 64), (65, 8), (1000, 7)] {
            for openmp in [false, true] {
                // Without an attached runtime `on_openmp` keeps the pool: same coverage.
                let run = || {
                    let seen: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
                    for_each_index(len, |i| {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
                    let mut data = vec![0usize; len];
                    for_each_chunk_mut(&mut data, chunk, |i, c| {
                        assert!(c.len() == chunk || (i + 1) * chunk >= len);
                        for (j, v) in c.iter_mut().enumerate() {
                            *v += i * chunk + j + 1;
                        }
                    });
                    assert!(data.iter().enumerate().all(|(k, &v)| v == k + 1));
                    let mut data = vec![0usize; len];
                    for_each_chunk_mut_in_runs(&mut data, chunk, |i, c| {
                        assert!(c.len() == chunk || (i + 1) * chunk >= len);
                        for (j, v) in c.iter_mut().enumerate() {
                            *v += i * chunk + j + 1;
                        }
                    });
                    assert!(data.iter().enumerate().all(|(k, &v)| v == k + 1));
                    // a second slice of 2 per chunk, one chunk longer: zip stops at `data`'s
                    let mut other = vec![0usize; 2 * (len.div_ceil(chunk) + 1)];
                    let mut data = vec![0usize; len];
                    for_each_chunk2_mut(&mut data, chunk, &mut other, 2, |i, c, o| {
                        c.iter_mut().for_each(|v| *v += 1);
                        o.iter_mut().for_each(|v| *v += i + 1);
                    });
                    assert!(data.iter().all(|&v| v == 1));
                    let used = 2 * len.div_ceil(chunk);
                    assert!(other[..used]
                        .iter()
                        .enumerate()
                        .all(|(j, &v)| v == j / 2 + 1));
                    assert!(other[used..].iter().all(|&v| v == 0));
                };
                if openmp {
                    on_openmp(run);
                } else {
                    run();
                }
            }
        }
    }

    #[test]
    fn on_openmp_is_scoped_to_its_call() {
        assert!(!OPENMP.get());
        on_openmp(|| {
            assert!(OPENMP.get());
            on_openmp(|| assert!(OPENMP.get()));
            assert!(OPENMP.get());
        });
        assert!(!OPENMP.get());
        let r = std::panic::catch_unwind(|| on_openmp(|| panic!("task")));
        assert!(r.is_err());
        assert!(!OPENMP.get());
    }
}
