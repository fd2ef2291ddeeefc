//! The KIVI group step of `ferroquant.kv`'s transformers cache, natively (`KvLayerState`'s
//! `push_group`): once the decode step's token is in the full-precision tail, the oldest `group`
//! tail rows after the sinks are one complete group; it is encoded (`encode::kivi_encode`, the
//! encoder `codecs.encode` calls) straight into the next free rows of the cache's key and value
//! buffers, and the newer tail rows move down over it. The Python path it replaces
//! (`QuantizedLayer._append`: torch concatenation, the encoder, the rows appended by slicing,
//! the residual written back) stores the same bytes (tests/test_kv_state.py).
//!
//! Tail layout (`(batch x n_head_kv, tail_cap, head_dim)` float32): slots `0..sinks` the sinks,
//! then the residual in token order. Buffer layout: every part is `(batch x n_head_kv, cap,
//! row bytes)`; a key row is one token group, a value row one token (`Parts`, `row_bytes`).

use super::encode::{kivi_encode, States};
use super::{row_bytes, Kind};
use crate::{Error, Result};

/// One role's stored parts, writable (see `Parts`).
pub struct PartsMut<'a> {
    pub main: &'a mut [u8],
    pub scale: &'a mut [u8],
    pub zero: &'a mut [u8],
    /// rows allocated per (batch, head)
    pub cap: usize,
}

/// The gathered group and its codes (reused between steps).
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    codes: Vec<u8>,
}

/// Where the group step happens.
#[derive(Clone, Copy, Debug)]
pub struct GroupStep {
    pub bits: u32,
    /// tokens per key group (and channels per value block)
    pub group: usize,
    /// batch x n_head_kv
    pub bh: usize,
    pub head_dim: usize,
    /// tail slots held by the sinks (the group starts at slot `sinks`)
    pub sinks: usize,
    /// tail rows after the sinks, the step's token included (`group` of them are quantized)
    pub rows: usize,
    /// tokens already in the quantized rows (a multiple of `group`; the group's first token)
    pub n_quant: usize,
}

/// Quantize the group in tail slots `sinks .. sinks + group` of `tail_k` / `tail_v` into key row
/// `n_quant / group` and value rows `n_quant .. n_quant + group` of `k` / `v`, then move tail
/// slots `sinks + group .. sinks + rows` to `sinks ..`. With no newer rows (`rows == group`,
/// no residual window) the last token of the group is copied to slot `sinks` instead: the
/// decode step attends its own token in full precision (as `QuantizedLayer.attend_decode`).
/// `scratch` keeps its allocations between calls. Sequential: the result does
/// not depend on the thread count.
pub fn quantize_group(
    s: &GroupStep,
    tail_k: &mut [f32],
    tail_v: &mut [f32],
    tail_cap: usize,
    k: PartsMut<'_>,
    v: PartsMut<'_>,
    scratch: &mut Scratch,
) -> Result<()> {
    let GroupStep {
        bits,
        group: g,
        bh,
        head_dim: d,
        sinks,
        rows,
        n_quant,
    } = *s;
    let bad = |msg: String| Err(Error::InvalidArgument(format!("kv group step: {msg}")));
    if g == 0 || d == 0 || !d.is_multiple_of(g) || !n_quant.is_multiple_of(g) {
        return bad(format!(
            "group {g}, head_dim {d}, {n_quant} quantized tokens"
        ));
    }
    if n_quant < sinks {
        // group 0 holds the sink slots (token S's values, out of the range): the Python path's
        return bad(format!("group 0 with {sinks} sinks"));
    }
    if rows < g || sinks + rows > tail_cap {
        return bad(format!(
            "{rows} tail rows after {sinks} sinks for a group of {g} in a tail of {tail_cap}"
        ));
    }
    let tail_len = bh * tail_cap * d;
    if tail_k.len() != tail_len || tail_v.len() != tail_len {
        return bad(format!(
            "tails of {} / {} values, expected {tail_len}",
            tail_k.len(),
            tail_v.len()
        ));
    }
    let kind = Kind::Kivi(bits);
    for (keys, p, row0, n) in [(true, &k, n_quant / g, 1), (false, &v, n_quant, g)] {
        let (m, sc, z) = row_bytes(kind, keys, d, g);
        let want = |per: usize| bh * p.cap * per;
        if p.main.len() != want(m) || p.scale.len() != want(sc) || p.zero.len() != want(z) {
            return bad(format!(
                "{} parts of {} / {} / {} bytes for {bh} x {} rows",
                if keys { "key" } else { "value" },
                p.main.len(),
                p.scale.len(),
                p.zero.len(),
                p.cap
            ));
        }
        if row0 + n > p.cap {
            return bad(format!(
                "rows {row0}..{} past the {} allocated",
                row0 + n,
                p.cap
            ));
        }
    }
    let states = States { bh, n: g, d };
    for (keys, tail, p, row0, n) in [
        (true, &mut *tail_k, k, n_quant / g, 1),
        (false, &mut *tail_v, v, n_quant, g),
    ] {
        let (m, sc, z) = row_bytes(kind, keys, d, g);
        // the group, gathered (bh, g, d), then its codes, scales and zeros (bh, n rows)
        scratch.x.clear();
        for h in 0..bh {
            let at = (h * tail_cap + sinks) * d;
            scratch.x.extend_from_slice(&tail[at..at + g * d]);
        }
        scratch.codes.clear();
        scratch.codes.resize(bh * n * (m + sc + z), 0);
        let (cq, rest) = scratch.codes.split_at_mut(bh * n * m);
        let (cs, cz) = rest.split_at_mut(bh * n * sc);
        kivi_encode(bits, g, keys, states, &scratch.x, cq, cs, cz)?;
        for h in 0..bh {
            for (dst, src, per) in [
                (&mut *p.main, &*cq, m),
                (&mut *p.scale, &*cs, sc),
                (&mut *p.zero, &*cz, z),
            ] {
                let at = (h * p.cap + row0) * per;
                dst[at..at + n * per].copy_from_slice(&src[h * n * per..(h + 1) * n * per]);
            }
        }
        for h in 0..bh {
            let base = (h * tail_cap + sinks) * d;
            if rows > g {
                tail.copy_within(base + g * d..base + rows * d, base);
            } else {
                tail.copy_within(base + (g - 1) * d..base + g * d, base);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BH: usize = 3;
    const D: usize = 64;
    const G: usize = 64;
    const SINKS: usize = 2;
    const TAIL_CAP: usize = SINKS + 20 + G;
    const KCAP: usize = 3;
    const VCAP: usize = 3 * G;

    type Bufs = [Vec<u8>; 3];

    fn run(
        s: &GroupStep,
        tk: &mut [f32],
        tv: &mut [f32],
        kb: &mut Bufs,
        vb: &mut Bufs,
    ) -> Result<()> {
        let [k0, k1, k2] = kb;
        let [v0, v1, v2] = vb;
        let k = PartsMut {
            main: k0,
            scale: k1,
            zero: k2,
            cap: KCAP,
        };
        let v = PartsMut {
            main: v0,
            scale: v1,
            zero: v2,
            cap: VCAP,
        };
        quantize_group(s, tk, tv, TAIL_CAP, k, v, &mut Scratch::default())
    }

    /// The step against its definition: the group gathered and encoded by `kivi_encode` into
    /// fresh arrays, the rows compared byte for byte, the other rows untouched; the tail moved;
    /// bad geometry refused.
    #[test]
    fn group_step_stores_the_encoders_bytes_and_moves_the_tail() {
        for bits in [2u32, 4] {
            for rows in [G, G + 20] {
                let mut tk: Vec<f32> = (0..BH * TAIL_CAP * D)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.021)
                    .collect();
                let mut tv: Vec<f32> = tk.iter().map(|x| x * -1.7 + 0.3).collect();
                let (orig_k, orig_v) = (tk.clone(), tv.clone());
                let kind = Kind::Kivi(bits);
                let (km, ks, kz) = row_bytes(kind, true, D, G);
                let (vm, vs, vz) = row_bytes(kind, false, D, G);
                let mut kb = [km, ks, kz].map(|per| vec![0xAAu8; BH * KCAP * per]);
                let mut vb = [vm, vs, vz].map(|per| vec![0xAAu8; BH * VCAP * per]);
                let step = GroupStep {
                    bits,
                    group: G,
                    bh: BH,
                    head_dim: D,
                    sinks: SINKS,
                    rows,
                    n_quant: G,
                };
                run(&step, &mut tk, &mut tv, &mut kb, &mut vb).unwrap();
                for (keys, orig, tail, bufs, row0, n) in [
                    (true, &orig_k, &tk, &kb, 1, 1),
                    (false, &orig_v, &tv, &vb, G, G),
                ] {
                    let group: Vec<f32> = (0..BH)
                        .flat_map(|h| {
                            let at = (h * TAIL_CAP + SINKS) * D;
                            orig[at..at + G * D].to_vec()
                        })
                        .collect();
                    let (m, sc, z) = row_bytes(kind, keys, D, G);
                    let mut want = [m, sc, z].map(|per| vec![0u8; BH * n * per]);
                    let [w0, w1, w2] = &mut want;
                    let states = States { bh: BH, n: G, d: D };
                    kivi_encode(bits, G, keys, states, &group, w0, w1, w2).unwrap();
                    let cap = if keys { KCAP } else { VCAP };
                    for ((buf, w), per) in bufs.iter().zip(&want).zip([m, sc, z]) {
                        for h in 0..BH {
                            let at = (h * cap + row0) * per;
                            let got = &buf[at..at + n * per];
                            assert_eq!(got, &w[h * n * per..(h + 1) * n * per]);
                            let others = buf[h * cap * per..at]
                                .iter()
                                .chain(&buf[at + n * per..(h + 1) * cap * per]);
                            assert!(others.into_iter().all(|&b| b == 0xAA));
                        }
                    }
                    for h in 0..BH {
                        let (row, base) = (h * TAIL_CAP * D, (h * TAIL_CAP + SINKS) * D);
                        assert_eq!(&tail[row..base], &orig[row..base], "sinks kept");
                        if rows > G {
                            let moved = &orig[base + G * D..base + rows * D];
                            assert_eq!(&tail[base..base + (rows - G) * D], moved);
                        } else {
                            let last = &orig[base + (G - 1) * D..base + G * D];
                            assert_eq!(&tail[base..base + D], last);
                        }
                    }
                }
                // refused: group 0 under the sinks, rows past the allocation, an incomplete
                // group, a tail too short
                for (n_quant, r) in [(0, rows), (3 * G, rows), (G, G - 1), (G, TAIL_CAP)] {
                    let s = GroupStep {
                        n_quant,
                        rows: r,
                        ..step
                    };
                    assert!(run(&s, &mut tk, &mut tv, &mut kb, &mut vb).is_err());
                }
            }
        }
    }
}
