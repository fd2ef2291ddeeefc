//! Prompt attention in tiles, for the f32 and f16 caches: the same floats as `attend::attend`
//! (one query head at a time, tested bit for bit), computed for many query rows of one sequence
//! at once.
//!
//! `attend` reads every cached key and value once per query head and row: at a 512-token prompt
//! that is ~130k key reads per head per layer, each converted into a scratch row and dotted on
//! its own. Here one sequence's rows of one key/value head are first widened once into
//! contiguous f32 buffers (exact for f16), then a block of query rows (all the query heads that
//! share the key/value head) is scored against the keys in register tiles of QT queries x KT
//! keys, and the values are accumulated in tiles of QT queries x 32 dimensions. Each score keeps
//! `ops::dot8`'s eight lanes, its chunk order and its lane tree (mul then add, no FMA), the
//! softmax is `ops::softmax_scaled` over the query's own positions `0..=pos`, and each output
//! element is `((0 + w0 v0) + w1 v1) + ...` in position order, as `attend::add_row` adds. A
//! query's scores past its own position (the causal tail inside the block's last tile) are set
//! to 0 and their `0 * v` terms add +-0 to an accumulator that never holds -0 (it starts at +0,
//! and round-to-nearest only gives -0 from -0 + -0), so they change no bit.
//!
//! Work is split by blocks of query rows, each computed by one fixed sequence of operations, so
//! results do not depend on the thread count. x86_64 with AVX2 only (elsewhere the caller keeps
//! `attend`).

#[cfg(target_arch = "x86_64")]
pub use x86::attend_rows;

/// Whether `attend_rows` handles a cache of type `kv` with heads of `head_dim` values.
pub fn available(kv: super::KvType, head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(kv, super::KvType::F32 | super::KvType::F16)
            && head_dim.is_multiple_of(32)
            && crate::cpu::has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kv, head_dim);
        false
    }
}

/// Query rows per task: the keys and values of the block's positions are read once per block
/// (per key/value head) instead of once per row.
pub const ROWS_PER_BLOCK: usize = 16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::super::pool::{bytes, LayerView};
    use super::super::rotate::wht;
    use super::super::types::{Geometry, KvType, Rotation};
    use super::ROWS_PER_BLOCK;
    use crate::runtime::ops;

    /// Queries x keys per score tile.
    const QT: usize = 4;
    const KT: usize = 4;
    /// Dimensions per value tile (four 8-float registers per query).
    const DT: usize = 32;

    /// The attention of `n` consecutive rows of one sequence (row `i` at position `pos0 + i`,
    /// every position up to `pos0 + n - 1` already appended to `view`'s cache): `q` holds the
    /// rows' query heads (`n x n_head x head_dim`), `out` gets the same shape. Query head `h`
    /// reads key/value head `h / (n_head / n_head_kv)`. Only where `available(kv, head_dim)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_rows(
        kv: KvType,
        rotate: Rotation,
        geo: &Geometry,
        n_head: usize,
        view: &LayerView<'_>,
        q: &[f32],
        pos0: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        assert!(super::available(kv, geo.head_dim), "attend_rows: {kv:?}");
        let (hd, nkv) = (geo.head_dim, geo.n_head_kv);
        let qd = n_head * hd;
        let n = q.len() / qd;
        assert_eq!(out.len(), q.len(), "attend_rows: q and out shapes");
        let len = pos0 + n;
        let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..nkv)
            .into_par_iter()
            .map(|h| gather(kv, geo, view, h, len))
            .collect();
        out.par_chunks_mut(ROWS_PER_BLOCK * qd)
            .enumerate()
            .for_each(|(b, o)| {
                let r0 = b * ROWS_PER_BLOCK;
                let rows = o.len() / qd;
                let qb = &q[r0 * qd..(r0 + rows) * qd];
                // SAFETY: `available` checked AVX2 at run time.
                unsafe { block(rotate, hd, n_head, &heads, qb, pos0 + r0, scale, o) }
            });
    }

    /// Key/value head `h`'s rows at positions `0..len` as contiguous f32 (`len x head_dim` each).
    fn gather(
        kv: KvType,
        geo: &Geometry,
        view: &LayerView<'_>,
        h: usize,
        len: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (hd, kvd, bb) = (geo.head_dim, geo.kv_dim(), kv.block_bytes());
        let (p, nb) = (kv.page_len(), hd / kv.block_len());
        let region = kvd * bb;
        let (k_at, v_at) = (2 * view.layer * region, (2 * view.layer + 1) * region);
        let row_bytes = nb * bb * geo.n_head_kv;
        let head_at = h * nb * bb;
        let (mut k, mut v) = (vec![0f32; len * hd], vec![0f32; len * hd]);
        for (t, (kr, vr)) in k
            .chunks_exact_mut(hd)
            .zip(v.chunks_exact_mut(hd))
            .enumerate()
        {
            let page = bytes(&view.pages[t / p]);
            let slot = (t % p) * row_bytes + head_at;
            widen(kv, &page[k_at + slot..][..nb * bb], kr);
            widen(kv, &page[v_at + slot..][..nb * bb], vr);
        }
        (k, v)
    }

    /// One cached row's bytes as f32 (exact).
    fn widen(kv: KvType, row: &[u8], out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match kv {
            KvType::F32 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            _ => {
                let h: Vec<half::f16> = row
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                    .collect();
                h.convert_to_f32_slice(out);
            }
        }
    }

    /// The rows `qb` (positions `pos0..`) of one block, every query head.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        rotate: Rotation,
        hd: usize,
        n_head: usize,
        heads: &[(Vec<f32>, Vec<f32>)],
        qb: &[f32],
        pos0: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let qd = n_head * hd;
        let rows = qb.len() / qd;
        let group = n_head / heads.len();
        let nq = rows * group;
        let len = pos0 + rows; // positions the block's last row reads
        let mut qs = vec![0f32; nq * hd];
        let mut pos = vec![0usize; nq];
        let mut scores = vec![0f32; nq * len];
        let mut o = vec![0f32; nq * hd];
        for (hk, (k, v)) in heads.iter().enumerate() {
            // Query i: row i / group, head hk * group + i % group.
            for (i, qr) in qs.chunks_exact_mut(hd).enumerate() {
                let (r, h) = (i / group, hk * group + i % group);
                qr.copy_from_slice(&qb[r * qd + h * hd..][..hd]);
                if rotate.keys() {
                    wht(qr);
                }
                pos[i] = pos0 + r;
            }
            // SAFETY: AVX2 (this function's contract); the shapes are the ones set up above.
            unsafe { score_tiles(&qs, k, hd, len, &mut scores) };
            for (i, s) in scores.chunks_exact_mut(len).enumerate() {
                let (mine, tail) = s.split_at_mut(pos[i] + 1);
                ops::softmax_scaled(mine, scale);
                tail.fill(0.0);
            }
            // SAFETY: as above.
            unsafe { value_tiles(&scores, v, hd, len, &mut o) };
            for (i, orow) in o.chunks_exact_mut(hd).enumerate() {
                if rotate.values() {
                    wht(orow);
                }
                let (r, h) = (i / group, hk * group + i % group);
                out[r * qd + h * hd..][..hd].copy_from_slice(orow);
            }
        }
    }

    /// `scores[i * len + t] = dot8(q_i, k_t)` for every query `i` and position `t < len`.
    #[target_feature(enable = "avx2")]
    unsafe fn score_tiles(qs: &[f32], k: &[f32], hd: usize, len: usize, scores: &mut [f32]) {
        let nq = qs.len() / hd;
        let mut i = 0;
        while i < nq {
            let qt = QT.min(nq - i);
            let mut t = 0;
            while t < len {
                let kt = KT.min(len - t);
                let mut tile = [[0f32; KT]; QT];
                if qt == QT && kt == KT {
                    // SAFETY: QT queries from i and KT keys from t are inside qs / k.
                    unsafe { score_tile(&qs[i * hd..], &k[t * hd..], hd, &mut tile) };
                } else {
                    for (a, row) in tile.iter_mut().enumerate().take(qt) {
                        for (b, s) in row.iter_mut().enumerate().take(kt) {
                            let (qa, kb) = (&qs[(i + a) * hd..][..hd], &k[(t + b) * hd..][..hd]);
                            *s = ops::dot8(qa, kb);
                        }
                    }
                }
                for (a, row) in tile.iter().enumerate().take(qt) {
                    scores[(i + a) * len + t..][..kt].copy_from_slice(&row[..kt]);
                }
                t += kt;
            }
            i += qt;
        }
    }

    /// One QT x KT tile of scores, each in `dot8`'s lanes and tree.
    ///
    /// # Safety
    /// AVX2; `q` holds QT rows and `k` KT rows of `hd` (a multiple of 8) values.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn score_tile(q: &[f32], k: &[f32], hd: usize, tile: &mut [[f32; KT]; QT]) {
        debug_assert!(q.len() >= QT * hd && k.len() >= KT * hd && hd.is_multiple_of(8));
        let mut acc = [[_mm256_setzero_ps(); KT]; QT];
        for c in (0..hd).step_by(8) {
            let mut kv = [_mm256_setzero_ps(); KT];
            for (b, x) in kv.iter_mut().enumerate() {
                // SAFETY: b * hd + c + 8 <= K * hd <= k.len().
                *x = unsafe { _mm256_loadu_ps(k.as_ptr().add(b * hd + c)) };
            }
            for (a, row) in acc.iter_mut().enumerate() {
                // SAFETY: a * hd + c + 8 <= Q * hd <= q.len().
                let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(a * hd + c)) };
                for (x, &kb) in row.iter_mut().zip(&kv) {
                    *x = _mm256_add_ps(*x, _mm256_mul_ps(qv, kb));
                }
            }
        }
        for (a, row) in acc.iter().enumerate() {
            for (b, &x) in row.iter().enumerate() {
                tile[a][b] = tree8(x);
            }
        }
    }

    /// `dot8`'s lane tree: [a0+a4, a1+a5, a2+a6, a3+a7], then [s0+s2, s1+s3], then their sum.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn tree8(acc: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// `out_i = sum_t scores[i * len + t] * v_t` in position order, for every query `i`.
    #[target_feature(enable = "avx2")]
    unsafe fn value_tiles(scores: &[f32], v: &[f32], hd: usize, len: usize, out: &mut [f32]) {
        let nq = out.len() / hd;
        let mut i = 0;
        while i < nq {
            let qt = QT.min(nq - i);
            for d0 in (0..hd).step_by(DT) {
                let mut acc = [[_mm256_setzero_ps(); DT / 8]; QT];
                for t in 0..len {
                    let mut vv = [_mm256_setzero_ps(); DT / 8];
                    for (c, x) in vv.iter_mut().enumerate() {
                        // SAFETY: t < len rows of hd values; d0 + c * 8 + 8 <= hd.
                        *x = unsafe { _mm256_loadu_ps(v.as_ptr().add(t * hd + d0 + c * 8)) };
                    }
                    for (a, row) in acc.iter_mut().enumerate().take(qt) {
                        let w = _mm256_set1_ps(scores[(i + a) * len + t]);
                        for (x, &vc) in row.iter_mut().zip(&vv) {
                            *x = _mm256_add_ps(*x, _mm256_mul_ps(w, vc));
                        }
                    }
                }
                for (a, row) in acc.iter().enumerate().take(qt) {
                    for (c, &x) in row.iter().enumerate() {
                        // SAFETY: query i + a < nq, dimension d0 + c * 8 + 8 <= hd.
                        unsafe {
                            _mm256_storeu_ps(out.as_mut_ptr().add((i + a) * hd + d0 + c * 8), x)
                        };
                    }
                }
            }
            i += qt;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::attend::{attend, Scratch};
    use super::super::tests::vals;
    use super::super::types::{Geometry, KvType, Rotation};
    use super::super::Pool;
    use super::*;

    /// Every row of every chunk of a prompt (uneven chunks, blocks cut mid-chunk, grouped query
    /// heads) gets the floats of `attend`, query head by query head, bit for bit: f32 and f16
    /// caches, rotated or not, head sizes 32 and 64, with the pool's threads and with one.
    #[test]
    fn tiled_rows_equal_attend_bit_for_bit() {
        if !available(KvType::F32, 64) {
            return; // no AVX2: the runtime keeps `attend`, nothing to compare
        }
        let rots = [Rotation::Off, Rotation::Values, Rotation::Both];
        for (kv, rotate, hd) in [KvType::F32, KvType::F16]
            .into_iter()
            .flat_map(|k| rots.map(|r| (k, r)))
            .flat_map(|(k, r)| [64usize, 32].map(|hd| (k, r, hd)))
        {
            let geo = Geometry {
                n_layer: 2,
                n_head_kv: 2,
                head_dim: hd,
            };
            let (kvd, n_head) = (geo.kv_dim(), 6);
            let qd = n_head * hd;
            let n = 150;
            let (k, v, q) = (vals(n * kvd, 1), vals(n * kvd, 2), vals(n * qd, 3));
            let mut pool = Pool::new(kv, geo, 1 << 24, Some(rotate)).unwrap();
            let mut seq = pool.admit(n).unwrap().unwrap();
            let mut s = Scratch::default();
            let mut at = 0;
            for m in [1usize, 37, 2, 5, 105] {
                pool.grow(&mut seq, m).unwrap();
                for layer in 0..2 {
                    let rows = at * kvd..(at + m) * kvd;
                    pool.append(&mut seq, layer, &k[rows.clone()], &v[rows]);
                }
                let qc = &q[at * qd..(at + m) * qd];
                for layer in 0..2 {
                    let view = seq.view(layer);
                    let mut want = vec![0f32; m * qd];
                    for (ih, o) in want.chunks_exact_mut(hd).enumerate() {
                        let (r, h) = (ih / n_head, ih % n_head);
                        let qh = &qc[ih * hd..][..hd];
                        let kvh = h / (n_head / geo.n_head_kv);
                        attend(kv, rotate, &geo, &view, kvh, qh, at + r, 0.125, &mut s, o);
                    }
                    for threads in [0, 1] {
                        crate::parallel::set_num_threads(threads);
                        let mut got = vec![0f32; m * qd];
                        crate::parallel::install(|| {
                            attend_rows(kv, rotate, &geo, n_head, &view, qc, at, 0.125, &mut got)
                        });
                        crate::parallel::set_num_threads(0);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{kv:?} {rotate:?} hd {hd} chunk at {at}+{m} layer {layer} threads {threads}"
                        );
                    }
                }
                pool.commit(&mut seq, m);
                at += m;
            }
            pool.release(seq);
        }
    }
}
