//! Whole decode steps timed over synthetic caches, for benches: `n_seqs` sequences whose first
//! `n_pos` positions are filled with pseudo-random K/V rows through the pool's own append path
//! (no prefill, which takes many minutes at 8192 positions or 18 x 2048 on a small machine), then
//! batched one-token steps of the real model (matmuls, attention over the quantized cache,
//! logits). The numbers are speeds only: the cache's contents are not the model's.

use std::time::Instant;

use crate::error::{Error, Result};

use super::kv::SeqCache;
use super::llama::Llama;

/// Median wall seconds of `reps` decode steps of `n_seqs` sequences decoding together, each over
/// `n_pos` cached positions (growing by one per step).
pub fn decode_step_seconds(
    model: &mut Llama,
    n_seqs: usize,
    n_pos: usize,
    reps: usize,
) -> Result<f64> {
    let reps = reps.max(1);
    let mut seqs: Vec<SeqCache> = Vec::with_capacity(n_seqs);
    let out = fill_and_time(model, &mut seqs, n_seqs, n_pos, reps);
    for s in seqs {
        model.release(s);
    }
    out
}

fn fill_and_time(
    model: &mut Llama,
    seqs: &mut Vec<SeqCache>,
    n_seqs: usize,
    n_pos: usize,
    reps: usize,
) -> Result<f64> {
    let max_len = n_pos + reps;
    for i in 0..n_seqs.max(1) {
        match model.admit(max_len)? {
            Some(s) => seqs.push(s),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "the KV pool holds {i} sequences of {max_len} positions, not {n_seqs}"
                )))
            }
        }
    }
    let (kvd, n_layer) = (model.pool.geo.kv_dim(), model.pool.geo.n_layer);
    let mut rows = super::kv::synthetic::pseudo_random_rows();
    for seq in seqs.iter_mut() {
        for start in (0..n_pos).step_by(256) {
            let m = 256.min(n_pos - start);
            model.pool.grow(seq, m)?;
            for layer in 0..n_layer {
                let (k, v) = (rows(m * kvd), rows(m * kvd));
                model.pool.append(seq, layer, &k, &v);
            }
            model.pool.commit(seq, m);
        }
    }
    let toks: Vec<[u32; 1]> = (0..seqs.len())
        .map(|i| [(i as u32 * 7919) % 1000 + 1])
        .collect();
    let tok_refs: Vec<&[u32]> = toks.iter().map(|t| &t[..]).collect();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let mut refs: Vec<&mut SeqCache> = seqs.iter_mut().collect();
        let t0 = Instant::now();
        model.forward_batch(&mut refs, &tok_refs, false)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
