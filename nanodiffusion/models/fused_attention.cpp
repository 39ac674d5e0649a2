// Fused attention for the CPU: softmax(q k^T * scale) v over bfloat16 or float32 heads, with the
// products' sums, the scores and the softmax in float32, one head and a few query rows at a
// time, so no score ever leaves the core's caches. Built by fused_attention.py with g++ for one
// of three instruction sets: AVX512-BF16 (bfloat16 and float32: vdpbf16ps sums two bfloat16
// products into a float32 lane), AVX-512 alone (float32), or those and AMX (bfloat16 heads on
// AMX's tiles: the "amx" section below), and loaded with ctypes: plain C++,
// no torch headers. Its threads are OpenMP's: the library links libgomp.so.1, which in a torch
// process is torch's own (the same soname), so the kernel runs on torch's thread pool, never
// beside it.
//
// The code is written over a float32 vector of L lanes (`vf`, AVX-512's 16) and the few
// operations below it (an AVX2 build of 8 lanes, 6 rows at a time, ran 138-161 GFLOP/s in
// float32 on a Zen 5 limited to AVX2, about torch's kernel there: not taken). Per head, keys
// and values are first packed so that each product step multiplies P elements (P = 2 for
// bfloat16's pairs, 1 for float32) into L lanes:
//   kp[s / NK][d2][s % NK][P] = k[s][P d2 .. P d2 + P - 1]  (scores: q's P elements broadcast,
//                                  L keys a vector; a block of NK keys is one piece of memory)
//   vp[s2][d][P] = v[P s2 .. P s2 + P - 1][d]  (output: p's P elements broadcast, L dims a vector)
// zero-padded to SP keys (a multiple of NK) and HP dims (a multiple of L). (Keys laid out
// kp[d2][s][P] were read SP elements apart, 16 KB at 4096 float32 keys, all in one set of the
// L1 cache: 4096 x 40 float32 heads took 229 ms against 218 blocked, 256 x 160 4.3 against
// 3.5.) Then for each MR
// query rows: scores (MR x SP, float32, in L2), each row's max, p = exp(scores - max) (in
// bfloat16 rounded as torch's kernel rounds it before its second product), the row sums in
// float32, and the output's product, divided by the sums.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_math.h"
#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#include "amx_tiles.h"
#endif

namespace {

#if defined(__AVX512F__)
typedef __m512 vf;
constexpr int L = 16;     // float32 lanes of a vector
constexpr int MR = 8;     // query rows at a time
constexpr int WMAX = 3;   // output vectors per row at a time
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline void vstore_n(float* p, vf x, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), x);
}
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vfmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }
inline float vsum(vf x) { return _mm512_reduce_add_ps(x); }
inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
// all ones in the lanes where a >= b, else zero; and its use: x in those lanes, else 0
inline vf vge(vf a, vf b) {
    return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ)));
}
inline vf vand(vf x, vf m) { return _mm512_and_ps(x, m); }
inline vf vbcast32(int32_t w) { return _mm512_castsi512_ps(_mm512_set1_epi32(w)); }
// x where key j + lane <= last, else -inf
inline vf vkeep(vf x, int j, int last) {
    const __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(j), _mm512_setr_epi32(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm512_mask_blend_ps(_mm512_cmple_epi32_mask(keys, _mm512_set1_epi32(last)),
                                _mm512_set1_ps(-INFINITY), x);
}
#else
#error "fused_attention.cpp needs AVX-512"
#endif

constexpr int NK = 2 * L;  // keys per step of the scores' product (two vectors)
constexpr int KC = 64;     // keys per partial sum of the output product

typedef uint16_t bf16;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// n elements on a 64-byte boundary (a cache line: a vector or tile row never straddles two)
template <typename T> struct Buffer {
    T* p = nullptr;
    size_t n = 0;
    Buffer() = default;
    explicit Buffer(size_t count) { resize(count); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() { std::free(p); }
    void resize(size_t count) {
        std::free(p);
        n = count;
        p = static_cast<T*>(std::aligned_alloc(64, (sizeof(T) * count + 63) / 64 * 64));
    }
    T* data() const { return p; }
    void fill(T x) { std::fill(p, p + n, x); }
};

// 2^x for x <= 0, float32-accurate (avx512_math.h); exactly 0 below -126, where 2^x is no
// longer a normal float (a masked key's -inf too). Were it 2^-126 there, a masked key would
// still weigh in (2^-126 times a value near float's max is about 4), and float32 products with
// it would be subnormal: Intel's cores take microcode assists on those (CLIP's causal heads,
// float32, 2 x 12 x 77 x 64: 1.74 ms, the same heads unmasked 0.36 ms).
inline vf exp2_ps(vf x) {
    const vf lo = vset1(-126.0f);
    return vand(nd_math::exp2(vmax(x, lo)), vge(x, lo));
}

// 32 bits at p (one bfloat16 pair or one float32) in every lane
inline vf bcast32(const void* p) {
    int32_t w;
    std::memcpy(&w, p, 4);
    return vbcast32(w);
}

// What differs between the element types: P elements per lane and step, the step's product,
// and how float32 values are stored as elements (L at a time, or the first n).
template <typename E> struct Ops;

#if defined(__AVX512BF16__)
template <> struct Ops<bf16> {
    static constexpr int P = 2;
    static vf dot(vf acc, vf a, vf b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
    // stores x rounded to bfloat16; returns the rounded values (what the products will see)
    static vf store(bf16* p, vf x) {
        __m256bh r = _mm512_cvtneps_pbh(x);
        _mm256_storeu_si256((__m256i*)p, (__m256i)r);
        return _mm512_cvtpbh_ps(r);
    }
    static void store_n(bf16* p, vf x, int n) {
        _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), (__m256i)_mm512_cvtneps_pbh(x));
    }
};
#endif

template <> struct Ops<float> {
    static constexpr int P = 1;
    static vf dot(vf acc, vf a, vf b) { return vfmadd(a, b, acc); }
    static vf store(float* p, vf x) {
        vstore(p, x);
        return x;
    }
    static void store_n(float* p, vf x, int n) { vstore_n(p, x, n); }
};

template <typename E> struct Args {
    const E *q, *k, *v;
    E* out;
    int64_t B, H, T, S, D;
    int64_t qs[3], ks[3], vs[3], os[3];  // strides (elements) of batch, head, token
    float scale;
    int causal;  // key s is masked for query t where s > t (torch's is_causal)
    int threads;
    int D2, HP, SP;  // steps of P over the width, the padded width and key count
    int KD2;         // steps of P a head's packed keys have room for (D2, or AMX's padding)
    E *kp, *vp;      // packed keys and values, per head
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> next_pack{0};
    E* keys(int64_t bh) const { return kp + bh * (int64_t)KD2 * SP * Ops<E>::P; }
    E* values(int64_t bh) const { return vp + bh * (int64_t)SP * HP; }
};

template <typename E> void pack_head(Args<E>& a, int64_t bh) {
    constexpr int P = Ops<E>::P;
    const int64_t b = bh / a.H, h = bh % a.H;
    const E* k = a.k + b * a.ks[0] + h * a.ks[1];
    const E* v = a.v + b * a.vs[0] + h * a.vs[1];
    E* kp = a.keys(bh);
    E* vp = a.values(bh);
    std::memset(kp, 0, sizeof(E) * a.D2 * a.SP * P);
    std::memset(vp, 0, sizeof(E) * a.SP * a.HP);
    for (int64_t s = 0; s < a.S; ++s) {
        const E* ks = k + s * a.ks[2];
        const E* vs = v + s * a.vs[2];
        for (int d = 0; d < a.D; ++d) {
            kp[(((int64_t)(s / NK) * a.D2 + d / P) * NK + s % NK) * P + d % P] = ks[d];
            vp[((s / P) * a.HP + d) * P + s % P] = vs[d];
        }
    }
}

// Scores of MR query rows from t0 (q: MR x D2 x P) against keys [j, j + NK), into sc
// (MR x SP); keys past S (padding), and when causal keys after the row's query, get -inf.
// vmx: the rows' running maxima, lane by lane.
template <typename E>
inline void scores_block(const Args<E>& a, const E* q, const E* kp, float* sc, int j, int64_t t0,
                         vf* vmx) {
    constexpr int P = Ops<E>::P;
    vf acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vzero();
    for (int d2 = 0; d2 < a.D2; ++d2) {
        const E* kk = kp + ((int64_t)(j / NK) * a.D2 + d2) * NK * P;
        vf k0 = vload((const float*)kk), k1 = vload((const float*)(kk + L * P));
        for (int r = 0; r < MR; ++r) {
            vf qq = bcast32(q + (r * a.D2 + d2) * P);
            acc[r][0] = Ops<E>::dot(acc[r][0], qq, k0);
            acc[r][1] = Ops<E>::dot(acc[r][1], qq, k1);
        }
    }
    // one rule for both: a row sees the keys up to its last (S - 1, or its own query if causal)
    for (int r = 0; r < MR; ++r) {
        const int last = (int)(a.causal && t0 + r < a.S - 1 ? t0 + r : a.S - 1);
        vf s0 = vkeep(acc[r][0], j, last), s1 = vkeep(acc[r][1], j + L, last);
        vstore(sc + (int64_t)r * a.SP + j, s0);
        vstore(sc + (int64_t)r * a.SP + j + L, s1);
        vmx[r] = vmax(vmx[r], vmax(s0, s1));
    }
}

// o (MR rows x W L dims from d0, float32) = p (MR x SP) @ v, times the rows' 1 / sums.
template <typename E, int W>
inline void output_block(const Args<E>& a, const E* p, const E* vp, const float* inv,
                         float* o, int d0) {
    constexpr int P = Ops<E>::P;
    vf sum[MR][W], acc[MR][W];
    for (int r = 0; r < MR; ++r)
        for (int w = 0; w < W; ++w) sum[r][w] = vzero();
    // in chunks of KC keys summed apart, then added up: the rounding error grows with KC and
    // S / KC, not with S as one running sum's does
    const int steps = a.SP / P;
    for (int c0 = 0; c0 < steps; c0 += KC / P) {
        const int c1 = c0 + KC / P < steps ? c0 + KC / P : steps;
        for (int r = 0; r < MR; ++r)
            for (int w = 0; w < W; ++w) acc[r][w] = vzero();
        for (int s2 = c0; s2 < c1; ++s2) {
            vf vv[W];
            for (int w = 0; w < W; ++w)
                vv[w] = vload((const float*)(vp + ((int64_t)s2 * a.HP + d0 + L * w) * P));
            for (int r = 0; r < MR; ++r) {
                vf pp = bcast32(p + (int64_t)r * a.SP + P * s2);
                for (int w = 0; w < W; ++w) acc[r][w] = Ops<E>::dot(acc[r][w], pp, vv[w]);
            }
        }
        for (int r = 0; r < MR; ++r)
            for (int w = 0; w < W; ++w) sum[r][w] = vadd(sum[r][w], acc[r][w]);
    }
    for (int r = 0; r < MR; ++r)
        for (int w = 0; w < W; ++w)
            vstore(o + r * a.HP + d0 + L * w, vmul(sum[r][w], vset1(inv[r])));
}

template <typename E> struct Scratch {
    std::vector<float> sc;  // MR x SP scores
    std::vector<E> p;       // MR x SP probabilities
    std::vector<E> q;       // MR x D2 x P queries
    std::vector<float> o;   // MR x HP outputs
};

// The outputs of MR query rows from t0 of head bh (fewer at the end: zero rows compute, unstored).
template <typename E> void rows(Args<E>& a, Scratch<E>& w, int64_t bh, int64_t t0) {
    constexpr int P = Ops<E>::P;
    const int64_t b = bh / a.H, h = bh % a.H;
    const E* kp = a.keys(bh);
    const E* vp = a.values(bh);
    const int n = (int)(a.T - t0 < MR ? a.T - t0 : MR);
    std::fill(w.q.begin(), w.q.end(), (E)0);
    for (int r = 0; r < n; ++r)
        std::memcpy(&w.q[(int64_t)r * a.D2 * P],
                    a.q + b * a.qs[0] + h * a.qs[1] + (t0 + r) * a.qs[2], sizeof(E) * a.D);
    vf vmx[MR];
    for (int r = 0; r < MR; ++r) vmx[r] = vset1(-INFINITY);
    for (int j = 0; j < a.SP; j += NK) scores_block(a, w.q.data(), kp, w.sc.data(), j, t0, vmx);
    // softmax: exp2((s - max) * scale * log2 e) stored as elements; the sums in float32
    const float c = a.scale * 1.4426950408889634f;
    const vf cc = vset1(c);
    float inv[MR];
    for (int r = 0; r < MR; ++r) {
        const vf m = vset1(vhmax(vmx[r]) * c);
        vf sum = vzero();
        const float* sr = w.sc.data() + (int64_t)r * a.SP;
        E* pr = w.p.data() + (int64_t)r * a.SP;
        for (int j = 0; j < a.SP; j += L)
            sum = vadd(sum, Ops<E>::store(pr + j, exp2_ps(vfmsub(vload(sr + j), cc, m))));
        inv[r] = 1.0f / vsum(sum);
    }
    // the output, WMAX vectors of dims at a time, then the rest
    int d0 = 0;
    for (; d0 + WMAX * L <= a.HP; d0 += WMAX * L)
        output_block<E, WMAX>(a, w.p.data(), vp, inv, w.o.data(), d0);
    if (a.HP - d0 >= 2 * L) output_block<E, 2>(a, w.p.data(), vp, inv, w.o.data(), d0);
    else if (a.HP - d0 == L) output_block<E, 1>(a, w.p.data(), vp, inv, w.o.data(), d0);
    for (int r = 0; r < n; ++r) {
        E* o = a.out + b * a.os[0] + h * a.os[1] + (t0 + r) * a.os[2];
        const float* src = w.o.data() + r * a.HP;
        int d = 0;
        for (; d + L <= a.D; d += L) Ops<E>::store(o + d, vload(src + d));
        if (d < a.D) Ops<E>::store_n(o + d, vload(src + d), (int)(a.D - d));
    }
}

// One thread's share, inside the parallel region: heads to pack, then (once every head is
// packed) blocks of rows, each taken from a shared counter.
template <typename E> void worker(Args<E>& a) {
    const int64_t heads = a.B * a.H;
    for (int64_t i; (i = a.next_pack.fetch_add(1)) < heads;) pack_head(a, i);
#pragma omp barrier
    constexpr int P = Ops<E>::P;
    Scratch<E> w;
    w.sc.resize((size_t)MR * a.SP);
    w.p.resize((size_t)MR * a.SP);
    w.q.resize((size_t)MR * a.D2 * P);
    w.o.resize((size_t)MR * a.HP);
    const int64_t blocks = (a.T + MR - 1) / MR;
    for (int64_t i; (i = a.next.fetch_add(1)) < heads * blocks;)
        rows(a, w, i / blocks, i % blocks * MR);
}

#if defined(__AMX_BF16__)
void amx_worker(Args<bf16>& a);
#endif

template <typename E>
int run(const E* q, const E* k, const E* v, E* out, int64_t B, int64_t H, int64_t T, int64_t S,
        int64_t D, const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* os,
        float scale, int causal, int threads) {
    constexpr int P = Ops<E>::P;
    Args<E> a;
    a.q = q; a.k = k; a.v = v; a.out = out;
    a.B = B; a.H = H; a.T = T; a.S = S; a.D = D;
    for (int i = 0; i < 3; ++i) {
        a.qs[i] = qs[i]; a.ks[i] = ks[i]; a.vs[i] = vs[i]; a.os[i] = os[i];
    }
    a.scale = scale;
    a.causal = causal;
    a.threads = threads < 1 ? 1 : threads;
    a.D2 = (int)((D + P - 1) / P);
    a.HP = round_up((int)D, L);
    a.SP = round_up((int)S, NK);
    a.KD2 = a.D2;
#if defined(__AMX_BF16__)
    if (std::is_same<E, bf16>::value) a.KD2 = round_up(a.D2, 16);  // amx_pairs
#endif
    Buffer<E> kp((size_t)B * H * a.KD2 * a.SP * P);
    Buffer<E> vp((size_t)B * H * a.SP * a.HP);
    a.kp = kp.data();
    a.vp = vp.data();
#if defined(__AMX_BF16__)
    if constexpr (std::is_same<E, bf16>::value) {
#pragma omp parallel num_threads(a.threads)
        amx_worker(a);
        return 0;
    }
#endif
#pragma omp parallel num_threads(a.threads)
    worker<E>(a);
    return 0;
}

#if defined(__AMX_BF16__)
// bfloat16 on AMX's tiles (the "amx" build). The packed values serve as the tiles' B operand as
// they are (a row of vp, a pair of keys x 16 dims, is 64 bytes: one tile row); the keys are
// laid out in blocks of 16 keys with the dims padded to a multiple of 32 (amx_pack_head),
// so that each B tile is 1 KB in one piece. MA query rows at a time, in four groups of a tile's
// 16 rows, each B tile (keys or values, read from L2) serving all four: with 16 rows a time,
// streaming a head's keys and values from L2 for each took most of the time. KA keys at a
// time (what one core's L1 holds of scores and probabilities), as flash attention does:
//   scores: each 16 x 16 key tile, 32 dims at a time;
//   softmax: each row's running max; where a chunk raises it by more than SLACK powers of
//           two (or it is the row's first, or has masked keys), the row's sum and output so
//           far are scaled down by 2^(old - new); p = exp(scores - max) rounded to bfloat16;
//           The rows' sums are of the rounded p, as the output's product sees them: where the
//           head's width leaves padding in its last tile of dims (HP > D: SD 1.5's 40-wide
//           heads) the output's product makes them, the values' first padding dim being 1 at
//           every key (amx_pack_head; ONES), else one vdpbf16ps against ones per 32 p. An
//           unmasked chunk after a row's first is exponentiated in one pass against the max
//           so far (below);
//   output: p (16 x 32 keys) times vp (16 key pairs x 16 dims), a tile of dims at a time,
//           summed in float32 on the tiles, which load the rows' float32 output so far (as
//           the softmax scaled it) and store it back: one running sum over the keys (its error
//           against float64 measured the same as partial sums per chunk added up, and below
//           torch's kernel's; storing each chunk's sums and adding them cost 7% more).
// Tiles do not rename: a tile loaded again waits for the product that reads it, so the A and B
// operands alternate between two tiles each. Tiles: 0, 1, 6, 7 the row groups' float32
// results (16 x 16); 2, 3 A (16 x 32 elements); 4, 5 B (16 pairs x 16).
constexpr int MA = 64;   // query rows at a time: four tiles' rows
constexpr int KA = 128;  // keys at a time
// powers of two by which a chunk's scores may pass the row's running max and still be
// exponentiated against it (amx_rows' one pass): its probabilities then reach up to 2^SLACK,
// far inside bfloat16's and the float32 sums' range, and divide out with the row's sum
constexpr float SLACK = 8.0f;
// the scratch's row strides (floats, elements): 64 bytes past the chunk, so that a tile's 16
// rows do not fall in one set of the L1 cache
constexpr int SROW = KA + 16, PROW = KA + 32;

using nd_amx::configure_tiles;  // amx_tiles.h

// the pairs of dims, padded to whole tiles (16 pairs)
inline int amx_pairs(const Args<bf16>& a) { return a.KD2; }

// ONES: whether the head's width leaves padding in its last tile of dims (HP > D), whose first
// dim the values carry as 1 at every key (amx_pack_head), so that the output's product makes
// the rows' sums (amx_rows<true>)
inline bool ones(const Args<bf16>& a) { return a.HP > a.D; }
constexpr bf16 BF16_ONE = 0x3F80;  // bfloat16 1.0

// Head bh's keys and values packed for the tiles: keys as SP / 16 blocks of (amx_pairs x 16
// pairs), each pair the key's two dims (a.keys(bh): `run` leaves room for the padding); values
// as vp (a pair of keys' dims interleaved, HP wide). Zero past the keys and the dims. Written
// row by row with vector moves (pack_head's element by element took most of a 256-token head's
// time).
void amx_pack_head(Args<bf16>& a, int64_t bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const int d2p = amx_pairs(a);
    uint32_t* kb = reinterpret_cast<uint32_t*>(a.keys(bh));  // pairs
    std::memset(kb, 0, sizeof(uint32_t) * (size_t)d2p * a.SP);
    const bf16* k = a.k + b * a.ks[0] + h * a.ks[1];
    for (int64_t s = 0; s < a.S; ++s) {
        const bf16* src = k + s * a.ks[2];
        uint32_t* dst = kb + (s / 16) * 16 * d2p + s % 16;
        int d2 = 0;
        for (; 2 * d2 + 1 < a.D; ++d2) {
            uint32_t w;
            std::memcpy(&w, src + 2 * d2, 4);
            dst[16 * d2] = w;
        }
        if (2 * d2 < a.D) dst[16 * d2] = src[2 * d2];  // an odd width's last dim, paired with 0
    }
    const bf16* v = a.v + b * a.vs[0] + h * a.vs[1];
    bf16* vp = a.values(bh);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t s2 = 0; s2 < a.SP / 2; ++s2) {
        bf16* dst = vp + s2 * a.HP * 2;
        const bool r0 = 2 * s2 < a.S, r1 = 2 * s2 + 1 < a.S;
        const bf16* v0 = v + 2 * s2 * a.vs[2];
        const bf16* v1 = v0 + a.vs[2];
        for (int d = 0; d < a.HP; d += 16) {
            const int n = a.D - d < 16 ? (int)(a.D - d) : 16;
            const __mmask16 m = n > 0 ? (__mmask16)((1u << n) - 1) : 0;
            const __m256i x = r0 && n > 0 ? _mm256_maskz_loadu_epi16(m, v0 + d) : zero;
            const __m256i y = r1 && n > 0 ? _mm256_maskz_loadu_epi16(m, v1 + d) : zero;
            const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
            _mm256_storeu_si256((__m256i*)(dst + 2 * d), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i*)(dst + 2 * d + 16),
                                _mm256_permute2x128_si256(lo, hi, 0x31));
        }
        if (ones(a)) {  // the padding's first dim 1 at every key
            dst[2 * a.D] = r0 ? BF16_ONE : 0;
            dst[2 * a.D + 1] = r1 ? BF16_ONE : 0;
        }
    }
}

// 2^f for f in [0, 1): avx512_math.h's degree-3 fit (within bfloat16's rounding of p, what the
// output's product sees; the row's sum carries the same error as its p's, so it cancels in
// the division: against float64 the outputs' mean error measured the same as with the degree-4
// fit before it, to 4 digits, and below torch's kernel's)
using nd_math::exp2_fraction_bf16;

// 2^x for x <= 0, -inf too (a masked key): 2^floor(x) (scalef's own rounding of x) times
// exp2_fraction_bf16(x - floor(x)); 0 below -126, where the product is a subnormal or NaN
inline vf exp2_bf16(vf x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, vset1(-126.0f), _CMP_GE_OQ);
    const vf f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_maskz_scalef_ps(keep, exp2_fraction_bf16(f), x);
}

// the same for x > -inf (a vector of no masked key), one comparison less: below -126 the
// product is a subnormal, which amx_worker's flush to zero (MXCSR's FTZ) makes 0
inline vf exp2_bf16_open(vf x) {
    const vf f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_fraction_bf16(f), x);
}

// bfloat16 1.0 in every element: a row's sum of 32 rounded probabilities in one vdpbf16ps
#define ONE_PAIRS ((__m512bh)_mm512_set1_epi16(BF16_ONE))

// tile t (one of 0, 1, 6, 7) += tile a (2 or 3) x tile b (4 or 5), the ids as constants
#define AMX_DP(t, a, b) _tile_dpbf16ps(t, a, b)
// the four row groups' products with B in tile `bt`, A from `q` (row group g at q + g * gs)
#define AMX_GROUPS(bt, q, gs, stride)                                        \
    do {                                                                     \
        _tile_loadd(2, (q), (stride));                                       \
        AMX_DP(0, 2, bt);                                                    \
        _tile_loadd(3, (q) + (gs), (stride));                                \
        AMX_DP(1, 3, bt);                                                    \
        _tile_loadd(2, (q) + 2 * (gs), (stride));                            \
        AMX_DP(6, 2, bt);                                                    \
        _tile_loadd(3, (q) + 3 * (gs), (stride));                            \
        AMX_DP(7, 3, bt);                                                    \
    } while (0)

inline void amx_zero() {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(6);
    _tile_zero(7);
}

// the four row groups' results, (MA x 16) floats from `dst`, rows `stride` bytes apart
inline void amx_store(float* dst, long stride) {
    const long g = 16 * stride / 4;
    _tile_stored(0, dst, stride);
    _tile_stored(1, dst + g, stride);
    _tile_stored(6, dst + 2 * g, stride);
    _tile_stored(7, dst + 3 * g, stride);
}

// sc (MA x 16, row stride SROW) = the scores of MA rows (q: MA x amx_pairs) against the keys
// [j, j + 16) (kp: amx_pack_head's)
inline void amx_scores(const Args<bf16>& a, const bf16* q, const bf16* kp, float* sc, int j) {
    const int d2p = amx_pairs(a);
    const long qstride = 4L * d2p, gs = 32L * d2p;  // gs: a row group's elements
    const bf16* kk = kp + (int64_t)(j / 16) * 32 * d2p;
    amx_zero();
    for (int c = 0; c < d2p / 16; ++c) {
        if (c % 2 == 0) {
            _tile_loadd(4, kk + 512 * c, 64);
            AMX_GROUPS(4, q + 32 * c, gs, qstride);
        } else {
            _tile_loadd(5, kk + 512 * c, 64);
            AMX_GROUPS(5, q + 32 * c, gs, qstride);
        }
    }
    amx_store(sc, 4 * SROW);
}

// o[:, d0 : d0 + 16] += p (MA x the keys [s0, s1), row stride PROW) @ v
inline void amx_output(const Args<bf16>& a, const bf16* p, const bf16* vp, float* o, int d0,
                       int s0, int s1, bool first) {
    const long vstride = 4L * a.HP, gs = 16L * PROW, ostride = 4L * a.HP;
    float* og = o + d0;
    const long g = 16L * a.HP;
    if (first) {  // the rows' first chunk: o holds nothing yet
        amx_zero();
    } else {
        _tile_loadd(0, og, ostride);
        _tile_loadd(1, og + g, ostride);
        _tile_loadd(6, og + 2 * g, ostride);
        _tile_loadd(7, og + 3 * g, ostride);
    }
    for (int s = s0; s < s1; s += 32) {
        const bf16* vv = vp + ((int64_t)(s / 2) * a.HP + d0) * 2;
        if ((s - s0) % 64 == 0) {
            _tile_loadd(4, vv, vstride);
            AMX_GROUPS(4, p + (s - s0), gs, 2 * PROW);
        } else {
            _tile_loadd(5, vv, vstride);
            AMX_GROUPS(5, p + (s - s0), gs, 2 * PROW);
        }
    }
    _tile_stored(0, og, ostride);
    _tile_stored(1, og + g, ostride);
    _tile_stored(6, og + 2 * g, ostride);
    _tile_stored(7, og + 3 * g, ostride);
}

struct AmxScratch {
    Buffer<float> sc;  // 2 x MA x SROW scores of a chunk and the next
    Buffer<bf16> p;    // MA x PROW probabilities of a chunk
    Buffer<bf16> q;    // MA x amx_pairs x 2 queries
    Buffer<float> o;   // MA x HP outputs, unnormalised
};

template <bool ONES>
void amx_rows(Args<bf16>& a, AmxScratch& w, int64_t bh, int64_t t0) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const bf16* kp = a.keys(bh);
    const bf16* vp = a.values(bh);
    const int n = (int)(a.T - t0 < MA ? a.T - t0 : MA);
    // the rows' queries, zero past D (and whole rows of zeros past the last query), 32
    // elements a vector: no fill of the buffer first, no copy call a row; the output rows are
    // not cleared either, the first chunk's product starts from zero tiles (amx_output's
    // `first`). Each of these had cost ~1.6 us a block of rows (4096 queries against 77 keys:
    // 2.8 ms, of which 0.8)
    const int width = amx_pairs(a) * 2;
    for (int r = 0; r < MA; ++r) {
        const bf16* src = a.q + b * a.qs[0] + h * a.qs[1] + (t0 + r) * a.qs[2];
        bf16* dst = w.q.data() + (int64_t)r * width;
        for (int e = 0; e < width; e += 32) {
            const int m = r < n ? std::min<int>(32, std::max<int>(0, (int)a.D - e)) : 0;
            const __mmask32 k = m == 32 ? ~0u : (1u << m) - 1;
            _mm512_storeu_si512(dst + e, _mm512_maskz_loadu_epi16(k, src + e));
        }
    }
    const float c = a.scale * 1.4426950408889634f;
    const vf cc = vset1(c);
    float mx[MA];
    vf sum[MA];  // each row's sum, lane by lane (added up once, at the end)
    int last[MA], seen = 0;  // row r sees keys [0, last[r]]; seen: the last any row sees
    for (int r = 0; r < MA; ++r) {
        mx[r] = -INFINITY;
        sum[r] = vzero();
        last[r] = (int)(a.causal && t0 + r < a.S - 1 ? t0 + r : a.S - 1);
        seen = last[r] > seen ? last[r] : seen;
    }
    // Two chunks' scores: the next chunk's are made a key tile at a time between the rows of
    // this one's softmax, so that the tiles' products run beside its vector code (2 x 8 heads
    // of 4096 x 40, 2 threads: 55 -> 50-52 ms against each chunk's scores made whole before
    // its softmax; the rest of the time is the softmax's vector code and the output's product)
    float* scb[2] = {w.sc.data(), w.sc.data() + (int64_t)MA * SROW};
    for (int j = 0; j < std::min(KA, a.SP); j += 16) amx_scores(a, w.q.data(), kp, scb[0] + j, j);
    int cur = 0;
    for (int s0 = 0; s0 <= seen; s0 += KA, cur ^= 1) {
        const int s1 = s0 + KA < a.SP ? s0 + KA : a.SP;  // a multiple of 32, as SP
        const int n0 = s0 + KA, n1 = n0 + KA < a.SP ? n0 + KA : a.SP;  // the next chunk
        const bool more = n0 <= seen;
        float* nx = scb[cur ^ 1];
        int jn = n0;  // its next key tile to score
        for (int r = 0; r < MA; ++r) {
            if (more && (r & 7) == 7 && jn < n1) {  // KA / 16 tiles over MA rows
                amx_scores(a, w.q.data(), kp, nx + (jn - n0), jn);
                jn += 16;
            }
            float* sr = scb[cur] + (int64_t)r * SROW;
            bf16* pr = w.p.data() + (int64_t)r * PROW;
            if (last[r] < s0) {  // no key of this chunk is seen: p = 0
                std::memset(pr, 0, sizeof(bf16) * (s1 - s0));
                continue;
            }
            // the vectors from `edge` on hold a key past last[r], up to `end`
            const int edge = std::min(s1, (last[r] + 1) / L * L), end = std::min(s1, (last[r] + L) / L * L);
            if (end == s1 && edge == s1 && mx[r] > -INFINITY) {
                // No key of the chunk masked, and a max from the chunks before: one pass,
                // p = exp(score - that max) (two vectors rounded by one instruction) while the
                // chunk's own max is found; only where it passes the old max by more than
                // SLACK powers of two is the chunk done again below, from its own. 2 x 8 heads,
                // 2 threads of an AMX Xeon, against the max pass at every chunk and the sums of
                // the unrounded p in the vector code: 4096 x 40 (the 512 px UNet's first level)
                // 56.0 -> 48.2 ms, 1024 x 80 5.8 -> 5.1, 1024 x 40 4.2 -> 3.5. A row's best key
                // found in such a chunk has its p rounded (the max found first makes it 1,
                // exact): the mean error against float64 1.02-1.13x torch's kernel's, from
                // 0.98-0.99x (SLACK 0, every rise done again: 0.99x, but 4096 x 40 60.2 against
                // 61.6 ms; this pass with the sums of the unrounded p: 1.2x)
                const vf mm = vset1(mx[r] * c);
                vf m = vset1(-INFINITY), acc = sum[r];
                for (int k = s0; k < s1; k += 2 * L) {  // s1 - s0: a multiple of 32
                    const vf x0 = vload(sr + (k - s0)), x1 = vload(sr + (k - s0) + L);
                    m = vmax(m, vmax(x0, x1));
                    const vf e0 = exp2_bf16_open(vfmsub(x0, cc, mm));
                    const vf e1 = exp2_bf16_open(vfmsub(x1, cc, mm));
                    const __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0);
                    _mm512_storeu_si512(pr + (k - s0), (__m512i)pb);
                    if (!ONES) acc = _mm512_dpbf16_ps(acc, pb, ONE_PAIRS);
                }
                if (!_mm512_cmp_ps_mask(m, vset1(mx[r] + SLACK / c), _CMP_GT_OQ)) {
                    sum[r] = acc;
                    continue;
                }
            }
            vf m = vset1(-INFINITY);
            for (int k = s0; k < edge; k += L) m = vmax(m, vload(sr + (k - s0)));
            if (edge < end) {
                vf x = vkeep(vload(sr + (edge - s0)), edge, last[r]);
                vstore(sr + (edge - s0), x);
                m = vmax(m, x);
            }
            // a score above the row's max so far (rare after the first chunks): the row's
            // sum and output so far scaled to the new max
            if (_mm512_cmp_ps_mask(m, vset1(mx[r]), _CMP_GT_OQ)) {
                const float top = vhmax(m);
                if (mx[r] > -INFINITY) {  // else no sum or output yet (o is not cleared)
                    const vf f = vset1(std::exp2((mx[r] - top) * c));
                    sum[r] = vmul(sum[r], f);
                    float* orow = w.o.data() + (int64_t)r * a.HP;
                    for (int d = 0; d < a.HP; d += L) vstore(orow + d, vmul(vload(orow + d), f));
                }
                mx[r] = top;
            }
            const vf mm = vset1(mx[r] * c);
            vf acc = sum[r];
            int k = s0;
            for (; k < edge; k += L) {
                const __m256bh pb = _mm512_cvtneps_pbh(exp2_bf16_open(vfmsub(vload(sr + (k - s0)), cc, mm)));
                _mm256_storeu_si256((__m256i*)(pr + (k - s0)), (__m256i)pb);
                if (!ONES) acc = vadd(acc, _mm512_cvtpbh_ps(pb));
            }
            for (; k < end; k += L) {
                const __m256bh pb = _mm512_cvtneps_pbh(exp2_bf16(vfmsub(vload(sr + (k - s0)), cc, mm)));
                _mm256_storeu_si256((__m256i*)(pr + (k - s0)), (__m256i)pb);
                if (!ONES) acc = vadd(acc, _mm512_cvtpbh_ps(pb));
            }
            sum[r] = acc;
            if (end < s1) std::memset(pr + (end - s0), 0, sizeof(bf16) * (s1 - end));
        }
        for (; more && jn < n1; jn += 16) amx_scores(a, w.q.data(), kp, nx + (jn - n0), jn);
        for (int d0 = 0; d0 < a.HP; d0 += 16)
            amx_output(a, w.p.data(), vp, w.o.data(), d0, s0, s1, s0 == 0);
    }
    for (int r = 0; r < n; ++r) {
        bf16* o = a.out + b * a.os[0] + h * a.os[1] + (t0 + r) * a.os[2];
        const float* src = w.o.data() + (int64_t)r * a.HP;
        const vf iv = vset1(1.0f / (ONES ? src[a.D] : vsum(sum[r])));
        int d = 0;
        for (; d + L <= a.D; d += L) Ops<bf16>::store(o + d, vmul(vload(src + d), iv));
        if (d < a.D) Ops<bf16>::store_n(o + d, vmul(vload(src + d), iv), (int)(a.D - d));
    }
}

void amx_worker(Args<bf16>& a) {
    const int64_t heads = a.B * a.H;
    for (int64_t i; (i = a.next_pack.fetch_add(1)) < heads;) amx_pack_head(a, i);
#pragma omp barrier
    AmxScratch w;
    w.sc.resize((size_t)2 * MA * SROW);
    w.p.resize((size_t)MA * PROW);
    w.q.resize((size_t)MA * amx_pairs(a) * 2);
    w.o.resize((size_t)MA * a.HP);
    configure_tiles();
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ, DAZ
    const int64_t blocks = (a.T + MA - 1) / MA;
    for (int64_t i; (i = a.next.fetch_add(1)) < heads * blocks;)
        if (ones(a)) amx_rows<true>(a, w, i / blocks, i % blocks * MA);
        else amx_rows<false>(a, w, i / blocks, i % blocks * MA);
    _mm_setcsr(csr);
    _tile_release();
}
#endif

}  // namespace

// q, k, v, out: (B, H, T or S, D) with the given strides of their first three dimensions
#if defined(__AVX512BF16__)
extern "C" int nd_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                 int64_t B, int64_t H, int64_t T, int64_t S, int64_t D,
                                 const int64_t* qs, const int64_t* ks, const int64_t* vs,
                                 const int64_t* os, float scale, int causal, int threads) {
    return run<bf16>(q, k, v, out, B, H, T, S, D, qs, ks, vs, os, scale, causal, threads);
}
#endif

#if defined(__AMX_BF16__)
// Asks Linux for this process's use of AMX's tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), as oneDNN does before its AMX kernels: 0 where granted.
extern "C" int nd_amx_init() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 0 : -1; }
#endif

extern "C" int nd_attention_f32(const float* q, const float* k, const float* v, float* out,
                                int64_t B, int64_t H, int64_t T, int64_t S, int64_t D,
                                const int64_t* qs, const int64_t* ks, const int64_t* vs,
                                const int64_t* os, float scale, int causal, int threads) {
    return run<float>(q, k, v, out, B, H, T, S, D, qs, ks, vs, os, scale, causal, threads);
}
