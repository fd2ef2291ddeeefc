//! The bf16 GEMM path of nf4, int8, fp8 and the grouped integers (x86-64 with AVX-512 BF16, at
//! least `GEMM16_MIN_M` rows, K a multiple of 32), and of the ggml formats on AMX tiles from
//! `ggml_bf16_min_m` rows (their chunks decoded by `x86::decode16_ggml`): jobs of up to `PANEL` weight
//! rows (fewer where that balances few jobs over the threads: `panel_rows`) x one block of
//! activation rows (parallel over both), each taking K chunk by chunk: the job's weight rows
//! decoded into an L2-resident buffer (`x86::gemm16::decode_*`), then `x86::gemm16::kernel` over
//! every group of activation vectors of the block (the group's chunk in L1, reused by all the
//! job's rows; the next group's lines prefetched a share per block of rows; on CPUs where
//! `vdpbf16ps` is slow the blocks of NR rows on `x86::gemm16_fma`), the outputs' f32
//! chains kept in a per-thread buffer between chunks; at the end the outputs go to `out` in
//! 16 x 16 tiles, a row of 16 columns at a time. Numerics: `reference/bf16.rs` (every output is
//! that reference's chain, wherever it sits and however the jobs split).

use std::arch::x86_64::{
    __m256, __m512, _mm512_castps512_ps256, _mm512_setzero_ps, _mm512_zextps256_ps512,
};
use std::cell::RefCell;

use super::out16::Sink;
use super::x86::gemm16::{self, Acts16, Pairs16, KC, MV_MAX, PANEL};
use super::x86::{self, amx_bf16, amx_bf16_small, gemm16_fma};
use super::{OutPtr, Plan};
use crate::qtype::QType;

/// Activation vectors (16 rows each) of one job's block: M = 512 is one block, so each weight
/// is decoded once (the f32 chains of a job, PANEL x 32 vectors x 64 bytes = 288 KiB, and its
/// decoded chunk, 72 KiB, stay in the 1 MiB L2).
const BLOCK_VECTORS: usize = 32;
/// Chunks of K ahead that `decode_bf16` prefetches a row's bytes.
const PREFETCH_CHUNKS: usize = 2;
/// Rows ahead that `decode_bf16` also prefetches the current chunk of (the ggml formats; 2 to
/// 16 measured alike, session 18).
const NEAR_ROWS: usize = 4;

/// A thread's decoded chunk (bf16), int8 codes, f32 chains and the chunk as f32.
type Scratch = (Vec<u16>, Vec<u8>, Vec<__m512>, Vec<f32>);

/// The FMA kernels' inputs: the decoded chunk as f32, the activations from the group's first
/// vector on, and the distance between vectors (entries).
type FmaIn<'a> = Option<(&'a [f32], &'a [Pairs16], usize)>;

thread_local! {
    /// Each pool thread's decoded chunk (PANEL rows of KC bf16), int8 codes of one grouped row
    /// chunk, the jobs' f32 chains, and the chunk widened to f32 for `gemm16_fma`.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Default::default());
}

impl Plan<'_> {
    /// The whole product into `out` (M x N) through the bf16 GEMM.
    pub(super) fn run_bf16(&self, x: &Acts16, out: &mut [f32]) {
        if amx_bf16_small::use_small(self.m) {
            return self.run_bf16_small(x, out);
        }
        self.run_bf16_to(x, &OutPtr::new(out, self.w.rows));
    }

    /// `run_bf16` into a sink (f32 or bf16 outputs), for M where `amx_bf16_small::use_small`
    /// does not hold.
    pub(super) fn run_bf16_to(&self, x: &Acts16, outp: &impl Sink) {
        let n = self.w.rows;
        let blocks = x.vectors.div_ceil(BLOCK_VECTORS);
        let threads = crate::parallel::num_threads();
        let panel = panel_rows(n, blocks, threads);
        let row_jobs = n.div_ceil(panel);
        let jobs = row_jobs * blocks;
        // The FMA kernels (where `vdpbf16ps` is slow) for the blocks of NR rows, on the chunk
        // widened to f32; single rows and a last half vector keep `gemm16` (the same bits).
        let fma = gemm16_fma::use_fma();
        // AMX tiles (`x86::amx_bf16`) from `AMX_BF16_MIN_M` rows where the process may use them.
        let amx = amx_bf16::use_amx(self.m);
        let job = |t: usize| {
            let (ri, bi) = (t / blocks, t % blocks);
            let n0 = ri * panel;
            let v0 = bi * BLOCK_VECTORS;
            let (rows, vs) = (panel.min(n - n0), v0..(v0 + BLOCK_VECTORS).min(x.vectors));
            if amx {
                self.job_amx(x, n0, rows, vs, outp);
            } else {
                self.job_bf16(x, n0, rows, vs, fma, outp);
            }
        };
        if threads == 1 || jobs == 1 {
            (0..jobs).for_each(job);
        } else {
            crate::parallel::for_each_index(jobs, job);
        }
    }

    fn job_bf16(
        &self,
        x: &Acts16,
        n0: usize,
        rows: usize,
        vs: std::ops::Range<usize>,
        fma: bool,
        out: &impl Sink,
    ) {
        let nv = vs.len();
        let k = self.k;
        SCRATCH.with_borrow_mut(|(wc, w8, acc, w32)| {
            wc.resize(PANEL * KC, 0);
            if fma {
                w32.resize(PANEL * KC, 0.0);
            }
            acc.clear();
            // SAFETY: bf16 is set only with `cpu::has_avx512_bf16` (AVX-512 F included).
            acc.resize(rows * nv, unsafe { zero() });
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                for i in 0..rows {
                    self.decode_bf16(n0 + i, k0, kc, w8, &mut wc[i * KC..i * KC + kc]);
                    if fma {
                        let at = i * KC..i * KC + kc;
                        // SAFETY: `cpu::has_avx512_bf16` (the plan's bf16 flag); kc is a
                        // multiple of 32.
                        unsafe { gemm16_fma::widen(&wc[at.clone()], &mut w32[at]) };
                    }
                }
                let w32 = if fma { Some(&w32[..]) } else { None };
                let pairs = kc / 2;
                let mut v = 0;
                while v < nv {
                    let mv = (nv - v).min(MV_MAX);
                    let xv = |j: usize| &x.x[(vs.start + v + j) * x.stride + k0 / 2..][..pairs];
                    // The next group: the following vectors of this chunk, else the first of
                    // the next chunk (none after the last).
                    let ahead = if v + mv < nv {
                        Ahead::new(x, vs.start + v + mv, (nv - v - mv).min(MV_MAX), k0, pairs)
                    } else if k0 + kc < k {
                        let pn = KC.min(k - k0 - kc) / 2;
                        Ahead::new(x, vs.start, nv.min(MV_MAX), k0 + kc, pn)
                    } else {
                        Ahead::default()
                    };
                    // The last vector with at most 8 rows of M in it: its low half only.
                    let half = mv == 1 && self.m <= (vs.start + v) * 16 + 8;
                    let at = Block { pairs, rows, v, nv };
                    // FMA kernels: the vectors from `v` on, `x.stride` entries apart.
                    let f = w32.map(|w| (w, &x.x[(vs.start + v) * x.stride + k0 / 2..], x.stride));
                    match mv {
                        1 if half => self.rows_bf16_half(wc, xv(0), at, &ahead, acc),
                        1 => self.rows_bf16::<24, 1>(wc, [xv(0)], f, at, &ahead, acc),
                        2 => self.rows_bf16::<12, 2>(wc, [xv(0), xv(1)], f, at, &ahead, acc),
                        3 => {
                            let x3 = [xv(0), xv(1), xv(2)];
                            self.rows_bf16::<8, 3>(wc, x3, f, at, &ahead, acc)
                        }
                        _ => {
                            let x4 = [xv(0), xv(1), xv(2), xv(3)];
                            self.rows_bf16::<6, 4>(wc, x4, f, at, &ahead, acc)
                        }
                    }
                    v += mv;
                }
                k0 += kc;
            }
            out.tiles(acc, rows, nv, vs.start, self.m, n0, |i, j| i * nv + j);
        });
    }

    /// `job_bf16` on AMX tiles: chunks of `amx_bf16::KCA` columns (each row decoded `KC` at a
    /// time into rows `W_STRIDE` apart), the chains in whole C tiles (`amx_bf16::acc_index`),
    /// every block of the chunk through `amx_bf16::chunk`; the tiles are configured for the job
    /// on the thread running it and released at its end.
    fn job_amx(
        &self,
        x: &Acts16,
        n0: usize,
        rows: usize,
        vs: std::ops::Range<usize>,
        out: &impl Sink,
    ) {
        use amx_bf16::{KCA, W_STRIDE};
        let nv = vs.len();
        let k = self.k;
        let rows16 = rows.next_multiple_of(16);
        SCRATCH.with_borrow_mut(|(wc, w8, acc, _)| {
            // (PANEL is a multiple of 16: the rounded rows fit; rows past `rows` hold whatever
            // the buffer held, their chains are never written out)
            wc.resize(PANEL * W_STRIDE, 0);
            // (grown only, never cut; not zeroed: the first chunk starts its tiles at +0.0,
            // `amx_bf16::chunk_from_zero`, and stores every one of them)
            let len = rows16 * nv;
            if acc.len() < len {
                // SAFETY: bf16 is set only with `cpu::has_avx512_bf16` (AVX-512 F included).
                acc.resize(len, unsafe { zero() });
            }
            let acc = &mut acc[..len];
            // SAFETY: `use_amx` checked `amx_bf16_usable`; released below on this thread.
            unsafe { crate::amx::tile_config(&amx_bf16::CONFIG) };
            let mut k0 = 0;
            while k0 < k {
                let kc = KCA.min(k - k0);
                for i in 0..rows {
                    let mut s = 0;
                    while s < kc {
                        let sc = KC.min(kc - s);
                        let at = i * W_STRIDE + s;
                        self.decode_bf16(n0 + i, k0 + s, sc, w8, &mut wc[at..at + sc]);
                        s += sc;
                    }
                }
                let c = amx_bf16::Chunk {
                    w: wc,
                    x: &x.x[vs.start * x.stride + k0 / 2..],
                    x_stride: x.stride,
                    pairs: kc / 2,
                };
                // SAFETY: tiles configured above; wc holds PANEL >= rows16 rows W_STRIDE apart
                // (kc <= KCA entries each), the job's vectors have kc / 2 pairs (a multiple of
                // 16: K is a multiple of 32) from k0 / 2, acc has the tiles of rows16 x nv.
                unsafe {
                    if k0 == 0 {
                        amx_bf16::chunk_from_zero(&c, rows16, nv, acc);
                    } else {
                        amx_bf16::chunk(&c, rows16, nv, acc);
                    }
                }
                k0 += kc;
            }
            // SAFETY: configured above on this thread.
            unsafe { crate::amx::tile_release() };
            out.tiles(acc, rows, nv, vs.start, self.m, n0, |i, j| {
                amx_bf16::acc_index(i, j, nv)
            });
        });
    }

    /// The kernel over the job's decoded rows, NR at a time (then one at a time), for the MV
    /// activation vectors from `at.v` on; the NR-row blocks on `gemm16_fma` when `fma` holds the
    /// chunk as f32, the vectors and their distance.
    fn rows_bf16<const NR: usize, const MV: usize>(
        &self,
        wc: &[u16],
        x: [&[Pairs16]; MV],
        fma: FmaIn<'_>,
        at: Block,
        ahead: &Ahead,
        acc: &mut [__m512],
    ) {
        let Block { pairs, rows, v, nv } = at;
        let mut i = 0;
        while i < rows {
            let r = if i + NR <= rows { NR } else { 1 };
            ahead.fetch(i, r, rows);
            if let (true, Some((w32, xf, xs))) = (r == NR, fma) {
                let w = &w32[i * KC..];
                // SAFETY: `cpu::has_avx512_bf16` (the plan's bf16 flag); w holds NR rows of KC
                // f32 from row i (each with 2 · pairs set), xf the MV vectors xs apart (each
                // with `pairs` entries), the accumulators of rows i.. sit nv apart from i · nv + v.
                unsafe { gemm16_fma::kernel::<NR, MV>(w, xf, xs, pairs, acc, i * nv + v, nv) };
            } else if r == NR {
                self.block_bf16::<NR, MV>(&wc[i * KC..], x, pairs, i, v, nv, acc);
            } else {
                self.block_bf16::<1, MV>(&wc[i * KC..], x, pairs, i, v, nv, acc);
            }
            i += r;
        }
    }

    /// `rows_bf16` for one vector through `kernel8` (its lanes 8..16 are rows past M: left at
    /// zero).
    fn rows_bf16_half(
        &self,
        wc: &[u16],
        x: &[Pairs16],
        at: Block,
        ahead: &Ahead,
        acc: &mut [__m512],
    ) {
        let Block { pairs, rows, v, nv } = at;
        let mut i = 0;
        while i < rows {
            let r = if i + 24 <= rows { 24 } else { 1 };
            ahead.fetch(i, r, rows);
            let at = |j: usize| (i + j) * nv + v;
            // SAFETY: `cpu::has_avx512_bf16` (the plan's bf16 flag); wc holds the rows from i on,
            // each with 2 · pairs decoded; x has `pairs` entries.
            unsafe {
                if r == 24 {
                    let mut a: [__m256; 24] = std::array::from_fn(|j| low(acc[at(j)]));
                    gemm16::kernel8::<24>(&wc[i * KC..], KC, x, pairs, &mut a);
                    for (j, &aj) in a.iter().enumerate() {
                        acc[at(j)] = widen(aj);
                    }
                } else {
                    let mut a = [low(acc[at(0)])];
                    gemm16::kernel8::<1>(&wc[i * KC..], KC, x, pairs, &mut a);
                    acc[at(0)] = widen(a[0]);
                }
            }
            i += r;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn block_bf16<const NR: usize, const MV: usize>(
        &self,
        w: &[u16],
        x: [&[Pairs16]; MV],
        pairs: usize,
        i0: usize,
        v: usize,
        nv: usize,
        acc: &mut [__m512],
    ) {
        // SAFETY: `cpu::has_avx512_bf16` (the plan's bf16 flag); w holds NR rows of KC bf16 from
        // row i0 of the chunk (PANEL · KC entries), each with 2 · pairs decoded; x[j] has
        // `pairs` entries; the accumulators of rows i0.. sit nv apart from i0 · nv + v.
        unsafe { gemm16::kernel::<NR, MV>(w, KC, x, pairs, acc, i0 * nv + v, nv) };
    }

    /// Columns `k0..k0 + kc` of weight row `n` as bf16 into `dst` (the format's f32 values
    /// rounded, `reference::bf16`).
    fn decode_bf16(&self, n: usize, k0: usize, kc: usize, w8: &mut Vec<u8>, dst: &mut [u16]) {
        let rb = self.row_bytes;
        let row = &self.w.data[n * rb..(n + 1) * rb];
        // The job reads its rows chunk by chunk (PANEL streams a stride apart, which the
        // hardware prefetchers do not follow): fetch this row's chunk `PREFETCH_CHUNKS` ahead.
        // (bytes of whole columns: the ggml formats' blocks are 32 or 256 columns, which KC
        // is a multiple of; a whole-bit rate would drift from the chunk for 4.5 or 8.5 bits)
        if x86::decode16_ggml::takes(self.w.qtype) {
            // (constants and shifts: this runs once per KC columns of every row, and
            // `row_bytes` / `info`'s table searches cost 15-25 % at M = 32-64)
            let (bs, ts) = x86::decode16_ggml::block_geometry(self.w.qtype);
            let sh = bs.trailing_zeros();
            let ahead = ((k0 + PREFETCH_CHUNKS * KC) >> sh) * ts;
            if ahead < rb {
                gemm16::prefetch(&row[ahead..rb.min(ahead + (KC >> sh) * ts)]);
            }
            // And the same chunk of the row `NEAR_ROWS` on, decoded a few hundred cycles from
            // now: the far prefetch above is a whole panel of rows old by its use and the
            // block's first load still missed (~17 % of a q5_k product's samples at M = 64).
            let near = (n + NEAR_ROWS) * rb + (k0 >> sh) * ts;
            if near + (KC >> sh) * ts <= self.w.data.len() {
                gemm16::prefetch(&self.w.data[near..near + (KC >> sh) * ts]);
            }
        } else {
            let bytes = |c: usize| self.w.qtype.row_bytes(c, self.w.block_size.clamp(1, KC));
            let ahead = bytes(k0 + PREFETCH_CHUNKS * KC);
            if ahead < rb {
                gemm16::prefetch(&row[ahead..rb.min(ahead + bytes(KC))]);
            }
        }
        self.decode_chunk(n, k0, kc, w8, dst);
    }

    /// `decode_bf16` without the prefetch.
    pub(super) fn decode_chunk(
        &self,
        n: usize,
        k0: usize,
        kc: usize,
        w8: &mut Vec<u8>,
        dst: &mut [u16],
    ) {
        let rb = self.row_bytes;
        let row = &self.w.data[n * rb..(n + 1) * rb];
        if x86::decode16_ggml::takes(self.w.qtype) {
            // Whole blocks: K-quants' chunks are one block (KC = QK_K), the 32-weight formats'
            // kc / 32 blocks.
            let (bs, ts) = x86::decode16_ggml::block_geometry(self.w.qtype);
            let sh = bs.trailing_zeros();
            let bytes = &row[(k0 >> sh) * ts..((k0 + kc) >> sh) * ts];
            // SAFETY: `cpu::has_avx512_bf16` (the plan's bf16 flag); dst has kc entries.
            unsafe { x86::decode16_ggml::decode(self.w.qtype, bytes, dst) };
            return;
        }
        let st = self.stats_of(n);
        let bl = self.block_len;
        // The block of column c: a shift for the powers of two (a division per 32 columns was
        // a visible share of the decode at M = 8 / 16).
        let (pow2, sh) = (bl.is_power_of_two(), bl.trailing_zeros());
        let blk = move |c: usize| if pow2 { c >> sh } else { c / bl };
        // One scale per 32 columns at least (blocks of 32 or more, powers of two, or whole
        // rows; groups of 32, 64, 128 or whole rows), so chunk j's scale is that of its first
        // column.
        let at = |j: usize| st[blk(k0 + 32 * j)];
        // Each arm: `cpu::has_avx512_bf16` (the plan's bf16 flag); `row` is the whole weight row,
        // `dst` has kc entries (kc a multiple of 32, checked by `plan`).
        match self.w.qtype {
            // SAFETY: see above.
            QType::NF4 if crate::cpu::has_vbmi_gfni() => unsafe {
                let p = &row[k0 / 2..(k0 + kc) / 2];
                // (k0 is a multiple of KC: with blocks of 64 or more, steps 2i and 2i + 1 share
                // their scale)
                x86::decode16_vbmi::decode_nf4(p, bl >= 64, at, dst)
            },
            // SAFETY: see above.
            QType::NF4 => unsafe { gemm16::decode_nf4(&row[k0 / 2..(k0 + kc) / 2], at, dst) },
            QType::Int8 if blk(k0) == blk(k0 + kc - 1) => {
                // One scale for the chunk (per-row or per-tensor scales, large blocks): passed
                // as a value. `at` itself, a closure over the stats and the block shift, was
                // copied through the stack into a 16-byte load that waited on its two 8-byte
                // stores: 60 % of this function's samples, which were 9-16 % of int8's call at
                // M = 16 / 64 (one thread, 4096 x 14336), 3-5 % after.
                let s = at(0);
                // SAFETY: see above.
                unsafe { gemm16::decode_i8(&row[k0..k0 + kc], |_| s, dst) }
            }
            // SAFETY: see above.
            QType::Int8 => unsafe { gemm16::decode_i8(&row[k0..k0 + kc], at, dst) },
            QType::Fp8E4M3 | QType::Fp8E5M2 => {
                let e5m2 = self.w.qtype == QType::Fp8E5M2;
                let q = &row[k0..k0 + kc];
                if blk(k0) == blk(k0 + kc - 1) {
                    // One scale for the chunk (per-row or per-tensor scales, large blocks): its
                    // table, kept per row across the job's chunks.
                    // SAFETY: see above.
                    unsafe { x86::decode16_fp8::decode(n, q, e5m2, at(0), dst) }
                } else {
                    // SAFETY: see above.
                    unsafe { gemm16::decode_fp8(q, e5m2, at, dst) }
                }
            }
            QType::GInt(g) if g.bits == 4 => {
                let groups = self.k / bl;
                let zs = |j: usize| {
                    let gi = blk(k0 + 32 * j);
                    let z = if g.sym { 8 } else { st[groups + gi] as i32 };
                    (z, st[gi])
                };
                let p = &row[k0 / 2..(k0 + kc) / 2];
                if crate::cpu::has_vbmi_gfni() {
                    let zf = |j: usize| {
                        let (z, s) = zs(j);
                        (z as f32, s)
                    };
                    // SAFETY: see above; VBMI checked. Groups of 64 or more (or whole rows):
                    // steps 2i and 2i + 1 share their scale and zero.
                    unsafe { x86::decode16_vbmi::decode_int4(p, bl >= 64, zf, dst) }
                } else {
                    // SAFETY: see above.
                    unsafe { gemm16::decode_gint4(p, zs, dst) }
                }
            }
            QType::GInt(g) if g.bits == 8 => {
                let groups = self.k / bl;
                let zs = |j: usize| {
                    let gi = blk(k0 + 32 * j);
                    let z = if g.sym { 128 } else { st[groups + gi] as u8 };
                    (z, st[gi])
                };
                // SAFETY: see above.
                unsafe { gemm16::decode_gint8(&row[k0..k0 + kc], zs, dst) }
            }
            QType::GInt(g) => {
                let mut scales = [0.0f32; KC / 32];
                let gl = crate::formats::gint::decode_chunk_i8(
                    g,
                    row,
                    st,
                    self.k,
                    (k0, kc),
                    w8,
                    &mut scales,
                );
                let sc = |j: usize| scales[32 * j / gl];
                // SAFETY: see above; w8 holds the chunk's kc codes.
                unsafe { gemm16::decode_i8(w8, sc, dst) }
            }
            _ => unreachable!("the bf16 GEMM runs for nf4, int8, fp8, grouped integers and ggml"),
        }
    }
}

/// Weight rows per job: `PANEL`, or fewer (a multiple of 16) where there are few jobs per thread
/// and they would not split evenly over the threads: N = 192 at M <= 512 was 144 + 48 rows, one
/// thread doing three times the other's work; now 96 + 96 (N = 1536: 12 jobs of 128 rows instead
/// of 11). No effect on results: every output is its own chain, whichever job holds its row.
fn panel_rows(n: usize, blocks: usize, threads: usize) -> usize {
    let mut per = n.div_ceil(PANEL);
    if threads > 1 && per * blocks < 8 * threads {
        while !(per * blocks).is_multiple_of(threads) {
            per += 1;
        }
    }
    n.div_ceil(per).next_multiple_of(16).min(PANEL)
}

/// Where one kernel group sits: `pairs` pairs of this chunk, the job's `rows` decoded rows,
/// vectors `v..` of the job's `nv`.
#[derive(Clone, Copy)]
struct Block {
    pairs: usize,
    rows: usize,
    v: usize,
    nv: usize,
}

/// The activation lines (one `Pairs16` each) of the next kernel group: `count` vectors from
/// `start`, `len` pairs each from column pair `p0`; fetched a share per block of weight rows so
/// that the group's first block finds them in cache (a hint: no effect on results).
#[derive(Default)]
struct Ahead<'a> {
    x: &'a [Pairs16],
    starts: [usize; MV_MAX],
    count: usize,
    len: usize,
}

impl<'a> Ahead<'a> {
    fn new(x: &'a Acts16, v0: usize, count: usize, k0: usize, len: usize) -> Self {
        Self {
            x: &x.x,
            starts: std::array::from_fn(|j| (v0 + j) * x.stride + k0 / 2),
            count,
            len,
        }
    }

    /// The share of rows `i..i + r` of `rows`.
    #[inline(always)]
    fn fetch(&self, i: usize, r: usize, rows: usize) {
        let total = self.count * self.len;
        let (t0, t1) = (total * i / rows, total * (i + r) / rows);
        let mut t = t0;
        while t < t1 {
            let (j, l) = (t / self.len, t % self.len);
            let e = t1.min((j + 1) * self.len);
            gemm16::prefetch_pairs(&self.x[self.starts[j] + l..self.starts[j] + e - j * self.len]);
            t = e;
        }
    }
}

/// f32 outputs: the job's outputs (`acc[at(i, j)]`: weight row `n0 + i`, activation rows 16 (v0 + j) ..)
/// into `out`, 16 x 16 at a time: transposed in registers (`acts16::transpose16`), then written a row
/// of 16 columns (one 64-byte line) at a time; a last partial block of columns lane by lane.
impl Sink for OutPtr {
    fn tiles(
        &self,
        acc: &[__m512],
        rows: usize,
        nv: usize,
        v0: usize,
        m: usize,
        n0: usize,
        at: impl Fn(usize, usize) -> usize,
    ) {
        let out = self;
        for j in 0..nv {
            let m0 = (v0 + j) * 16;
            let lanes = m.saturating_sub(m0).min(16);
            for c0 in (0..rows).step_by(16) {
                let cols = (rows - c0).min(16);
                if cols == 16 {
                    let mut t: [__m512; 16] = std::array::from_fn(|c| acc[at(c0 + c, j)]);
                    // SAFETY: bf16 is set only with `cpu::has_avx512_bf16` (AVX-512 F included).
                    unsafe { x86::acts16::transpose16(&mut t) };
                    for (l, row) in t.iter().enumerate().take(lanes) {
                        let row = lanes_of(*row);
                        out.set8(m0 + l, n0 + c0, row[..8].try_into().unwrap());
                        out.set8(m0 + l, n0 + c0 + 8, row[8..].try_into().unwrap());
                    }
                } else {
                    for c in 0..cols {
                        for (l, y) in lanes_of(acc[at(c0 + c, j)])
                            .into_iter()
                            .enumerate()
                            .take(lanes)
                        {
                            out.set(m0 + l, n0 + c0 + c, y);
                        }
                    }
                }
            }
        }
    }
}

/// The 16 lanes of a vector.
fn lanes_of(v: __m512) -> [f32; 16] {
    // SAFETY: __m512 is 16 f32 (64 bytes, no invalid bit patterns).
    unsafe { std::mem::transmute::<__m512, [f32; 16]>(v) }
}

/// Lanes 0..8.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn low(v: __m512) -> __m256 {
    _mm512_castps512_ps256(v)
}

/// Lanes 0..8 of `v`, lanes 8..16 zero.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn widen(v: __m256) -> __m512 {
    _mm512_zextps256_ps512(v)
}

/// A zero vector.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn zero() -> __m512 {
    _mm512_setzero_ps()
}
