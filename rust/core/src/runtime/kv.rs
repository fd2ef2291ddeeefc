//! The quantized KV cache (docs/kv.md, "Cache types"): the type table and its byte formula
//! (types.rs), the per-type block codecs (block.rs), the per-head Walsh-Hadamard rotation of the
//! low-bit types (rotate.rs), the paged pool that many sequences share (pool.rs), attention
//! reading the blocks in place (attend.rs; the KIVI pages' tiles and integer dot products in
//! kivi.rs; a prompt's rows of the f32 / f16 caches in register tiles, prefill.rs) and one
//! scalar reference per
//! type that the paged path is tested against bit for bit (reference.rs); synthetic.rs times the
//! attention of one decode step over a synthetic cache, for benches.

pub mod attend;
pub mod block;
pub mod kivi;
pub mod pool;
pub mod prefill;
pub mod reference;
pub mod rotate;
pub mod synthetic;
pub mod types;

pub use pool::{Pool, SeqCache};
pub use types::{Geometry, KvSpec, KvType, Rotation, Window};

#[cfg(test)]
pub(super) mod tests {
    use super::attend::{attend, Scratch};
    use super::reference::attend_reference;
    use super::types::{ALL, KIVI_GROUP};
    use super::*;

    /// Deterministic test values in [-3, 3) (xorshift), shared with the prefill tests.
    pub(in crate::runtime) fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    /// The rotations and windows a type is tested with: every rotation with the type's
    /// window; for KIVI also no window, odd sinks with a residual that is not a page multiple,
    /// and the most sinks with a one-position residual (one rotation each, to keep it short).
    fn cases(kv: KvType) -> Vec<(Rotation, Window)> {
        let w = |sinks, residual| Window { sinks, residual };
        let rots = [Rotation::Off, Rotation::Values, Rotation::Both];
        let mut c: Vec<_> = rots.map(|r| (r, Window::default_for(kv))).to_vec();
        if kv.is_kivi() {
            c.extend([
                (Rotation::Off, w(0, 0)),
                (Rotation::Values, w(5, 70)),
                (Rotation::Both, w(63, 1)),
            ]);
        }
        c
    }

    /// The paged path (appended in uneven chunks, every position of each chunk attending before
    /// the chunk is committed, as in a prefill) equals the reference bit for bit, every type,
    /// rotated or not, and for KIVI with sinks and residuals (windows()).
    #[test]
    fn paged_attention_equals_the_reference() {
        let geo = Geometry {
            n_layer: 2,
            n_head_kv: 2,
            head_dim: 64,
        };
        let (kvd, hd, n) = (geo.kv_dim(), geo.head_dim, 300);
        let k = vals(n * kvd * 2, 1);
        let v = vals(n * kvd * 2, 2);
        let q = vals(hd, 3);
        let scale = 0.125f32;
        let all = ALL
            .iter()
            .flat_map(|&t| cases(t).into_iter().map(move |(r, w)| (t, r, w)));
        for (kv, rotate, window) in all {
            let mut pool = Pool::new(kv, geo, 1 << 24, Some(rotate))
                .unwrap()
                .with_window(window);
            let mut seq = pool.admit(n).unwrap().unwrap();
            let mut s = Scratch::default();
            let mut at = 0;
            for m in [1usize, 30, 1, 33, 35, 63, 7, 64, 66] {
                pool.grow(&mut seq, m).unwrap();
                for layer in 0..2 {
                    let lk = &k[layer * n * kvd..][..n * kvd];
                    let lv = &v[layer * n * kvd..][..n * kvd];
                    pool.append(
                        &mut seq,
                        layer,
                        &lk[at * kvd..(at + m) * kvd],
                        &lv[at * kvd..(at + m) * kvd],
                    );
                }
                for layer in 0..2 {
                    for h in 0..2 {
                        let head = |x: &[f32], upto: usize| -> Vec<f32> {
                            (0..upto)
                                .flat_map(|t| {
                                    x[layer * n * kvd + t * kvd + h * hd..][..hd].to_vec()
                                })
                                .collect()
                        };
                        // Every position of the first pages and each chunk's first and last;
                        // past that every fifth (the reference re-encodes the whole cache).
                        let check = |pos: usize| {
                            pos < 2 * KIVI_GROUP
                                || pos.is_multiple_of(5)
                                || pos == at
                                || pos + 1 == at + m
                        };
                        for pos in (at..at + m).filter(|&p| check(p)) {
                            let mut out = vec![0f32; hd];
                            let view = seq.view(layer);
                            attend(kv, rotate, &geo, &view, h, &q, pos, scale, &mut s, &mut out);
                            let want = attend_reference(
                                kv,
                                rotate,
                                window,
                                &head(&k, pos + 1),
                                &head(&v, pos + 1),
                                hd,
                                &q,
                                pos,
                                scale,
                            );
                            let (a, b): (Vec<u32>, Vec<u32>) = (
                                out.iter().map(|x| x.to_bits()).collect(),
                                want.iter().map(|x| x.to_bits()).collect(),
                            );
                            let name = kv.name();
                            assert_eq!(
                                a, b,
                                "{name} rot {rotate:?} {window:?} layer {layer} head {h} pos {pos}"
                            );
                        }
                    }
                }
                pool.commit(&mut seq, m);
                at += m;
            }
            pool.release(seq);
            assert_eq!(pool.charged(), 0);
        }
    }

    /// KIVI's integer attention (the query times the key scales, and the weights times the value
    /// scales, rounded to 16 bits per page) stays within a derived bound of exact f64 attention
    /// over the same dequantized cache (codes * scale + zero; the residual's f16 rows):
    /// a score moves by at most `0.5 d Σ_c k_c <= 0.5 (max_c |q_c s_c| / QK) (2^b - 1) hd` plus
    /// f32 rounding; the softmax then moves by at most `2 scale max|δs|` in L1, each output by that
    /// times max |v| plus `0.5 e (2^b - 1) 64` per page (`e = max_t w_t s_t / QV`). That bound is
    /// under 5 % of the cache's own worst case from the keys' rounding alone.
    #[test]
    fn kivi_integer_attention_is_within_its_bound_of_exact() {
        use super::block::{decode, encode};
        use super::kivi::{QK, QV};
        let geo = Geometry {
            n_layer: 1,
            n_head_kv: 1,
            head_dim: 64,
        };
        let (hd, n) = (64usize, 200usize);
        for (kv, seed) in [
            (KvType::Int4, 11u64),
            (KvType::Int2, 12),
            (KvType::Int4, 13),
        ] {
            let f16r = |x: &[f32]| -> Vec<f32> {
                x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
            };
            let (mut k, v) = (f16r(&vals(n * hd, seed)), f16r(&vals(n * hd, seed + 100)));
            for t in 0..n {
                k[t * hd + 3] *= 8.0; // an outlier channel, as real keys have
            }
            let q = vals(hd, seed + 200);
            // No sinks, no residual: every complete page is quantized (the bound's setting).
            let mut pool = Pool::new(kv, geo, 1 << 24, Some(Rotation::Off))
                .unwrap()
                .with_window(Window::default());
            let mut seq = pool.admit(n).unwrap().unwrap();
            pool.grow(&mut seq, n).unwrap();
            pool.append(&mut seq, 0, &k, &v);
            pool.commit(&mut seq, n);
            let (pos, scale, p) = (n - 1, 0.125f32, 64usize);
            let b = pos + 1 - (pos + 1) % p;
            // The dequantized cache, exactly as stored.
            let bb = kv.block_bytes();
            let (mut kd, mut vd) = (k.clone(), v.clone());
            let mut blk = vec![0u8; bb];
            let mut col = vec![0f32; p];
            let (mut dq, mut max_qs) = (vec![0f32; p], vec![0f32; b / p]);
            let mut sum_qs = vec![0f64; b / p];
            for g in 0..b / p {
                for c in 0..hd {
                    for t in 0..p {
                        col[t] = k[(g * p + t) * hd + c];
                    }
                    encode(kv, &col, &mut blk);
                    decode(kv, &blk, &mut dq);
                    for t in 0..p {
                        kd[(g * p + t) * hd + c] = dq[t];
                    }
                    let s = half::f16::from_le_bytes([blk[bb - 4], blk[bb - 3]]).to_f32();
                    max_qs[g] = max_qs[g].max((q[c] * s).abs());
                    sum_qs[g] += (q[c] * s).abs() as f64;
                }
                for t in g * p..(g + 1) * p {
                    encode(kv, &v[t * hd..(t + 1) * hd], &mut blk);
                    decode(kv, &blk, &mut vd[t * hd..(t + 1) * hd]);
                }
            }
            let sc: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..hd)
                        .map(|c| q[c] as f64 * kd[j * hd + c] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            let w: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
            let levels = ((1u32 << kv.kivi_bits().unwrap()) - 1) as f64;
            let vmax = vd.iter().fold(0f64, |a, &x| a.max(x.abs() as f64));
            let qk: f64 = (0..hd)
                .map(|c| {
                    q[c].abs() as f64
                        * kd.iter()
                            .skip(c)
                            .step_by(hd)
                            .fold(0f64, |a, &x| a.max(x.abs() as f64))
                })
                .sum();
            // f32 rounding of a score: (hd + 3) u relative to Σ|q||k| (+ the zeros' term).
            let f32_score = 2.0 * (hd as f64 + 3.0) * 2f64.powi(-24) * qk;
            let ds = max_qs
                .iter()
                .map(|&a| 0.5 * (a as f64 / QK as f64) * levels * hd as f64)
                .fold(0f64, f64::max)
                + f32_score;
            let mut bound = 2.0 * scale as f64 * ds * vmax;
            for g in 0..b / p {
                let mut e = 0f64;
                for t in g * p..(g + 1) * p {
                    let mut blk = vec![0u8; bb];
                    encode(kv, &v[t * hd..(t + 1) * hd], &mut blk);
                    let s = half::f16::from_le_bytes([blk[bb - 4], blk[bb - 3]]).to_f32();
                    e = e.max(w[t] * s as f64 / QV as f64);
                }
                bound += 0.5 * e * levels * p as f64;
            }
            // f32 accumulation of the output over the pages and the residual rows.
            bound += 4.0 * (n as f64 + hd as f64) * 2f64.powi(-24) * vmax;
            let mut out = vec![0f32; hd];
            let mut s = Scratch::default();
            attend(
                kv,
                Rotation::Off,
                &geo,
                &seq.view(0),
                0,
                &q,
                pos,
                scale,
                &mut s,
                &mut out,
            );
            let mut worst = 0f64;
            for d in 0..hd {
                let exact: f64 = (0..=pos).map(|j| w[j] * vd[j * hd + d] as f64).sum();
                let err = (out[d] as f64 - exact).abs();
                worst = worst.max(err);
                assert!(
                    err <= bound,
                    "{} d {d}: |{} - {exact}| = {err} > {bound}",
                    kv.name(),
                    out[d]
                );
            }
            // The bound is a small fraction of the cache's own worst case from its key rounding
            // alone (half a code step per channel: 0.5 Σ_c |q_c| s_c per score).
            let cache =
                2.0 * scale as f64 * sum_qs.iter().fold(0f64, |a, &x| a.max(0.5 * x)) * vmax;
            assert!(
                bound < 0.05 * cache,
                "{}: bound {bound} vs the cache's {cache} (err {worst})",
                kv.name()
            );
            pool.release(seq);
        }
    }

    /// The f32 type is the exact cache: its output is the plain softmax(q.k)V of the raw rows.
    #[test]
    fn f32_reference_is_plain_attention() {
        let hd = 32;
        let (k, v, q) = (vals(5 * hd, 4), vals(5 * hd, 5), vals(hd, 6));
        let out = attend_reference(
            KvType::F32,
            Rotation::Off,
            Window::default(),
            &k,
            &v,
            hd,
            &q,
            4,
            0.2,
        );
        let s: Vec<f64> = (0..5)
            .map(|j| {
                (0..hd)
                    .map(|d| q[d] as f64 * k[j * hd + d] as f64)
                    .sum::<f64>()
                    * 0.2
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for d in 0..hd {
            let w: f64 = (0..5)
                .map(|j| (s[j] - m).exp() / z * v[j * hd + d] as f64)
                .sum();
            assert!((out[d] as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "{d}");
        }
    }
}
