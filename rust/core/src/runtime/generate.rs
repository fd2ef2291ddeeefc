//! Token generation: the prompt as one batch (prefill), then one token at a time. Greedy
//! (argmax, the first maximum on ties, as llama.cpp's greedy sampler) or temperature / top-k
//! sampling from a seeded generator, so a seed always gives the same tokens.

use std::time::Instant;

use crate::error::{Error, Result};

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
