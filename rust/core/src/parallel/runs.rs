//! Tasks claimed in contiguous runs, one run a thread (`for_each_chunk_mut_in_runs`).
//!
//! Why: at M = 1 a task is a few dozen weight rows read once from memory, and a thread streams
//! them with a software prefetch some KiB ahead. Claimed one by one from a shared counter (as
//! `openmp::run` does), the two threads of a team take tasks 0, 2, 4, .. and 1, 3, 5, ..: at
//! every task's end a thread's prefetches run into the other thread's next task, and its own
//! next task starts cold. Here thread i takes the tasks of run i (1 / threads of them, in
//! order, so its stream and its prefetches run on as the read probe's do), and a thread whose
//! run is done takes the upper half of what is left of the run with the most left (again in
//! order), down to single tasks, so the tail stays one task. Results do not change: every task is run exactly once, whichever thread runs it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The runs of tasks still unclaimed: run r holds tasks `front..back`, packed as
/// `front | back << 32` so that the owner (from the front) and a thief (the upper half) claim
/// with one compare-and-swap each.
pub(super) struct Runs {
    runs: Vec<AtomicU64>,
    joined: AtomicUsize,
}

fn pack(front: usize, back: usize) -> u64 {
    front as u64 | (back as u64) << 32
}

fn unpack(v: u64) -> (usize, usize) {
    ((v & 0xffff_ffff) as usize, (v >> 32) as usize)
}

impl Runs {
    /// Tasks `0..tasks` in `runs` contiguous runs whose lengths differ by at most one.
    ///
    /// # Panics
    /// If `tasks` does not fit in 32 bits.
    pub(super) fn new(tasks: usize, runs: usize) -> Self {
        assert!(
            u32::try_from(tasks).is_ok(),
            "{tasks} tasks: more than 2^32"
        );
        let runs = runs.clamp(1, tasks.max(1));
        let (per, extra) = (tasks / runs, tasks % runs);
        let start = |r: usize| r * per + r.min(extra);
        Runs {
            runs: (0..runs)
                .map(|r| AtomicU64::new(pack(start(r), start(r + 1))))
                .collect(),
            joined: AtomicUsize::new(0),
        }
    }

    /// The next task of run `r` from its front, if any is left.
    fn own(&self, r: usize) -> Option<usize> {
        let slot = &self.runs[r];
        let mut v = slot.load(Ordering::Relaxed);
        loop {
            let (front, back) = unpack(v);
            if front >= back {
                return None;
            }
            match slot.compare_exchange_weak(
                v,
                pack(front + 1, back),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(front),
                Err(now) => v = now,
            }
        }
    }

    /// Moves the upper half (at least one task) of the unclaimed tasks of the run with the most
    /// left into run `r`, whose member is done with its own; false when no task is left. The
    /// thief then reads its share in order too (a descheduled or late thread's rows are taken
    /// over a half at a time, each half a stream).
    fn steal_into(&self, r: usize) -> bool {
        loop {
            let (mut best, mut left) = (0, 0);
            for (i, slot) in self.runs.iter().enumerate() {
                let (front, back) = unpack(slot.load(Ordering::Relaxed));
                if back.saturating_sub(front) > left {
                    (best, left) = (i, back - front);
                }
            }
            if left == 0 {
                return false;
            }
            let slot = &self.runs[best];
            let v = slot.load(Ordering::Relaxed);
            let (front, back) = unpack(v);
            if front < back {
                let mid = back - (back - front).div_ceil(2);
                if slot
                    .compare_exchange(v, pack(front, mid), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    // Run r is empty and only its member stores into it; a thief's CAS on it
                    // needs front < back, so none can race with this store.
                    self.runs[r].store(pack(mid, back), Ordering::Relaxed);
                    return true;
                }
            }
            // (lost a race: look again)
        }
    }

    /// One thread's share: the next run not yet taken, in order, then halves taken from the
    /// others. Every task is run by exactly one call of `task` over all members. (There is one
    /// member call per run; a call beyond that finds no run and leaves the tasks to the others.)
    pub(super) fn member(&self, task: &(dyn Fn(usize) + Sync)) {
        let r = self.joined.fetch_add(1, Ordering::Relaxed);
        if r >= self.runs.len() {
            return;
        }
        loop {
            while let Some(t) = self.own(r) {
                task(t);
            }
            if !self.steal_into(r) {
                return;
            }
        }
    }

    /// Number of runs.
    pub(super) fn len(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Runs;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[test]
    fn runs_cover_the_tasks_in_order_with_lengths_within_one() {
        for (tasks, runs) in [(0, 2), (1, 2), (2, 2), (7, 2), (10, 3), (224, 2), (5, 8)] {
            let r = Runs::new(tasks, runs);
            let mut next = 0;
            let mut lens = vec![];
            for slot in &r.runs {
                let (front, back) = super::unpack(slot.load(Ordering::Relaxed));
                assert_eq!(front, next);
                lens.push(back - front);
                next = back;
            }
            assert_eq!(next, tasks);
            let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            assert!(hi - lo <= 1, "{tasks} / {runs}: {lens:?}");
        }
    }

    /// One member alone runs its run in order, then the other's in upper halves, each in order.
    #[test]
    fn a_lone_member_runs_everything_once() {
        let r = Runs::new(10, 2);
        let order = Mutex::new(vec![]);
        r.member(&|t| order.lock().unwrap().push(t));
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 7, 8, 9, 6, 5]);
        // a late member finds nothing left
        r.member(&|_| panic!("no task is left"));
    }

    /// Members on real threads: every task exactly once, whatever the interleaving.
    #[test]
    fn threads_run_every_task_exactly_once() {
        for (tasks, runs, threads) in [
            (1000, 2, 2),
            (1000, 2, 3),
            (37, 4, 2),
            (3, 2, 4),
            (500, 3, 3),
        ] {
            let seen: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            let r = Runs::new(tasks, runs);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        r.member(&|t| {
                            seen[t].fetch_add(1, Ordering::Relaxed);
                        })
                    });
                }
            });
            assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
    }
}
