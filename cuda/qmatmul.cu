// ferroquant CUDA: fused dequantize + matmul, y[M, N] = x[M, K] @ W[N, K]^T, W quantized.
//
// One traits struct per weight format and kernel templates over (format, activation type):
//   qgemv     M = 1..16 tokens. A warp owns FQ_ROWS weight rows (a CTA's warps may split K:
//             `ksplit` warps per row group, their sums added in a fixed order through shared
//             memory) and streams each row once with 128-bit loads, FQ_UNROLL lane steps of
//             every row fetched before any is used (FQ_UNROLL * FQ_ROWS independent 16-byte
//             weight loads in flight per lane). Each decoded weight serves all M tokens.
//   qmma      M = 2..16 tokens on tensor cores (mma.sync m16n8k16, weights decoded to bf16/fp16
//             in registers), split-K with a deterministic reduction (qreduce).
//   qdequant  W -> bf16/fp16 [N, K] (for larger M the shim then calls F.linear / cuBLAS).
// extern "C" wrappers (bottom of the file) name every instantiation, so the shim loads kernels by
// plain name: fq_gemv_<fmt>_<act>_m<MT>, fq_mma_<fmt>_<act>, fq_reduce_<act>,
// fq_dequant_<fmt>_<act>.
//
// Weight layouts the kernels read (ferroquant/cuda/qmatmul.py builds them once per weight):
//   nf4   bitsandbytes' packed bytes as stored ([N, K/2], element 2j in the high nibble) and the
//         fp32 absmax per `group` consecutive elements of the flattened weight (a double-quantized
//         checkpoint has its absmax expanded to fp32 once, at load). Needs K % 32 == 0.
//   int8  one int8 per weight ([N, K]) and fp32 scales, one per group of elements (per row, per
//         tensor, or per power-of-two block of a row).
//   ggml  (q4_0, q8_0, q4_K, q5_K, q6_K) the "split" layout: the same bytes as the ggml rows,
//         permuted so each block's quant bytes (QB) come first for the whole matrix and each
//         block's remaining bytes (its "meta": d, dmin, scales, in their original order) after:
//             [ qbits: N * nb * QB bytes ][ meta: N * nb * MB bytes ],  QB + MB = block size.
//         Same size as the ggml data, reversible, and every QB is a multiple of 16, so all quant
//         bytes are read with aligned 128-bit loads (ggml's 18/34/210-byte blocks are not).
// The fp32 statistic of element (row, col) is stats[(row * srs + col) >> sshift] (the shim
// derives srs, sshift from the grouping): a multiply-add and a shift, no integer division.
//
// Each format decodes a lane step into NRUNS runs of RUN values v (small integers, or nf4 code
// values: exact in fp32) with one scale a and, for the K-quants, one min m per run: the weight
// is a * v (- m). qdequant forms exactly that with explicitly rounded operations (__fmul_rn,
// __fsub_rn, never contracted into an FMA), in ggml's / bitsandbytes' order, so it is bit-exact
// with the Rust reference `ferroquant.dequantize` (then rounded to bf16/fp16). qgemv factors the
// scale out of the inner loop: per run p = sum v_i x_i (FMA chain), then acc = fma(a, p, acc)
// and, with a min, acc = fma(-m, sum x_i, acc): one multiply per run instead of one per weight.
// tests/test_cuda_compile.py emulates that order in numpy and checks the host build of these
// kernels against it bit for bit.
#include "ferroquant_blocks.cuh"

namespace fq {

// Everything a format needs to find row `n`'s weights.
struct Ctx {
    const u8* qbits;  // quant bytes, row-major in steps of QB bytes per (row, block)
    const u8* meta;   // per-block metadata (ggml split layout) or fp32 statistics (nf4, int8)
    int K;            // input features (columns of W)
    int nb;           // blocks per row = K / QK
    i64 srs;          // statistics: row stride of the flat element index ...
    int sshift;       // ... and the shift that maps it to the statistic's index
    __device__ __forceinline__ i64 stat(i64 row, int col) const {
        return (row * srs + col) >> sshift;
    }
};

struct NoShared {
    __device__ void init() {}
};

// A 16-bit load through the read-only cache (p 2-byte aligned).
__device__ __forceinline__ u16 load_u16(const u8* p) {
    return __ldg(reinterpret_cast<const u16*>(p));
}

// Every traits struct has: QK (weights per block), QB (quant bytes per block), MB (meta bytes per
// block, ggml), SPB (lane steps per block), NRUNS x RUN (the weights one step decodes: NRUNS runs
// of RUN consecutive columns, RUN a multiple of 8), HAS_MIN (weight = a * v - m rather than
// a * v), col(st, r) (first column of run r of step st within the block), Shared (per-CTA
// tables), Raw (a lane step's loaded bytes), fetch(c, row, b, st, raw) (the global loads only)
// and values(raw, sh, st, v, a, m) (register work only).

struct Fmt_q4_0 {
    static constexpr int QK = 32, QB = 16, MB = 2, SPB = 1, NRUNS = 2, RUN = 16;
    static constexpr bool HAS_MIN = false;
    typedef NoShared Shared;
    struct Raw {
        uint4 v;
        u16 d;
    };
    __device__ static int col(int, int r) { return 16 * r; }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int, Raw& r) {
        const i64 blk = row * c.nb + b;
        r.v = load_weights16(c.qbits + blk * QB);
        r.d = load_u16(c.meta + blk * MB);
    }
    __device__ static void values(const Raw& r, const Shared&, int, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        a[0] = a[1] = half_bits_to_float(r.d);
        m[0] = m[1] = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(r.v, i);
            v[0][i] = int_minus<8>(q & 0xF);
            v[1][i] = int_minus<8>(q >> 4);
        }
    }
};

struct Fmt_q8_0 {
    static constexpr int QK = 32, QB = 32, MB = 2, SPB = 2, NRUNS = 1, RUN = 16;
    static constexpr bool HAS_MIN = false;
    typedef NoShared Shared;
    struct Raw {
        uint4 v;
        u16 d;
    };
    __device__ static int col(int st, int) { return 16 * st; }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int st, Raw& r) {
        const i64 blk = row * c.nb + b;
        r.v = load_weights16(c.qbits + blk * QB + 16 * st);
        r.d = load_u16(c.meta + blk * MB);
    }
    __device__ static void values(const Raw& r, const Shared&, int, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        a[0] = half_bits_to_float(r.d);
        m[0] = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) v[0][i] = int_minus<128>(byte_of(r.v, i) ^ 0x80u);  // int8
    }
};

// ggml's get_scale_min_k4 over the 12 packed 6-bit scales/mins of q4_K / q5_K, read from the
// block's 16 meta bytes in a register (d, dmin, then the scales at bytes 4..15).
__device__ __forceinline__ void scale_min_k4(int j, const uint4& mb, int& d, int& m) {
    if (j < 4) {
        d = byte_of(mb, 4 + j) & 63;
        m = byte_of(mb, 8 + j) & 63;
    } else {
        d = (byte_of(mb, 8 + j) & 0xF) | ((byte_of(mb, j) >> 6) << 4);
        m = (byte_of(mb, 8 + j) >> 4) | ((byte_of(mb, 4 + j) >> 6) << 4);
    }
}

// q4_K / q5_K scales of sub-blocks 2j, 2j + 1 (ggml's order: d * sc, dmin * m).
__device__ __forceinline__ void k4_scales(const uint4& mb, int j, float a[2], float m[2]) {
    const float d = half_bits_to_float(static_cast<u16>(mb.x & 0xffffu));
    const float dmin = half_bits_to_float(static_cast<u16>(mb.x >> 16));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        int sc, mn;
        scale_min_k4(2 * j + h, mb, sc, mn);
        a[h] = __fmul_rn(d, static_cast<float>(sc));
        m[h] = __fmul_rn(dmin, static_cast<float>(mn));
    }
}

// q4_K: qbits = qs[128]; meta = d, dmin, scales[12] (16 bytes, 16-byte aligned in the split
// layout). Step st = 2j + h decodes qs[32j + 16h .. +16]: low nibbles are columns
// 64j + 16h + i, high nibbles 64j + 32 + 16h + i (ggml dequantize_row_q4_K).
struct Fmt_q4_K {
    static constexpr int QK = 256, QB = 128, MB = 16, SPB = 8, NRUNS = 2, RUN = 16;
    static constexpr bool HAS_MIN = true;
    typedef NoShared Shared;
    struct Raw {
        uint4 v, mb;
    };
    __device__ static int col(int st, int r) { return 64 * (st >> 1) + 32 * r + 16 * (st & 1); }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int st, Raw& r) {
        const i64 blk = row * c.nb + b;
        r.v = load_weights16(c.qbits + blk * QB + 32 * (st >> 1) + 16 * (st & 1));
        r.mb = load_ro16(c.meta + blk * MB);  // shared by the block's SPB lanes: cached
    }
    __device__ static void values(const Raw& r, const Shared&, int st, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        k4_scales(r.mb, st >> 1, a, m);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(r.v, i);
            v[0][i] = int_minus<0>(q & 0xF);
            v[1][i] = int_minus<0>(q >> 4);
        }
    }
};

// q5_K: qbits = qh[32] then qs[128]. Step st = 2j + h as for q4_K; the fifth bit of column
// 64j + l is bit 2j of qh[l], of column 64j + 32 + l bit 2j + 1 (ggml dequantize_row_q5_K).
struct Fmt_q5_K {
    static constexpr int QK = 256, QB = 160, MB = 16, SPB = 8, NRUNS = 2, RUN = 16;
    static constexpr bool HAS_MIN = true;
    typedef NoShared Shared;
    struct Raw {
        uint4 vh, v, mb;
    };
    __device__ static int col(int st, int r) { return 64 * (st >> 1) + 32 * r + 16 * (st & 1); }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int st, Raw& r) {
        const i64 blk = row * c.nb + b;
        const u8* qb = c.qbits + blk * QB;
        r.vh = load_weights16(qb + 16 * (st & 1));
        r.v = load_weights16(qb + 32 + 32 * (st >> 1) + 16 * (st & 1));
        r.mb = load_ro16(c.meta + blk * MB);
    }
    __device__ static void values(const Raw& r, const Shared&, int st, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        const int j = st >> 1;
        k4_scales(r.mb, j, a, m);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(r.v, i);
            const int hb = byte_of(r.vh, i);
            const int lo = (q & 0xF) + (((hb >> (2 * j)) & 1) ? 16 : 0);
            const int hi = (q >> 4) + (((hb >> (2 * j + 1)) & 1) ? 16 : 0);
            v[0][i] = int_minus<0>(lo);
            v[1][i] = int_minus<0>(hi);
        }
    }
};

// q6_K: qbits = ql[128] then qh[64]; meta = scales[16] (int8) then d. Step st = 4nh + 2wq + u
// decodes ql[64nh + 32wq + 16u .. +16] with qh[32nh + 16u .. +16]: low nibbles are columns
// 128nh + 32wq + 16u + i (qh bits 2wq, scale 8nh + u + 2wq), high nibbles columns
// 128nh + 64 + 32wq + 16u + i (qh bits 4 + 2wq, scale 8nh + u + 4 + 2wq); value
// d * scale * (q - 32) (ggml dequantize_row_q6_K).
struct Fmt_q6_K {
    static constexpr int QK = 256, QB = 192, MB = 18, SPB = 8, NRUNS = 2, RUN = 16;
    static constexpr bool HAS_MIN = false;
    typedef NoShared Shared;
    struct Raw {
        uint4 vl, vh;
        u16 d;
        i8 slo, shi;
    };
    __device__ static int col(int st, int r) {
        return 128 * (st >> 2) + 64 * r + 32 * ((st >> 1) & 1) + 16 * (st & 1);
    }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int st, Raw& r) {
        const i64 blk = row * c.nb + b;
        const int nh = st >> 2, wq = (st >> 1) & 1, u = st & 1;
        const u8* qb = c.qbits + blk * QB;
        r.vl = load_weights16(qb + 64 * nh + 32 * wq + 16 * u);
        r.vh = load_weights16(qb + 128 + 32 * nh + 16 * u);
        const u8* mb = c.meta + blk * MB;
        const i8* sc = reinterpret_cast<const i8*>(mb);
        r.d = load_u16(mb + 16);
        r.slo = __ldg(sc + 8 * nh + u + 2 * wq);
        r.shi = __ldg(sc + 8 * nh + u + 4 + 2 * wq);
    }
    __device__ static void values(const Raw& r, const Shared&, int st, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        const int wq = (st >> 1) & 1;
        const float d = half_bits_to_float(r.d);
        a[0] = __fmul_rn(d, static_cast<float>(r.slo));
        a[1] = __fmul_rn(d, static_cast<float>(r.shi));
        m[0] = m[1] = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int ql = byte_of(r.vl, i);
            const int qh = byte_of(r.vh, i);
            v[0][i] = int_minus<32>((ql & 0xF) | (((qh >> (2 * wq)) & 3) << 4));
            v[1][i] = int_minus<32>((ql >> 4) | (((qh >> (4 + 2 * wq)) & 3) << 4));
        }
    }
};

// nf4 (bitsandbytes): a pseudo-block of 32 weights = 16 packed bytes; byte i holds element 2i in
// the high nibble and 2i + 1 in the low one; value code[q] * absmax[element / group]. The code
// table sits in shared memory once per bank (code[q][lane]): lane l always reads bank l, so a
// warp's 32 lookups never conflict, whatever the nibbles.
__constant__ float nf4_code[16] = FQ_NF4_CODE;

struct Nf4Shared {
    float code[16][32];
    __device__ void init() {
        for (int i = threadIdx.x; i < 16 * 32; i += blockDim.x) {
            code[i >> 5][i & 31] = nf4_code[i >> 5];
        }
    }
};

struct Fmt_nf4 {
    static constexpr int QK = 32, QB = 16, MB = 0, SPB = 1, NRUNS = 1, RUN = 32;
    static constexpr bool HAS_MIN = false;
    typedef Nf4Shared Shared;
    struct Raw {
        uint4 v;
        float absmax;
    };
    __device__ static int col(int, int) { return 0; }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int, Raw& r) {
        const i64 blk = row * c.nb + b;
        r.v = load_weights16(c.qbits + blk * QB);
        r.absmax = __ldg(reinterpret_cast<const float*>(c.meta) + c.stat(row, b * QK));
    }
    __device__ static void values(const Raw& r, const Shared& sh, int, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        const int lane = threadIdx.x & 31;
        a[0] = r.absmax;
        m[0] = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(r.v, i);
            v[0][2 * i] = sh.code[q >> 4][lane];
            v[0][2 * i + 1] = sh.code[q & 15][lane];
        }
    }
};

// int8: one signed byte per weight, value q * scale (a step's 16 columns share one scale).
struct Fmt_int8 {
    static constexpr int QK = 32, QB = 32, MB = 0, SPB = 2, NRUNS = 1, RUN = 16;
    static constexpr bool HAS_MIN = false;
    typedef NoShared Shared;
    struct Raw {
        uint4 v;
        float scale;
    };
    __device__ static int col(int st, int) { return 16 * st; }
    __device__ static void fetch(const Ctx& c, i64 row, int b, int st, Raw& r) {
        const i64 blk = row * c.nb + b;
        r.v = load_weights16(c.qbits + blk * QB + 16 * st);
        r.scale = __ldg(reinterpret_cast<const float*>(c.meta) + c.stat(row, b * QK + 16 * st));
    }
    __device__ static void values(const Raw& r, const Shared&, int, float v[NRUNS][RUN],
                                  float a[NRUNS], float m[NRUNS]) {
        a[0] = r.scale;
        m[0] = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) v[0][i] = int_minus<128>(byte_of(r.v, i) ^ 0x80u);
    }
};

// The weights of one lane step, a * v (- m) with explicit rounding: the reference's values.
template <class F>
__device__ __forceinline__ void decode(const Ctx& c, const typename F::Shared& sh, i64 row, int b,
                                       int st, float w[F::NRUNS][F::RUN]) {
    typename F::Raw raw;
    F::fetch(c, row, b, st, raw);
    float v[F::NRUNS][F::RUN], a[F::NRUNS], m[F::NRUNS];
    F::values(raw, sh, st, v, a, m);
#pragma unroll
    for (int r = 0; r < F::NRUNS; ++r)
#pragma unroll
        for (int i = 0; i < F::RUN; ++i)
            w[r][i] = F::HAS_MIN ? __fsub_rn(__fmul_rn(a[r], v[r][i]), m[r])
                                 : __fmul_rn(a[r], v[r][i]);
}

// ---- kernels -------------------------------------------------------------------------------

// Tuning knobs (the shim passes -D for variants; benches/gpu_qmatmul.py times them):
#define FQ_GEMV_WARPS 4  // warps per CTA
static_assert(FQ_GEMV_WARPS == 4, "qgemv's row-group arithmetic assumes 4 warps per CTA");
#ifndef FQ_ROWS
#define FQ_ROWS 2  // weight rows per warp: activations loaded once serve FQ_ROWS rows
#endif
#ifndef FQ_UNROLL
#define FQ_UNROLL 2  // lane steps of every row fetched before the first is used
#endif
#define FQ_PRAGMA_(x) _Pragma(#x)
#define FQ_PRAGMA(x) FQ_PRAGMA_(x)

// One lane's partial sums for rows n0 .. n0 + FQ_ROWS - 1 and tokens m < M <= MT: K part
// `part` of `ksplit` takes lane steps part * 32 + lane, then every 32 * ksplit (consecutive
// lanes read consecutive 16-byte pieces of a row). Each round first issues the loads of
// FQ_UNROLL steps of every row, then decodes them and multiplies with every token. Per row,
// token and run (in order): p = fma chain of v_i * x_i, acc = fma(a, p, acc), and for the
// K-quants acc = fma(-m, sx, acc) with sx the plain sum of the run's x_i.
template <class F, class T, int MT>
__device__ __forceinline__ void qgemv_lane(const Ctx& c, const typename F::Shared& sh,
                                           const T* __restrict__ x, int M, int N, int n0,
                                           int lane, int part, int ksplit,
                                           float acc[FQ_ROWS][MT]) {
#pragma unroll
    for (int r = 0; r < FQ_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

    const int steps = c.nb * F::SPB;
    const int stride = 32 * ksplit;
    for (int s0 = part * 32 + lane; s0 < steps; s0 += stride * FQ_UNROLL) {
        typename F::Raw raw[FQ_UNROLL][FQ_ROWS];
#pragma unroll
        for (int u = 0; u < FQ_UNROLL; ++u) {
            const int s = s0 + u * stride;
            if (s < steps) {
#pragma unroll
                for (int r = 0; r < FQ_ROWS; ++r)  // a row past the end (N odd): row N - 1
                    F::fetch(c, min(n0 + r, N - 1), s / F::SPB, s % F::SPB, raw[u][r]);
            }
        }
#pragma unroll
        for (int u = 0; u < FQ_UNROLL; ++u) {
            const int s = s0 + u * stride;
            if (s >= steps) break;
            const int b = s / F::SPB, st = s % F::SPB;
            float v[FQ_ROWS][F::NRUNS][F::RUN], a[FQ_ROWS][F::NRUNS], mn[FQ_ROWS][F::NRUNS];
#pragma unroll
            for (int r = 0; r < FQ_ROWS; ++r) F::values(raw[u][r], sh, st, v[r], a[r], mn[r]);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m >= M) break;
                const T* xm = x + static_cast<i64>(m) * c.K + static_cast<i64>(b) * F::QK;
#pragma unroll
                for (int run = 0; run < F::NRUNS; ++run) {
                    float p[FQ_ROWS], sx = 0.0f;
#pragma unroll
                    for (int r = 0; r < FQ_ROWS; ++r) p[r] = 0.0f;
#pragma unroll
                    for (int q = 0; q < F::RUN / 8; ++q) {
                        float xv[8];
                        load8(xm + F::col(st, run) + 8 * q, xv);
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            if (F::HAS_MIN) sx = __fadd_rn(sx, xv[i]);
#pragma unroll
                            for (int r = 0; r < FQ_ROWS; ++r)
                                p[r] = fmaf(v[r][run][8 * q + i], xv[i], p[r]);
                        }
                    }
#pragma unroll
                    for (int r = 0; r < FQ_ROWS; ++r) {
                        acc[r][m] = fmaf(a[r][run], p[r], acc[r][m]);
                        if (F::HAS_MIN) acc[r][m] = fmaf(-mn[r][run], sx, acc[r][m]);
                    }
                }
            }
        }
    }
}

// y[m, n] for m < M <= MT. A CTA's FQ_GEMV_WARPS warps form FQ_GEMV_WARPS / ksplit row groups of
// FQ_ROWS rows; the `ksplit` warps of a group (ksplit 1, 2 or 4: more warps per row when rows
// are few) take interleaved lane steps, and part 0 adds the parts' warp sums in part order.
// x: [M, K], y: [M, N], both contiguous and 16-byte aligned (the shim checks).
template <class F, class T, int MT>
__device__ __forceinline__ void qgemv(const u8* __restrict__ qbits, const u8* __restrict__ meta,
                                      const T* __restrict__ x, T* __restrict__ y, int M, int N,
                                      int K, i64 srs, int sshift, int ksplit) {
    __shared__ typename F::Shared sh;
    __shared__ float parts[FQ_GEMV_WARPS][FQ_ROWS][MT];
    sh.init();
    __syncthreads();
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kshift = ksplit == 4 ? 2 : ksplit == 2 ? 1 : 0;  // ksplit is 1, 2 or 4
    const int part = warp & (ksplit - 1);
    const int n0 = ((blockIdx.x << (2 - kshift)) + (warp >> kshift)) * FQ_ROWS;
    const bool active = n0 < N;  // whole warps: the shuffles below see all 32 lanes
    float acc[FQ_ROWS][MT];
    if (active) {
        qgemv_lane<F, T, MT>(c, sh, x, M, N, n0, lane, part, ksplit, acc);
    } else {
#pragma unroll
        for (int r = 0; r < FQ_ROWS; ++r)
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    }
#pragma unroll
    for (int r = 0; r < FQ_ROWS; ++r) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum(acc[r][m]);
            if (ksplit > 1) {
                if (lane == 0) parts[warp][r][m] = v;
            } else if (active && lane == 0 && m < M && n0 + r < N) {
                y[static_cast<i64>(m) * N + n0 + r] = Act<T>::from_float(v);
            }
        }
    }
    if (ksplit > 1) {
        __syncthreads();  // ksplit is the same for the whole CTA
        if (part == 0 && active && lane == 0) {
#pragma unroll
            for (int r = 0; r < FQ_ROWS; ++r)
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    float v = parts[warp][r][m];
                    for (int q = 1; q < ksplit; ++q) v = __fadd_rn(v, parts[warp + q][r][m]);
                    if (m < M && n0 + r < N)
                        y[static_cast<i64>(m) * N + n0 + r] = Act<T>::from_float(v);
                }
        }
    }
}

// out[N, K] = W in T, one lane step per thread.
template <class F, class T>
__device__ __forceinline__ void qdequant(const u8* __restrict__ qbits,
                                         const u8* __restrict__ meta, T* __restrict__ out, int N,
                                         int K, i64 srs, int sshift) {
    __shared__ typename F::Shared sh;
    sh.init();
    __syncthreads();
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    const i64 per_row = static_cast<i64>(c.nb) * F::SPB;
    const i64 gid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= per_row * N) return;
    const i64 row = gid / per_row;  // once per thread, not in a loop
    const int s = static_cast<int>(gid - row * per_row);
    const int b = s / F::SPB, st = s % F::SPB;
    float w[F::NRUNS][F::RUN];
    decode<F>(c, sh, row, b, st, w);
    T* o = out + row * K + static_cast<i64>(b) * F::QK;
#pragma unroll
    for (int run = 0; run < F::NRUNS; ++run)
#pragma unroll
        for (int q = 0; q < F::RUN / 8; ++q) store8(o + F::col(st, run) + 8 * q, &w[run][8 * q]);
}

// ---- tensor-core path: M = 2..16 tokens ------------------------------------------------------
//
// qgemv spends K * M fp32 FMAs per weight row on CUDA cores; at M = 16 that outweighs reading the
// weights. qmma decodes each weight once into bf16/fp16 and lets mma.sync.m16n8k16 (fp32
// accumulation) do the products: the tokens are the 16 rows of A (rows >= M are zeros), 8
// weight rows are the 8 columns of B. The 16 "k" slots of one mma may be any 16 columns as long
// as A and B agree: lane (g, t) = (lane / 4, lane % 4) decodes lane step s0 + t of weight row
// n0 + 8i + g (the same steps qgemv reads), and in mma j (j = r * RUN/4 + u) its k slots
// {2t, 2t+1} hold columns col(st, r) + 4u + {0, 1} and {2t+8, 2t+9} columns + {2, 3}; lane
// (g, t) of A loads the same 4 columns of tokens g and g + 8. A warp covers 8 * FQ_MMA_NT rows
// (the A fragments serve every tile) and the lane steps of one K slice (split-K: `per` steps,
// a multiple of 4, per slice); slices write fp32 partial sums to a workspace that qreduce adds
// in slice order (deterministic), or, with one slice, the result directly.
//
// Weights are rounded to the activation type before the products, as the dequantize + cuBLAS
// path rounds them (benches/gpu_qmatmul.py's tolerance for that path applies).
#ifndef FQ_MMA_NT
#define FQ_MMA_NT 2  // 8-row weight tiles per warp
#endif
#define FQ_MMA_WARPS 4

template <class T>
struct Mma;

template <>
struct Mma<bf16_t> {
    __device__ static __forceinline__ void run(float c[4], const u32 a[4], const u32 b[2]) {
#ifdef __CUDA_ARCH__
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};

template <>
struct Mma<fp16_t> {
    __device__ static __forceinline__ void run(float c[4], const u32 a[4], const u32 b[2]) {
#ifdef __CUDA_ARCH__
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};

template <class F>
struct MmaShape {
    static constexpr int J = F::NRUNS * F::RUN / 4;  // mma per lane step
};

// Four consecutive activations (8 bytes, p 8-byte aligned) as two packed pairs.
template <class T>
__device__ __forceinline__ uint2 load4(const T* p) {
    return __ldg(reinterpret_cast<const uint2*>(p));
}

// Lane `lane`'s A and B fragments for lane step `s` (valid: s is inside the warp's K slice;
// otherwise zeros, so the lane adds nothing).
template <class F, class T, int NT>
__device__ __forceinline__ void qmma_fragments(const Ctx& c, const typename F::Shared& sh,
                                               const T* __restrict__ x, int M, int N, int n0,
                                               int s, bool valid, int lane,
                                               u32 a[MmaShape<F>::J][4],
                                               u32 b[NT][MmaShape<F>::J][2]) {
    constexpr int J = MmaShape<F>::J, PER_RUN = F::RUN / 4;
    const int g = lane >> 2;
    const int blk = s / F::SPB, st = s % F::SPB;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
        float w[F::NRUNS][F::RUN];
        if (valid) {
            // A row past the end (N not a multiple of 8 * NT) decodes row N - 1 again; its
            // sums are never stored.
            decode<F>(c, sh, min(n0 + 8 * i + g, N - 1), blk, st, w);
        }
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int r = j / PER_RUN, u = j % PER_RUN;
            b[i][j][0] = valid ? Act<T>::from_float2(w[r][4 * u], w[r][4 * u + 1]) : 0u;
            b[i][j][1] = valid ? Act<T>::from_float2(w[r][4 * u + 2], w[r][4 * u + 3]) : 0u;
        }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int r = j / PER_RUN, u = j % PER_RUN;
        const i64 col = static_cast<i64>(blk) * F::QK + F::col(st, r) + 4 * u;
        const uint2 zero = make_uint2(0u, 0u);
        const uint2 lo = valid && g < M ? load4(x + static_cast<i64>(g) * c.K + col) : zero;
        const uint2 hi =
            valid && g + 8 < M ? load4(x + static_cast<i64>(g + 8) * c.K + col) : zero;
        a[j][0] = lo.x;  // token g, k slots 2t, 2t + 1
        a[j][1] = hi.x;  // token g + 8
        a[j][2] = lo.y;  // token g, k slots 2t + 8, 2t + 9
        a[j][3] = hi.y;
    }
}

// The warps of K slice `split` (0 <= split < splits) for rows n0 .. n0 + 8 * NT - 1.
template <class F, class T>
__device__ __forceinline__ void qmma(const u8* __restrict__ qbits, const u8* __restrict__ meta,
                                     const T* __restrict__ x, T* __restrict__ y,
                                     float* __restrict__ ws, int M, int N, int K, i64 srs,
                                     int sshift,
                                     int per, int splits) {
    constexpr int NT = FQ_MMA_NT, J = MmaShape<F>::J;
    __shared__ typename F::Shared sh;
    sh.init();
    __syncthreads();
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    const int ctas_n = ((N + 8 * NT - 1) / (8 * NT) + FQ_MMA_WARPS - 1) / FQ_MMA_WARPS;
    const int split = blockIdx.x / ctas_n;
    const int warp = (blockIdx.x % ctas_n) * FQ_MMA_WARPS + (threadIdx.x >> 5);
    const int n0 = warp * 8 * NT;
    if (n0 >= N || split >= splits) return;  // whole warps only: mma.sync needs all 32 lanes
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int steps = c.nb * F::SPB;
    const int s_begin = split * per, s_end = min(steps, s_begin + per);
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int s0 = s_begin; s0 < s_end; s0 += 4) {
        u32 a[J][4], b[NT][J][2];
        qmma_fragments<F, T, NT>(c, sh, x, M, N, n0, s0 + t, s0 + t < s_end, lane, a, b);
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
            for (int i = 0; i < NT; ++i) Mma<T>::run(acc[i], a[j], b[i][j]);
    }
    // acc[i] = tokens g (0, 1) and g + 8 (2, 3) at rows n0 + 8i + 2t + (0, 1).
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = g + 8 * (e >> 1), n = n0 + 8 * i + 2 * t + (e & 1);
            if (m < M && n < N) {
                if (splits == 1) {
                    y[static_cast<i64>(m) * N + n] = Act<T>::from_float(acc[i][e]);
                } else {
                    ws[(static_cast<i64>(split) * M + m) * N + n] = acc[i][e];
                }
            }
        }
}

// y = the sum of the `splits` partial results in ws ([splits, M * N] fp32), in slice order.
template <class T>
__device__ __forceinline__ void qreduce(const float* __restrict__ ws, T* __restrict__ y, i64 mn,
                                        int splits) {
    const i64 gid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= mn) return;
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += ws[s * mn + gid];
    y[gid] = Act<T>::from_float(v);
}

}  // namespace fq

// ---- named instantiations (the shim's kernel names) -----------------------------------------
// (FQ_NO_INSTANTIATIONS: tests/test_cuda_compile.py compiles the traits for the host.)
#ifndef FQ_NO_INSTANTIATIONS

#define FQ_GEMV(FMT, ACT, T, MT)                                                              \
    extern "C" __global__ void __launch_bounds__(FQ_GEMV_WARPS * 32)                          \
        fq_gemv_##FMT##_##ACT##_m##MT(const fq::u8* qbits, const fq::u8* meta, const T* x,    \
                                      T* y, int M, int N, int K, long long srs, int sshift,   \
                                      int ksplit) {                                           \
        fq::qgemv<fq::Fmt_##FMT, T, MT>(qbits, meta, x, y, M, N, K, srs, sshift, ksplit);     \
    }

#define FQ_DEQUANT(FMT, ACT, T)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        fq_dequant_##FMT##_##ACT(const fq::u8* qbits, const fq::u8* meta, T* out, int N, int K, \
                                 long long srs, int sshift) {                                 \
        fq::qdequant<fq::Fmt_##FMT, T>(qbits, meta, out, N, K, srs, sshift);                  \
    }

#define FQ_MMA(FMT, ACT, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(FQ_MMA_WARPS * 32)                           \
        fq_mma_##FMT##_##ACT(const fq::u8* qbits, const fq::u8* meta, const T* x, T* y,       \
                             float* ws, int M, int N, int K, long long srs, int sshift,       \
                             int per, int splits) {                                           \
        fq::qmma<fq::Fmt_##FMT, T>(qbits, meta, x, y, ws, M, N, K, srs, sshift, per, splits); \
    }

#define FQ_REDUCE(ACT, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        fq_reduce_##ACT(const float* ws, T* y, long long mn, int splits) {                    \
        fq::qreduce<T>(ws, y, mn, splits);                                                    \
    }
FQ_REDUCE(bf16, fq::bf16_t)
FQ_REDUCE(fp16, fq::fp16_t)

#define FQ_ACT(FMT, ACT, T)   \
    FQ_MMA(FMT, ACT, T)       \
    FQ_GEMV(FMT, ACT, T, 1)   \
    FQ_GEMV(FMT, ACT, T, 2)   \
    FQ_GEMV(FMT, ACT, T, 4)   \
    FQ_GEMV(FMT, ACT, T, 8)   \
    FQ_GEMV(FMT, ACT, T, 16)  \
    FQ_DEQUANT(FMT, ACT, T)

#define FQ_FORMAT(FMT)              \
    FQ_ACT(FMT, bf16, fq::bf16_t)   \
    FQ_ACT(FMT, fp16, fq::fp16_t)

// The shim compiles one program per format (-DFQ_ONLY_<fmt>); without a selection, all of them.
#if !defined(FQ_ONLY_nf4) && !defined(FQ_ONLY_int8) && !defined(FQ_ONLY_q4_0) && \
    !defined(FQ_ONLY_q8_0) && !defined(FQ_ONLY_q4_K) && !defined(FQ_ONLY_q5_K) && \
    !defined(FQ_ONLY_q6_K)
#define FQ_ALL_FORMATS 1
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_nf4)
FQ_FORMAT(nf4)
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_int8)
FQ_FORMAT(int8)
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_q4_0)
FQ_FORMAT(q4_0)
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_q8_0)
FQ_FORMAT(q8_0)
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_q4_K)
FQ_FORMAT(q4_K)
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_q5_K)
FQ_FORMAT(q5_K)
#endif
#if defined(FQ_ALL_FORMATS) || defined(FQ_ONLY_q6_K)
FQ_FORMAT(q6_K)
#endif
#endif  // FQ_NO_INSTANTIATIONS
