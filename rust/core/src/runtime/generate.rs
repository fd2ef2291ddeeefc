//! Token generation: the prompt as one batch (prefill), then one token at a time. Greedy
//! (argmax, the first maximum on ties, as llama.cpp's greedy sampler) or temperature / top-k
//! sampling from a seeded generator, so a seed always gives the same tokens. `generate_batch`
//! decodes several prompts together over the paged KV pool.

use std::time::Instant;

use crate::error::{Error, Result};

use super::kv::SeqCache;
use super::llama::Llama;

/// How the next token is picked. `temperature <= 0` is greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// What `generate` produced, with wall times of its two phases.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    /// Forward passes of single tokens (one fewer than `tokens` when the last token was not
    /// fed back).
    pub decode_steps: usize,
    pub decode_seconds: f64,
}

/// splitmix64: small, fast and reproducible on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 || s.top_k == 1 {
        return argmax(logits);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    // Highest first; ties by index so the order is total and reproducible.
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0] as usize] as f64;
    let t = s.temperature as f64;
    let p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) / t).exp())
        .collect();
    let total: f64 = p.iter().sum();
    let mut r = rng.uniform() * total;
    for (&i, &pi) in idx.iter().zip(&p) {
        if r < pi {
            return i;
        }
        r -= pi;
    }
    idx[idx.len() - 1]
}

/// Continue the model's sequence with `prompt`, then pick up to `max_new` tokens, stopping
/// after any token in `stop`. The prompt is one forward pass; each new token but the last is fed
/// back as the next step.
pub fn generate(
    model: &mut Llama,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop: &[u32],
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "generate needs a non-empty prompt".into(),
        ));
    }
    if !(sampling.temperature.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "temperature must be finite, got {}",
            sampling.temperature
        )));
    }
    let mut rng = Rng(sampling.seed);
    let t0 = Instant::now();
    let mut logits = model.forward(prompt, false)?;
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let mut tokens = Vec::with_capacity(max_new);
    let (mut steps, t1) = (0, Instant::now());
    while tokens.len() < max_new {
        let t = sample(&logits, sampling, &mut rng);
        tokens.push(t);
        if stop.contains(&t) || tokens.len() == max_new {
            break;
        }
        logits = model.forward(&[t], false)?;
        steps += 1;
    }
    Ok(Generation {
        tokens,
        prompt_tokens: prompt.len(),
        prompt_seconds,
        decode_steps: steps,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// What `generate_batch` produced: each prompt's new tokens, in prompt order.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchGeneration {
    pub tokens: Vec<Vec<u32>>,
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    /// Tokens fed back in batched decode steps (all sequences together).
    pub decode_tokens: usize,
    /// Batched decode steps (one forward pass each).
    pub decode_steps: usize,
    pub decode_seconds: f64,
    /// The most sequences that decoded together.
    pub max_active: usize,
}

struct Active {
    index: usize,
    seq: SeqCache,
    out: Vec<u32>,
    rng: Rng,
    logits: Vec<f32>,
}

/// Generate for several prompts together. Each prompt is admitted to the KV pool with room for
/// `prompt + max_new` positions, prefilled alone, then decodes with every other admitted
/// sequence in one forward pass per step (one batched matmul over the active sequences). A
/// sequence ends after a `stop` token or `max_new` tokens and frees its pages at once. While the
/// pool is full, prompts wait (first come, first served) and are admitted as pages free up.
/// Every prompt is checked before any work: a prompt that can never fit (past n_ctx, or larger
/// than the whole pool) is an error naming it. The sequence of `forward` is reset first.
/// Sequence i samples with seed `sampling.seed + i`.
pub fn generate_batch(
    model: &mut Llama,
    prompts: &[Vec<u32>],
    max_new: usize,
    sampling: &Sampling,
    stop: &[u32],
) -> Result<BatchGeneration> {
    if prompts.is_empty() {
        return Err(Error::InvalidArgument(
            "generate_batch needs at least one prompt".into(),
        ));
    }
    if !(sampling.temperature.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "temperature must be finite, got {}",
            sampling.temperature
        )));
    }
    for (i, p) in prompts.iter().enumerate() {
        let need = p.len() + max_new;
        let named = |e: Error| Error::InvalidArgument(format!("prompt {i}: {e}"));
        if p.is_empty() {
            return Err(named(Error::InvalidArgument("empty prompt".into())));
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= model.cfg.vocab) {
            return Err(named(Error::InvalidArgument(format!(
                "token {t} is outside the vocabulary of {}",
                model.cfg.vocab
            ))));
        }
        if need > model.n_ctx {
            return Err(named(Error::InvalidArgument(format!(
                "{} prompt tokens + {max_new} new tokens pass n_ctx {}",
                p.len(),
                model.n_ctx
            ))));
        }
        model.pool.check_fits(need).map_err(named)?;
    }
    model.reset();
    let mut waiting: std::collections::VecDeque<usize> = (0..prompts.len()).collect();
    let mut active: Vec<Active> = Vec::new();
    let mut done: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    let mut r = BatchGeneration {
        tokens: Vec::new(),
        prompt_tokens: 0,
        prompt_seconds: 0.0,
        decode_tokens: 0,
        decode_steps: 0,
        decode_seconds: 0.0,
        max_active: 0,
    };
    let result = (|| -> Result<()> {
        loop {
            // Admit waiting prompts while pages last; prefill each alone.
            while let Some(&i) = waiting.front() {
                let Some(mut seq) = model.admit(prompts[i].len() + max_new)? else {
                    break;
                };
                waiting.pop_front();
                let t0 = Instant::now();
                let logits = model.forward_batch(&mut [&mut seq], &[&prompts[i]], false);
                r.prompt_seconds += t0.elapsed().as_secs_f64();
                r.prompt_tokens += prompts[i].len();
                let logits = match logits {
                    Ok(l) => l,
                    Err(e) => {
                        model.release(seq);
                        return Err(e);
                    }
                };
                active.push(Active {
                    index: i,
                    seq,
                    out: Vec::new(),
                    rng: Rng(sampling.seed.wrapping_add(i as u64)),
                    logits,
                });
            }
            if active.is_empty() {
                return Ok(());
            }
            r.max_active = r.max_active.max(active.len());
            // Sample every active sequence; the finished ones leave and free their pages.
            let mut k = 0;
            while k < active.len() {
                let a = &mut active[k];
                let t = sample(&a.logits, sampling, &mut a.rng);
                a.out.push(t);
                if stop.contains(&t) || a.out.len() >= max_new {
                    let a = active.swap_remove(k);
                    done[a.index] = Some(a.out);
                    model.release(a.seq);
                } else {
                    k += 1;
                }
            }
            if active.is_empty() {
                continue;
            }
            // Keep prompt order among the active sequences (deterministic batches).
            active.sort_by_key(|a| a.index);
            let last: Vec<[u32; 1]> = active
                .iter()
                .map(|a| [*a.out.last().unwrap_or(&0)])
                .collect();
            let toks: Vec<&[u32]> = last.iter().map(|t| &t[..]).collect();
            let mut seqs: Vec<&mut SeqCache> = active.iter_mut().map(|a| &mut a.seq).collect();
            let t1 = Instant::now();
            let logits = model.forward_batch(&mut seqs, &toks, false)?;
            r.decode_seconds += t1.elapsed().as_secs_f64();
            r.decode_steps += 1;
            r.decode_tokens += active.len();
            let vocab = model.cfg.vocab;
            for (a, l) in active.iter_mut().zip(logits.chunks_exact(vocab)) {
                a.logits = l.to_vec();
            }
        }
    })();
    for a in active.drain(..) {
        model.release(a.seq);
    }
    result?;
    r.tokens = done.into_iter().map(|t| t.unwrap_or_default()).collect();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let s = Sampling {
            temperature: 1.0,
            top_k: 3,
            seed: 42,
        };
        let mut top: Vec<u32> = (0..50).collect();
        top.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        top.truncate(3);
        let (mut r1, mut r2) = (Rng(s.seed), Rng(s.seed));
        let a: Vec<u32> = (0..200).map(|_| sample(&logits, &s, &mut r1)).collect();
        let b: Vec<u32> = (0..200).map(|_| sample(&logits, &s, &mut r2)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|t| top.contains(t)));
        // All three candidates show up over 200 draws (each has probability > 0.2).
        assert!(top.iter().all(|t| a.contains(t)));
        let greedy = Sampling::default();
        assert_eq!(sample(&logits, &greedy, &mut r1), argmax(&logits));
    }
}
