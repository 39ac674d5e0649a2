// Float32 functions on AVX-512 vectors, shared by the kernels built here (fused_attention.cpp,
// small_gemm.cpp, fused_norm.cpp; fused_attention.build hashes this header with each source).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace nd_math {

// 16 bfloat16s (their bits) widened to float32
inline __m512 load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// 2^f for f in [0, 1) to bfloat16's precision: a degree-3 fit (relative error 7.5e-5, far
// below bfloat16's rounding of what it feeds: the attention's probabilities, a bfloat16 SiLU)
inline __m512 exp2_fraction_bf16(__m512 f) {
    __m512 p = _mm512_set1_ps(0.07802445285768202f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2260673282509298f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958334392765183f));
    return _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999252310222465f));
}

// 2^x, float32-accurate: 2^round(x) (scalef: 0 far below, inf far above) times a degree-6
// polynomial of 2^f on f in [-0.5, 0.5] (Taylor series of exp(f ln 2); error below 2e-7)
inline __m512 exp2(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

}  // namespace nd_math
