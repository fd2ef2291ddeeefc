//! One decode step's attention over a cache stored in `ferroquant.kv`'s torch layout
//! (python/ferroquant/kv/codecs.py), read in place: transformers' `QuantizedCache` calls this
//! from its attention function instead of dequantizing the whole cache every step.
//!
//! Each stored part is a contiguous `(batch, n_head_kv, cap, ...)` buffer (the cache's growing
//! buffers, `cap` rows of which the first are used). Per key/value head the rows are decoded one
//! token at a time into a head_dim-sized scratch: per-token types with the arithmetic of
//! `codecs.decode` (`q * d`, `f32(q) * scale`), so the values attended are bit-identical to the
//! dequantized cache's; KIVI (`int4` / `int2`) keeps its scale and zero apart, as the runtime
//! does: `q.k = Σ_c (q_c s_c) code_c + Σ_c q_c z_c` (scaled query and constant once per
//! 32-token group) and `o = Σ_t (w_t s_t) code_t + Σ_t w_t z_t` per value block. The softmax
//! uses a polynomial exp (Cephes' expf, about 1 ulp) that vectorises. Only float32 rounding
//! differs from dequantize-then-attend; the bound is in docs/kv.md and tests/test_kv_attention.py.
//! The last `n_tail` positions come from a float32 tail (KIVI's full-precision residual).
//!
//! Work is split by (batch, key/value head); each task is sequential, so results do not depend
//! on the thread count.

use rayon::prelude::*;

use crate::formats::blocks::f16_to_f32;
use crate::formats::fp8::e4m3fn_to_f32;
use crate::parallel;
use crate::Result;

pub mod encode;
pub mod group;
mod layout;
mod rotated;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd512;

use layout::{check, row_bytes};
pub use layout::{check_layer, Kind, Layer, Parts};
pub use rotated::attend_decode_rotated;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32([b[2 * i], b[2 * i + 1]])
}

#[inline(always)]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

fn fp8_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3fn_to_f32(b as u8)))
}

/// Row `row` of one (batch, head)'s per-token parts (values, or keys of a per-token type) as
/// the f32 values `codecs.decode` writes.
#[inline(always)]
fn decode_row(kind: Kind, g: usize, p: &Parts<'_>, bh: usize, row: usize, out: &mut [f32]) {
    let d = out.len();
    let (m, s, z) = row_bytes(kind, false, d, g);
    let r = bh * p.cap + row;
    let main = &p.main[r * m..(r + 1) * m];
    let scale = &p.scale[r * s..(r + 1) * s];
    match kind {
        Kind::F32 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f32_at(main, i)),
        Kind::F16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f16_at(main, i)),
        Kind::Q8_0 => {
            for ((o, qs), blk) in out.chunks_exact_mut(g).zip(main.chunks_exact(g)).zip(0..) {
                let dd = f16_at(scale, blk);
                o.iter_mut()
                    .zip(qs)
                    .for_each(|(oj, &qj)| *oj = (qj as i8) as f32 * dd);
            }
        }
        Kind::Q4_0 => {
            let half = g / 2;
            for ((o, qs), blk) in out
                .chunks_exact_mut(g)
                .zip(main.chunks_exact(half))
                .zip(0..)
            {
                let dd = f16_at(scale, blk);
                let (lo, hi) = o.split_at_mut(half);
                for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                    *l = ((b & 15) as i8 - 8) as f32 * dd;
                    *h = ((b >> 4) as i8 - 8) as f32 * dd;
                }
            }
        }
        Kind::Fp8 => {
            let t = fp8_table();
            for ((o, qs), blk) in out.chunks_exact_mut(g).zip(main.chunks_exact(g)).zip(0..) {
                let sc = f32_at(scale, blk);
                o.iter_mut()
                    .zip(qs)
                    .for_each(|(oj, &qj)| *oj = t[qj as usize] * sc);
            }
        }
        Kind::Kivi(bits) => {
            let zero = &p.zero[r * z..(r + 1) * z];
            let pack = g * bits as usize / 8;
            let mask = (1u8 << bits) - 1;
            for ((o, bytes), blk) in out
                .chunks_exact_mut(g)
                .zip(main.chunks_exact(pack))
                .zip(0..)
            {
                let (sc, ze) = (f16_at(scale, blk), f16_at(zero, blk));
                // byte j holds elements j, j + pack, ... from the low bits up
                for (k, ok) in o.chunks_exact_mut(pack).enumerate() {
                    let shift = bits as usize * k;
                    for (oj, &b) in ok.iter_mut().zip(bytes) {
                        *oj = (((b >> shift) & mask) as f32 * sc) + ze;
                    }
                }
            }
        }
    }
}

/// The f32 scales and zeros of KIVI key group `grp` of one (batch, head), one per channel.
fn kivi_key_group(p: &Parts<'_>, bh: usize, grp: usize, s: &mut [f32], z: &mut [f32]) {
    let d = s.len();
    let r = bh * p.cap + grp;
    for c in 0..d {
        s[c] = f16_at(p.scale, r * d + c);
        z[c] = f16_at(p.zero, r * d + c);
    }
}

/// The integer codes (as f32) of token `i` of a KIVI key group (`main`: the group's packed
/// bytes, `pack` lines of head_dim).
#[inline(always)]
fn kivi_key_codes(bits: u32, main: &[u8], i: usize, out: &mut [f32]) {
    let d = out.len();
    let pack = main.len() / d;
    let line = &main[(i % pack) * d..(i % pack + 1) * d];
    let shift = bits as usize * (i / pack);
    let mask = (1u8 << bits) - 1;
    for (o, &b) in out.iter_mut().zip(line) {
        *o = ((b >> shift) & mask) as f32;
    }
}

/// The integer codes (as f32) of value row `row` of one (batch, head) and its blocks' f32
/// scales and zeros.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn kivi_value_codes(
    bits: u32,
    g: usize,
    p: &Parts<'_>,
    bh: usize,
    row: usize,
    out: &mut [f32],
    s: &mut [f32],
    z: &mut [f32],
) {
    let d = out.len();
    let (m, sb, zb) = row_bytes(Kind::Kivi(bits), false, d, g);
    let r = bh * p.cap + row;
    let main = &p.main[r * m..(r + 1) * m];
    let (scale, zero) = (
        &p.scale[r * sb..(r + 1) * sb],
        &p.zero[r * zb..(r + 1) * zb],
    );
    let pack = g * bits as usize / 8;
    let mask = (1u8 << bits) - 1;
    for ((o, bytes), blk) in out
        .chunks_exact_mut(g)
        .zip(main.chunks_exact(pack))
        .zip(0..)
    {
        s[blk] = f16_at(scale, blk);
        z[blk] = f16_at(zero, blk);
        for (k, ok) in o.chunks_exact_mut(pack).enumerate() {
            let shift = bits as usize * k;
            for (oj, &b) in ok.iter_mut().zip(bytes) {
                *oj = ((b >> shift) & mask) as f32;
            }
        }
    }
}

/// e^x for x <= 0 (a score minus the row's maximum): Cephes' expf (range reduction by ln 2 in
/// two parts, a degree-6 polynomial, about 1 ulp), 0 below -87.3 (and for -inf, a masked
/// position). Branch-free, so the softmax loop vectorises.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let xc = x.max(-87.3);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (xc - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = (p * (r * r) + r) + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * two_n
    }
}

/// Σ x_i in eight interleaved partial sums (fixed order).
#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for v in c {
        for l in 0..8 {
            acc[l] += v[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in rest {
        s += v;
    }
    s
}

/// Σ a_i b_i in eight interleaved partial sums (a fixed order: vectorisable, deterministic).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The decode-step attention output `(batch, n_head, head_dim)` of queries `q` (same shape,
/// f32) over the layer `l`: `softmax(scale * q.k + mask) v` per query head, query head h reading
/// key/value head `h / (n_head / n_head_kv)`. `mask`, `(batch, positions)`, 0 = not attended.
/// `reference`: the scalar reference instead of the SIMD kernel (bit-identical results; tests).
pub fn attend_decode(
    l: &Layer<'_>,
    n_head: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    reference: bool,
) -> Result<()> {
    check(l, n_head, q, mask, out)?;
    let d = l.head_dim;
    let rep = n_head / l.n_head_kv;
    let total = l.n_quant + l.n_tail;
    let task = |(bh, o): (usize, &mut [f32])| {
        let b = bh / l.n_head_kv;
        let qh = &q[bh * rep * d..(bh + 1) * rep * d];
        let mrow = mask.map(|m| &m[b * total..(b + 1) * total]);
        head(l, bh, rep, qh, scale, mrow, o, reference);
    };
    // Small layers: the pool's wake-up costs more than the work.
    if l.batch * l.n_head_kv > 1 && total * d * rep >= 1 << 16 && parallel::num_threads() > 1 {
        parallel::install(|| out.par_chunks_mut(rep * d).enumerate().for_each(task));
    } else {
        out.chunks_mut(rep * d).enumerate().for_each(task);
    }
    Ok(())
}

/// One key/value head's `rep` query heads: the blocked SIMD kernel for KIVI types where the CPU
/// has AVX2 (`simd.rs`, bit-exact with the reference), else the reference.
#[allow(clippy::too_many_arguments)]
fn head(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    reference: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if !reference && simd::takes(l) {
        return simd::head_kivi(l, bh, rep, q, scale, mask, out);
    }
    let _ = reference;
    head_reference(l, bh, rep, q, scale, mask, out)
}

/// The scalar reference of one key/value head's `rep` query heads: every fast path is checked
/// bit-exact against it. Portable code, the same sequence of float operations on every ISA (no
/// fused multiply-add is ever formed: LLVM does not contract without fast-math).
fn head_reference(
    l: &Layer<'_>,
    bh: usize,
    rep: usize,
    q: &[f32],
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
) {
    let (d, g) = (l.head_dim, l.group);
    let total = l.n_quant + l.n_tail;
    let mut row = vec![0f32; d];
    let mut scores = vec![0f32; rep * total];
    match l.kind {
        Kind::Kivi(bits) => {
            // k_tc = s_c * code_tc + z_c per channel c, so q.k_t = Σ_c (q_c s_c) code_tc + Σ_c q_c z_c:
            // per group, the scaled query and the constant once, then one dot per token.
            let (mut ks, mut kz) = (vec![0f32; d], vec![0f32; d]);
            let (mut qs, mut cst) = (vec![0f32; rep * d], vec![0f32; rep]);
            let group_bytes = g * bits as usize / 8 * d;
            for grp in 0..l.n_quant.div_ceil(g) {
                kivi_key_group(&l.k, bh, grp, &mut ks, &mut kz);
                kivi_scaled_query(q, &ks, &kz, &mut qs, &mut cst);
                let at = bh * l.k.cap + grp;
                let main = &l.k.main[at * group_bytes..(at + 1) * group_bytes];
                for i in 0..g.min(l.n_quant - grp * g) {
                    kivi_key_codes(bits, main, i, &mut row);
                    for r in 0..rep {
                        let sc = dot(&qs[r * d..(r + 1) * d], &row) + cst[r];
                        scores[r * total + grp * g + i] = sc * scale;
                    }
                }
            }
        }
        kind => {
            for t in 0..l.n_quant {
                decode_row(kind, g, &l.k, bh, t, &mut row);
                put_scores(t, &row, q, scale, total, &mut scores);
            }
        }
    }
    tail_scores(l, bh, q, scale, &mut scores);
    softmax(&mut scores, rep, total, mask);
    out.iter_mut().for_each(|o| *o = 0.0);
    if let Kind::Kivi(bits) = l.kind {
        // v_tj = s_tb * code_tj + z_tb per block b: out += (w s) * code, and Σ_t w z per block
        let nb = d / g;
        let (mut vs, mut vz) = (vec![0f32; nb], vec![0f32; nb]);
        let mut zsum = vec![0f32; rep * nb];
        for t in 0..l.n_quant {
            kivi_value_codes(bits, g, &l.v, bh, t, &mut row, &mut vs, &mut vz);
            for r in 0..rep {
                let w = scores[r * total + t];
                if w == 0.0 {
                    continue;
                }
                let o = &mut out[r * d..(r + 1) * d];
                for (b, (ob, cb)) in o.chunks_exact_mut(g).zip(row.chunks_exact(g)).enumerate() {
                    let ws = w * vs[b];
                    ob.iter_mut().zip(cb).for_each(|(x, c)| *x += ws * c);
                    zsum[r * nb + b] += w * vz[b];
                }
            }
        }
        add_value_zeros(out, &zsum, d, g);
    } else {
        for t in 0..l.n_quant {
            decode_row(l.kind, g, &l.v, bh, t, &mut row);
            add_weighted(t, &row, &scores, total, out);
        }
    }
    tail_values(l, bh, &scores, out);
}

/// `qs = q_r * s` per query head r and `cst_r = q_r . z` (a KIVI key group's scales and zeros).
#[inline(always)]
fn kivi_scaled_query(q: &[f32], ks: &[f32], kz: &[f32], qs: &mut [f32], cst: &mut [f32]) {
    let d = ks.len();
    for (r, c) in cst.iter_mut().enumerate() {
        let qr = &q[r * d..(r + 1) * d];
        qs[r * d..(r + 1) * d]
            .iter_mut()
            .zip(qr)
            .zip(ks)
            .for_each(|((o, a), b)| *o = a * b);
        *c = dot(qr, kz);
    }
}

/// `scores[r, t] = scale * q_r . row` for every query head r.
#[inline(always)]
fn put_scores(t: usize, row: &[f32], q: &[f32], scale: f32, total: usize, scores: &mut [f32]) {
    let d = row.len();
    for r in 0..scores.len() / total {
        scores[r * total + t] = dot(&q[r * d..(r + 1) * d], row) * scale;
    }
}

/// `out_r += scores[r, t] * row` for every query head r with a non-zero weight.
#[inline(always)]
fn add_weighted(t: usize, row: &[f32], scores: &[f32], total: usize, out: &mut [f32]) {
    let d = row.len();
    for r in 0..scores.len() / total {
        let w = scores[r * total + t];
        if w != 0.0 {
            out[r * d..(r + 1) * d]
                .iter_mut()
                .zip(row)
                .for_each(|(o, v)| *o += w * v);
        }
    }
}

/// The scores of the float32 tail (positions n_quant..).
#[inline(always)]
fn tail_scores(l: &Layer<'_>, bh: usize, q: &[f32], scale: f32, scores: &mut [f32]) {
    let d = l.head_dim;
    let total = l.n_quant + l.n_tail;
    let tail = bh * l.tail_cap * d;
    for i in 0..l.n_tail {
        let row = &l.tail_k[tail + i * d..tail + (i + 1) * d];
        put_scores(l.n_quant + i, row, q, scale, total, scores);
    }
}

/// The float32 tail's values added to `out`.
#[inline(always)]
fn tail_values(l: &Layer<'_>, bh: usize, scores: &[f32], out: &mut [f32]) {
    let d = l.head_dim;
    let total = l.n_quant + l.n_tail;
    let tail = bh * l.tail_cap * d;
    for i in 0..l.n_tail {
        let row = &l.tail_v[tail + i * d..tail + (i + 1) * d];
        add_weighted(l.n_quant + i, row, scores, total, out);
    }
}

/// KIVI values' zero terms: `out_r[block b] += Σ_t w_rt z_tb`.
#[inline(always)]
fn add_value_zeros(out: &mut [f32], zsum: &[f32], d: usize, g: usize) {
    let nb = d / g;
    for (r, o) in out.chunks_exact_mut(d).enumerate() {
        for (b, ob) in o.chunks_exact_mut(g).enumerate() {
            ob.iter_mut().for_each(|x| *x += zsum[r * nb + b]);
        }
    }
}

/// Softmax per query head in place (masked positions get weight 0; a fully masked row is 0).
#[inline(always)]
fn softmax(scores: &mut [f32], rep: usize, total: usize, mask: Option<&[u8]>) {
    for r in 0..rep {
        let s = &mut scores[r * total..(r + 1) * total];
        if let Some(m) = mask {
            s.iter_mut()
                .zip(m)
                .filter(|(_, &a)| a == 0)
                .for_each(|(x, _)| *x = f32::NEG_INFINITY);
        }
        let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if mx == f32::NEG_INFINITY {
            s.iter_mut().for_each(|x| *x = 0.0);
            continue;
        }
        s.iter_mut().for_each(|x| *x = exp_neg(*x - mx));
        let sum = sum8(s);
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests;
