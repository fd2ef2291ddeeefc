//! The paged cache: one pool of fixed-size pages (P = `page_len` token positions each: 32, KIVI
//! 64; every layer's K and V) under a byte budget, shared by the sequences that decode together.
//!
//! A sequence is admitted with its maximum length and charged, up front, every page it can need
//! (plus, for the KIVI types, its f16 rows: up to `residual + P` recent positions and the
//! `sinks` first ones, types.rs's Window): once admitted it can never run out of pages in the
//! middle of a step. Pages are allocated as the sequence grows and go back to
//! the pool when it ends. With rotation on (rotate.rs), every K and V row is rotated per head
//! before it is stored, residual included.
//!
//! Page layout, per layer l (`kvd` = n_head_kv * head_dim, `bb` = the type's block bytes, `n` =
//! its block length): keys at `2 l kvd bb`, values at `(2 l + 1) kvd bb`, `kvd bb` bytes each.
//! Per-token blocks (the non-KIVI types): slot s (position % P), head h at
//! `(s * kvd + h * head_dim) / n * bb`. KIVI (int4 / int2): keys per channel over the page's P
//! positions and values per token, their codes in kivi.rs's tiles (for integer dot products),
//! then the f16 scales and zeros (kivi::Layout).

use crate::error::{Error, Result};

use half::f16;

use super::block;
use super::kivi::{self, Layout};
use super::rotate::wht_heads;
use super::types::{Geometry, KvType, Rotation, Window, KIVI_GROUP};

/// One page: 8-byte words so f32 and f16 blocks can be read in place.
pub type Page = Box<[u64]>;

pub struct Pool {
    pub kv: KvType,
    pub geo: Geometry,
    /// Which rows are rotated per head (rotate.rs).
    pub rotate: Rotation,
    /// KIVI's sinks and residual (zero for the per-token types).
    pub window: Window,
    pub budget: usize,
    charged: usize,
    free: Vec<Page>,
}

/// One sequence's cache: its pages in position order and, for KIVI, the rows (rounded to f16) of
/// the positions `resid_start..n` and of the sink positions `0..min(n, sinks)` (per layer, `kvd`
/// values a row).
pub struct SeqCache {
    pub max_len: usize,
    pub n: usize,
    charge: usize,
    pages: Vec<Page>,
    resid_start: usize,
    resid_k: Vec<Vec<f16>>,
    resid_v: Vec<Vec<f16>>,
    sink_k: Vec<Vec<f16>>,
    sink_v: Vec<Vec<f16>>,
    /// The pool's window when the sequence was admitted.
    window: Window,
}

/// One layer of one sequence, as attention reads it.
pub struct LayerView<'a> {
    pub pages: &'a [Page],
    pub layer: usize,
    /// Positions below `quantized` are in pages (per-token types: every appended position).
    pub resid_start: usize,
    pub resid_k: &'a [f16],
    pub resid_v: &'a [f16],
    /// KIVI: the sink positions' rows (read in place of page 0's first `window.sinks` slots).
    pub sink_k: &'a [f16],
    pub sink_v: &'a [f16],
    pub window: Window,
}

fn parse_err(s: &str) -> Error {
    Error::InvalidArgument(format!(
        "kv_budget {s:?} is not a size (bytes, or a number with KB/MB/GB/KiB/MiB/GiB)"
    ))
}

/// "512MiB", "1.5GB", "1048576" -> bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim().to_ascii_lowercase());
    let mult: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        _ => return Err(parse_err(s)),
    };
    let v: f64 = num.parse().map_err(|_| parse_err(s))?;
    let bytes = v * mult;
    if !(1.0..=1e15).contains(&bytes) {
        return Err(parse_err(s));
    }
    Ok(bytes as usize)
}

impl Pool {
    /// A pool of `budget` bytes; `rotate`: None = the type's default where head_dim allows it.
    pub fn new(kv: KvType, geo: Geometry, budget: usize, rotate: Option<Rotation>) -> Result<Pool> {
        geo.check(kv)?;
        let rotate = match rotate {
            Some(Rotation::Off) => Rotation::Off,
            Some(r) => geo.check_rotation(kv).map(|_| r)?,
            None if geo.check_rotation(kv).is_ok() => kv.default_rotation(),
            None => Rotation::Off,
        };
        Ok(Pool {
            kv,
            geo,
            rotate,
            window: Window::default_for(kv),
            budget,
            charged: 0,
            free: Vec::new(),
        })
    }

    /// The same pool with KIVI sinks and residual `window` (types.rs's Window::resolve checks it).
    pub fn with_window(mut self, window: Window) -> Pool {
        self.window = window;
        self
    }

    pub fn page_bytes(&self) -> usize {
        self.kv.page_len() * self.kv.bytes_per_token(&self.geo)
    }

    /// Bytes of a KIVI sequence's f16 rows (`residual + P` recent positions and `sinks` first
    /// ones, every layer's K and V); 0 else.
    /// (Charged whatever the sequence's length, as the residual of P positions always was.)
    pub fn residual_bytes(&self) -> usize {
        if !self.kv.is_kivi() {
            return 0;
        }
        let slots = self.window.residual + self.kv.page_len() + self.window.sinks;
        slots * self.geo.n_layer * 2 * self.geo.kv_dim() * 2
    }

    /// Pages a sequence of `n` positions holds: every position's (KIVI: the quantized ones').
    fn pages_for(&self, n: usize) -> usize {
        if self.kv.is_kivi() {
            self.window.quantized(n) / self.kv.page_len()
        } else {
            n.div_ceil(self.kv.page_len())
        }
    }

    /// What a sequence of at most `max_len` positions is charged.
    pub fn charge_of(&self, max_len: usize) -> usize {
        self.pages_for(max_len) * self.page_bytes() + self.residual_bytes()
    }

    pub fn charged(&self) -> usize {
        self.charged
    }

    /// How many sequences of `max_len` positions the budget holds at once.
    pub fn capacity(&self, max_len: usize) -> usize {
        self.budget / self.charge_of(max_len).max(1)
    }

    /// A new sequence of at most `max_len` positions, or None while the pool is too full for it
    /// (an error when even an empty pool could not hold it).
    pub fn admit(&mut self, max_len: usize) -> Result<Option<SeqCache>> {
        let charge = self.check_fits(max_len)?;
        if self.charged + charge > self.budget {
            return Ok(None);
        }
        self.charged += charge;
        let l = self.geo.n_layer;
        Ok(Some(SeqCache {
            max_len,
            n: 0,
            charge,
            pages: Vec::new(),
            resid_start: 0,
            resid_k: vec![Vec::new(); l],
            resid_v: vec![Vec::new(); l],
            sink_k: vec![Vec::new(); l],
            sink_v: vec![Vec::new(); l],
            window: self.window,
        }))
    }

    /// The charge of a sequence of `max_len` positions, or an error when even an empty pool
    /// could not hold it.
    pub fn check_fits(&self, max_len: usize) -> Result<usize> {
        let charge = self.charge_of(max_len);
        if charge > self.budget {
            return Err(Error::InvalidArgument(format!(
                "kv_budget of {} bytes is too small for one sequence of {max_len} positions with \
                 kv_type {} ({charge} bytes: {} B per token, pages of {} positions{})",
                self.budget,
                self.kv.name(),
                self.kv.bytes_per_token(&self.geo),
                self.kv.page_len(),
                if self.kv.is_kivi() {
                    " plus the f16 residual and sinks"
                } else {
                    ""
                }
            )));
        }
        Ok(charge)
    }

    /// End a sequence: its pages go back to the pool.
    pub fn release(&mut self, seq: SeqCache) {
        self.charged -= seq.charge;
        self.free.extend(seq.pages);
    }

    fn page(&mut self) -> Page {
        self.free
            .pop()
            .unwrap_or_else(|| vec![0u64; self.page_bytes().div_ceil(8)].into_boxed_slice())
    }

    /// Make room for `m` more positions of `seq` (pages for them), or an error naming the limit.
    pub fn grow(&mut self, seq: &mut SeqCache, m: usize) -> Result<()> {
        if seq.n + m > seq.max_len {
            return Err(Error::InvalidArgument(format!(
                "context full: {} cached + {m} new tokens > {} positions",
                seq.n, seq.max_len
            )));
        }
        while seq.pages.len() < self.pages_for(seq.n + m) {
            let p = self.page();
            seq.pages.push(p);
        }
        Ok(())
    }

    /// Append the rows `k`, `v` (`m` x kvd, positions `seq.n..seq.n + m`) of layer `layer`
    /// (rotated first when the pool rotates). The per-token types quantize each row now; KIVI
    /// keeps the rows in f16 (the sink positions' also apart, for good) and quantizes each
    /// P-position group that now has `window.residual` newer positions (keys per channel, values
    /// per token) from those f16 values, keeping the rows until `commit` so that this call's
    /// earlier positions still read them. Page 0's key ranges leave the sinks out: their slots
    /// take position `sinks`'s value (a don't-care code; attention reads the sinks' f16 rows).
    pub fn append(&self, seq: &mut SeqCache, layer: usize, k: &[f32], v: &[f32]) {
        let (kv, kvd, hd) = (self.kv, self.geo.kv_dim(), self.geo.head_dim);
        let rotated;
        let (k, v) = if self.rotate.any() {
            let (mut rk, mut rv) = (k.to_vec(), v.to_vec());
            if self.rotate.keys() {
                wht_heads(&mut rk, hd);
            }
            wht_heads(&mut rv, hd);
            rotated = (rk, rv);
            (&rotated.0[..], &rotated.1[..])
        } else {
            (k, v)
        };
        let (bb, p) = (kv.block_bytes(), kv.page_len());
        let region = kvd * bb; // P rows of kvd / n blocks (KIVI keys: kvd channel blocks)
        let row_bytes = kvd / kv.block_len() * bb;
        let (k_at, v_at) = (2 * layer * region, (2 * layer + 1) * region);
        let m = k.len() / kvd;
        if !kv.is_kivi() {
            for i in 0..m {
                let pos = seq.n + i;
                let page = bytes_mut(&mut seq.pages[pos / p]);
                let slot = (pos % p) * row_bytes;
                block::encode(
                    kv,
                    &k[i * kvd..][..kvd],
                    &mut page[k_at + slot..][..row_bytes],
                );
                block::encode(
                    kv,
                    &v[i * kvd..][..kvd],
                    &mut page[v_at + slot..][..row_bytes],
                );
            }
            return;
        }
        seq.resid_k[layer].extend(k.iter().map(|&x| f16::from_f32(x)));
        seq.resid_v[layer].extend(v.iter().map(|&x| f16::from_f32(x)));
        let sinks = self.window.sinks;
        let new_sinks = sinks.min(seq.n + m).saturating_sub(seq.n) * kvd;
        seq.sink_k[layer].extend(k[..new_sinks].iter().map(|&x| f16::from_f32(x)));
        seq.sink_v[layer].extend(v[..new_sinks].iter().map(|&x| f16::from_f32(x)));
        let first_group = self.window.quantized(seq.n) / p;
        let end_group = self.window.quantized(seq.n + m) / p;
        let bits = kv.kivi_bits().unwrap_or(4);
        let lay = Layout::new(bits, &self.geo);
        let mut col = vec![0f32; p];
        let mut row = vec![0f32; KIVI_GROUP];
        for g in first_group..end_group {
            let base = g * p - seq.resid_start;
            let (rk, rv) = (&seq.resid_k[layer], &seq.resid_v[layer]);
            let page = bytes_mut(&mut seq.pages[g]);
            let (keys, values) = page[k_at..k_at + 2 * region].split_at_mut(region);
            // Pages come back from other sequences: clear before OR-ing codes in.
            keys.fill(0);
            values.fill(0);
            for ch in 0..kvd {
                for (t, c) in col.iter_mut().enumerate() {
                    *c = rk[(base + t) * kvd + ch].to_f32();
                }
                if g == 0 {
                    let stand_in = col[sinks];
                    col[..sinks].fill(stand_in);
                }
                let (q, s16, z16) = block::kivi_quantize(bits, &col);
                let (h, c) = (ch / hd, ch % hd);
                let tile = &mut keys[lay.key_tile(h, c / kivi::RED)..][..kivi::tile_bytes(bits)];
                for (t, &qt) in q.iter().enumerate() {
                    kivi::put(tile, bits, c % kivi::RED, t, qt);
                }
                keys[lay.key_scales(h) + 2 * c..][..2].copy_from_slice(&s16);
                keys[lay.key_zeros(h) + 2 * c..][..2].copy_from_slice(&z16);
            }
            for t in 0..p {
                for h in 0..self.geo.n_head_kv {
                    for vg in 0..lay.groups() {
                        let at = (base + t) * kvd + h * hd + vg * KIVI_GROUP;
                        for (r, x) in row.iter_mut().zip(&rv[at..][..KIVI_GROUP]) {
                            *r = x.to_f32();
                        }
                        let (q, s16, z16) = block::kivi_quantize(bits, &row);
                        let tile = &mut values[lay.value_tile(h, vg, t / kivi::RED)..]
                            [..kivi::tile_bytes(bits)];
                        for (d, &qd) in q.iter().enumerate() {
                            kivi::put(tile, bits, t % kivi::RED, d, qd);
                        }
                        values[lay.value_scales(h, vg) + 2 * t..][..2].copy_from_slice(&s16);
                        values[lay.value_zeros(h, vg) + 2 * t..][..2].copy_from_slice(&z16);
                    }
                }
            }
        }
    }

    /// After every layer appended `m` positions: count them, drop the f32 rows of groups now
    /// quantized.
    pub fn commit(&self, seq: &mut SeqCache, m: usize) {
        seq.n += m;
        if self.kv.is_kivi() {
            let keep_from = self.window.quantized(seq.n);
            let drop = (keep_from - seq.resid_start) * self.geo.kv_dim();
            for r in seq.resid_k.iter_mut().chain(seq.resid_v.iter_mut()) {
                r.drain(..drop);
            }
            seq.resid_start = keep_from;
        }
    }

    /// Undo `append`s of `m` positions whose step failed (nothing was committed).
    pub fn rollback(&self, seq: &mut SeqCache) {
        if self.kv.is_kivi() {
            let keep = (seq.n - seq.resid_start) * self.geo.kv_dim();
            for r in seq.resid_k.iter_mut().chain(seq.resid_v.iter_mut()) {
                r.truncate(keep);
            }
            let sinks = seq.n.min(self.window.sinks) * self.geo.kv_dim();
            for r in seq.sink_k.iter_mut().chain(seq.sink_v.iter_mut()) {
                r.truncate(sinks);
            }
        }
    }
}

impl SeqCache {
    pub fn view(&self, layer: usize) -> LayerView<'_> {
        LayerView {
            sink_k: &self.sink_k[layer],
            sink_v: &self.sink_v[layer],
            window: self.window,
            pages: &self.pages,
            layer,
            resid_start: self.resid_start,
            resid_k: &self.resid_k[layer],
            resid_v: &self.resid_v[layer],
        }
    }
}

fn bytes_mut(p: &mut Page) -> &mut [u8] {
    bytemuck::cast_slice_mut(&mut p[..])
}

/// A page's bytes.
pub fn bytes(p: &Page) -> &[u8] {
    bytemuck::cast_slice(&p[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn admission_waits_and_refuses_clearly() {
        let geo = Geometry {
            n_layer: 2,
            n_head_kv: 1,
            head_dim: 32,
        };
        let mut p = Pool::new(KvType::Q8_0, geo, 3 * 32 * 2 * 2 * 34, None).unwrap();
        assert_eq!(p.capacity(64), 1);
        let a = p.admit(64).unwrap().unwrap();
        assert!(p.admit(64).unwrap().is_none());
        assert!(p
            .check_fits(1000)
            .unwrap_err()
            .to_string()
            .contains("too small"));
        assert!(p.admit(1000).is_err());
        p.release(a);
        assert_eq!(p.charged(), 0);
        assert!(p.admit(64).unwrap().is_some());
    }

    /// SmolLM2's shape (30 layers, 3 KV heads of 64; f16 rows 23,040 B a position): int2 charges
    /// the pages of its quantized positions and its f16 rows (residual + a page + the sinks);
    /// int4's defaults keep the former rule (every page, one page of f16 rows).
    #[test]
    fn kivi_charges_its_quantized_pages_and_f16_rows() {
        let geo = Geometry {
            n_layer: 30,
            n_head_kv: 3,
            head_dim: 64,
        };
        let f16_row = 30 * 2 * 3 * 64 * 2;
        let p = Pool::new(KvType::Int2, geo, 256 << 20, None).unwrap();
        assert_eq!(
            p.window,
            Window {
                sinks: 4,
                residual: 128
            }
        );
        let int2_page = 64 * KvType::Int2.bytes_per_token(&geo);
        let charge = (2048 - 128) / 64 * int2_page + (128 + 64 + 4) * f16_row;
        assert_eq!(p.charge_of(2048), charge);
        assert_eq!(p.capacity(2048), (256 << 20) / charge);
        // A sequence shorter than the residual holds only f16 rows.
        assert_eq!(p.charge_of(100), (128 + 64 + 4) * f16_row);
        let p4 = Pool::new(KvType::Int4, geo, 256 << 20, None).unwrap();
        assert_eq!(p4.window, Window::default());
        let int4_page = 64 * KvType::Int4.bytes_per_token(&geo);
        assert_eq!(p4.charge_of(2048), 32 * int4_page + 64 * f16_row);
    }

    /// Over uneven chunks and several windows: the pages are those of the quantized positions,
    /// the f16 residual holds `residual` to `residual + 63` positions once that many exist, the
    /// sink rows the first `min(n, sinks)`; a rolled-back step leaves them as they were.
    #[test]
    fn kivi_window_bounds_the_f16_rows() {
        let geo = Geometry {
            n_layer: 1,
            n_head_kv: 1,
            head_dim: 64,
        };
        let kvd = geo.kv_dim();
        for (sinks, residual) in [(4, 128), (0, 0), (5, 70), (63, 1)] {
            let window = Window { sinks, residual };
            let mut pool = Pool::new(KvType::Int2, geo, 1 << 26, None)
                .unwrap()
                .with_window(window);
            let mut seq = pool.admit(700).unwrap().unwrap();
            for m in [3usize, 1, 64, 100, 7, 200, 63, 1, 130] {
                pool.grow(&mut seq, m).unwrap();
                let rows = vec![0.5f32; m * kvd];
                pool.append(&mut seq, 0, &rows, &rows);
                if m == 7 {
                    pool.rollback(&mut seq);
                } else {
                    pool.commit(&mut seq, m);
                }
                let n = seq.n;
                let q = window.quantized(n);
                assert_eq!(q % 64, 0);
                assert!(n - q >= residual.min(n) && n - q < residual + 64, "{n} {q}");
                assert_eq!(seq.pages.len(), q / 64, "pages at {n}");
                assert_eq!(seq.resid_start, q);
                assert_eq!(seq.resid_k[0].len(), (n - q) * kvd);
                assert_eq!(seq.sink_k[0].len(), n.min(sinks) * kvd);
                assert_eq!(seq.sink_v[0].len(), n.min(sinks) * kvd);
            }
            pool.release(seq);
            assert_eq!(pool.charged(), 0);
        }
    }
}
