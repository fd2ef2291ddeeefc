//! Attention of one query head over one sequence's cache, reading the quantized blocks in place
//! (the fast path; reference.rs is the same arithmetic written token by token).
//!
//! Scores, per type (q = the query head, f32; `dot8` = ops::dot8's fixed lane order):
//! - f32: `dot8(q, k)`; f16: `dot8(q, f32(k))`;
//! - q8_0 / q4_0: the query is quantized to q8_0 (ggml's `vec_dot_q8_0_q8_0` /
//!   `vec_dot_q4_0_q8_0`): per block `isum = Σ qi ki` (exact), `score += isum * (dk * dq)` in
//!   block order;
//! - fp8_e4m3: per block `score += scale * dot8(q_b, f32(k_b))` in block order;
//! - KIVI keys: per page, the integer dot of kivi.rs (query times the channels' scales, rounded
//!   to 16 bits, against the 4- or 2-bit codes) plus `dot8(q, zeros)`;
//! - positions still in the f16 residual, and KIVI's sinks once page 0 is quantized (their
//!   f16 rows replace the page's first `window.sinks` scores): `dot8(q, f32(k))`.
//!
//! Then `ops::softmax_scaled` and, over positions in order, `out += w * v` with v read per block
//! as `(w * d) * q` (q8_0, q4_0), `(w * scale) * f32(q)` (fp8), per page `f32(Σ wi v) * e + dot8(w, zeros)` with the weights times scales rounded to 16 bits
//! (KIVI, kivi.rs),
//! `w * f32(v)` (f16, f32, residual). KIVI's sinks are added first, as `w * f32(v)`, and page
//! 0's first `window.sinks` weights are set to 0 in its integer sum. No whole-cache copy: one
//! block at a time.
//!
//! With rotation (rotate.rs) the query is rotated first and the output rotated back at the end;
//! the cache already holds rotated rows.

use crate::formats::blocks::f16_to_f32;
use crate::formats::legacy::quantize_row_q8_0_ref;

use super::super::ops;
use super::block::{fp8_table, q4_0_values};
use super::kivi;
use super::pool::{bytes, LayerView};
use super::rotate::wht;
use super::types::{Geometry, KvType, Rotation, Window, GROUP, KIVI_GROUP};

/// Buffers one task reuses between heads.
#[derive(Default)]
pub struct Scratch {
    pub scores: Vec<f32>,
    q8: Vec<u8>,
    tmp: Vec<f32>,
    qr: Vec<f32>,
    kivi: kivi::Bufs,
}

/// First position read from the f16 residual by a query at `pos` (all before it are in pages):
/// KIVI's quantized positions at length `pos + 1` (types.rs's Window).
pub fn boundary(kv: KvType, window: Window, pos: usize) -> usize {
    if kv.is_kivi() {
        window.quantized(pos + 1)
    } else {
        pos + 1
    }
}

/// Output of query head `q` (head_dim values) of key/value head `h` at position `pos`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    kv: KvType,
    rotate: Rotation,
    geo: &Geometry,
    view: &LayerView<'_>,
    h: usize,
    q: &[f32],
    pos: usize,
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: AVX2 was detected at run time; attend_avx2 is safe code compiled with it.
        return unsafe { attend_avx2(kv, rotate, geo, view, h, q, pos, scale, s, out) };
    }
    attend_body(kv, rotate, geo, view, h, q, pos, scale, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
fn attend_avx2(
    kv: KvType,
    rotate: Rotation,
    geo: &Geometry,
    view: &LayerView<'_>,
    h: usize,
    q: &[f32],
    pos: usize,
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    attend_body(kv, rotate, geo, view, h, q, pos, scale, s, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body(
    kv: KvType,
    rotate: Rotation,
    geo: &Geometry,
    view: &LayerView<'_>,
    h: usize,
    q: &[f32],
    pos: usize,
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let (hd, kvd, bb) = (geo.head_dim, geo.kv_dim(), kv.block_bytes());
    let (p, nb) = (kv.page_len(), hd / kv.block_len());
    let region = kvd * bb; // P rows of kvd / n blocks (KIVI keys: kvd channel blocks)
    let (k_at, v_at) = (2 * view.layer * region, (2 * view.layer + 1) * region);
    let head_at = h * nb * bb;
    let b = boundary(kv, view.window, pos);
    // KIVI sinks read from their own rows (while page 0 is unquantized the residual has them).
    let ns = if kv.is_kivi() && b > 0 {
        view.window.sinks
    } else {
        0
    };
    let mut qr = std::mem::take(&mut s.qr);
    qr.clear();
    qr.extend_from_slice(q);
    if rotate.keys() {
        wht(&mut qr);
    }
    let q = &qr[..];
    s.scores.clear();
    s.scores.resize(pos + 1, 0.0);
    s.tmp.resize(hd, 0.0);
    if matches!(kv, KvType::Q8_0 | KvType::Q4_0) {
        s.q8.resize(hd / GROUP * 34, 0);
        quantize_row_q8_0_ref(q, &mut s.q8);
    }
    let row_bytes = nb * bb * geo.n_head_kv;
    let lay = kv.kivi_bits().map(|bits| kivi::Layout::new(bits, geo));
    let table = fp8_table();
    for (pi, page) in view.pages.iter().enumerate().take(b.div_ceil(p)) {
        let page = bytes(page);
        let count = (b - pi * p).min(p);
        let sc = &mut s.scores[pi * p..pi * p + count];
        if let Some(lay) = &lay {
            let keys = &page[k_at..k_at + region];
            kivi::page_scores(lay, keys, h, q, &mut s.kivi, sc);
            continue;
        }
        for (j, o) in sc.iter_mut().enumerate() {
            let row = &page[k_at + j * row_bytes + head_at..][..nb * bb];
            *o = score_row(kv, q, &s.q8, row, &mut s.tmp, table);
        }
    }
    for t in 0..ns {
        f16_values(&view.sink_k[t * kvd + h * hd..][..hd], &mut s.tmp);
        s.scores[t] = ops::dot8(q, &s.tmp);
    }
    for t in b..=pos {
        let r = &view.resid_k[(t - view.resid_start) * kvd + h * hd..][..hd];
        f16_values(r, &mut s.tmp);
        s.scores[t] = ops::dot8(q, &s.tmp);
    }
    ops::softmax_scaled(&mut s.scores, scale);
    out.fill(0.0);
    for t in 0..ns {
        let w = s.scores[t];
        f16_values(&view.sink_v[t * kvd + h * hd..][..hd], &mut s.tmp);
        for (o, &v) in out.iter_mut().zip(&s.tmp) {
            *o += w * v;
        }
    }
    for (pi, page) in view.pages.iter().enumerate().take(b.div_ceil(p)) {
        let page = bytes(page);
        let count = (b - pi * p).min(p);
        if let Some(lay) = &lay {
            let w = &s.scores[pi * p..pi * p + p];
            let mut w0 = [0f32; KIVI_GROUP];
            let w = if pi == 0 && ns > 0 {
                w0.copy_from_slice(w);
                w0[..ns].fill(0.0);
                &w0[..]
            } else {
                w
            };
            kivi::page_values(lay, &page[v_at..v_at + region], h, w, &mut s.kivi, out);
            continue;
        }
        for j in 0..count {
            let w = s.scores[pi * p + j];
            let row = &page[v_at + j * row_bytes + head_at..][..nb * bb];
            add_row(kv, w, row, out, table);
        }
    }
    for t in b..=pos {
        let w = s.scores[t];
        let r = &view.resid_v[(t - view.resid_start) * kvd + h * hd..][..hd];
        f16_values(r, &mut s.tmp);
        for (o, &v) in out.iter_mut().zip(&s.tmp) {
            *o += w * v;
        }
    }
    if rotate.values() {
        wht(out);
    }
    s.qr = qr;
}

/// f16 residual values -> f32 (exact; F16C where the CPU has it).
#[inline(always)]
fn f16_values(r: &[half::f16], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    r.convert_to_f32_slice(&mut out[..r.len()]);
}

/// The score of one per-token key row (`nb` blocks of one head).
#[inline(always)]
pub fn score_row(
    kv: KvType,
    q: &[f32],
    q8: &[u8],
    row: &[u8],
    tmp: &mut [f32],
    table: &[f32; 256],
) -> f32 {
    let bb = kv.block_bytes();
    match kv {
        KvType::F32 => {
            for (t, b) in tmp.iter_mut().zip(row.chunks_exact(4)) {
                *t = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            ops::dot8(q, tmp)
        }
        KvType::F16 => {
            f16_row(row, tmp);
            ops::dot8(q, tmp)
        }
        KvType::Q8_0 | KvType::Q4_0 => {
            let mut sum = 0f32;
            for (blk, qb) in row.chunks_exact(bb).zip(q8.chunks_exact(34)) {
                let dk = f16_to_f32([blk[0], blk[1]]);
                let dq = f16_to_f32([qb[0], qb[1]]);
                let mut isum = 0i32;
                if kv == KvType::Q8_0 {
                    for i in 0..GROUP {
                        isum += blk[2 + i] as i8 as i32 * qb[2 + i] as i8 as i32;
                    }
                } else {
                    let kq = q4_0_values(&blk[2..18]);
                    for i in 0..GROUP {
                        isum += kq[i] as i32 * qb[2 + i] as i8 as i32;
                    }
                }
                sum += isum as f32 * (dk * dq);
            }
            sum
        }
        KvType::Fp8E4m3 => {
            let mut sum = 0f32;
            let mut kf = [0f32; GROUP];
            for (blk, qb) in row.chunks_exact(bb).zip(q.chunks_exact(GROUP)) {
                for (f, &b) in kf.iter_mut().zip(&blk[..GROUP]) {
                    *f = table[b as usize];
                }
                let sc = f32::from_le_bytes([blk[32], blk[33], blk[34], blk[35]]);
                sum += sc * ops::dot8(qb, &kf);
            }
            sum
        }
        KvType::Int4 | KvType::Int2 => unreachable!("KIVI keys are scored per page"),
    }
}

/// `out += w * v` for one per-token value row, read block by block.
#[inline(always)]
pub fn add_row(kv: KvType, w: f32, row: &[u8], out: &mut [f32], table: &[f32; 256]) {
    let bb = kv.block_bytes();
    for (blk, o) in row
        .chunks_exact(bb)
        .zip(out.chunks_exact_mut(kv.block_len()))
    {
        match kv {
            KvType::F32 => {
                for (o, b) in o.iter_mut().zip(blk.chunks_exact(4)) {
                    *o += w * f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            KvType::F16 => {
                let mut v = [0f32; GROUP];
                f16_row(blk, &mut v);
                for (o, v) in o.iter_mut().zip(v) {
                    *o += w * v;
                }
            }
            KvType::Q8_0 => {
                let f = w * f16_to_f32([blk[0], blk[1]]);
                for (o, &q) in o.iter_mut().zip(&blk[2..34]) {
                    *o += f * (q as i8) as f32;
                }
            }
            KvType::Q4_0 => {
                let f = w * f16_to_f32([blk[0], blk[1]]);
                for (o, q) in o.iter_mut().zip(q4_0_values(&blk[2..18])) {
                    *o += f * q as f32;
                }
            }
            KvType::Fp8E4m3 => {
                let f = w * f32::from_le_bytes([blk[32], blk[33], blk[34], blk[35]]);
                for (o, &q) in o.iter_mut().zip(&blk[..GROUP]) {
                    *o += f * table[q as usize];
                }
            }
            KvType::Int4 | KvType::Int2 => unreachable!("KIVI values are read per page"),
        }
    }
}

/// f16 bytes -> f32 (exact), with F16C where the CPU has it (half's slice conversion).
#[inline(always)]
fn f16_row(bytes: &[u8], out: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    // Pages are 8-byte aligned and f16 rows start at even offsets, so the cast succeeds.
    match bytemuck::try_cast_slice::<u8, u16>(bytes) {
        Ok(bits) => {
            let h: &[half::f16] = bits.reinterpret_cast();
            h.convert_to_f32_slice(&mut out[..h.len()]);
        }
        Err(_) => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32([b[0], b[1]]);
            }
        }
    }
}
