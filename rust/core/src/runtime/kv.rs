//! The quantized KV cache (docs/kv.md, "Cache types"): the type table and its byte formula
//! (types.rs), the per-type block codecs (block.rs), the per-head Walsh-Hadamard rotation of the
//! low-bit types (rotate.rs), the paged pool that many sequences share (pool.rs), attention
//! reading the blocks in place (attend.rs) and one scalar reference per
//! type that the paged path is tested against bit for bit (reference.rs); synthetic.rs times the
//! attention of one decode step over a synthetic cache, for benches.

pub mod attend;
pub mod block;
pub mod pool;
pub mod reference;
pub mod rotate;
pub mod synthetic;
pub mod types;

pub use pool::{Pool, SeqCache};
pub use types::{Geometry, KvSpec, KvType};

#[cfg(test)]
mod tests {
    use super::attend::{attend, Scratch};
    use super::reference::attend_reference;
    use super::types::ALL;
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
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

    /// The paged path (appended in uneven chunks, every position of each chunk attending before
    /// the chunk is committed, as in a prefill) equals the reference bit for bit, every type,
    /// rotated or not.
    #[test]
    fn paged_attention_equals_the_reference() {
        let geo = Geometry {
            n_layer: 2,
            n_head_kv: 2,
            head_dim: 64,
        };
        let (kvd, hd, n) = (geo.kv_dim(), geo.head_dim, 170);
        let k = vals(n * kvd * 2, 1);
        let v = vals(n * kvd * 2, 2);
        let q = vals(hd, 3);
        let scale = 0.125f32;
        for (kv, rotate) in ALL.iter().flat_map(|&t| [(t, false), (t, true)]) {
            let mut pool = Pool::new(kv, geo, 1 << 24, Some(rotate)).unwrap();
            let mut seq = pool.admit(192).unwrap().unwrap();
            let mut s = Scratch::default();
            let mut at = 0;
            for m in [1usize, 30, 1, 33, 35, 63, 7] {
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
                        for pos in at..at + m {
                            let mut out = vec![0f32; hd];
                            let view = seq.view(layer);
                            attend(kv, rotate, &geo, &view, h, &q, pos, scale, &mut s, &mut out);
                            let want = attend_reference(
                                kv,
                                rotate,
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
                                "{name} rot {rotate} layer {layer} head {h} pos {pos}"
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

    /// The f32 type is the exact cache: its output is the plain softmax(q.k)V of the raw rows.
    #[test]
    fn f32_reference_is_plain_attention() {
        let hd = 32;
        let (k, v, q) = (vals(5 * hd, 4), vals(5 * hd, 5), vals(hd, 6));
        let out = attend_reference(KvType::F32, false, &k, &v, hd, &q, 4, 0.2);
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
