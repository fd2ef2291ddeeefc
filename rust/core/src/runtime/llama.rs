//! The forward pass of a Llama-family decoder, as llama.cpp's `llm_build_llama` computes it:
//! embedding lookup; per block RMSNorm, Q/K/V projections (+ optional biases), normal (pairwise)
//! RoPE, grouped-query attention over the (quantized) KV cache of kv/, output projection,
//! residual; RMSNorm,
//! SwiGLU feed-forward, residual; final RMSNorm and the output head (tied to token_embd when the
//! file has no output.weight).
//!
//! One call runs any number of tokens of any number of sequences (a prompt of one sequence, or
//! one token of each of several sequences decoding together): every projection is one
//! `qmatmul` over all the rows (prefill uses the small-M GEMM, decode the GEMV). Work is split
//! only by output rows (matmuls) and by (row, head) pairs (attention), each computed by one fixed
//! sequence, so results do not depend on the thread count.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::tensor::QuantizedView;
use crate::gguf::GgufFile;
use crate::matmul::{self, qmatmul};
use crate::parallel;
use crate::qtype::QType;

use super::config::Config;
use super::kv::attend::{self, Scratch as AttnScratch};
use super::kv::pool::parse_size;
#[cfg(target_arch = "x86_64")]
use super::kv::prefill;
use super::kv::{Geometry, KvSpec, Pool, SeqCache, Window};
use super::ops;
use super::packed::{self, ActsQ8};
use super::packed_k::{self, ActsQ8K};
use super::weights::{Weight, Weights};

/// A loaded model, its pool of KV-cache pages and the one sequence `forward` continues.
pub struct Llama {
    pub cfg: Config,
    pub weights: Weights,
    /// Positions a sequence may hold (prompt and generated tokens).
    pub n_ctx: usize,
    pub pool: Pool,
    /// The sequence of `forward` / `generate` (admitted on first use, freed by `reset`).
    main: Option<SeqCache>,
}

/// The default `kv_budget`.
pub const DEFAULT_KV_BUDGET: &str = "512MiB";

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
        if let Some(v) = gemm_view(QType::Q8_0, p.rows, p.cols, &p.file_rows, m, file) {
            return qmatmul(x, m, &v, out);
        }
        acts.q8.quantize(x, m, p.cols)?;
        return packed::matmul(p, &acts.q8, out);
    }
    if let Weight::PackedK(p) = w {
        if let Some(v) = gemm_view(p.qtype(), p.rows, p.cols, &p.file_rows, m, file) {
            return qmatmul(x, m, &v, out);
        }
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

/// From this many activation rows a packed weight whose rows are also in the file takes
/// `qmatmul`'s GEMM path, where it has one and K is a multiple of 256. Measured (one thread,
/// CPU time, SmolLM2's q8_0 ffn_down 576x1536, a loaded machine): the GEMM runs at 0.54-0.70x
/// the packed kernel's speed at M = 4, 0.96-1.12x at M = 8, 1.2-1.4x at M = 16 and 32, 1.5x at
/// M = 512. At K = 576 (2 groups of 8 blocks and 2 blocks,
/// which the GEMM pads to a third group) the packed kernel stays faster at every M (GEMM
/// 0.67-0.8x), so the rule asks for whole groups, or M where the AMX int8 tiles take the
/// format (`matmul::amx_int8_takes`: q8_0 from 32 rows), which run any K in blocks of 32
/// (a 512-token prompt on the Intel Xeon with AMX: see benches/RESULTS.md, session 14).
pub const GEMM_OVER_PACKED_M: usize = 16;

/// The file rows of a packed weight when `m` rows should take the GEMM path instead.
fn gemm_view<'a>(
    qtype: QType,
    rows: usize,
    cols: usize,
    file_rows: &Option<std::ops::Range<usize>>,
    m: usize,
    file: &'a [u8],
) -> Option<QuantizedView<'a>> {
    let gemm = m >= GEMM_OVER_PACKED_M
        && (cols.is_multiple_of(256) || matmul::amx_int8_takes(qtype, m, cols))
        && matmul::has_gemm(qtype, m, cols);
    if !gemm {
        return None;
    }
    super::weights::file_view(qtype, rows, cols, file_rows, file)
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
    /// Map `path`, read the configuration and weights; a pool of `kv_budget` bytes (None: 512
    /// MiB) of `kv` pages, sequences of up to `n_ctx` positions (None: the training context, at
    /// most 4096). Errors when `n_ctx` passes the model's training context or one sequence of
    /// `n_ctx` positions does not fit the budget. `kv`: a KvType, or a KvSpec choosing the
    /// rotation and the KIVI sinks and residual too.
    pub fn open(
        path: impl AsRef<Path>,
        n_ctx: Option<usize>,
        kv: impl Into<KvSpec>,
        kv_budget: Option<usize>,
    ) -> Result<Llama> {
        Self::from_file(Arc::new(GgufFile::open(path)?), n_ctx, kv, kv_budget)
    }

    pub fn from_file(
        file: Arc<GgufFile>,
        n_ctx: Option<usize>,
        kv: impl Into<KvSpec>,
        kv_budget: Option<usize>,
    ) -> Result<Llama> {
        let KvSpec {
            kv,
            rotate,
            sinks,
            residual,
        } = kv.into();
        let window = Window::resolve(kv, sinks, residual)?;
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
        let n_ctx = n_ctx.unwrap_or(cfg.n_ctx_train.min(4096));
        if n_ctx == 0 || n_ctx > cfg.n_ctx_train {
            return Err(invalid(format!(
                "n_ctx must be 1 to the model's context length {}, got {n_ctx}",
                cfg.n_ctx_train
            )));
        }
        let geo = Geometry {
            n_layer: cfg.n_layer,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
        };
        let budget = match kv_budget {
            Some(b) => b,
            None => parse_size(DEFAULT_KV_BUDGET)?,
        };
        let pool = Pool::new(kv, geo, budget, rotate)?.with_window(window);
        // One sequence of n_ctx positions must fit (the error says by how much it does not).
        pool.check_fits(n_ctx)?;
        let weights = Weights::load(file, &cfg)?;
        Ok(Llama {
            cfg,
            weights,
            n_ctx,
            pool,
            main: None,
        })
    }

    /// Positions in the sequence `forward` continues (the next token's position).
    pub fn n_past(&self) -> usize {
        self.main.as_ref().map_or(0, |s| s.n)
    }

    /// Forget the sequence (its pages go back to the pool).
    pub fn reset(&mut self) {
        if let Some(s) = self.main.take() {
            self.pool.release(s);
        }
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
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
        Ok(())
    }

    /// Run `tokens` at positions `n_past..`, append them to the cache and return the logits:
    /// of every token (n x vocab) when `all_logits`, else of the last one (vocab).
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        if self.n_past() + n > self.n_ctx {
            return Err(invalid(format!(
                "context full: {} cached + {n} new tokens > n_ctx {}",
                self.n_past(),
                self.n_ctx
            )));
        }
        let mut seq = match self.main.take() {
            Some(s) => s,
            None => self.pool.admit(self.n_ctx)?.ok_or_else(|| {
                invalid(format!(
                    "the KV pool ({} bytes) has no room for a sequence of n_ctx {} positions",
                    self.pool.budget, self.n_ctx
                ))
            })?,
        };
        let out = self.forward_batch(&mut [&mut seq], &[tokens], all_logits);
        self.main = Some(seq);
        out
    }

    /// A new sequence of at most `max_len` positions from the pool (None while it is full).
    pub fn admit(&mut self, max_len: usize) -> Result<Option<SeqCache>> {
        if max_len > self.n_ctx {
            return Err(invalid(format!(
                "a sequence of {max_len} positions passes n_ctx {} (the model's context length is {})",
                self.n_ctx, self.cfg.n_ctx_train
            )));
        }
        self.pool.admit(max_len)
    }

    pub fn release(&mut self, seq: SeqCache) {
        self.pool.release(seq)
    }

    /// Run `toks[i]` at the next positions of `seqs[i]`, every sequence's rows in one pass, and
    /// append them to their caches. Logits: every row's (all_logits) or each sequence's last.
    pub fn forward_batch(
        &mut self,
        seqs: &mut [&mut SeqCache],
        toks: &[&[u32]],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        if seqs.len() != toks.len() || seqs.is_empty() {
            return Err(invalid(
                "forward_batch needs one token list per sequence".into(),
            ));
        }
        for (s, t) in seqs.iter_mut().zip(toks) {
            self.check_tokens(t)?;
            self.pool.grow(s, t.len())?;
        }
        let out = parallel::install(|| self.forward_inner(seqs, toks, all_logits));
        for (s, t) in seqs.iter_mut().zip(toks) {
            if out.is_ok() {
                self.pool.commit(s, t.len());
            } else {
                self.pool.rollback(s);
            }
        }
        out
    }

    fn forward_inner(
        &self,
        seqs: &mut [&mut SeqCache],
        toks: &[&[u32]],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let cfg = self.cfg.clone();
        // Row r is token `tokens[r]` of sequence `row_seq[r]` at position `row_pos[r]`.
        let tokens: Vec<u32> = toks.iter().flat_map(|t| t.iter().copied()).collect();
        let (row_seq, row_pos): (Vec<usize>, Vec<usize>) = toks
            .iter()
            .enumerate()
            .flat_map(|(si, t)| (0..t.len()).map(move |i| (si, i)))
            .map(|(si, i)| (si, seqs[si].n + i))
            .unzip();
        let (n, e) = (tokens.len(), cfg.n_embd);
        let (qd, kvd, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let file = self.weights.file.clone();
        let bytes = file.bytes();
        let mut x = vec![0f32; n * e];
        for (row, &t) in x.chunks_exact_mut(e).zip(&tokens) {
            self.weights.token_embd.row_f32(bytes, t as usize, row)?;
        }
        let mut cs = vec![0f32; n * cfg.rope_dim];
        for (c, &pos) in cs.chunks_exact_mut(cfg.rope_dim.max(1)).zip(&row_pos) {
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
            let mut at = 0;
            for (s, t) in seqs.iter_mut().zip(toks) {
                let rows = at * kvd..(at + t.len()) * kvd;
                self.pool.append(s, li, &k[rows.clone()], &v[rows]);
                at += t.len();
            }
            let views: Vec<_> = seqs.iter().map(|s| s.view(li)).collect();
            attention(&self.pool, &cfg, &q, &views, &row_seq, &row_pos, &mut att);
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
            // each sequence's last row
            (0..n)
                .filter(|&r| r + 1 == n || row_seq[r + 1] != row_seq[r])
                .collect()
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

/// From this many rows of one sequence in a step (a prompt, a chunk of one) the f32 / f16 caches
/// take the tiled prompt attention (kv/prefill.rs, the same floats): it reads each cached row
/// once per block of rows instead of once per row and query head.
pub const PREFILL_MIN_ROWS: usize = 2;

/// Causal grouped-query attention of every row (`row_seq`, `row_pos`: its sequence and
/// position): query head `h` reads key/value head `h / (n_head / n_head_kv)` of its sequence's
/// cache, positions `0..=pos`. A sequence's run of at least `PREFILL_MIN_ROWS` rows takes
/// kv/prefill.rs where it handles the cache type; every other row one task per (row, head) of
/// kv/attend.rs. Both give the same floats.
pub fn attention(
    pool: &Pool,
    cfg: &Config,
    q: &[f32],
    views: &[super::kv::pool::LayerView<'_>],
    row_seq: &[usize],
    row_pos: &[usize],
    out: &mut [f32],
) {
    let (hd, nh) = (cfg.head_dim, cfg.n_head);
    let group = cfg.n_head / cfg.n_head_kv;
    let scale = 1.0f32 / (hd as f32).sqrt();
    // Rows the tiled path computed (none off x86_64).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut tiled = vec![false; row_seq.len()];
    #[cfg(target_arch = "x86_64")]
    if prefill::available(pool.kv, hd) {
        let qd = nh * hd;
        let mut r = 0;
        while r < row_seq.len() {
            let e = r + row_seq[r..]
                .iter()
                .take_while(|&&s| s == row_seq[r])
                .count();
            if e - r >= PREFILL_MIN_ROWS {
                prefill::attend_rows(
                    pool.kv,
                    pool.rotate,
                    &pool.geo,
                    nh,
                    &views[row_seq[r]],
                    &q[r * qd..e * qd],
                    row_pos[r],
                    scale,
                    &mut out[r * qd..e * qd],
                );
                tiled[r..e].fill(true);
            }
            r = e;
        }
    }
    out.par_chunks_mut(hd)
        .enumerate()
        .filter(|(ih, _)| !tiled[ih / nh])
        .for_each_init(AttnScratch::default, |s, (ih, o)| {
            let (r, h) = (ih / nh, ih % nh);
            let qh = &q[r * nh * hd + h * hd..][..hd];
            let view = &views[row_seq[r]];
            attend::attend(
                pool.kv,
                pool.rotate,
                &pool.geo,
                view,
                h / group,
                qh,
                row_pos[r],
                scale,
                s,
                o,
            );
        });
}

#[cfg(test)]
mod tests;
