//! The forward pass of a Llama-family decoder, as llama.cpp's `llm_build_llama` computes it:
//! embedding lookup; per block RMSNorm, Q/K/V projections (+ optional biases), normal (pairwise)
//! RoPE, grouped-query attention over an f32 KV cache, output projection, residual; RMSNorm,
//! SwiGLU feed-forward, residual; final RMSNorm and the output head (tied to token_embd when the
//! file has no output.weight).
//!
//! A batch of `n` tokens at positions `n_past..n_past + n` is one call: every projection is one
//! `qmatmul` with M = n (prefill uses the small-M GEMM, decode the GEMV). Work is split only by
//! output rows (matmuls) and by (token, head) pairs (attention), each computed by one fixed
//! sequence, so results do not depend on the thread count.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::matmul::qmatmul;
use crate::parallel;

use super::config::Config;
use super::ops;
use super::packed::{self, ActsQ8};
use super::packed_k::{self, ActsQ8K};
use super::weights::{Weight, Weights};

/// A loaded model and its KV cache (one sequence).
pub struct Llama {
    pub cfg: Config,
    pub weights: Weights,
    /// Positions the cache holds room for.
    pub n_ctx: usize,
    /// Positions already in the cache (the next token's position).
    pub n_past: usize,
    /// n_layer x n_ctx x kv_dim each.
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Quantized activations of the packed weights (buffers kept between calls).
#[derive(Default)]
pub struct Scratch {
    q8: ActsQ8,
    q8k: ActsQ8K,
}

/// `out = x · Wᵀ` for any weight kind (M = `m` rows of x); `acts` is scratch for the packed
/// weights' quantized activations.
pub fn matmul(
    w: &Weight,
    file: &[u8],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    acts: &mut Scratch,
) -> Result<()> {
    if let Weight::Packed(p) = w {
        acts.q8.quantize(x, m, p.cols)?;
        return packed::matmul(p, &acts.q8, out);
    }
    if let Weight::PackedK(p) = w {
        acts.q8k.quantize(x, m, p.cols)?;
        return packed_k::matmul(p, &acts.q8k, out);
    }
    let (n, k) = (w.rows(), w.cols());
    if let Some(view) = w.view(file, 0, n) {
        return qmatmul(x, m, &view, out);
    }
    let data = w.f32_data(file).unwrap_or(&[]);
    if x.len() != m * k || out.len() != m * n || data.len() != n * k {
        return Err(invalid(format!(
            "f32 matmul shapes: x {} for {m}x{k}, out {} for {m}x{n}",
            x.len(),
            out.len()
        )));
    }
    let per_task = parallel::rows_per_task(n, k.saturating_mul(m));
    let mut yt = vec![0f32; n * m];
    parallel::install(|| {
        yt.par_chunks_mut(per_task * m)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, yr) in chunk.chunks_mut(m).enumerate() {
                    let r = t * per_task + i;
                    let wr = &data[r * k..(r + 1) * k];
                    for (mi, y) in yr.iter_mut().enumerate() {
                        *y = ops::dot(&x[mi * k..(mi + 1) * k], wr);
                    }
                }
            })
    });
    for (r, yr) in yt.chunks_exact(m).enumerate() {
        for (mi, &v) in yr.iter().enumerate() {
            out[mi * n + r] = v;
        }
    }
    Ok(())
}

/// Batches of at least this many tokens run the row-wise element work (norms, RoPE, SwiGLU) in
/// parallel; a decode step's single row is not worth a fork.
const PAR_ROWS: usize = 8;

/// `ops::rms_norm` of each row of `x` (rows of `w.len()`) into `y`.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let e = w.len();
    if x.len() / e >= PAR_ROWS {
        y.par_chunks_mut(e)
            .zip(x.par_chunks(e))
            .for_each(|(yr, xr)| ops::rms_norm(xr, w, eps, yr));
    } else {
        for (yr, xr) in y.chunks_exact_mut(e).zip(x.chunks_exact(e)) {
            ops::rms_norm(xr, w, eps, yr);
        }
    }
}

/// `ops::swiglu` row by row (rows of `ff`).
fn swiglu_rows(gate: &[f32], up: &[f32], ff: usize, h: &mut [f32]) {
    if gate.len() / ff >= PAR_ROWS {
        h.par_chunks_mut(ff)
            .zip(gate.par_chunks(ff).zip(up.par_chunks(ff)))
            .for_each(|(hr, (g, u))| ops::swiglu(g, u, hr));
    } else {
        ops::swiglu(gate, up, h);
    }
}

/// `ops::swiglu` of rows holding `[gate | up]` (each `ff` wide) side by side.
fn swiglu_stacked(gate_up: &[f32], ff: usize, h: &mut [f32]) {
    let one = |(hr, gu): (&mut [f32], &[f32])| ops::swiglu(&gu[..ff], &gu[ff..], hr);
    if h.len() / ff >= PAR_ROWS {
        h.par_chunks_mut(ff)
            .zip(gate_up.par_chunks(2 * ff))
            .for_each(one);
    } else {
        h.chunks_mut(ff).zip(gate_up.chunks(2 * ff)).for_each(one);
    }
}

/// RoPE on every head of every token's q and k (`cs`: each token's cos/sin cache).
fn rope_rows(q: &mut [f32], k: &mut [f32], cs: &[f32], cfg: &Config, n: usize) {
    let (qd, kvd, rd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.rope_dim, cfg.head_dim);
    if rd == 0 {
        return;
    }
    let one = |(qr, (kr, c)): (&mut [f32], (&mut [f32], &[f32]))| {
        ops::rope_heads(qr, hd, c);
        ops::rope_heads(kr, hd, c);
    };
    if n >= PAR_ROWS {
        q.par_chunks_mut(qd)
            .zip(k.par_chunks_mut(kvd).zip(cs.par_chunks(rd)))
            .for_each(one);
    } else {
        q.chunks_mut(qd)
            .zip(k.chunks_mut(kvd).zip(cs.chunks(rd)))
            .for_each(one);
    }
}

/// Split each of the `m` rows of a stacked product (`parts`' widths side by side) into the parts.
fn split_rows(stacked: &[f32], m: usize, parts: &mut [&mut [f32]]) {
    let width = stacked.len() / m;
    for (i, row) in stacked.chunks_exact(width).enumerate() {
        let mut at = 0;
        for p in parts.iter_mut() {
            let w = p.len() / m;
            p[i * w..(i + 1) * w].copy_from_slice(&row[at..at + w]);
            at += w;
        }
    }
}

fn add_bias(y: &mut [f32], b: &Option<Vec<f32>>) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(b.len()) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
}

impl Llama {
    /// Map `path`, read the configuration and weights, allocate a cache of `n_ctx` positions
    /// (None: the training context, at most 4096).
    pub fn open(path: impl AsRef<Path>, n_ctx: Option<usize>) -> Result<Llama> {
        Self::from_file(Arc::new(GgufFile::open(path)?), n_ctx)
    }

    pub fn from_file(file: Arc<GgufFile>, n_ctx: Option<usize>) -> Result<Llama> {
        let vocab_rows = file
            .header()
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| Error::Format {
                field: "tensor token_embd.weight".into(),
                offset: 0,
                message: "missing from the GGUF file (or not 2-D)".into(),
            })?;
        let cfg = Config::from_header(file.header(), vocab_rows as usize)?;
        let weights = Weights::load(file, &cfg)?;
        let n_ctx = n_ctx.unwrap_or(cfg.n_ctx_train.min(4096));
        if n_ctx == 0 || n_ctx > 1 << 20 {
            return Err(invalid(format!("n_ctx must be 1 to 1048576, got {n_ctx}")));
        }
        let cache = cfg
            .n_layer
            .checked_mul(n_ctx)
            .and_then(|v| v.checked_mul(cfg.kv_dim()))
            .filter(|&v| v <= (1usize << 34))
            .ok_or_else(|| invalid(format!("a KV cache of n_ctx={n_ctx} is too large")))?;
        let alloc = || -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(cache).map_err(|_| {
                invalid(format!(
                    "cannot allocate a KV cache of n_ctx={n_ctx} ({} MiB per K or V)",
                    (cache * 4) >> 20
                ))
            })?;
            v.resize(cache, 0f32);
            Ok(v)
        };
        Ok(Llama {
            cfg,
            weights,
            n_ctx,
            n_past: 0,
            k_cache: alloc()?,
            v_cache: alloc()?,
        })
    }

    /// Forget the sequence (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Run `tokens` at positions `n_past..`, append them to the cache and return the logits:
    /// of every token (n x vocab) when `all_logits`, else of the last one (vocab).
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let n = tokens.len();
        if n == 0 {
            return Err(invalid("forward needs at least one token".into()));
        }
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.cfg.vocab)
        {
            return Err(invalid(format!(
                "token {t} at index {i} is outside the vocabulary of {}",
                self.cfg.vocab
            )));
        }
        if self.n_past + n > self.n_ctx {
            return Err(invalid(format!(
                "context full: {} cached + {n} new tokens > n_ctx {}",
                self.n_past, self.n_ctx
            )));
        }
        let out = parallel::install(|| self.forward_inner(tokens, all_logits))?;
        self.n_past += n;
        Ok(out)
    }

    fn forward_inner(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let cfg = self.cfg.clone();
        let (n, e) = (tokens.len(), cfg.n_embd);
        let (qd, kvd, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let file = self.weights.file.clone();
        let bytes = file.bytes();
        let mut x = vec![0f32; n * e];
        for (row, &t) in x.chunks_exact_mut(e).zip(tokens) {
            self.weights.token_embd.row_f32(bytes, t as usize, row)?;
        }
        let mut cs = vec![0f32; n * cfg.rope_dim];
        for (i, c) in cs.chunks_exact_mut(cfg.rope_dim.max(1)).enumerate() {
            let pos = self.n_past + i;
            ops::rope_cache(pos, cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale, c);
        }
        let mut xn = vec![0f32; n * e];
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut att = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * e];
        let (mut gate, mut up, mut h) =
            (vec![0f32; n * ff], vec![0f32; n * ff], vec![0f32; n * ff]);
        let mut qkv = vec![0f32; n * (qd + 2 * kvd)];
        let mut gate_up = vec![0f32; n * 2 * ff];
        let layer_len = self.n_ctx * kvd;
        let acts = &mut Scratch::default();
        for (li, l) in self.weights.layers.iter().enumerate() {
            norm_rows(&x, &l.attn_norm, cfg.rms_eps, &mut xn);
            match &l.wqkv {
                Some(w) => {
                    matmul(w, bytes, &xn, n, &mut qkv, acts)?;
                    split_rows(&qkv, n, &mut [&mut q[..], &mut k[..], &mut v[..]]);
                }
                None => {
                    matmul(&l.wq, bytes, &xn, n, &mut q, acts)?;
                    matmul(&l.wk, bytes, &xn, n, &mut k, acts)?;
                    matmul(&l.wv, bytes, &xn, n, &mut v, acts)?;
                }
            }
            add_bias(&mut q, &l.bq);
            add_bias(&mut k, &l.bk);
            add_bias(&mut v, &l.bv);
            rope_rows(&mut q, &mut k, &cs, &cfg, n);
            let base = li * layer_len + self.n_past * kvd;
            self.k_cache[base..base + n * kvd].copy_from_slice(&k);
            self.v_cache[base..base + n * kvd].copy_from_slice(&v);
            let kc = &self.k_cache[li * layer_len..(li + 1) * layer_len];
            let vc = &self.v_cache[li * layer_len..(li + 1) * layer_len];
            attention(&cfg, &q, kc, vc, self.n_past, &mut att);
            matmul(&l.wo, bytes, &att, n, &mut proj, acts)?;
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            norm_rows(&x, &l.ffn_norm, cfg.rms_eps, &mut xn);
            match &l.w_gate_up {
                Some(w) => {
                    // Each row holds [gate | up]: SwiGLU reads them in place.
                    matmul(w, bytes, &xn, n, &mut gate_up, acts)?;
                    swiglu_stacked(&gate_up, ff, &mut h);
                }
                None => {
                    matmul(&l.w_gate, bytes, &xn, n, &mut gate, acts)?;
                    matmul(&l.w_up, bytes, &xn, n, &mut up, acts)?;
                    swiglu_rows(&gate, &up, ff, &mut h);
                }
            }
            matmul(&l.w_down, bytes, &h, n, &mut proj, acts)?;
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        let rows: Vec<usize> = if all_logits {
            (0..n).collect()
        } else {
            vec![n - 1]
        };
        let mut xo = vec![0f32; rows.len() * e];
        for (yr, &r) in xo.chunks_exact_mut(e).zip(&rows) {
            ops::rms_norm(
                &x[r * e..(r + 1) * e],
                &self.weights.output_norm,
                cfg.rms_eps,
                yr,
            );
        }
        let mut logits = vec![0f32; rows.len() * cfg.vocab];
        matmul(
            self.weights.head(),
            bytes,
            &xo,
            rows.len(),
            &mut logits,
            acts,
        )?;
        Ok(logits)
    }
}

/// Causal grouped-query attention for `n` new tokens at positions `n_past..`: query head `h`
/// reads key/value head `h / (n_head / n_head_kv)`; scores `q·k` scaled by 1/sqrt(head_dim),
/// softmax over positions `0..=pos`, then the weighted sum of values in position order.
/// One task per (token, head); the per-head arithmetic is the same with or without AVX2.
pub fn attention(cfg: &Config, q: &[f32], kc: &[f32], vc: &[f32], n_past: usize, out: &mut [f32]) {
    let avx2 = use_avx2();
    out.par_chunks_mut(cfg.head_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (ih, o)| {
            attend_one(cfg, q, kc, vc, n_past, ih, avx2, scores, o)
        });
}

/// Output `o` of query head `ih % n_head` of token `ih / n_head` (`attention`'s task; `scores`
/// is scratch).
#[allow(clippy::too_many_arguments)]
fn attend_one(
    cfg: &Config,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    n_past: usize,
    ih: usize,
    avx2: bool,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let (hd, nh, kvd) = (cfg.head_dim, cfg.n_head, cfg.kv_dim());
    let group = cfg.n_head / cfg.n_head_kv;
    let (i, h) = (ih / nh, ih % nh);
    let head = Head {
        q: &q[i * nh * hd + h * hd..][..hd],
        kc,
        vc,
        kvd,
        off: (h / group) * hd,
        npos: n_past + i + 1,
        scale: 1.0f32 / (hd as f32).sqrt(),
        avx2,
    };
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 was detected at run time; head_avx2 is safe code compiled with it.
        return unsafe { head_avx2(&head, scores, o) };
    }
    head.attend(scores, o)
}

fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One query head against the cached keys/values of its key/value head.
struct Head<'a> {
    q: &'a [f32],
    kc: &'a [f32],
    vc: &'a [f32],
    kvd: usize,
    off: usize,
    npos: usize,
    scale: f32,
    /// Read on x86-64 only (no other architecture has an AVX2 path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx2: bool,
}

// Indexed loops on purpose: see `attend`.
#[allow(clippy::needless_range_loop)]
impl Head<'_> {
    /// Scores, softmax, weighted values: each score is `ops::dot8`; each output element sums
    /// `s_j * v_j` in position order. Plain indexed loops, so that everything is generated inside
    /// `head_avx2` (iterator adaptors would be instantiated outside it and lose AVX2); head
    /// widths 64 and 128 get a copy with the width known at compile time (the same arithmetic,
    /// with every output element in its own register lane).
    #[inline(always)]
    fn attend(&self, scores: &mut Vec<f32>, o: &mut [f32]) {
        match o.len() {
            64 => self.attend_n::<64>(scores, o),
            128 => self.attend_n::<128>(scores, o),
            _ => self.attend_any(scores, o),
        }
    }

    #[inline(always)]
    fn scores(&self, scores: &mut Vec<f32>, hd: usize) {
        scores.resize(self.npos, 0.0);
        for j in 0..self.npos {
            scores[j] = ops::dot8(self.q, &self.kc[j * self.kvd + self.off..][..hd]);
        }
        ops::softmax_scaled(scores, self.scale);
    }

    /// `ops::dot8_n`, with AVX2 intrinsics where detected (the same float either way).
    #[inline(always)]
    fn dot8_n<const HD: usize>(&self, q: &[f32; HD], k: &[f32; HD]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: avx2 is set only when AVX2 was detected; HD is 64 or 128 (multiples of 8).
            return unsafe { ops::dot8_n_avx2(q, k) };
        }
        ops::dot8_n(q, k)
    }

    #[inline(always)]
    fn attend_n<const HD: usize>(&self, scores: &mut Vec<f32>, o: &mut [f32]) {
        let q: &[f32; HD] = self.q.try_into().expect("HD elements");
        scores.resize(self.npos, 0.0);
        for j in 0..self.npos {
            let k: &[f32; HD] = self.kc[j * self.kvd + self.off..][..HD]
                .try_into()
                .expect("HD elements");
            scores[j] = self.dot8_n(q, k);
        }
        ops::softmax_scaled(scores, self.scale);
        let mut acc = [0f32; HD];
        for (j, &s) in scores.iter().enumerate() {
            let v: &[f32; HD] = self.vc[j * self.kvd + self.off..][..HD]
                .try_into()
                .expect("HD elements");
            for d in 0..HD {
                acc[d] += s * v[d];
            }
        }
        o.copy_from_slice(&acc);
    }

    #[inline(always)]
    fn attend_any(&self, scores: &mut Vec<f32>, o: &mut [f32]) {
        let hd = o.len();
        self.scores(scores, hd);
        o.fill(0.0);
        for (j, &s) in scores.iter().enumerate() {
            let v = &self.vc[j * self.kvd + self.off..][..hd];
            for d in 0..hd {
                o[d] += s * v[d];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn head_avx2(h: &Head<'_>, scores: &mut Vec<f32>, o: &mut [f32]) {
    h.attend(scores, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_head: usize, n_head_kv: usize, head_dim: usize) -> Config {
        Config {
            n_layer: 1,
            n_embd: n_head * head_dim,
            n_ff: 1,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim: head_dim,
            rope_base: 10000.0,
            rope_freq_scale: 1.0,
            rms_eps: 1e-5,
            n_ctx_train: 16,
            vocab: 1,
        }
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    /// softmax(q·k / sqrt(d)) · V over positions 0..=pos in f64, per (token, head).
    fn naive(c: &Config, q: &[f32], kc: &[f32], vc: &[f32], n_past: usize, n: usize) -> Vec<f64> {
        let (hd, kvd) = (c.head_dim, c.kv_dim());
        let mut out = vec![0f64; n * c.q_dim()];
        for i in 0..n {
            for h in 0..c.n_head {
                let off = (h / (c.n_head / c.n_head_kv)) * hd;
                let qh = &q[i * c.q_dim() + h * hd..][..hd];
                let s: Vec<f64> = (0..=n_past + i)
                    .map(|j| {
                        let k = &kc[j * kvd + off..][..hd];
                        let d: f64 = qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        d / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    let w = (sj - m).exp() / z;
                    for d in 0..hd {
                        out[i * c.q_dim() + h * hd + d] += w * vc[j * kvd + off + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_the_formula_for_every_head_width() {
        for hd in [8usize, 64, 128] {
            let c = cfg(6, 2, hd);
            let (n_past, n) = (5, 3);
            let q = vals(n * c.q_dim(), 1);
            let kc = vals((n_past + n) * c.kv_dim(), 2);
            let vc = vals((n_past + n) * c.kv_dim(), 3);
            let mut out = vec![0f32; n * c.q_dim()];
            attention(&c, &q, &kc, &vc, n_past, &mut out);
            let want = naive(&c, &q, &kc, &vc, n_past, n);
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (o as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                    "hd {hd} at {i}"
                );
            }
            // The portable path gives the same floats as the AVX2 one.
            let head = |avx2| Head {
                q: &q[..hd],
                kc: &kc,
                vc: &vc,
                kvd: c.kv_dim(),
                off: 0,
                npos: n_past + 1,
                scale: 1.0 / (hd as f32).sqrt(),
                avx2,
            };
            let (mut s, mut a, mut b) = (Vec::new(), vec![0f32; hd], vec![0f32; hd]);
            head(false).attend(&mut s, &mut a);
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                // SAFETY: AVX2 detected.
                unsafe { head_avx2(&head(true), &mut s, &mut b) };
                assert_eq!(a, b, "hd {hd}");
            }
            let _ = &mut b;
        }
    }
}
