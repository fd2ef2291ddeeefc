//! One scalar reference per cache type: the attention output of one query head at position
//! `pos`, from the raw f32 key and value rows, quantizing each token (or KIVI key group) with
//! block.rs and evaluating attend.rs's formulas one position and one element at a time. With
//! rotation, the rows and the query are rotated first (rotate.rs) and the output rotated back;
//! KIVI rounds every row to f16 (its residual) before anything else, quantizes a key group only
//! once `window.residual` newer positions exist, and, once page 0 is quantized, reads its first
//! `window.sinks` positions from the f16 rows (page 0's key ranges leave them out: their codes
//! are those of position `sinks`'s value, and their value weights are 0 in the integer sum). The
//! paged path must equal it bit for bit (tests in kv.rs and llama.rs).

use crate::formats::blocks::f16_to_f32;
use crate::formats::legacy::quantize_row_q8_0_ref;

use super::super::ops;
use super::attend::boundary;
use super::block::{encode, fp8_table, kivi_decode, q4_0_values};
use super::kivi::{QK, QV};
use super::rotate::wht_heads;
use super::types::{KvType, Rotation, Window, GROUP, KIVI_GROUP};

/// `k`, `v`: positions `0..=pos`, `hd` values each (one head); `q`: the query head; `window`:
/// KIVI's sinks and residual (ignored by the per-token types).
#[allow(clippy::too_many_arguments)]
pub fn attend_reference(
    kv: KvType,
    rotate: Rotation,
    window: Window,
    k: &[f32],
    v: &[f32],
    hd: usize,
    q: &[f32],
    pos: usize,
    scale: f32,
) -> Vec<f32> {
    let (mut k, mut v, mut q) = (k.to_vec(), v.to_vec(), q.to_vec());
    if rotate.keys() {
        wht_heads(&mut k, hd);
        wht_heads(&mut q, hd);
    }
    if rotate.values() {
        wht_heads(&mut v, hd);
    }
    if kv.is_kivi() {
        for x in k.iter_mut().chain(v.iter_mut()) {
            *x = half::f16::from_f32(*x).to_f32();
        }
    }
    let mut out = attend_rotated(kv, window, &k, &v, hd, &q, pos, scale);
    if rotate.values() {
        wht_heads(&mut out, hd);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn attend_rotated(
    kv: KvType,
    window: Window,
    k: &[f32],
    v: &[f32],
    hd: usize,
    q: &[f32],
    pos: usize,
    scale: f32,
) -> Vec<f32> {
    let b = boundary(kv, window, pos);
    let ns = if kv.is_kivi() && b > 0 {
        window.sinks
    } else {
        0
    };
    let bb = kv.block_bytes();
    let (p, nb) = (kv.page_len(), hd / kv.block_len());
    let lut = fp8_table();
    let mut scores = vec![0f32; pos + 1];
    let mut blocks = vec![0u8; nb * bb];
    let mut q8 = vec![0u8; hd / GROUP * 34];
    quantize_row_q8_0_ref(q, &mut q8);
    if let Some(bits) = kv.kivi_bits() {
        for g in 0..b / p {
            let mut col = vec![0f32; p];
            let mut blk = vec![0u8; bb];
            let (mut codes, mut s, mut z) =
                (vec![[0u8; KIVI_GROUP]; hd], vec![0f32; hd], vec![0f32; hd]);
            for c in 0..hd {
                for (t, x) in col.iter_mut().enumerate() {
                    // Page 0's sinks stand in as position `ns`'s value (out of the range).
                    *x = k[(g * p + t.max(if g == 0 { ns } else { 0 })) * hd + c];
                }
                encode(kv, &col, &mut blk);
                (codes[c], s[c], z[c]) = kivi_decode(bits, &blk);
            }
            let qs: Vec<f32> = (0..hd).map(|c| q[c] * s[c]).collect();
            let (qi, d) = round16(&qs, QK);
            let cst = ops::dot8(q, &z);
            for j in 0..p {
                let isum: i32 = (0..hd).map(|c| qi[c] * codes[c][j] as i32).sum();
                scores[g * p + j] = isum as f32 * d + cst;
            }
        }
    } else {
        for j in 0..b {
            encode(kv, &k[j * hd..(j + 1) * hd], &mut blocks);
            scores[j] = key_score(kv, q, &q8, &blocks, lut);
        }
    }
    for j in (0..ns).chain(b..=pos) {
        scores[j] = ops::dot8(q, &k[j * hd..(j + 1) * hd]);
    }
    ops::softmax_scaled(&mut scores, scale);
    let mut out = vec![0f32; hd];
    for j in 0..ns {
        for d in 0..hd {
            out[d] += scores[j] * v[j * hd + d];
        }
    }
    if let Some(bits) = kv.kivi_bits() {
        for g in 0..b / p {
            let mut w = scores[g * p..(g + 1) * p].to_vec();
            if g == 0 {
                w[..ns].fill(0.0);
            }
            let mut blk = vec![0u8; bb];
            for vg in 0..hd / KIVI_GROUP {
                let (mut codes, mut s, mut z) =
                    (vec![[0u8; KIVI_GROUP]; p], vec![0f32; p], vec![0f32; p]);
                for t in 0..p {
                    encode(
                        kv,
                        &v[(g * p + t) * hd + vg * KIVI_GROUP..][..KIVI_GROUP],
                        &mut blk,
                    );
                    (codes[t], s[t], z[t]) = kivi_decode(bits, &blk);
                }
                let ws: Vec<f32> = (0..p).map(|t| w[t] * s[t]).collect();
                let (wi, e) = round16(&ws, QV);
                let wz = ops::dot8(&w, &z);
                for i in 0..KIVI_GROUP {
                    let acc: i32 = (0..p).map(|t| wi[t] * codes[t][i] as i32).sum();
                    out[vg * KIVI_GROUP + i] += acc as f32 * e + wz;
                }
            }
        }
    }
    for j in 0..=pos {
        if kv.is_kivi() && j < b {
            continue;
        }
        let (w, row) = (scores[j], &v[j * hd..(j + 1) * hd]);
        if j >= b {
            for d in 0..hd {
                out[d] += w * row[d];
            }
            continue;
        }
        encode(kv, row, &mut blocks);
        let n = kv.block_len();
        for ib in 0..nb {
            let blk = &blocks[ib * bb..(ib + 1) * bb];
            for i in 0..n {
                let d = ib * n + i;
                out[d] += match kv {
                    KvType::F32 => w * row[d],
                    KvType::F16 => w * f16_to_f32([blk[2 * i], blk[2 * i + 1]]),
                    KvType::Q8_0 => (w * f16_to_f32([blk[0], blk[1]])) * blk[2 + i] as i8 as f32,
                    KvType::Q4_0 => {
                        (w * f16_to_f32([blk[0], blk[1]])) * q4_0_values(&blk[2..18])[i] as f32
                    }
                    KvType::Fp8E4m3 => {
                        let s = f32::from_le_bytes([blk[32], blk[33], blk[34], blk[35]]);
                        (w * s) * lut[blk[i] as usize]
                    }
                    KvType::Int4 | KvType::Int2 => unreachable!("KIVI pages are read above"),
                };
            }
        }
    }
    out
}

/// `x` rounded to integers of at most `lim` in magnitude at the step `max |x| / lim` (kivi.rs:
/// the query times the key scales, or the weights times the value scales, of one page); a
/// largest |x| below f32's smallest normal gives zeros and step 0.
fn round16(x: &[f32], lim: f32) -> (Vec<i32>, f32) {
    let a = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let normal = a.is_finite() && a >= f32::MIN_POSITIVE;
    if !normal {
        return (vec![0; x.len()], 0.0);
    }
    let id = lim / a;
    let q = x
        .iter()
        .map(|&v| (v * id).round_ties_even().clamp(-lim, lim) as i32)
        .collect();
    (q, a / lim)
}

/// One per-token key row's score, element by element.
fn key_score(kv: KvType, q: &[f32], q8: &[u8], blocks: &[u8], lut: &[f32; 256]) -> f32 {
    let bb = kv.block_bytes();
    let hd = q.len();
    let mut kf = vec![0f32; hd];
    match kv {
        KvType::F32 | KvType::F16 => {
            for (d, x) in kf.iter_mut().enumerate() {
                *x = if kv == KvType::F32 {
                    let b = &blocks[4 * d..4 * d + 4];
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                } else {
                    f16_to_f32([blocks[2 * d], blocks[2 * d + 1]])
                };
            }
            ops::dot8(q, &kf)
        }
        KvType::Q8_0 | KvType::Q4_0 => {
            let mut sum = 0f32;
            for ib in 0..hd / GROUP {
                let (blk, qb) = (&blocks[ib * bb..], &q8[ib * 34..]);
                let kq: Vec<i32> = if kv == KvType::Q8_0 {
                    (0..GROUP).map(|i| blk[2 + i] as i8 as i32).collect()
                } else {
                    q4_0_values(&blk[2..18]).iter().map(|&x| x as i32).collect()
                };
                let isum: i32 = (0..GROUP).map(|i| kq[i] * qb[2 + i] as i8 as i32).sum();
                let (dk, dq) = (f16_to_f32([blk[0], blk[1]]), f16_to_f32([qb[0], qb[1]]));
                sum += isum as f32 * (dk * dq);
            }
            sum
        }
        KvType::Fp8E4m3 => {
            let mut sum = 0f32;
            for ib in 0..hd / GROUP {
                let blk = &blocks[ib * bb..(ib + 1) * bb];
                let s = f32::from_le_bytes([blk[32], blk[33], blk[34], blk[35]]);
                let kb: Vec<f32> = blk[..GROUP].iter().map(|&b| lut[b as usize]).collect();
                sum += s * ops::dot8(&q[ib * GROUP..(ib + 1) * GROUP], &kb);
            }
            sum
        }
        KvType::Int4 | KvType::Int2 => unreachable!("KIVI keys are per channel"),
    }
}
