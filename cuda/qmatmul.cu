// ferroquant CUDA: fused dequantize + matmul, y[M, N] = x[M, K] @ W[N, K]^T, W quantized.
//
// One traits struct per weight format and two kernel templates over (format, activation type):
//   qgemv     M = 1..16 tokens. A warp owns FQ_ROWS weight rows and streams each row once with
//             128-bit loads; every decoded weight is used for all M tokens (fp32 accumulation,
//             warp-shuffle reduction). Activations are read through the read-only cache.
//   qmma      M = 2..16 tokens on tensor cores (mma.sync m16n8k16, weights decoded to bf16/fp16
//             in registers), split-K with a deterministic reduction (qreduce).
//   qdequant  W -> bf16/fp16 [N, K] (for larger M the shim then calls F.linear / cuBLAS).
// extern "C" wrappers (bottom of the file) name every instantiation, so the shim loads kernels by
// plain name: fq_gemv_<fmt>_<act>_m<MT>, fq_mma_<fmt>_<act>, fq_reduce_<act>,
// fq_dequant_<fmt>_<act>.
//
// Weight layouts the kernels read (ferroquant/cuda_ops.py builds them once per weight):
//   nf4   bitsandbytes' packed bytes as stored ([N, K/2], element 2j in the high nibble) and the
//         fp32 absmax per `group` consecutive elements of the flattened weight (a double-quantized
//         checkpoint has its absmax expanded to fp32 once, at load). Needs K % 32 == 0.
//   int8  one int8 per weight ([N, K]) and fp32 scales, one per `group` consecutive elements of
//         the flattened weight (group = K: per row; N*K: per tensor; block size: per block).
//   ggml  (q4_0, q8_0, q4_K, q5_K, q6_K) the "split" layout: the same bytes as the ggml rows,
//         permuted so each block's quant bytes (QB) come first for the whole matrix and each
//         block's remaining bytes (its "meta": d, dmin, scales, in their original order) after:
//             [ qbits: N * nb * QB bytes ][ meta: N * nb * MB bytes ],  QB + MB = block size.
//         Same size as the ggml data, reversible, and every QB is a multiple of 16, so all quant
//         bytes are read with aligned 128-bit loads (ggml's 18/34/210-byte blocks are not).
//
// Dequantized values are computed in ggml's / bitsandbytes' order with explicitly rounded
// operations (__fmul_rn, __fsub_rn: never contracted into an FMA), so qdequant is bit-exact with
// the Rust reference `ferroquant.dequantize` (then rounded to bf16/fp16). The dot products use
// FMA and a different summation order than a CPU matmul: benches/gpu_qmatmul.py derives the
// tolerance.
#include "ferroquant_blocks.cuh"

namespace fq {

// Everything a format needs to find row `n`'s weights.
struct Ctx {
    const u8* qbits;  // quant bytes, row-major in steps of QB bytes per (row, block)
    const u8* meta;   // per-block metadata (ggml split layout) or fp32 statistics (nf4, int8)
    int K;            // input features (columns of W)
    int nb;           // blocks per row = K / QK
    i64 group;        // elements per fp32 statistic (nf4, int8)
};

struct NoShared {
    __device__ void init() {}
};

// Every traits struct has: QK (weights per block), QB (quant bytes per block), MB (meta bytes per
// block, ggml), SPB (lane steps per block), NRUNS x RUN (the weights one step decodes: NRUNS runs
// of RUN consecutive columns, RUN a multiple of 8), col(st, r) (first column of run r of step st
// within the block), Shared (per-CTA tables) and decode(c, sh, row, b, st, w).

struct Fmt_q4_0 {
    static constexpr int QK = 32, QB = 16, MB = 2, SPB = 1, NRUNS = 2, RUN = 16;
    typedef NoShared Shared;
    __device__ static int col(int, int r) { return 16 * r; }
    __device__ static void decode(const Ctx& c, const Shared&, i64 row, int b, int,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const uint4 v = load_weights16(c.qbits + blk * QB);
        const float d = load_half(c.meta + blk * MB);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(v, i);
            w[0][i] = __fmul_rn(int_minus<8>(q & 0xF), d);
            w[1][i] = __fmul_rn(int_minus<8>(q >> 4), d);
        }
    }
};

struct Fmt_q8_0 {
    static constexpr int QK = 32, QB = 32, MB = 2, SPB = 2, NRUNS = 1, RUN = 16;
    typedef NoShared Shared;
    __device__ static int col(int st, int) { return 16 * st; }
    __device__ static void decode(const Ctx& c, const Shared&, i64 row, int b, int st,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const uint4 v = load_weights16(c.qbits + blk * QB + 16 * st);
        const float d = load_half(c.meta + blk * MB);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            w[0][i] = __fmul_rn(int_minus<128>(byte_of(v, i) ^ 0x80u), d);  // int8 value
        }
    }
};

// q4_K / q5_K meta: d, dmin, scales[12] (16 bytes). Read through the read-only cache: the
// SPB lanes that decode one block share it.
__device__ __forceinline__ void k4_scales(const u8* mb, int j, float& d1, float& m1, float& d2,
                                          float& m2) {
    const float d = load_half(mb);
    const float dmin = load_half(mb + 2);
    int sc, mn;
    get_scale_min_k4(2 * j, mb + 4, sc, mn);
    d1 = __fmul_rn(d, static_cast<float>(sc));
    m1 = __fmul_rn(dmin, static_cast<float>(mn));
    get_scale_min_k4(2 * j + 1, mb + 4, sc, mn);
    d2 = __fmul_rn(d, static_cast<float>(sc));
    m2 = __fmul_rn(dmin, static_cast<float>(mn));
}

// q4_K: qbits = qs[128]. Step st = 2j + h decodes qs[32j + 16h .. +16]: low nibbles are columns
// 64j + 16h + i, high nibbles 64j + 32 + 16h + i (ggml dequantize_row_q4_K).
struct Fmt_q4_K {
    static constexpr int QK = 256, QB = 128, MB = 16, SPB = 8, NRUNS = 2, RUN = 16;
    typedef NoShared Shared;
    __device__ static int col(int st, int r) { return 64 * (st >> 1) + 32 * r + 16 * (st & 1); }
    __device__ static void decode(const Ctx& c, const Shared&, i64 row, int b, int st,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const int j = st >> 1, h = st & 1;
        const uint4 v = load_weights16(c.qbits + blk * QB + 32 * j + 16 * h);
        float d1, m1, d2, m2;
        k4_scales(c.meta + blk * MB, j, d1, m1, d2, m2);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(v, i);
            w[0][i] = __fsub_rn(__fmul_rn(d1, int_minus<0>(q & 0xF)), m1);
            w[1][i] = __fsub_rn(__fmul_rn(d2, int_minus<0>(q >> 4)), m2);
        }
    }
};

// q5_K: qbits = qh[32] then qs[128]. Step st = 2j + h as for q4_K; the fifth bit of column
// 64j + l is bit 2j of qh[l], of column 64j + 32 + l bit 2j + 1 (ggml dequantize_row_q5_K).
struct Fmt_q5_K {
    static constexpr int QK = 256, QB = 160, MB = 16, SPB = 8, NRUNS = 2, RUN = 16;
    typedef NoShared Shared;
    __device__ static int col(int st, int r) { return 64 * (st >> 1) + 32 * r + 16 * (st & 1); }
    __device__ static void decode(const Ctx& c, const Shared&, i64 row, int b, int st,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const int j = st >> 1, h = st & 1;
        const u8* qb = c.qbits + blk * QB;
        const uint4 vh = load_weights16(qb + 16 * h);
        const uint4 v = load_weights16(qb + 32 + 32 * j + 16 * h);
        float d1, m1, d2, m2;
        k4_scales(c.meta + blk * MB, j, d1, m1, d2, m2);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int q = byte_of(v, i);
            const int hb = byte_of(vh, i);
            const int lo = (q & 0xF) + (((hb >> (2 * j)) & 1) ? 16 : 0);
            const int hi = (q >> 4) + (((hb >> (2 * j + 1)) & 1) ? 16 : 0);
            w[0][i] = __fsub_rn(__fmul_rn(d1, int_minus<0>(lo)), m1);
            w[1][i] = __fsub_rn(__fmul_rn(d2, int_minus<0>(hi)), m2);
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
    typedef NoShared Shared;
    __device__ static int col(int st, int r) {
        return 128 * (st >> 2) + 64 * r + 32 * ((st >> 1) & 1) + 16 * (st & 1);
    }
    __device__ static void decode(const Ctx& c, const Shared&, i64 row, int b, int st,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const int nh = st >> 2, wq = (st >> 1) & 1, u = st & 1;
        const u8* qb = c.qbits + blk * QB;
        const uint4 vl = load_weights16(qb + 64 * nh + 32 * wq + 16 * u);
        const uint4 vh = load_weights16(qb + 128 + 32 * nh + 16 * u);
        const u8* mb = c.meta + blk * MB;
        const float d = load_half(mb + 16);
        const i8* sc = reinterpret_cast<const i8*>(mb);
        const float dlo = __fmul_rn(d, static_cast<float>(__ldg(sc + 8 * nh + u + 2 * wq)));
        const float dhi = __fmul_rn(d, static_cast<float>(__ldg(sc + 8 * nh + u + 4 + 2 * wq)));
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int ql = byte_of(vl, i);
            const int qh = byte_of(vh, i);
            const u32 lo = (ql & 0xF) | (((qh >> (2 * wq)) & 3) << 4);
            const u32 hi = (ql >> 4) | (((qh >> (4 + 2 * wq)) & 3) << 4);
            w[0][i] = __fmul_rn(dlo, int_minus<32>(lo));
            w[1][i] = __fmul_rn(dhi, int_minus<32>(hi));
        }
    }
};

// nf4 (bitsandbytes): a pseudo-block of 32 weights = 16 packed bytes; byte i holds element 2i in
// the high nibble and 2i + 1 in the low one; value code[q] * absmax[element / group]. The table
// is per byte (both nibbles' codes, one 64-bit shared-memory load per two weights).
__constant__ float nf4_code[16] = FQ_NF4_CODE;

struct Nf4Shared {
    float2 pair[256];
    __device__ void init() {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            pair[i] = make_float2(nf4_code[i >> 4], nf4_code[i & 15]);
        }
    }
};

struct Fmt_nf4 {
    static constexpr int QK = 32, QB = 16, MB = 0, SPB = 1, NRUNS = 1, RUN = 32;
    typedef Nf4Shared Shared;
    __device__ static int col(int, int) { return 0; }
    __device__ static void decode(const Ctx& c, const Shared& sh, i64 row, int b, int,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const uint4 v = load_weights16(c.qbits + blk * QB);
        const float* absmax = reinterpret_cast<const float*>(c.meta);
        const float a = __ldg(absmax + (row * c.K + static_cast<i64>(b) * QK) / c.group);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const float2 p = sh.pair[byte_of(v, i)];
            w[0][2 * i] = __fmul_rn(p.x, a);
            w[0][2 * i + 1] = __fmul_rn(p.y, a);
        }
    }
};

// int8: one signed byte per weight, value q * scale[element / group].
struct Fmt_int8 {
    static constexpr int QK = 32, QB = 32, MB = 0, SPB = 2, NRUNS = 1, RUN = 16;
    typedef NoShared Shared;
    __device__ static int col(int st, int) { return 16 * st; }
    __device__ static void decode(const Ctx& c, const Shared&, i64 row, int b, int st,
                                  float w[NRUNS][RUN]) {
        const i64 blk = row * c.nb + b;
        const uint4 v = load_weights16(c.qbits + blk * QB + 16 * st);
        const float* scales = reinterpret_cast<const float*>(c.meta);
        const float s = __ldg(scales + (row * c.K + static_cast<i64>(b) * QK + 16 * st) / c.group);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            w[0][i] = __fmul_rn(int_minus<128>(byte_of(v, i) ^ 0x80u), s);  // int8 value
        }
    }
};

// ---- kernels -------------------------------------------------------------------------------

// Tuning knobs (the shim passes -D for variants; benches/gpu_qmatmul.py times them):
#define FQ_GEMV_WARPS 4  // warps per CTA
#ifndef FQ_ROWS
#define FQ_ROWS 2  // weight rows per warp: activations loaded once serve FQ_ROWS rows
#endif
#ifndef FQ_UNROLL
#define FQ_UNROLL 1  // lane steps unrolled (more loads in flight, more registers)
#endif
#define FQ_PRAGMA_(x) _Pragma(#x)
#define FQ_PRAGMA(x) FQ_PRAGMA_(x)

// One lane's partial sums for rows n0 .. n0 + FQ_ROWS - 1 and tokens m < M <= MT: the lane
// takes lane steps lane, lane + 32, ... of each row (consecutive lanes read consecutive 16-byte
// pieces of the row), decodes them once and multiplies them with every token's activations.
template <class F, class T, int MT>
__device__ __forceinline__ void qgemv_lane(const Ctx& c, const typename F::Shared& sh,
                                           const T* __restrict__ x, int M, int N, int n0,
                                           int lane, float acc[FQ_ROWS][MT]) {
#pragma unroll
    for (int r = 0; r < FQ_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

    const int steps = c.nb * F::SPB;
    FQ_PRAGMA(unroll FQ_UNROLL)
    for (int s = lane; s < steps; s += 32) {
        const int b = s / F::SPB, st = s % F::SPB;
        float w[FQ_ROWS][F::NRUNS][F::RUN];
#pragma unroll
        for (int r = 0; r < FQ_ROWS; ++r) {
            // A row past the end (N odd) decodes row N - 1 again; its sums are never stored.
            const int n = min(n0 + r, N - 1);
            F::decode(c, sh, n, b, st, w[r]);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m >= M) break;
            const T* xm = x + static_cast<i64>(m) * c.K + static_cast<i64>(b) * F::QK;
#pragma unroll
            for (int run = 0; run < F::NRUNS; ++run) {
#pragma unroll
                for (int q = 0; q < F::RUN / 8; ++q) {
                    float xv[8];
                    load8(xm + F::col(st, run) + 8 * q, xv);
#pragma unroll
                    for (int r = 0; r < FQ_ROWS; ++r)
#pragma unroll
                        for (int i = 0; i < 8; ++i)
                            acc[r][m] = fmaf(w[r][run][8 * q + i], xv[i], acc[r][m]);
                }
            }
        }
    }
}

// y[m, n] for m < M <= MT; a warp owns FQ_ROWS rows. x: [M, K], y: [M, N], both contiguous and
// x 16-byte aligned (the shim checks).
template <class F, class T, int MT>
__device__ __forceinline__ void qgemv(const u8* __restrict__ qbits, const u8* __restrict__ meta,
                                      const T* __restrict__ x, T* __restrict__ y, int M, int N,
                                      int K, i64 group) {
    __shared__ typename F::Shared sh;
    sh.init();
    __syncthreads();
    const Ctx c = {qbits, meta, K, K / F::QK, group};
    const int lane = threadIdx.x & 31;
    const int warp = blockIdx.x * FQ_GEMV_WARPS + (threadIdx.x >> 5);
    const int n0 = warp * FQ_ROWS;
    if (n0 >= N) return;  // whole warps only: the shuffles below see all 32 lanes
    float acc[FQ_ROWS][MT];
    qgemv_lane<F, T, MT>(c, sh, x, M, N, n0, lane, acc);
#pragma unroll
    for (int r = 0; r < FQ_ROWS; ++r) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum(acc[r][m]);
            if (lane == 0 && m < M && n0 + r < N) {
                y[static_cast<i64>(m) * N + n0 + r] = Act<T>::from_float(v);
            }
        }
    }
}

// out[N, K] = W in T, one lane step per thread.
template <class F, class T>
__device__ __forceinline__ void qdequant(const u8* __restrict__ qbits,
                                         const u8* __restrict__ meta, T* __restrict__ out, int N,
                                         int K, i64 group) {
    __shared__ typename F::Shared sh;
    sh.init();
    __syncthreads();
    const Ctx c = {qbits, meta, K, K / F::QK, group};
    const i64 per_row = static_cast<i64>(c.nb) * F::SPB;
    const i64 gid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= per_row * N) return;
    const i64 row = gid / per_row;
    const int s = static_cast<int>(gid - row * per_row);
    const int b = s / F::SPB, st = s % F::SPB;
    float w[F::NRUNS][F::RUN];
    F::decode(c, sh, row, b, st, w);
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
            F::decode(c, sh, min(n0 + 8 * i + g, N - 1), blk, st, w);
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
                                     float* __restrict__ ws, int M, int N, int K, i64 group,
                                     int per, int splits) {
    constexpr int NT = FQ_MMA_NT, J = MmaShape<F>::J;
    __shared__ typename F::Shared sh;
    sh.init();
    __syncthreads();
    const Ctx c = {qbits, meta, K, K / F::QK, group};
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
                                      T* y, int M, int N, int K, long long group) {           \
        fq::qgemv<fq::Fmt_##FMT, T, MT>(qbits, meta, x, y, M, N, K, group);                   \
    }

#define FQ_DEQUANT(FMT, ACT, T)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        fq_dequant_##FMT##_##ACT(const fq::u8* qbits, const fq::u8* meta, T* out, int N, int K, \
                                 long long group) {                                           \
        fq::qdequant<fq::Fmt_##FMT, T>(qbits, meta, out, N, K, group);                        \
    }

#define FQ_MMA(FMT, ACT, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(FQ_MMA_WARPS * 32)                           \
        fq_mma_##FMT##_##ACT(const fq::u8* qbits, const fq::u8* meta, const T* x, T* y,       \
                             float* ws, int M, int N, int K, long long group, int per,        \
                             int splits) {                                                    \
        fq::qmma<fq::Fmt_##FMT, T>(qbits, meta, x, y, ws, M, N, K, group, per, splits);       \
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
