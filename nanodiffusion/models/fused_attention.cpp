// Fused attention for the CPU: softmax(q k^T * scale) v over bfloat16 or float32 heads, with the
// products' sums, the scores and the softmax in float32, one head and a few query rows at a
// time, so no score ever leaves the core's caches. Built by fused_attention.py with g++ for one
// of two instruction sets: AVX512-BF16 (bfloat16 and float32: vdpbf16ps sums two bfloat16
// products into a float32 lane) or AVX-512 alone (float32), and loaded with ctypes: plain C++,
// no torch headers. Its threads are OpenMP's: the library links libgomp.so.1, which in a torch
// process is torch's own (the same soname), so the kernel runs on torch's thread pool, never
// beside it.
//
// The code is written over a float32 vector of L lanes (`vf`, AVX-512's 16) and the few
// operations below it (an AVX2 build of 8 lanes, 6 rows at a time, ran 138-161 GFLOP/s in
// float32 on a Zen 5 limited to AVX2, about torch's kernel there: not taken). Per head, keys
// and values are first packed so that each product step multiplies P elements (P = 2 for
// bfloat16's pairs, 1 for float32) into L lanes:
//   kp[d2][s][P] = k[s][P d2 .. P d2 + P - 1]  (scores: q's P elements broadcast, L keys a vector)
//   vp[s2][d][P] = v[P s2 .. P s2 + P - 1][d]  (output: p's P elements broadcast, L dims a vector)
// zero-padded to SP keys (a multiple of NK) and HP dims (a multiple of L). Then for each MR
// query rows: scores (MR x SP, float32, in L2), each row's max, p = exp(scores - max) (in
// bfloat16 rounded as torch's kernel rounds it before its second product), the row sums in
// float32, and the output's product, divided by the sums.
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

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
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vfmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }
inline float vsum(vf x) { return _mm512_reduce_add_ps(x); }
inline float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
inline vf vround(vf x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p 2^n
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

// 2^x for x <= 0, float32-accurate: 2^round(x) times a degree-6 polynomial of 2^f on f in
// [-0.5, 0.5] (Taylor series of exp(f ln 2); error below 2e-7); exactly 0 below -126, where
// 2^x is no longer a normal float (a masked key's -inf too). Were it 2^-126 there, a masked
// key would still weigh in (2^-126 times a value near float's max is about 4), and float32
// products with it would be subnormal: Intel's cores take microcode assists on those (CLIP's
// causal heads, float32, 2 x 12 x 77 x 64: 1.74 ms, the same heads unmasked 0.36 ms).
inline vf exp2_ps(vf x) {
    const vf lo = vset1(-126.0f);
    const vf keep = vge(x, lo);
    x = vmax(x, lo);
    vf n = vround(x);
    vf f = vmul(vsub(x, n), vset1(0.6931471805599453f));
    vf p = vset1(1.0f / 720);
    p = vfmadd(p, f, vset1(1.0f / 120));
    p = vfmadd(p, f, vset1(1.0f / 24));
    p = vfmadd(p, f, vset1(1.0f / 6));
    p = vfmadd(p, f, vset1(0.5f));
    p = vfmadd(p, f, vset1(1.0f));
    p = vfmadd(p, f, vset1(1.0f));
    return vand(vscale2(p, n), keep);
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
    E *kp, *vp;      // packed keys and values, per head
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> next_pack{0};
    E* keys(int64_t bh) const { return kp + bh * (int64_t)D2 * SP * Ops<E>::P; }
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
            kp[((int64_t)(d / P) * a.SP + s) * P + d % P] = ks[d];
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
        const E* kk = kp + ((int64_t)d2 * a.SP + j) * P;
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
    std::unique_ptr<E[]> kp(new E[(size_t)B * H * a.D2 * a.SP * P]);
    std::unique_ptr<E[]> vp(new E[(size_t)B * H * a.SP * a.HP]);
    a.kp = kp.get();
    a.vp = vp.get();
#pragma omp parallel num_threads(a.threads)
    worker<E>(a);
    return 0;
}

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

extern "C" int nd_attention_f32(const float* q, const float* k, const float* v, float* out,
                                int64_t B, int64_t H, int64_t T, int64_t S, int64_t D,
                                const int64_t* qs, const int64_t* ks, const int64_t* vs,
                                const int64_t* os, float scale, int causal, int threads) {
    return run<float>(q, k, v, out, B, H, T, S, D, qs, ks, vs, os, scale, causal, threads);
}
