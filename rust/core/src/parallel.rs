//! The one rayon pool of ferroquant. Its size comes from FERROQUANT_NUM_THREADS (default: all
//! cores) and can be changed at run time; results never depend on it, because work is split by
//! rows and every row is computed by the same scalar sequence.

use std::sync::{Arc, OnceLock, RwLock};

use rayon::ThreadPool;

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
