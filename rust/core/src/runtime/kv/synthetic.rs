//! A cache of synthetic rows for benches: the attention of one decode step at a given context
//! length, timed without a model prefill (which takes minutes at 8192 positions on a laptop).

use std::time::Instant;

use rayon::prelude::*;

use crate::error::Result;
use crate::parallel;

use super::attend::{attend, Scratch};
use super::pool::Pool;
use super::types::{Geometry, KvType, Rotation};

/// A generator of `n` pseudo-random values in [-2, 2) per call (xorshift64, fixed seed): the
/// synthetic K/V rows of the bench caches, the same sequence on every run.
pub(crate) fn pseudo_random_rows() -> impl FnMut(usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    move |n| {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 22) as f32 - 2.0
            })
            .collect()
    }
}

/// Median wall seconds of `reps` decode steps' attention (every layer, `n_head` query heads over
/// `n_pos` cached positions), the cache filled with pseudo-random rows in [-2, 2).
pub fn decode_attention_seconds(
    kv: KvType,
    rotate: Option<Rotation>,
    geo: Geometry,
    n_head: usize,
    n_pos: usize,
    reps: usize,
) -> Result<f64> {
    let kvd = geo.kv_dim();
    let mut pool = Pool::new(kv, geo, usize::MAX / 2, rotate)?;
    let mut seq = pool
        .admit(n_pos + 1)?
        .expect("an empty pool of usize::MAX / 2 bytes admits any sequence");
    let mut rows = pseudo_random_rows();
    for start in (0..n_pos).step_by(256) {
        let m = 256.min(n_pos - start);
        pool.grow(&mut seq, m)?;
        for layer in 0..geo.n_layer {
            let (k, v) = (rows(m * kvd), rows(m * kvd));
            pool.append(&mut seq, layer, &k, &v);
        }
        pool.commit(&mut seq, m);
    }
    let q = rows(n_head * geo.head_dim);
    let rot = pool.rotate;
    let group = n_head / geo.n_head_kv.max(1);
    let scale = 1.0 / (geo.head_dim as f32).sqrt();
    let mut times = Vec::with_capacity(reps);
    let mut out = vec![0f32; n_head * geo.head_dim];
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        for layer in 0..geo.n_layer {
            let view = seq.view(layer);
            parallel::install(|| {
                out.par_chunks_mut(geo.head_dim).enumerate().for_each_init(
                    Scratch::default,
                    |sc, (h, o)| {
                        let qh = &q[h * geo.head_dim..(h + 1) * geo.head_dim];
                        attend(kv, rot, &geo, &view, h / group, qh, n_pos - 1, scale, sc, o);
                    },
                )
            });
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    pool.release(seq);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
