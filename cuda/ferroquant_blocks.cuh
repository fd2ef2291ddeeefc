// ferroquant CUDA: block layouts and shared helpers.
//
// The ggml block structs repeat rust/core/src/formats/blocks.rs field for field (every field a
// byte array, alignment 1), each with a static_assert on its size; tests/test_cuda_compile.py
// parses these asserts and compares them with ferroquant._native.block_struct_sizes(), and NVRTC
// enforces them whenever the kernels compile.
//
// Compiled by NVRTC (ferroquant/cuda.py) with no include path: no host or CUDA headers, the
// fixed-width types are defined here and bf16/fp16 are raw bits converted with PTX `cvt`. (The
// tests also compile it for the host, without __CUDA_ARCH__, behind a small emulation header.)
#pragma once

namespace fq {

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

static_assert(sizeof(u16) == 2 && sizeof(u32) == 4 && sizeof(i64) == 8, "fixed-width types");

#define FQ_QK4_0 32
#define FQ_QK8_0 32
#define FQ_QK4_1 32
#define FQ_QK5_0 32
#define FQ_QK5_1 32
#define FQ_QK4_NL 32
#define FQ_QK_K 256
#define FQ_K_SCALE_SIZE 12

// An IEEE half stored little-endian (ggml_half), as raw bytes so the structs have alignment 1.
typedef u8 half_bytes[2];

struct block_q4_0 {
    half_bytes d;
    u8 qs[FQ_QK4_0 / 2];
};
struct block_q4_1 {
    half_bytes d;
    half_bytes m;
    u8 qs[FQ_QK4_1 / 2];
};
struct block_q5_0 {
    half_bytes d;
    u8 qh[4];
    u8 qs[FQ_QK5_0 / 2];
};
struct block_q5_1 {
    half_bytes d;
    half_bytes m;
    u8 qh[4];
    u8 qs[FQ_QK5_1 / 2];
};
struct block_q8_0 {
    half_bytes d;
    i8 qs[FQ_QK8_0];
};
struct block_q2_K {
    u8 scales[FQ_QK_K / 16];
    u8 qs[FQ_QK_K / 4];
    half_bytes d;
    half_bytes dmin;
};
struct block_q3_K {
    u8 hmask[FQ_QK_K / 8];
    u8 qs[FQ_QK_K / 4];
    u8 scales[12];
    half_bytes d;
};
struct block_q4_K {
    half_bytes d;
    half_bytes dmin;
    u8 scales[FQ_K_SCALE_SIZE];
    u8 qs[FQ_QK_K / 2];
};
struct block_q5_K {
    half_bytes d;
    half_bytes dmin;
    u8 scales[FQ_K_SCALE_SIZE];
    u8 qh[FQ_QK_K / 8];
    u8 qs[FQ_QK_K / 2];
};
struct block_q6_K {
    u8 ql[FQ_QK_K / 2];
    u8 qh[FQ_QK_K / 4];
    i8 scales[FQ_QK_K / 16];
    half_bytes d;
};
struct block_iq4_nl {
    half_bytes d;
    u8 qs[FQ_QK4_NL / 2];
};
struct block_iq4_xs {
    half_bytes d;
    u8 scales_h[2];
    u8 scales_l[FQ_QK_K / 64];
    u8 qs[FQ_QK_K / 2];
};

// One line per struct, `static_assert(sizeof(block_X) == N, ...)`: the test parses these lines.
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl size");
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs size");

// bitsandbytes' NF4 code, index 0..15 (bitsandbytes functional.py, get_4bit_type("nf4")).
#define FQ_NF4_CODE                                                                          \
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,               \
     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,              \
     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, \
     0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

// ---- 16-bit floats as raw bits -------------------------------------------------------------

struct bf16_t {
    u16 bits;
};
struct fp16_t {
    u16 bits;
};

#ifdef __CUDA_ARCH__
__device__ __forceinline__ float f16_to_f32(u16 h) {  // exact
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// Round to nearest even; `lo` lands in the low 16 bits (the lower address).
__device__ __forceinline__ u32 f32x2_to_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 f32x2_to_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u16 f32_to_f16(float a) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ u16 f32_to_bf16(float a) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(a));
    return r;
}
#else  // host build for the tests: the exact decoder; the encoders are never called there
inline float f16_to_f32(u16 h) {
    const u32 s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    const float v = e == 0    ? ldexpf(static_cast<float>(m), -24)
                    : e == 31 ? (m ? __int_as_float(0x7fc00000) : __int_as_float(0x7f800000))
                              : ldexpf(static_cast<float>(m | 1024), static_cast<int>(e) - 25);
    return s ? -v : v;
}
u32 f32x2_to_f16x2(float lo, float hi);
u32 f32x2_to_bf16x2(float lo, float hi);
u16 f32_to_f16(float a);
u16 f32_to_bf16(float a);
#endif

__device__ __forceinline__ float bf16_to_f32(u32 h) {  // exact; h < 2^16
    return __int_as_float(static_cast<int>(h << 16));
}

// ---- helpers -------------------------------------------------------------------------------

// Little-endian ggml_half bits -> float (exact).
__device__ __forceinline__ float half_bits_to_float(u16 bits) { return f16_to_f32(bits); }

// A ggml_half in global memory (p 2-byte aligned), through the read-only cache.
__device__ __forceinline__ float load_half(const u8* p) {
    return half_bits_to_float(__ldg(reinterpret_cast<const u16*>(p)));
}

// 128-bit weight load, streaming (read once: keep it out of L1). p must be 16-byte aligned.
__device__ __forceinline__ uint4 load_weights16(const u8* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}

// 128-bit read-only load through the texture/L1 path (activations, statistics).
__device__ __forceinline__ uint4 load_ro16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// (u - off) as a float, exactly, for 0 <= u < 2^23 and a small constant off, without I2F (a
// quarter-rate instruction on sm_80/sm_90 that would bound the 4-bit decoders): the float with
// bits 0x4B000000 | u is 2^23 + u.
template <int off>
__device__ __forceinline__ float int_minus(u32 u) {
    return __fsub_rn(__int_as_float(static_cast<int>(0x4B000000u | u)), 8388608.0f + off);
}

__device__ __forceinline__ u8 byte_of(const uint4& v, int i) {
    const u32 w = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
    return static_cast<u8>(w >> (8 * (i & 3)));
}

// ---- activation types ----------------------------------------------------------------------

template <class T>
struct Act;

template <>
struct Act<bf16_t> {
    __device__ static __forceinline__ float2 to_float2(u32 bits) {
        return make_float2(bf16_to_f32(bits & 0xffffu), bf16_to_f32(bits >> 16));
    }
    __device__ static __forceinline__ u32 from_float2(float a, float b) {
        return f32x2_to_bf16x2(a, b);
    }
    __device__ static __forceinline__ bf16_t from_float(float a) { return {f32_to_bf16(a)}; }
};

template <>
struct Act<fp16_t> {
    __device__ static __forceinline__ float2 to_float2(u32 bits) {
        return make_float2(f16_to_f32(static_cast<u16>(bits & 0xffffu)),
                           f16_to_f32(static_cast<u16>(bits >> 16)));
    }
    __device__ static __forceinline__ u32 from_float2(float a, float b) {
        return f32x2_to_f16x2(a, b);
    }
    __device__ static __forceinline__ fp16_t from_float(float a) { return {f32_to_f16(a)}; }
};

// Eight consecutive activations (one 128-bit load) as floats.
template <class T>
__device__ __forceinline__ void load8(const T* p, float out[8]) {
    const uint4 v = load_ro16(p);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = Act<T>::to_float2(w[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Eight floats rounded to T and stored with one 128-bit store (p 16-byte aligned).
template <class T>
__device__ __forceinline__ void store8(T* p, const float v[8]) {
    uint4 o;
    o.x = Act<T>::from_float2(v[0], v[1]);
    o.y = Act<T>::from_float2(v[2], v[3]);
    o.z = Act<T>::from_float2(v[4], v[5]);
    o.w = Act<T>::from_float2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = o;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

}  // namespace fq
