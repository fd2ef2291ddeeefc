//! One decode step (a single token) with two or more threads, when `enabled` (opt-in): every
//! thread of the pool runs the whole forward pass in one parallel region (`rayon::broadcast`)
//! instead of forking and joining the pool once per matmul (about 160 times a token). The pass is a sequence of steps (7 a
//! layer); a step's work is cut into items (row ranges of a matrix, attention heads, SwiGLU
//! elements) that the threads claim from an atomic counter, and a thread goes on to the next
//! step once every item of this one is finished (spinning briefly, then sleeping). A thread that
//! is not running (a busy machine) claims nothing and delays nobody, so the region degrades to
//! one thread instead of waiting for it. Each output is computed by the same code as in
//! `llama.rs` (the same kernels on the same rows), so the logits are those of one thread, bit
//! for bit. Norms and activation quantization are cheap and run on each thread that needs them.
//!
//! Shared buffers are written through `Buf`: within a step each element is written by at most
//! one item and read by none; what a step wrote is read in later steps.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::matmul::qmatmul;

use super::llama::{add_bias, attend_one, use_avx2, Llama};
use super::ops;
use super::packed::{self, ActsQ8, P};
use super::packed_k::{self, ActsQ8K};
use super::weights::Weight;

/// Whether decode steps use the region: only with FERROQUANT_RUNTIME_REGION=1 (read at every
/// step). Off by default: on this project's busy 2-core machine it measured no faster than one
/// fork-join per matmul (the same CPU time per token, wall times within the noise); it waits
/// for an A/B run on a quiet machine.
pub fn enabled() -> bool {
    std::env::var("FERROQUANT_RUNTIME_REGION").is_ok_and(|v| v.trim() == "1")
}

/// Spins (about 20 µs) before a waiting thread sleeps: on a busy machine the other thread may
/// not be running at all, and spinning (or yielding) then only keeps it off its core.
const SPINS: u32 = 1 << 11;

/// The work counters of one step: items claimed and items finished.
#[derive(Default)]
struct Step {
    claimed: AtomicUsize,
    done: AtomicUsize,
}

/// The steps of one token and the means to sleep until one is finished.
struct Steps {
    steps: Vec<Step>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Steps {
    fn new(n: usize) -> Steps {
        Steps {
            steps: (0..n).map(|_| Step::default()).collect(),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Step `s` of `n` items: claim items and run `f` on each until none is left, then wait
    /// until every item (claimed by any thread) is finished. What the items wrote is then
    /// visible to the caller. A thread that arrives late finds the items taken and goes on.
    fn run(&self, s: usize, n: usize, mut f: impl FnMut(usize)) {
        let st = &self.steps[s];
        loop {
            let i = st.claimed.fetch_add(1, Ordering::AcqRel);
            if i >= n {
                break;
            }
            // Counted as finished even if `f` panics: the other threads then run to the end
            // instead of waiting forever, and the broadcast passes the panic on.
            let _finish = Finish(self, st, n);
            f(i);
        }
        for _ in 0..SPINS {
            if st.done.load(Ordering::Acquire) == n {
                return;
            }
            std::hint::spin_loop();
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while st.done.load(Ordering::SeqCst) != n {
            held = self.wake.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        drop(held);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks one item of a step finished when dropped.
struct Finish<'a>(&'a Steps, &'a Step, usize);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let Finish(steps, st, n) = *self;
        // A sleeper counted itself before its last look at `done`: either it saw the final
        // count, or it is (about to be) waiting under the lock and gets woken.
        if st.done.fetch_add(1, Ordering::SeqCst) + 1 == n
            && steps.sleepers.load(Ordering::SeqCst) > 0
        {
            let _held = steps.lock.lock().unwrap_or_else(|p| p.into_inner());
            steps.wake.notify_all();
        }
    }
}

/// A shared f32 buffer of the region.
#[derive(Clone, Copy)]
struct Buf(*mut f32, usize);

// SAFETY: the threads of the region access a `Buf` only as the module comment says (disjoint
// writes within a step); the buffers outlive the region.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    fn of(v: &mut [f32]) -> Buf {
        Buf(v.as_mut_ptr(), v.len())
    }

    /// # Safety
    /// Within the step no other thread reads or writes `r`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, r: Range<usize>) -> &mut [f32] {
        assert!(r.start <= r.end && r.end <= self.1, "{r:?} of {}", self.1);
        // SAFETY: in bounds (checked); unshared (the caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.0.add(r.start), r.len()) }
    }

    /// # Safety
    /// Within the step no thread writes `r`.
    #[cfg(test)]
    unsafe fn get(&self, r: Range<usize>) -> &[f32] {
        assert!(r.start <= r.end && r.end <= self.1, "{r:?} of {}", self.1);
        // SAFETY: in bounds (checked); no writer (the caller's contract).
        unsafe { std::slice::from_raw_parts(self.0.add(r.start), r.len()) }
    }

    /// # Safety
    /// Within the step no thread writes any of it.
    unsafe fn all(&self) -> &[f32] {
        // SAFETY: the whole buffer; no writer (the caller's contract).
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }
}

/// Rows of `w` per work item: whole panels, about 16 K multiply-adds for the packed kernel (a
/// claim costs well under a microsecond); `qmatmul` pays its set-up (activation quantization) per
/// call, so its matrices go in 2 items per thread.
fn chunk(w: &Weight, nt: usize) -> usize {
    match w {
        Weight::Packed(p) => P * (16384 / p.cols.max(1)).max(1),
        Weight::PackedK(p) => P * (16384 / p.cols.max(1)).max(1),
        _ => w.rows().div_ceil(2 * nt).next_multiple_of(P),
    }
}

/// Work items of `w`.
fn items(w: &Weight, nt: usize) -> usize {
    w.rows().div_ceil(chunk(w, nt))
}

/// The rows of item `i` of `w`.
fn item_rows(w: &Weight, nt: usize, i: usize) -> Range<usize> {
    let c = chunk(w, nt);
    i * c..((i + 1) * c).min(w.rows())
}

/// Steps of one layer: q|k|v, rope and cache, attention, output + residual, gate|up, SwiGLU,
/// down + residual.
const LAYER_STEPS: usize = 7;
/// SwiGLU elements per work item.
const SWIGLU_CHUNK: usize = 512;

/// One thread's private state: the normed input and the quantized activations of the step
/// that last needed them.
struct Worker<'a> {
    nt: usize,
    bytes: &'a [u8],
    acts: ActsQ8,
    acts_step: usize,
    acts_k: ActsQ8K,
    acts_k_step: usize,
    xn: Vec<f32>,
    xn_step: usize,
    part: Vec<f32>,
    scores: Vec<f32>,
    err: &'a Mutex<Option<Error>>,
}

impl Worker<'_> {
    fn keep(&self, r: Result<()>) {
        if let Err(e) = r {
            let mut slot = self.err.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
    }

    /// Rows `rows` of `x · Wᵀ` (one activation row, the input of step `s`) into `out`.
    fn rows(
        &mut self,
        s: usize,
        w: &Weight,
        x: &[f32],
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        if let Weight::Packed(p) = w {
            if self.acts_step != s || self.acts.k != p.cols {
                self.acts.quantize(x, 1, p.cols)?;
                self.acts_step = s;
            }
            return packed::matvec_rows(p, &self.acts, rows, out);
        }
        if let Weight::PackedK(p) = w {
            if self.acts_k_step != s || self.acts_k.k != p.cols {
                self.acts_k.quantize(x, 1, p.cols)?;
                self.acts_k_step = s;
            }
            return packed_k::matvec_rows(p, &self.acts_k, rows, out);
        }
        if let Some(v) = w.view(self.bytes, rows.start, rows.end) {
            return qmatmul(x, 1, &v, out);
        }
        let k = w.cols();
        let data = w.f32_data(self.bytes).unwrap_or(&[]);
        if data.len() != w.rows() * k || x.len() != k {
            return Err(Error::InvalidArgument(format!(
                "f32 matvec shapes: x {} for K={k}",
                x.len()
            )));
        }
        for (o, r) in out.iter_mut().zip(rows) {
            *o = ops::dot(x, &data[r * k..(r + 1) * k]);
        }
        Ok(())
    }

    /// Step `s`: `rms_norm(x) · Wᵀ` for each (W, offset) of `parts` into `out` at the offset.
    #[allow(clippy::too_many_arguments)]
    fn proj(
        &mut self,
        steps: &Steps,
        s: usize,
        parts: &[(&Weight, usize)],
        out: Buf,
        x: Buf,
        norm: &[f32],
        eps: f32,
    ) {
        let nt = self.nt;
        let total = parts.iter().map(|(w, _)| items(w, nt)).sum();
        steps.run(s, total, |mut i| {
            let mut at = 0;
            while i >= items(parts[at].0, nt) {
                i -= items(parts[at].0, nt);
                at += 1;
            }
            let (w, off) = parts[at];
            if self.xn_step != s {
                // SAFETY: x is written in no step that can overlap this one (see forward_one).
                ops::rms_norm(unsafe { x.all() }, norm, eps, &mut self.xn);
                self.xn_step = s;
            }
            let rows = item_rows(w, nt, i);
            // SAFETY: these rows of out belong to this item only; nobody reads them in this step.
            let o = unsafe { out.part(off + rows.start..off + rows.end) };
            let xn = std::mem::take(&mut self.xn);
            let r = self.rows(s, w, &xn, rows, o);
            self.xn = xn;
            self.keep(r);
        });
    }

    /// Step `s`: `input · Wᵀ` added to the residual `x`.
    fn residual(&mut self, steps: &Steps, s: usize, w: &Weight, input: Buf, x: Buf) {
        let nt = self.nt;
        steps.run(s, items(w, nt), |i| {
            let rows = item_rows(w, nt, i);
            let mut part = std::mem::take(&mut self.part);
            part.resize(rows.len(), 0.0);
            // SAFETY: no item of this step writes `input`.
            let r = self.rows(s, w, unsafe { input.all() }, rows.clone(), &mut part);
            // SAFETY: these rows of x belong to this item only.
            for (a, b) in unsafe { x.part(rows) }.iter_mut().zip(&part) {
                *a += b;
            }
            self.part = part;
            self.keep(r);
        });
    }
}

/// `Llama::forward` of one token on every thread of the current pool.
///
/// Steps run in order on every thread; within a step the items write disjoint ranges: the
/// projections their rows of q|k|v, gate|up, the logits, or (residual steps) of x; rope and
/// cache one item; attention one head per item; SwiGLU its elements. Reads in a step are of
/// buffers written in earlier steps only (x is read by the norms of projection steps and
/// written only in residual steps).
pub(super) fn forward_one(model: &mut Llama, token: u32) -> Result<Vec<f32>> {
    let cfg = model.cfg.clone();
    let (e, qd, kvd, ff, hd) = (
        cfg.n_embd,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.n_ff,
        cfg.head_dim,
    );
    let file = model.weights.file.clone();
    let bytes = file.bytes();
    let mut x = vec![0f32; e];
    model
        .weights
        .token_embd
        .row_f32(bytes, token as usize, &mut x)?;
    let mut cs = vec![0f32; cfg.rope_dim];
    if cfg.rope_dim > 0 {
        ops::rope_cache(
            model.n_past,
            cfg.rope_dim,
            cfg.rope_base,
            cfg.rope_freq_scale,
            &mut cs,
        );
    }
    let (mut qkv, mut att) = (vec![0f32; qd + 2 * kvd], vec![0f32; qd]);
    let (mut gate_up, mut h) = (vec![0f32; 2 * ff], vec![0f32; ff]);
    let mut logits = vec![0f32; cfg.vocab];
    let (xb, qkvb, attb) = (Buf::of(&mut x), Buf::of(&mut qkv), Buf::of(&mut att));
    let (gub, hb, lb) = (Buf::of(&mut gate_up), Buf::of(&mut h), Buf::of(&mut logits));
    let (kcb, vcb) = (Buf::of(&mut model.k_cache), Buf::of(&mut model.v_cache));
    let (n_past, layer_len, avx2) = (model.n_past, model.n_ctx * kvd, use_avx2());
    let weights = &model.weights;
    let plans: Vec<_> = weights
        .layers
        .iter()
        .map(|l| {
            let qkv: Vec<(&Weight, usize)> = match &l.wqkv {
                Some(m) => vec![(m, 0)],
                None => vec![(&l.wq, 0), (&l.wk, qd), (&l.wv, qd + kvd)],
            };
            let gu: Vec<(&Weight, usize)> = match &l.w_gate_up {
                Some(m) => vec![(m, 0)],
                None => vec![(&l.w_gate, 0), (&l.w_up, ff)],
            };
            (qkv, gu)
        })
        .collect();
    let head = [(weights.head(), 0)];
    let err = Mutex::new(None);
    let steps = Steps::new(cfg.n_layer * LAYER_STEPS + 1);
    rayon::broadcast(|ctx| {
        let mut w = Worker {
            nt: ctx.num_threads(),
            bytes,
            acts: ActsQ8::default(),
            acts_step: usize::MAX,
            acts_k: ActsQ8K::default(),
            acts_k_step: usize::MAX,
            xn: vec![0f32; e],
            xn_step: usize::MAX,
            part: Vec::new(),
            scores: Vec::new(),
            err: &err,
        };
        for (li, (l, (qkv_parts, gu_parts))) in weights.layers.iter().zip(&plans).enumerate() {
            let s0 = li * LAYER_STEPS;
            w.proj(&steps, s0, qkv_parts, qkvb, xb, &l.attn_norm, cfg.rms_eps);
            steps.run(s0 + 1, 1, |_| {
                // SAFETY (this item and the next step's): see the function comment.
                let all = unsafe { qkvb.part(0..qd + 2 * kvd) };
                let (q, rest) = all.split_at_mut(qd);
                let (k, v) = rest.split_at_mut(kvd);
                add_bias(q, &l.bq);
                add_bias(k, &l.bk);
                add_bias(v, &l.bv);
                if cfg.rope_dim > 0 {
                    ops::rope_heads(q, hd, &cs);
                    ops::rope_heads(k, hd, &cs);
                }
                let base = li * layer_len + n_past * kvd;
                unsafe { kcb.part(base..base + kvd) }.copy_from_slice(k);
                unsafe { vcb.part(base..base + kvd) }.copy_from_slice(v);
            });
            steps.run(s0 + 2, cfg.n_head, |ih| {
                let q = unsafe { &qkvb.all()[..qd] };
                let layer = li * layer_len..(li + 1) * layer_len;
                let (kc, vc) = unsafe { (&kcb.all()[layer.clone()], &vcb.all()[layer]) };
                let o = unsafe { attb.part(ih * hd..(ih + 1) * hd) };
                attend_one(&cfg, q, kc, vc, n_past, ih, avx2, &mut w.scores, o);
            });
            w.residual(&steps, s0 + 3, &l.wo, attb, xb);
            w.proj(&steps, s0 + 4, gu_parts, gub, xb, &l.ffn_norm, cfg.rms_eps);
            steps.run(s0 + 5, ff.div_ceil(SWIGLU_CHUNK), |i| {
                let r = i * SWIGLU_CHUNK..((i + 1) * SWIGLU_CHUNK).min(ff);
                let gu = unsafe { gub.all() };
                let (g, u) = (&gu[r.clone()], &gu[ff + r.start..ff + r.end]);
                ops::swiglu(g, u, unsafe { hb.part(r) });
            });
            w.residual(&steps, s0 + 6, &l.w_down, hb, xb);
        }
        let s = cfg.n_layer * LAYER_STEPS;
        w.proj(&steps, s, &head, lb, xb, &weights.output_norm, cfg.rms_eps);
    });
    if let Some(e) = err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn every_item_runs_once_and_steps_see_the_steps_before() {
        let (n_steps, items) = (50, 7);
        let mut data = vec![0f32; n_steps * items];
        let buf = Buf::of(&mut data);
        let steps = Steps::new(n_steps);
        let runs = AtomicUsize::new(0);
        pool(3).broadcast(|_| {
            for s in 0..n_steps {
                steps.run(s, items, |i| {
                    // SAFETY: item i of step s owns element s * items + i; the previous step's
                    // elements are finished (the property under test) and only read now.
                    let before: f32 = if s == 0 {
                        0.0
                    } else {
                        let prev = unsafe { buf.get((s - 1) * items..s * items) };
                        prev.iter().sum()
                    };
                    let cell = unsafe { buf.part(s * items + i..s * items + i + 1) };
                    cell[0] = before + 1.0;
                    runs.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(runs.into_inner(), n_steps * items);
        // Step s's values: 1 + items * (step s - 1's value), if every step saw the whole one
        // before it.
        let mut want = 1.0f32;
        for s in 0..n_steps.min(6) {
            assert!(
                data[s * items..(s + 1) * items].iter().all(|&v| v == want),
                "step {s}"
            );
            want = 1.0 + items as f32 * want;
        }
    }

    #[test]
    fn a_panicking_item_is_passed_on_instead_of_hanging() {
        let steps = Steps::new(3);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool(2).broadcast(|_| {
                for s in 0..3 {
                    steps.run(s, 4, |i| assert!(!(s == 1 && i == 2), "item 2 of step 1"));
                }
            })
        }));
        assert!(r.is_err());
    }
}
