// A bfloat16 matrix product for few rows on AMX's tiles: y = x w^T + bias, x (M x K), w (N x K,
// a Linear's weight or a channels-last convolution's, as it lies in memory), y (M x N), all
// bfloat16, the sums in float32 and one rounding. For products whose weight is read once
// and used by few rows (SD 1.5's UNet at 4x4 and 8x8: 32 to 128 rows of 1280 to 11520), the
// time is the weight's trip from memory, which oneDNN's kernels made at 7-10 GB/s where the
// two cores read 26. Built by small_gemm.py (fused_attention.build, its "amx" level) and
// loaded with ctypes: plain C++, no torch headers; its threads are OpenMP's (torch's pool).
//
// It computes y^T = w x^T, so that the weight is the tiles' A operand as it lies (16 rows of
// 32 elements a tile, the row stride K), read once, in order, by one thread per block of 32
// of its rows: nothing of it is copied or laid out anew. x is the B operand: packed first,
// per 16 rows, into tiles of 16 pairs of k x 16 rows (a 16 x 16 transpose of 32-bit pairs),
// small beside the weight for these shapes. K goes in chunks of X_CHUNK bytes of x's tiles
// (one chunk where K is short: the text encoder's 768 or 3072 at 154 rows), every block of w
// over a chunk before the next, so that x's chunk stays in the core's L2: at 128 rows of
// 11520, x is 2.9 MB, and read whole for each block it came from L3 (2 threads, AMX Xeon,
// 128 x 11520 -> 1280 with the weight in cache: 2.69 -> 1.93 ms). Within a chunk each 32-row
// block of w goes KC tiles of k at a time (its chunk then stays in L1), each over all the
// rows of x 32 at a time: four 16 x 16 float32 result tiles, loaded from and stored to the
// thread's float32 sums between chunks. The next chunk of w's rows is prefetched a few lines
// before each step of the products (all of them at the chunk's start, and no prefetch at a
// block's end, left each block's first chunk to the memory's latency: the text encoder, whose
// K is one chunk, 30-32 -> 27-29 ms a call on 2 x 77 tokens). At the end the sums are transposed
// back, the bias added, the epilogue applied (an activation, a residual or a gate: Epilogue
// below) and rounded once to bfloat16. (Measured no faster on an AMX Xeon: blocks of 64
// rows of w a B tile; chunks of 8 or 16 k tiles, or of all K; X_CHUNK 512 KB; prefetching
// 2 or 4 chunks ahead, or into L2; w laid out in whole tiles beforehand (faster from cache,
// slower from memory); the next tiles' loads issued between the products that free them.
// Single-threaded, with x and w fixed in L1, the loop runs at 7.6 ns a product against 4.8
// for products alone: the tiles' loads and stores.)
// Tiles: 0-3 results, 4-5 A (w), 6-7 B (x).
//
// A float32 product of at most 32 rows too (nd_small_gemm_f32: sums of outer products on
// AVX-512, below), for float32 convolutions of few output pixels (small_gemm.py's F32_ROWS).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "amx_tiles.h"
#include "avx512_math.h"

namespace {

constexpr int64_t KC = 4;  // k tiles (32 each) at a time: the block's rows stay in L1
// Bytes of x's B tiles per chunk of K: what the core's L2 (2 MB on the AMX Xeon) keeps beside
// the weight's stream and the sums
constexpr int64_t X_CHUNK = 1 << 20;

// k tiles per chunk of K for MB2 blocks of 16 rows of x: X_CHUNK's worth, a multiple of KC
inline int64_t kb_tiles(int64_t MB2) {
    return std::max<int64_t>(KC, X_CHUNK / (1024 * MB2) / KC * KC);
}

typedef uint16_t bf16;

using nd_amx::configure_tiles;  // amx_tiles.h

// r[0..15] transposed in place as a 16 x 16 matrix of 32-bit elements
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // each 128-bit lane of r[i] now holds a 4 x 4 block; gather lanes across groups of four
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

// One k tile of both kernels' 2 x 2 blocks: results 0-3 += the A tiles at a0, a1 (16 rows of 32
// elements, rows `stride` bytes apart) x the B tiles at b0, b1 (pack_rows'). Tiles do not
// rename, so each load waits only on the product before the one that last read its tile.
inline void products_2x2(const bf16* a0, const bf16* a1, int64_t stride, const bf16* b0,
                         const bf16* b1) {
    _tile_loadd(4, a0, stride);
    _tile_loadd(6, b0, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1, stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

// x's rows m0 .. m0 + 15 (those below M; zero past them) packed as K / 32 B tiles, each 16
// pairs of k (its rows) x 16 rows of x (its columns): dst[kt][p][c] = x[m0 + c][32 kt + 2p ..]
void pack_rows(const bf16* x, int64_t xs, int64_t M, int64_t K, int64_t m0, bf16* dst) {
    const int n = M - m0 < 16 ? (int)(M - m0) : 16;
    for (int64_t kt = 0; kt < K / 32; ++kt) {
        __m512i r[16];
        for (int c = 0; c < 16; ++c)
            r[c] = c < n ? _mm512_loadu_si512(x + (m0 + c) * xs + 32 * kt) : _mm512_setzero_si512();
        transpose16(r);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + kt * 512 + p * 32, r[p]);
    }
}

// What store_rows does with a result before its one rounding to bfloat16: y = act(sum + bias)
// op other. bias: N values, float32 or bfloat16 (read as it lies: a bfloat16 layer's bias needs
// no float32 copy at each call); other: a bfloat16 matrix of y's shape (row stride os), added
// (a residual) or multiplied (GEGLU's gate) in float32. ACT_GEGLU (nd_gemm_bf16 only, no op):
// GEGLU whole, y = (x w_h^T + b_h) GELU(x w_g^T + b_g), w's first N / 2 rows w_h, the rest w_g,
// y N / 2 wide.
enum Act { ACT_NONE = 0, ACT_QUICK_GELU = 1, ACT_GELU = 2, ACT_GEGLU = 3 };
enum Op { OP_NONE = 0, OP_ADD = 1, OP_MUL = 2 };
struct Epilogue {
    const void* bias;
    int bias_bf16, act, op;
    const bf16* other;
    int64_t os;
    int64_t half = 0;  // ACT_GEGLU: w_h's rows (w's rows / 2)
};

using nd_math::load_bf16;

// OpenAI CLIP's quick GELU, v sigmoid(1.702 v), as v / (1 + 2^(-1.702 log2(e) v))
inline __m512 quick_gelu(__m512 v) {
    const __m512 e = nd_math::exp2(_mm512_mul_ps(v, _mm512_set1_ps(-1.702f * 1.4426950408889634f)));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// GELU, v (1 + erf(v / sqrt 2)) / 2, erf by Abramowitz and Stegun's 7.1.26 (absolute error
// below 1.5e-7, far within bfloat16's rounding of the result): erf(|z|) = 1 - q, q = p(t)
// exp(-z^2), so GELU = v q / 2 for z < 0 (no cancellation in 1 - (1 - q)) and v (2 - q) / 2
// else. t = 1 / (1 + 0.3275911 |z|) by rcp14 and a Newton step (float32's precision; measured
// no faster than the division it replaced, alone or in GEGLU's epilogue)
inline __m512 gelu(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 d = _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), one);
    __m512 t = _mm512_rcp14_ps(d);
    t = _mm512_fmadd_ps(t, _mm512_fnmadd_ps(d, t, one), t);
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = nd_math::exp2(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.4426950408889634f)));
    const __m512 q = _mm512_mul_ps(p, e);
    const __m512 w = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.0f), q),
                                        _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), q);
    return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), w);
}

// The 16 x 16 float32 results c (rows: n0 .. n0 + 15 of w, columns: rows m0 .. of x)
// transposed, through the epilogue, rounded to bfloat16 into y's rows m0 .. m0 + n - 1
void store_rows(const float* c, const Epilogue& ep, bf16* y, int64_t ys, int64_t n0, int64_t m0,
                int n) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + 16 * i);
    transpose16(r);
    const __m512 b = !ep.bias ? _mm512_setzero_ps()
                     : ep.bias_bf16 ? load_bf16(static_cast<const bf16*>(ep.bias) + n0)
                                    : _mm512_loadu_ps(static_cast<const float*>(ep.bias) + n0);
    for (int i = 0; i < n; ++i) {
        __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[i]), b);
        if (ep.act == ACT_QUICK_GELU) v = quick_gelu(v);
        else if (ep.act == ACT_GELU) v = gelu(v);
        if (ep.op != OP_NONE) {
            const __m512 o = load_bf16(ep.other + (m0 + i) * ep.os + n0);
            v = ep.op == OP_ADD ? _mm512_add_ps(v, o) : _mm512_mul_ps(v, o);
        }
        _mm256_storeu_si256((__m256i*)(y + (m0 + i) * ys + n0), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// float32, at most 32 rows (F32_ROWS): y^T = w x^T as sums of outer products, k by k: w's
// element broadcast (read from w's rows as they lie, 12 of them at a time) times x^T's row of
// 16 or 32 floats (one or two vectors: MV), into 12 x MV accumulators. x^T is packed first
// (K x 16 MV floats, zero past M), and read KCH32 k at a time (the chunk stays in L1) by each
// block of w's rows; each chunk's sums start from zero and are added to the thread's float32
// sums (acc), so that rounding errors grow with KCH32 and K / KCH32, not with K.
constexpr int F32_ROWS = 32;
constexpr int64_t KCH32 = 128;

// x's rows (M of them, zero past M up to 16 MV) transposed: xt[k][m] = x[m][k], 16 x 16 at a time
void pack_t32(const float* x, int64_t xs, int64_t M, int64_t K, int MV, float* xt) {
    const int MP = 16 * MV;
#pragma omp for schedule(static)
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int nk = K - k0 < 16 ? (int)(K - k0) : 16;
        const __mmask16 km = (__mmask16)((1u << nk) - 1);
        for (int mb = 0; mb < MV; ++mb) {
            __m512i r[16];
            for (int c = 0; c < 16; ++c) {
                const int64_t m = 16 * mb + c;
                r[c] = m < M ? _mm512_maskz_loadu_epi32(km, x + m * xs + k0)
                             : _mm512_setzero_si512();
            }
            transpose16(r);
            for (int i = 0; i < nk; ++i) _mm512_storeu_si512(xt + (k0 + i) * MP + 16 * mb, r[i]);
        }
    }
}

// acc[r][v] += the sums over k0 .. k1 of w[r][k] xt[k][16 v ..], for NR rows of w from wr
template <int NR, int MV>
inline void outer_block(const float* wr, int64_t ws, const float* xt, int64_t k0, int64_t k1,
                        float* acc) {
    __m512 c[NR][MV];
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < MV; ++v) c[r][v] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
        __m512 x[MV];
        for (int v = 0; v < MV; ++v) x[v] = _mm512_loadu_ps(xt + k * 16 * MV + 16 * v);
        for (int r = 0; r < NR; ++r) {
            const __m512 a = _mm512_set1_ps(wr[r * ws + k]);
            for (int v = 0; v < MV; ++v) c[r][v] = _mm512_fmadd_ps(a, x[v], c[r][v]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < MV; ++v) {
            float* o = acc + (r * MV + v) * 16;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), c[r][v]));
        }
}

// the float32 product, MV vectors of x^T's rows (M <= 16 MV), inside the parallel region
template <int MV>
void gemm_f32(const float* x, int64_t xs, const float* w, int64_t ws, const float* bias,
              float* y, int64_t ys, int64_t M, int64_t N, int64_t K, float* xt) {
    constexpr int NR = 12;  // rows of w at a time (24 at one vector: slower, 24 streams)
    constexpr int MP = 16 * MV;
    pack_t32(x, xs, M, K, MV, xt);  // ends with omp for's barrier
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t q = N / 4, n0 = 4 * (q * t / T), n1 = 4 * (q * (t + 1) / T);  // 4-row blocks
    float* acc = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * MP * (n1 - n0 + 1)));
    std::fill(acc, acc + MP * (n1 - n0), 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += KCH32) {
        const int64_t k1 = k0 + KCH32 < K ? k0 + KCH32 : K;
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) {
            if (n + 2 * NR <= n1)  // the next block's rows of this chunk on their way
                for (int r = 0; r < NR; ++r)
                    for (int64_t l = k0; l < k1; l += 16)
                        _mm_prefetch((const char*)(w + (n + NR + r) * ws + l), _MM_HINT_T0);
            outer_block<NR, MV>(w + n * ws, ws, xt, k0, k1, acc + (n - n0) * MP);
        }
        for (; n < n1; n += 4) outer_block<4, MV>(w + n * ws, ws, xt, k0, k1, acc + (n - n0) * MP);
    }
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m)
            y[m * ys + n] = acc[(n - n0) * MP + m] + (bias ? bias[n] : 0.0f);
    std::free(acc);
}

}  // namespace

// y (M x N, row stride ys) = act(x (M x K, row stride xs) w^T (w: N x K, row stride ws) + bias)
// op other (Epilogue: bias N values, float32 or, where bias_bf16, bfloat16, or null; act and op
// as the enums; other M x N, row stride os, where op is not OP_NONE); K and N multiples of 32.
// packed: scratch for x's B tiles, room for ceil(M / 32) * 32 * K bfloat16s. 0 on success, -1
// for shapes or epilogues it does not take. Linux must have granted the tiles (small_gemm.py
// asks through fused_attention.amx_permitted).
extern "C" int nd_small_gemm_bf16(const bf16* x, int64_t xs, const bf16* w, int64_t ws,
                                  const void* bias, bf16* y, int64_t ys, int64_t M, int64_t N,
                                  int64_t K, bf16* packed, int threads, int bias_bf16, int act,
                                  int op, const bf16* other, int64_t os) {
    if (K % 32 || N % 32 || M <= 0 || act < ACT_NONE || act > ACT_GELU || op < OP_NONE
        || op > OP_MUL || (op != OP_NONE && !other))
        return -1;
    const Epilogue ep{bias, bias_bf16, act, op, other, os};
    // MB2: x's 16-row blocks, even (packed has room: a zero block past the last)
    const int64_t MB = (M + 15) / 16, MB2 = (MB + 1) / 2 * 2, KT = K / 32, NB = N / 32;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < MB2; ++mb)
            pack_rows(x, xs, M, K, 16 * mb, packed + mb * KT * 512);
        configure_tiles();
        // This thread's blocks of w (omp for's static schedule, written out), over K in chunks
        // of KB tiles (kb_tiles): every block runs over one chunk of x before the next, so that
        // x's chunk stays in the core's L2; the sums are then kept for all of the thread's
        // blocks (one block's where K is one chunk).
        const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t nb0 = NB * t / T, nb1 = NB * (t + 1) / T;
        const int64_t KB = kb_tiles(MB2);
        const bool one = KT <= KB;
        const int64_t blocks = one ? 1 : std::max<int64_t>(nb1 - nb0, 1);
        float* acc =
            static_cast<float*>(std::aligned_alloc(64, sizeof(float) * 512 * MB2 * blocks));
        for (int64_t K0 = 0; K0 < KT; K0 += KB) {
            const int64_t K1 = K0 + KB < KT ? K0 + KB : KT;
            for (int64_t nb = nb0; nb < nb1; ++nb) {
                const bf16* a0 = w + 32 * nb * ws;
                const bf16* a1 = a0 + 16 * ws;
                float* sums = one ? acc : acc + (nb - nb0) * 512 * MB2;
                for (int64_t k0 = K0; k0 < K1; k0 += KC) {
                    const int64_t k1 = k0 + KC < K1 ? k0 + KC : K1;
                    // The next chunk of w's rows on its way from memory (this block's, or at
                    // its last the next block's first), its lines spread over this chunk's
                    // products: 32 rows x pn lines, `per` before each step (line = pr pn + pc).
                    const bf16* pa = k1 < K1 ? a0 : nb + 1 < nb1 ? a0 + 32 * ws : nullptr;
                    const int64_t pk = k1 < K1 ? k1 : K0;
                    const int64_t pn = pa ? std::min<int64_t>(KC, K1 - pk) : 0;
                    const int64_t lines = 32 * pn, steps = MB2 / 2 * (k1 - k0);
                    const int64_t per = (lines + steps - 1) / steps;
                    int64_t line = 0, pr = 0, pc = 0;
                    for (int64_t mb = 0; mb < MB2; mb += 2) {
                        // tiles (mb, n 0-15), (mb, 16-31), (mb + 1, ..)
                        float* c = sums + mb * 512;
                        if (k0 == 0) {
                            _tile_zero(0);
                            _tile_zero(1);
                            _tile_zero(2);
                            _tile_zero(3);
                        } else {
                            _tile_loadd(0, c, 64);
                            _tile_loadd(1, c + 512, 64);
                            _tile_loadd(2, c + 256, 64);
                            _tile_loadd(3, c + 768, 64);
                        }
                        const bf16* b0 = packed + mb * KT * 512;
                        const bf16* b1 = b0 + KT * 512;
                        for (int64_t kt = k0; kt < k1; ++kt) {
                            for (const int64_t e = line + per; line < e && line < lines; ++line) {
                                _mm_prefetch((const char*)(pa + pr * ws + 32 * (pk + pc)),
                                             _MM_HINT_T0);
                                if (++pc == pn) {
                                    pc = 0;
                                    ++pr;
                                }
                            }
                            products_2x2(a0 + 32 * kt, a1 + 32 * kt, 2 * ws, b0 + 512 * kt,
                                         b1 + 512 * kt);
                        }
                        _tile_stored(0, c, 64);
                        _tile_stored(1, c + 512, 64);
                        _tile_stored(2, c + 256, 64);
                        _tile_stored(3, c + 768, 64);
                    }
                }
                if (K1 == KT)
                    for (int64_t mb = 0; mb < MB; ++mb) {
                        const int n = M - 16 * mb < 16 ? (int)(M - 16 * mb) : 16;
                        store_rows(sums + mb * 512, ep, y, ys, 32 * nb, 16 * mb, n);
                        store_rows(sums + mb * 512 + 256, ep, y, ys, 32 * nb + 16, 16 * mb, n);
                    }
            }
        }
        std::free(acc);
        _tile_release();
    }
    return 0;
}

namespace {

// Products of many rows (nd_gemm_bf16: past small_gemm.py's MAX_ROWS): y = x w^T, x the tiles'
// A operand as it lies (16 rows of 32 elements a tile, the row stride xs), w their B operand,
// packed by each thread per chunk of W_CHUNK bytes of its rows (N) into the B tiles pack_rows
// makes (the chunk then stays in the core's L2), 2 x 2 result tiles a block of 32 rows x 32
// columns over all of K. The threads share out x's rows where there are more of them than of
// w's (each packs all of w), else w's rows (each reads all of x): one buffer packed by both
// threads, a barrier between its chunks, had cost 8-35% (2048 x 640 -> 2560: 4.1 against 3.7
// ms). A block's epilogue (store_rows' without its transpose) runs a few rows at a time between
// the next block's products, so that the vector code and the tiles' work overlap, the branches
// of its act and op resolved when it is built (block_epilogue). 2 threads of an AMX Xeon, 8192
// x 320 -> 1280 (SD 1.5's GEGLU halves at 512 px): the products alone 2.4 ms, with the
// epilogue after each block 3.4, with GELU 6.1, with the gate multiplied in 7.0; run between:
// 2.9, 4.7 and 4.0 (oneDNN's, in that run's hour: 2.9, 5.3 and 3.2 alone, more in the model).
// ACT_GEGLU computes GEGLU whole: each block's 16 columns of h beside the same 16 of the gate
// (packed next to each other), h GELU(gate) in float32, one rounding: 6.9 ms against 9.5 as
// two products (GELU's, then h's with the gate's bfloat16 read back), the mean error against
// float64 4.4e-3 against 6.0e-3.
constexpr int64_t W_CHUNK = 1 << 20;

// rows r0 .. r1 - 1 of a 32-row block of results (its first row m0 of y, its first column n0):
// c[2 h + j] the tile of rows 16 h .., columns n0 + 16 j .., through the epilogue (store_rows')
// into y
template <int ACT, int OP>
void store_block(const float (*c)[256], const Epilogue& ep, bf16* y, int64_t ys, int64_t n0,
                 int64_t m0, int r0, int r1) {
    if (r0 >= r1) return;
    __m512 b[2];
    for (int j = 0; j < 2; ++j)
        b[j] = !ep.bias ? _mm512_setzero_ps()
               : ep.bias_bf16 ? load_bf16(static_cast<const bf16*>(ep.bias) + n0 + 16 * j)
                              : _mm512_loadu_ps(static_cast<const float*>(ep.bias) + n0 + 16 * j);
    for (int i = r0; i < r1; ++i) {
        __m512 v[2];
        for (int j = 0; j < 2; ++j) {
            v[j] = _mm512_add_ps(_mm512_load_ps(c[2 * (i / 16) + j] + 16 * (i % 16)), b[j]);
            if (ACT == ACT_QUICK_GELU) v[j] = quick_gelu(v[j]);
            else if (ACT == ACT_GELU) v[j] = gelu(v[j]);
            if (OP != OP_NONE) {
                const __m512 o = load_bf16(ep.other + (m0 + i) * ep.os + n0 + 16 * j);
                v[j] = OP == OP_ADD ? _mm512_add_ps(v[j], o) : _mm512_mul_ps(v[j], o);
            }
        }
        _mm512_storeu_si512(y + (m0 + i) * ys + n0, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    }
}

typedef void (*BlockEpilogue)(const float (*)[256], const Epilogue&, bf16*, int64_t, int64_t,
                              int64_t, int, int);

// store_block for ACT_GEGLU: the block's columns n0 .. n0 + 31 are packed ones (nd_gemm_bf16
// packs 16 of w_h's rows, then the same 16 of w_g's), its output 16 columns from n0 / 2; h =
// 16 rows x 16 columns of c[2 h'], the gates c[2 h' + 1] (their bias after w_h's: ep.half)
void store_gated(const float (*c)[256], const Epilogue& ep, bf16* y, int64_t ys, int64_t n0,
                 int64_t m0, int r0, int r1) {
    if (r0 >= r1) return;
    const int64_t o0 = n0 / 2, half = ep.half;
    __m512 b[2];
    for (int j = 0; j < 2; ++j)
        b[j] = !ep.bias ? _mm512_setzero_ps()
               : ep.bias_bf16 ? load_bf16(static_cast<const bf16*>(ep.bias) + o0 + j * half)
                              : _mm512_loadu_ps(static_cast<const float*>(ep.bias) + o0 + j * half);
    for (int i = r0; i < r1; ++i) {
        const float* h = c[2 * (i / 16)] + 16 * (i % 16);
        const __m512 v = _mm512_add_ps(_mm512_load_ps(h), b[0]);
        const __m512 g = gelu(_mm512_add_ps(_mm512_load_ps(h + 256), b[1]));
        _mm256_storeu_si256((__m256i*)(y + (m0 + i) * ys + o0),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, g)));
    }
}

// store_block for the epilogue's act and op, its branches resolved when it is built
template <int ACT>
BlockEpilogue block_epilogue_op(int op) {
    return op == OP_ADD ? store_block<ACT, OP_ADD>
           : op == OP_MUL ? store_block<ACT, OP_MUL> : store_block<ACT, OP_NONE>;
}
BlockEpilogue block_epilogue(const Epilogue& ep) {
    return ep.act == ACT_GEGLU ? store_gated
           : ep.act == ACT_GELU ? block_epilogue_op<ACT_GELU>(ep.op)
           : ep.act == ACT_QUICK_GELU ? block_epilogue_op<ACT_QUICK_GELU>(ep.op)
                                      : block_epilogue_op<ACT_NONE>(ep.op);
}

// the scratch kept by the calling thread for nd_gemm_bf16 (freed when the thread ends): the
// packed chunks of w, then x's last block of rows padded with zero rows (where M is not a
// multiple of 32); null where it was not granted
struct Scratch {
    bf16* buf = nullptr;
    size_t size = 0;
    ~Scratch() { std::free(buf); }
};
bf16* gemm_scratch(size_t elements) {
    static thread_local Scratch s;
    if (elements > s.size) {
        std::free(s.buf);
        const size_t bytes = (elements * sizeof(bf16) + 63) / 64 * 64;
        s.buf = static_cast<bf16*>(std::aligned_alloc(64, bytes));
        s.size = s.buf ? elements : 0;
    }
    return s.buf;
}

}  // namespace

// y (M x N, row stride ys) = act(x (M x K, row stride xs) w^T (w: N x K, row stride ws) + bias)
// op other, as nd_small_gemm_bf16 (the same arguments, `packed` unused) for any M. 0 on
// success, -1 for shapes or epilogues it does not take, -2 where its scratch was not granted.
extern "C" int nd_gemm_bf16(const bf16* x, int64_t xs, const bf16* w, int64_t ws,
                            const void* bias, bf16* y, int64_t ys, int64_t M, int64_t N, int64_t K,
                            bf16* packed, int threads, int bias_bf16, int act, int op,
                            const bf16* other, int64_t os) {
    (void)packed;
    if (K % 32 || N % 32 || M <= 0 || act < ACT_NONE || act > ACT_GEGLU || op < OP_NONE
        || op > OP_MUL || (op != OP_NONE && (!other || act == ACT_GEGLU)))
        return -1;
    const bool gated = act == ACT_GEGLU;
    const Epilogue ep{bias, bias_bf16, act, op, other, os, N / 2};
    const int64_t KT = K / 32, MB = (M + 31) / 32, tail = M % 32;
    // columns a chunk: W_CHUNK's worth, a multiple of 32
    const int64_t NC = std::min<int64_t>(N, std::max<int64_t>(32, W_CHUNK / (2 * K) / 32 * 32));
    bf16* scratch = gemm_scratch((size_t)threads * NC * K + (tail ? 32 * K : 0));
    if (!scratch) return -2;
    bf16* last = scratch + threads * NC * K;  // x's last rows, zero past M
    if (tail) {
        std::memset(last, 0, sizeof(bf16) * 32 * K);
        for (int64_t r = 0; r < tail; ++r)
            std::memcpy(last + r * K, x + (M - tail + r) * xs, sizeof(bf16) * K);
    }
    const bool by_rows = M >= N;
    const BlockEpilogue store = block_epilogue(ep);
#pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        // a block's results are stored to c[cur], and its epilogue runs a few rows at a time
        // between the next block's products (the tiles' work and the vector code side by
        // side: 8192 x 320 -> 1280, 2 threads of an AMX Xeon, the products alone 2.4 ms, with
        // the epilogue after each block's 3.4 ms, with GELU 6.1 ms)
        alignas(64) float c[2][4][256];
        int cur = 0;
        int64_t pn = -1, pm = 0;  // the block waiting for its epilogue: its column, row (none: -1)
        int prows = 0;
        const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
        // this thread's blocks of x's rows and its columns: a share of the rows (each thread
        // packs all of w) where they are more, else of the columns (each reads all of x)
        const int64_t mb0 = by_rows ? MB * t / T : 0, mb1 = by_rows ? MB * (t + 1) / T : MB;
        const int64_t NB = N / 32, n0t = by_rows ? 0 : 32 * (NB * t / T),
                      n1t = by_rows ? N : 32 * (NB * (t + 1) / T);
        bf16* chunk = scratch + t * NC * K;
        for (int64_t n0c = n0t; n0c < n1t; n0c += NC) {
            const int64_t nc = std::min(NC, n1t - n0c);
            for (int64_t nb = 0; nb < nc / 16; ++nb)
                // GEGLU: packed block 2 j is w_h's rows 16 j .., 2 j + 1 w_g's the same
                pack_rows(w, ws, N, K,
                          gated ? (n0c + 16 * nb) / 32 * 16 + (nb % 2) * (N / 2) : n0c + 16 * nb,
                          chunk + nb * KT * 512);
            for (int64_t mb = mb0; mb < mb1; ++mb) {
                const bool part = tail && mb == MB - 1;
                const bf16* a0 = part ? last : x + 32 * mb * xs;
                const int64_t as = part ? K : xs;
                const bf16* a1 = a0 + 16 * as;
                for (int64_t n0 = 0; n0 < nc; n0 += 32) {
                    const bf16* b0 = chunk + (n0 / 16) * KT * 512;
                    const bf16* b1 = b0 + KT * 512;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t kt = 0; kt < KT; ++kt) {
                        products_2x2(a0 + 32 * kt, a1 + 32 * kt, 2 * as, b0 + 512 * kt,
                                     b1 + 512 * kt);
                        if (pn >= 0)
                            store(c[cur ^ 1], ep, y, ys, pn, pm,
                                        std::min<int>(prows, (int)(32 * kt / KT)),
                                        std::min<int>(prows, (int)(32 * (kt + 1) / KT)));
                    }
                    _tile_stored(0, c[cur][0], 64);
                    _tile_stored(1, c[cur][1], 64);
                    _tile_stored(2, c[cur][2], 64);
                    _tile_stored(3, c[cur][3], 64);
                    pn = n0c + n0, pm = 32 * mb, prows = part ? (int)tail : 32;
                    cur ^= 1;
                }
            }
        }
        if (pn >= 0) store(c[cur ^ 1], ep, y, ys, pn, pm, 0, prows);
        _tile_release();
    }
    return 0;
}

// y (M x N, row stride ys) = x (M x K, row stride xs) w^T (w: N x K, row stride ws) + bias
// (N, or null), all float32; M at most F32_ROWS, N a multiple of 4. packed: scratch for x^T,
// room for K x 32 floats. The arguments after threads are the bfloat16 kernel's epilogue: none
// is taken here (all zero). 0 on success, -1 for shapes or epilogues it does not take.
extern "C" int nd_small_gemm_f32(const float* x, int64_t xs, const float* w, int64_t ws,
                                 const float* bias, float* y, int64_t ys, int64_t M, int64_t N,
                                 int64_t K, float* packed, int threads, int bias_bf16, int act,
                                 int op, const void* other, int64_t os) {
    if (M <= 0 || M > F32_ROWS || N % 4 || K <= 0 || bias_bf16 || act || op || other || os)
        return -1;
#pragma omp parallel num_threads(threads)
    {
        if (M <= 16)
            gemm_f32<1>(x, xs, w, ws, bias, y, ys, M, N, K, packed);
        else
            gemm_f32<2>(x, xs, w, ws, bias, y, ys, M, N, K, packed);
    }
    return 0;
}

// The columns of a float32 3x3 convolution (zero padding ph, pw; stride sh, sw) of x, N images
// of H x W x C laid out channels-last (NHWC), for a weight as it lies in a file (OIHW: each
// output channel's row is (c, kh, kw)): out (N OH OW rows of 9 C) with out[m][9 c + t] = tap t
// (kh 3 + kw) of channel c at output pixel m, zero outside the image. small_gemm.py's columns
// for a float32 weight read as it lies, so that no channels-last copy of it is made: the 9
// taps' 16 channels at a time interleaved by masked permutes (9 of them per vector of the
// row), as fast as the channels-last order's plain copies (2 threads, AMX Xeon: 1280
// channels at 8x8, batch 2, 0.23 against 0.24 ms). C a multiple of 16; 0 on success, -1 else.
extern "C" int nd_columns_f32(const float* x, int64_t N, int64_t H, int64_t W, int64_t C,
                              int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t ph,
                              int64_t pw, float* out, int threads) {
    if (C % 16 || C <= 0 || N <= 0 || OH <= 0 || OW <= 0 || sh <= 0 || sw <= 0) return -1;
    // output vector j (16 floats of a 16-channel group's 144) takes lane i from tap
    // (16 j + i) % 9, channel (16 j + i) / 9 of the group
    __m512i idx[9][9];
    __mmask16 msk[9][9];
    for (int j = 0; j < 9; ++j)
        for (int t = 0; t < 9; ++t) {
            alignas(64) int32_t v[16];
            unsigned m = 0;
            for (int i = 0; i < 16; ++i) {
                v[i] = (16 * j + i) / 9;
                if ((16 * j + i) % 9 == t) m |= 1u << i;
            }
            idx[j][t] = _mm512_load_si512(v);
            msk[j][t] = (__mmask16)m;
        }
    const int64_t rows = N * OH * OW;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / (OH * OW), oh = r / OW % OH, ow = r % OW;
        const float* src[9];
        for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw) {
                const int64_t ih = oh * sh + kh - ph, iw = ow * sw + kw - pw;
                src[3 * kh + kw] = ih < 0 || ih >= H || iw < 0 || iw >= W
                                       ? nullptr : x + ((n * H + ih) * W + iw) * C;
            }
        float* o = out + r * 9 * C;
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            __m512 v[9];
            for (int t = 0; t < 9; ++t)
                v[t] = src[t] ? _mm512_loadu_ps(src[t] + c0) : _mm512_setzero_ps();
            for (int j = 0; j < 9; ++j) {
                __m512 y = _mm512_setzero_ps();
                for (int t = 0; t < 9; ++t)
                    y = _mm512_mask_permutexvar_ps(y, msk[j][t], idx[j][t], v[t]);
                _mm512_storeu_ps(o + 9 * c0 + 16 * j, y);
            }
        }
    }
    return 0;
}
