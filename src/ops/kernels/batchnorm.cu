// Batch norm in training mode on CUDA (see src/ops/bn_cuda.rs, which launches these kernels).
//
// The input is viewed as (B, C, S) with S = H*W (S = 1 for a (B, C) input), N = B*S values per
// channel, E = B*C*S values in all. Activations are T = f32, bf16 or f16; every statistic, sum and
// coefficient is f32 or f64.
//
// Statistics (two launches): bn_stats_partial_T runs a (C, P) grid, block (c, p) summing x - shift
// and (x - shift)^2 over the p-th chunk of channel c's N values (f32 per thread, f32 tree in the
// block, shift = the channel's first value so a large mean does not cancel digits), written as f64;
// bn_stats_finalize (one thread per channel) adds the P partials in f64 and writes (3, C) rows
// mean, biased variance, 1/sqrt(var + eps).
//
// Forward (one launch): y = act((x - mean) * (scale*gamma*invstd) + scale*beta + r).
//
// Backward (three launches): bn_bwd_partial_T / bn_bwd_finalize reduce sum(dy') and
// sum(dy' * (x - mean)) per channel the same way, dy' = scale * dy * [y > 0 if relu], and write (6, C)
// rows dgamma = invstd * sum(dy' (x - mean)), dbeta = sum(dy'), and the coefficients of
// dx = a*dy' + c1*(x - mean) + c0 (a = gamma*invstd, c1 = -a*invstd*dgamma/N, c0 = -a*dbeta/N) plus
// the mean; bn_bwd_dx_T writes dx and/or dz = dy * [y > 0] (the residual's gradient) elementwise.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Walks the flat indices i, i + G, i + 2G, ... of a (B, C, S) tensor keeping the position s in the
// plane and the channel c without a division per step.
struct ChanIter {
    u32 s, c, ds, dc;
    __device__ __forceinline__ ChanIter(u64 i, u64 g, u32 S, u32 C) {
        u64 plane = i / S;
        s = (u32)(i - plane * S);
        c = (u32)(plane % C);
        u64 q = g / S;
        ds = (u32)(g - q * S);
        dc = (u32)(q % C);
    }
    __device__ __forceinline__ void step(u32 S, u32 C) {
        s += ds;
        u32 carry = 0;
        if (s >= S) { s -= S; carry = 1; }
        c += dc + carry;
        if (c >= C) c -= C;
    }
};

// Walks the indices j, j + G, ... of one channel's N = B*S values as (b, s) pairs; offset() is the
// flat index of (b, c, s).
struct PlaneIter {
    u64 b;
    u32 s, ds;
    u64 db;
    __device__ __forceinline__ PlaneIter(u64 j, u32 g, u32 S) {
        b = j / S;
        s = (u32)(j - b * S);
        db = g / S;
        ds = g - (u32)(db * S);
    }
    __device__ __forceinline__ void step(u32 S) {
        s += ds;
        b += db;
        if (s >= S) { s -= S; b += 1; }
    }
    __device__ __forceinline__ u64 offset(u32 c, u32 C, u32 S) const { return (b * C + c) * (u64)S + s; }
};

// Sum of two values over the block (blockDim.x a multiple of 32, at most 1024); the result is
// valid in thread 0.
__device__ __forceinline__ void block_sum2(float &a, float &b) {
    __shared__ float sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    if (warp == 0) {
        a = lane < nw ? sa[lane] : 0.f;
        b = lane < nw ? sb[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, o);
            b += __shfl_down_sync(0xffffffffu, b, o);
        }
    }
}

// The body of the partial-sum kernels. Block (c, p) = (blockIdx.x, blockIdx.y) calls add(o, s1, s2)
// for each of channel c's values j in [p*chunk, min(N, (p+1)*chunk)) (o its flat index), each thread
// on its own f32 accumulators, sums them over the block and returns the block's partials of channel c
// (valid in thread 0, the one to write them): partial + (c*P + p)*K with K values per block.
template <typename F>
__device__ __forceinline__ double *chunk_sums(u32 C, u32 S, u64 N, u64 chunk, double *partial, u32 K, float &s1,
                                              float &s2, F add) {
    const u32 c = blockIdx.x, p = blockIdx.y, P = gridDim.y;
    const u64 start = (u64)p * chunk;
    const u64 end = min(N, start + chunk);
    s1 = 0.f;
    s2 = 0.f;
    if (start + threadIdx.x < end) {
        PlaneIter it(start + threadIdx.x, blockDim.x, S);
        for (u64 j = start + threadIdx.x; j < end; j += blockDim.x) {
            add(it.offset(c, C, S), s1, s2);
            it.step(S);
        }
    }
    block_sum2(s1, s2);
    return partial + ((u64)c * P + p) * K;
}

// The first two of the K partials of each of channel c's P blocks, summed in f64.
__device__ __forceinline__ void sum_partials(const double *partial, u32 c, u32 P, u32 K, double &s1, double &s2) {
    s1 = 0.0;
    s2 = 0.0;
    const double *q = partial + (u64)c * P * K;
    for (u32 p = 0; p < P; ++p) {
        s1 += q[p * K];
        s2 += q[p * K + 1];
    }
}

// The body of the elementwise kernels: body(i, c) for the flat indices i < E this thread covers
// (grid-stride), c the channel of i.
template <typename F>
__device__ __forceinline__ void for_each_value(u32 C, u32 S, u64 E, F body) {
    const u64 g = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= E) return;
    ChanIter it(i, g, S, C);
    for (; i < E; i += g) {
        body(i, it.c);
        it.step(S, C);
    }
}

// Block (c, p) = (blockIdx.x, blockIdx.y): partial[(c*P + p)*3 + {0,1,2}] = sum(x - shift),
// sum((x - shift)^2), shift over channel c's values j in [p*chunk, min(N, (p+1)*chunk)).
template <typename T>
__device__ void stats_partial(const T *x, u32 C, u32 S, u64 N, u64 chunk, double *partial) {
    const float shift = to_f(x[(u64)blockIdx.x * S]);
    float s1, s2;
    double *o = chunk_sums(C, S, N, chunk, partial, 3, s1, s2, [&](u64 i, float &a, float &b) {
        const float d = to_f(x[i]) - shift;
        a += d;
        b += d * d;
    });
    if (threadIdx.x == 0) {
        o[0] = s1;
        o[1] = s2;
        o[2] = shift;
    }
}

// One thread per channel: stats = (3, C) rows mean, biased variance, 1/sqrt(var + eps).
extern "C" __global__ void bn_stats_finalize(const double *partial, u32 C, u32 P, u64 N, double eps, float *stats) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s1, s2;
    sum_partials(partial, c, P, 3, s1, s2);
    const double n = (double)N;
    const double m = s1 / n;
    const double var = fmax(s2 / n - m * m, 0.0);
    stats[c] = (float)(m + partial[(u64)c * P * 3 + 2]);
    stats[C + c] = (float)var;
    stats[2 * C + c] = (float)(1.0 / sqrt(var + eps));
}

// y = act((x - mean) * a + b + r) with a = scale*gamma*invstd, b = scale*beta; r only when has_r.
template <typename T>
__device__ void fwd(const T *x, const float *gamma, const float *beta, const float *stats, const T *r, u32 C, u32 S,
                    u64 E, float scale, int has_r, int relu, T *y) {
    for_each_value(C, S, E, [&](u64 i, u32 c) {
        const float a = scale * gamma[c] * stats[2 * C + c];
        float v = (to_f(x[i]) - stats[c]) * a + scale * beta[c];
        if (has_r) v += to_f(r[i]);
        if (relu) v = fmaxf(v, 0.f);
        y[i] = from_f<T>(v);
    });
}

// partial[(c*P + p)*2 + {0,1}] = sum(dy'), sum(dy' * (x - mean)) over the chunk, as stats_partial.
template <typename T>
__device__ void bwd_partial(const T *x, const T *dy, const T *y, const float *stats, u32 C, u32 S, u64 N, u64 chunk,
                            float scale, int relu, double *partial) {
    const float mean = stats[blockIdx.x];
    float s1, s2;
    double *o = chunk_sums(C, S, N, chunk, partial, 2, s1, s2, [&](u64 i, float &a, float &b) {
        float d = scale * to_f(dy[i]);
        if (relu && !(to_f(y[i]) > 0.f)) d = 0.f;
        a += d;
        b += d * (to_f(x[i]) - mean);
    });
    if (threadIdx.x == 0) {
        o[0] = s1;
        o[1] = s2;
    }
}

// One thread per channel: coef = (6, C) rows dgamma, dbeta, a, c1, c0, mean.
extern "C" __global__ void bn_bwd_finalize(const double *partial, const float *stats, const float *gamma, u32 C, u32 P,
                                           u64 N, float *coef) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s1, s2;
    sum_partials(partial, c, P, 2, s1, s2);
    const double invstd = stats[2 * C + c];
    const double dgamma = s2 * invstd;
    const double a = (double)gamma[c] * invstd;
    const double n = (double)N;
    coef[c] = (float)dgamma;
    coef[C + c] = (float)s1;
    coef[2 * C + c] = (float)a;
    coef[3 * C + c] = (float)(-a * invstd * dgamma / n);
    coef[4 * C + c] = (float)(-a * s1 / n);
    coef[5 * C + c] = stats[c];
}

// dx = a*dy' + c1*(x - mean) + c0 into out[0..E) when write_dx; dz = dy * [y > 0] (dy without
// relu) into out[E..2E) when both are written, out[0..E) when only dz is.
template <typename T>
__device__ void bwd_dx(const T *x, const T *dy, const T *y, const float *coef, u32 C, u32 S, u64 E, float scale,
                       int relu, int write_dx, int write_dz, T *out) {
    T *dz = write_dx ? out + E : out;
    for_each_value(C, S, E, [&](u64 i, u32 c) {
        float d = to_f(dy[i]);
        if (relu && !(to_f(y[i]) > 0.f)) d = 0.f;
        if (write_dz) dz[i] = from_f<T>(d);
        if (write_dx) {
            const float v = coef[2 * C + c] * (scale * d) + coef[3 * C + c] * (to_f(x[i]) - coef[5 * C + c]) +
                            coef[4 * C + c];
            out[i] = from_f<T>(v);
        }
    });
}

#define INSTANTIATE(SUFFIX, T)                                                                                     \
    extern "C" __global__ void bn_stats_partial_##SUFFIX(const T *x, u32 C, u32 S, u64 N, u64 chunk,                \
                                                         double *partial) {                                         \
        stats_partial<T>(x, C, S, N, chunk, partial);                                                              \
    }                                                                                                              \
    extern "C" __global__ void bn_fwd_##SUFFIX(const T *x, const float *gamma, const float *beta, const float *stats, \
                                               const T *r, u32 C, u32 S, u64 E, float scale, int has_r, int relu,   \
                                               T *y) {                                                              \
        fwd<T>(x, gamma, beta, stats, r, C, S, E, scale, has_r, relu, y);                                           \
    }                                                                                                              \
    extern "C" __global__ void bn_bwd_partial_##SUFFIX(const T *x, const T *dy, const T *y, const float *stats, u32 C, \
                                                       u32 S, u64 N, u64 chunk, float scale, int relu,              \
                                                       double *partial) {                                           \
        bwd_partial<T>(x, dy, y, stats, C, S, N, chunk, scale, relu, partial);                                      \
    }                                                                                                              \
    extern "C" __global__ void bn_bwd_dx_##SUFFIX(const T *x, const T *dy, const T *y, const float *coef, u32 C,      \
                                                  u32 S, u64 E, float scale, int relu, int write_dx, int write_dz,  \
                                                  T *out) {                                                         \
        bwd_dx<T>(x, dy, y, coef, C, S, E, scale, relu, write_dx, write_dz, out);                                   \
    }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE(f16, __half)
