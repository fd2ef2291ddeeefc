//! The OpenMP team of a library already in the process (torch's libgomp) as a second way to run
//! `parallel`'s tasks.
//!
//! Why: under torch (QuantLinear), torch's OpenMP workers spin-wait after every torch op (norms,
//! attention, SiLU) on the cores our rayon workers need; on two cores the two pools then share
//! them (SmolLM2's 128-token prompt at 2 threads: q8_0 607 tok/s, 932 with
//! `OMP_WAIT_POLICY=PASSIVE`). Running our tasks on that same team lets the spinning workers pick
//! them up instead. Nothing is linked: `attach` looks the entry points up in a library that is
//! already loaded (`RTLD_NOLOAD`), and without one every caller keeps the rayon pool.
//!
//! Results do not change: a task is the same code whichever thread runs it, and every task
//! writes only its own output.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

/// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on a team of `num_threads`
/// (the caller is thread 0) and returns when all have finished (libgomp's ABI since GCC 4.9; the
/// LLVM and Intel runtimes export it too).
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);
/// `omp_in_parallel()`: non-zero inside an active parallel region.
type OmpInParallel = unsafe extern "C" fn() -> i32;

#[derive(Clone, Copy)]
struct Entry {
    parallel: GompParallel,
    in_parallel: OmpInParallel,
}

static ENTRY: RwLock<Option<Entry>> = RwLock::new(None);

/// Regions run on the attached team so far (tests and `ferroquant doctor` read it).
static REGIONS: AtomicU64 = AtomicU64::new(0);

/// How many times `run` has run tasks on the attached team in this process.
pub fn regions_run() -> u64 {
    REGIONS.load(Ordering::Relaxed)
}

fn entry() -> Option<Entry> {
    *ENTRY.read().unwrap_or_else(|e| e.into_inner())
}

/// Use the OpenMP runtime that the already-loaded library `path` links (e.g. torch's `_C`
/// extension: its dependencies include torch's libgomp). Returns false, and leaves the previous
/// state, when `path` is not loaded in this process or neither it nor its dependencies export
/// `GOMP_parallel` and `omp_in_parallel`. Never loads a library.
#[cfg(unix)]
pub fn attach(path: &str) -> bool {
    let Ok(cpath) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded (no
    // constructor runs); cpath is NUL-terminated. The handle is never closed, so the library and
    // the functions below stay mapped for the life of the process.
    let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
    if handle.is_null() {
        return false;
    }
    // SAFETY: handle is valid (above); the names are NUL-terminated literals. dlsym on a handle
    // searches the library and then its dependencies, i.e. the runtime that library calls.
    let (p, q) = unsafe {
        (
            libc::dlsym(handle, c"GOMP_parallel".as_ptr()),
            libc::dlsym(handle, c"omp_in_parallel".as_ptr()),
        )
    };
    if p.is_null() || q.is_null() {
        return false;
    }
    // SAFETY: both symbols are the C functions of the OpenMP ABI with these signatures
    // (libgomp's `GOMP_parallel` and `omp_in_parallel`).
    let found = unsafe {
        Entry {
            parallel: std::mem::transmute::<*mut c_void, GompParallel>(p),
            in_parallel: std::mem::transmute::<*mut c_void, OmpInParallel>(q),
        }
    };
    *ENTRY.write().unwrap_or_else(|e| e.into_inner()) = Some(found);
    true
}

/// Without `dlopen` there is no team to attach to.
#[cfg(not(unix))]
pub fn attach(_path: &str) -> bool {
    false
}

/// Forget the attached runtime: every caller uses the rayon pool again.
pub fn detach() {
    *ENTRY.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// True when a runtime is attached.
pub fn attached() -> bool {
    entry().is_some()
}

/// What the team's threads share: the tasks, the next unclaimed one, the first panic.
struct Region<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

extern "C" fn team_member(data: *mut c_void) {
    // SAFETY: `data` is the `&Region` that `run` passed to GOMP_parallel, which returns only
    // after every member has returned, so it outlives this call.
    let r = unsafe { &*(data as *const Region<'_>) };
    // A panic must not unwind into C: it is kept and re-raised on the caller's thread.
    let res = catch_unwind(AssertUnwindSafe(|| loop {
        let t = r.next.fetch_add(1, Ordering::Relaxed);
        if t >= r.tasks {
            break;
        }
        (r.task)(t);
    }));
    if let Err(p) = res {
        r.next.store(r.tasks, Ordering::Relaxed);
        let mut slot = r.panic.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(p);
    }
}

/// `task(t)` for every t in 0..tasks on a team of `threads` of the attached runtime, each thread
/// claiming the next unclaimed task. Returns false, running nothing, when no runtime is attached
/// or the caller is already inside an active OpenMP region (a nested team would be one thread:
/// the caller uses the rayon pool then). A panic in a task is re-raised here.
pub fn run(threads: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(e) = entry() else { return false };
    // SAFETY: omp_in_parallel takes no arguments and only reads the calling thread's state.
    if unsafe { (e.in_parallel)() } != 0 {
        return false;
    }
    let region = Region {
        task,
        tasks,
        next: AtomicUsize::new(0),
        panic: Mutex::new(None),
    };
    let team = threads.clamp(1, tasks.max(1)).min(u32::MAX as usize) as u32;
    REGIONS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: team_member is a C-ABI function that never unwinds; `region` lives until
    // GOMP_parallel returns, which is after every member has finished with it; flags 0 is the
    // plain `#pragma omp parallel num_threads(team)`.
    unsafe {
        (e.parallel)(
            team_member,
            &region as *const Region<'_> as *mut c_void,
            team,
            0,
        )
    };
    if let Some(p) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(p);
    }
    true
}
