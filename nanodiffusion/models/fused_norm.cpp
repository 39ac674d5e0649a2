// GroupNorm, and GroupNorm then SiLU, over channels-last activations: float32 or bfloat16
// (N, HW, C) rows, C a multiple of 16. Two passes over the input, where torch's GroupNorm and
// an in-place SiLU made five (its statistics, its output, then SiLU's read and write), each
// bfloat16 element converted to float32 and back by the slower generic code. Built by
// fused_norm.py with g++ for AVX-512 (F, BW, DQ; and AVX512-BF16 where the CPU has it, for its
// rounding instruction) and loaded with ctypes: plain C++, no torch
// headers; its threads are OpenMP's, torch's own pool in a torch process (as
// fused_attention.cpp's).
//   statistics: per channel, float32 sums of x and x^2 over blocks of BLOCK rows, added up in
//               float64 per thread and then across threads; each group's mean and variance
//               from its channels' sums (float64: E[x^2] - E[x]^2 loses nothing that matters
//               at these sizes);
//   output:     y = x a + b per channel (a = w / sqrt(var + eps), b = bias - mean a), then
//               SiLU y / (1 + exp(-y)) where asked, in float32 (to float32's precision, or to
//               bfloat16's for a bfloat16 output: silu_bf16), rounded once to the dtype.
// SD 1.5's VAE decoder at 512 px, 1 x 128 x 512 x 512 bfloat16 in place with SiLU (2-core
// Intel Xeon with AMX): 18.2 -> 14.4 ms with silu_bf16 and the one rounding instruction (the
// pass without SiLU 7.8-8.5 ms, a copy 4.4); the decode 1.57-1.64 -> 1.51-1.53 s.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_math.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__)
#error "fused_norm.cpp needs AVX-512 F, BW and DQ"
#endif

namespace {

typedef uint16_t bf16;
constexpr int L = 16;        // float32 lanes
constexpr int BLOCK = 256;   // rows summed in float32 before adding into float64

inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load(const bf16* p) { return nd_math::load_bf16(p); }
inline void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
// rounded to the nearest bfloat16, ties to even (NaN stays NaN: its payload's top bit is set):
// one instruction where the CPU has AVX512-BF16 (fused_norm.py builds for it there), the same
// bits as the integer steps after it
inline void store(bf16* p, __m512 x) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x));
    return;
#endif
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

// 2^f for f in [0, 1) to float32's precision: a degree-5 fit (relative error 1e-7)
inline __m512 exp2_fraction_f32(__m512 f) {
    __m512 p = _mm512_set1_ps(0.0018951072911098906f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.008946214666062526f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05586328265952245f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2401407700917158f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931546200033188f));
    return _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999998957631356f));
}

// 1 + exp(-x): exp(-x) = 2^n 2^f (f in [0, 1), 2^f by `fraction`), -x clamped to [-126, 126]
// (outside it the sigmoid is 0 or 1 to float32's precision)
template <__m512 (*fraction)(__m512)>
inline __m512 one_plus_exp_neg(__m512 x) {
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f));
    z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    const __m512 f = _mm512_reduce_ps(z, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(fraction(f), z));
}

// x / (1 + exp(-x)) to float32's precision: x / d as x r, r = 1 / d from rcp14 and a Newton
// step (relative error ~2^-28; a division is ~10x the cost)
inline __m512 silu(__m512 x) {
    const __m512 d = one_plus_exp_neg<exp2_fraction_f32>(x);
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return _mm512_mul_ps(x, r);
}

// the same to bfloat16's precision, for a result rounded to bfloat16: avx512_math.h's
// degree-3 fit of 2^f (relative error 7.5e-5) and rcp14's reciprocal (2^-14) without the
// Newton step, together far below bfloat16's rounding (2^-9)
inline __m512 silu_bf16(__m512 x) {
    return _mm512_mul_ps(x, _mm512_rcp14_ps(one_plus_exp_neg<nd_math::exp2_fraction_bf16>(x)));
}

template <typename E>
int run(const E* x, E* out, int64_t N, int64_t HW, int64_t C, int64_t G, const float* weight,
        const float* bias, float eps, int with_silu, int threads) {
    const int64_t cg = C / G;
    // per sample and channel: the sums of x and x^2 (float64), then a and b
    std::vector<double> sums((size_t)N * C * 2, 0.0);
    std::vector<float> a((size_t)N * C), b((size_t)N * C);
    const int64_t blocks = (HW + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads)
    {
        std::vector<double> mine((size_t)N * C * 2, 0.0);
        std::vector<float> s(C), q(C);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N * blocks; ++i) {
            const int64_t n = i / blocks, r0 = i % blocks * BLOCK;
            const int64_t r1 = r0 + BLOCK < HW ? r0 + BLOCK : HW;
            std::memset(s.data(), 0, sizeof(float) * C);
            std::memset(q.data(), 0, sizeof(float) * C);
            for (int64_t r = r0; r < r1; ++r) {
                const E* row = x + (n * HW + r) * C;
                for (int64_t c = 0; c < C; c += L) {
                    const __m512 v = load(row + c);
                    store(s.data() + c, _mm512_add_ps(load(s.data() + c), v));
                    store(q.data() + c, _mm512_fmadd_ps(v, v, load(q.data() + c)));
                }
            }
            double* m = mine.data() + n * C * 2;
            for (int64_t c = 0; c < C; ++c) {
                m[2 * c] += s[c];
                m[2 * c + 1] += q[c];
            }
        }
#pragma omp critical
        for (size_t k = 0; k < mine.size(); ++k) sums[k] += mine[k];
#pragma omp barrier
#pragma omp single
        for (int64_t n = 0; n < N; ++n)
            for (int64_t g = 0; g < G; ++g) {
                double s1 = 0, s2 = 0;
                for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
                    s1 += sums[(n * C + c) * 2];
                    s2 += sums[(n * C + c) * 2 + 1];
                }
                const double count = (double)HW * cg, mean = s1 / count;
                const double var = s2 / count - mean * mean;
                const double rstd = 1.0 / std::sqrt((var > 0 ? var : 0) + eps);
                for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
                    const double w = weight ? weight[c] : 1.0, bb = bias ? bias[c] : 0.0;
                    a[n * C + c] = (float)(w * rstd);
                    b[n * C + c] = (float)(bb - mean * w * rstd);
                }
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N * HW; ++i) {
            const int64_t n = i / HW;
            const E* row = x + i * C;
            E* dst = out + i * C;
            const float* an = a.data() + n * C;
            const float* bn = b.data() + n * C;
            if (!with_silu)
                for (int64_t c = 0; c < C; c += L)
                    store(dst + c, _mm512_fmadd_ps(load(row + c), load(an + c), load(bn + c)));
            else
                for (int64_t c = 0; c < C; c += L) {
                    const __m512 y = _mm512_fmadd_ps(load(row + c), load(an + c), load(bn + c));
                    store(dst + c, std::is_same<E, bf16>::value ? silu_bf16(y) : silu(y));
                }
        }
    }
    return 0;
}

}  // namespace

// x, out: (N, HW, C) contiguous (out may be x); weight, bias: C floats, or null
extern "C" int nd_group_norm_f32(const float* x, float* out, int64_t N, int64_t HW, int64_t C,
                                 int64_t G, const float* weight, const float* bias, float eps,
                                 int with_silu, int threads) {
    return run<float>(x, out, N, HW, C, G, weight, bias, eps, with_silu, threads);
}

extern "C" int nd_group_norm_bf16(const bf16* x, bf16* out, int64_t N, int64_t HW, int64_t C,
                                  int64_t G, const float* weight, const float* bias, float eps,
                                  int with_silu, int threads) {
    return run<bf16>(x, out, N, HW, C, G, weight, bias, eps, with_silu, threads);
}
