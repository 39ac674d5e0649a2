// Fused attention for the CPU: softmax(q k^T * scale) v over bfloat16 heads, with the products'
// sums, the scores and the softmax in float32, one head and a few query rows at a time, so no
// score ever leaves the core's caches. Built by fused_attention.py with g++ for CPUs with
// AVX512-BF16 (vdpbf16ps: two bfloat16 products summed into a float32 lane) and loaded with
// ctypes: plain C++, no torch headers, its own threads.
//
// Per head, keys and values are first packed for vdpbf16ps, which multiplies pairs:
//   kp[d2][s][2] = k[s][2 d2 .. 2 d2 + 1]   (scores: q's pair broadcast, 16 keys a vector)
//   vp[s2][d][2] = v[2 s2 .. 2 s2 + 1][d]   (output: p's pair broadcast, 16 dims a vector)
// zero-padded to SP keys (a multiple of NK) and HP dims (a multiple of 16). Then for each MR
// query rows: scores (MR x SP, float32, in L2), each row's max, p = exp(scores - max) rounded
// to bfloat16 as torch's kernel rounds it before its second product, the row sums in float32,
// and the output's product, divided by the sums.
#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int MR = 8;   // query rows at a time
constexpr int NK = 32;  // keys per step of the scores' product (two vectors)

typedef uint16_t bf16;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// 2^x for x <= 0 (x >= -126 after clamping), float32-accurate: 2^round(x) times a degree-6
// polynomial of 2^f on f in [-0.5, 0.5] (Taylor series of exp(f ln 2); error below 2e-7).
inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

inline __m512 bcast_pair(const bf16* p) {
    int32_t w;
    std::memcpy(&w, p, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(w));
}

inline __m512 dp(__m512 acc, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

struct Args {
    const bf16 *q, *k, *v;
    bf16* out;
    int64_t B, H, T, S, D;
    int64_t qs[3], ks[3], vs[3], os[3];  // strides (elements) of batch, head, token
    float scale;
    int threads;
    // derived
    int D2, HP, SP;
    bf16 *kp, *vp;  // packed keys and values, per head
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> next_pack{0};
    std::atomic<int> packed{0};
};

void pack_head(Args& a, int64_t bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const bf16* k = a.k + b * a.ks[0] + h * a.ks[1];
    const bf16* v = a.v + b * a.vs[0] + h * a.vs[1];
    bf16* kp = a.kp + bh * (int64_t)a.D2 * a.SP * 2;
    bf16* vp = a.vp + bh * (int64_t)a.SP * a.HP;
    std::memset(kp, 0, sizeof(bf16) * a.D2 * a.SP * 2);
    std::memset(vp, 0, sizeof(bf16) * a.SP * a.HP);
    for (int64_t s = 0; s < a.S; ++s) {
        const bf16* ks = k + s * a.ks[2];
        const bf16* vs = v + s * a.vs[2];
        for (int d = 0; d < a.D; ++d) {
            kp[((int64_t)(d >> 1) * a.SP + s) * 2 + (d & 1)] = ks[d];
            vp[((s >> 1) * a.HP + d) * 2 + (s & 1)] = vs[d];
        }
    }
}

// Scores of MR rows (qpair: MR x D2 pairs) against keys [j, j + NK), into sc (MR x SP).
inline void scores_block(const Args& a, const bf16* qrows, const bf16* kp, float* sc, int j,
                         __m512* vmax) {
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < a.D2; ++d2) {
        const bf16* kk = kp + ((int64_t)d2 * a.SP + j) * 2;
        __m512 k0 = _mm512_loadu_ps(kk), k1 = _mm512_loadu_ps(kk + 32);
        for (int r = 0; r < MR; ++r) {
            __m512 qq = bcast_pair(qrows + (r * a.D2 + d2) * 2);
            acc[r][0] = dp(acc[r][0], qq, k0);
            acc[r][1] = dp(acc[r][1], qq, k1);
        }
    }
    const int valid = (int)(a.S - j);  // keys past S are padding: -inf
    __mmask16 m0 = valid >= 16 ? 0xFFFF : (__mmask16)((1u << (valid > 0 ? valid : 0)) - 1);
    __mmask16 m1 = valid >= 32 ? 0xFFFF : (__mmask16)((1u << (valid > 16 ? valid - 16 : 0)) - 1);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < MR; ++r) {
        __m512 s0 = _mm512_mask_blend_ps(m0, ninf, acc[r][0]);
        __m512 s1 = _mm512_mask_blend_ps(m1, ninf, acc[r][1]);
        _mm512_storeu_ps(sc + (int64_t)r * a.SP + j, s0);
        _mm512_storeu_ps(sc + (int64_t)r * a.SP + j + 16, s1);
        vmax[r] = _mm512_max_ps(vmax[r], _mm512_max_ps(s0, s1));
    }
}

// out (MR rows x W*16 dims from d0) = p (MR x SP bf16) @ v, divided by the rows' sums.
template <int W>
inline void output_block(const Args& a, const bf16* p, const bf16* vp, const float* inv,
                         float* o, int d0) {
    __m512 acc[MR][W];
    for (int r = 0; r < MR; ++r)
        for (int w = 0; w < W; ++w) acc[r][w] = _mm512_setzero_ps();
    for (int s2 = 0; s2 < a.SP / 2; ++s2) {
        __m512 vv[W];
        for (int w = 0; w < W; ++w)
            vv[w] = _mm512_loadu_ps(vp + ((int64_t)s2 * a.HP + d0 + 16 * w) * 2);
        for (int r = 0; r < MR; ++r) {
            __m512 pp = bcast_pair(p + (int64_t)r * a.SP + 2 * s2);
            for (int w = 0; w < W; ++w) acc[r][w] = dp(acc[r][w], pp, vv[w]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int w = 0; w < W; ++w)
            _mm512_storeu_ps(o + r * a.HP + d0 + 16 * w,
                             _mm512_mul_ps(acc[r][w], _mm512_set1_ps(inv[r])));
}

struct Scratch {
    std::vector<float> sc;  // MR x SP scores
    std::vector<bf16> p;    // MR x SP probabilities
    std::vector<bf16> q;    // MR x D2 x 2 query pairs
    std::vector<float> o;   // MR x HP outputs
};

void rows(Args& a, Scratch& w, int64_t bh, int64_t t0) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const bf16* kp = a.kp + bh * (int64_t)a.D2 * a.SP * 2;
    const bf16* vp = a.vp + bh * (int64_t)a.SP * a.HP;
    const int n = (int)(a.T - t0 < MR ? a.T - t0 : MR);
    std::fill(w.q.begin(), w.q.end(), (bf16)0);
    for (int r = 0; r < n; ++r)
        std::memcpy(&w.q[(int64_t)r * a.D2 * 2], a.q + b * a.qs[0] + h * a.qs[1] + (t0 + r) * a.qs[2],
                    sizeof(bf16) * a.D);
    __m512 vmax[MR];
    for (int r = 0; r < MR; ++r) vmax[r] = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < a.SP; j += NK) scores_block(a, w.q.data(), kp, w.sc.data(), j, vmax);
    // softmax: exp2((s - max) * scale * log2 e), rounded to bfloat16; the sums in float32
    const float c = a.scale * 1.4426950408889634f;
    float inv[MR];
    for (int r = 0; r < MR; ++r) {
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[r]) * c);
        const __m512 cc = _mm512_set1_ps(c);
        __m512 sum = _mm512_setzero_ps();
        float* sr = w.sc.data() + (int64_t)r * a.SP;
        bf16* pr = w.p.data() + (int64_t)r * a.SP;
        for (int j = 0; j < a.SP; j += 16) {
            __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), cc, m));
            __m256bh pb = _mm512_cvtneps_pbh(e);
            sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(pb));
            _mm256_storeu_si256((__m256i*)(pr + j), (__m256i)pb);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    int d0 = 0;
    for (; d0 + 48 <= a.HP; d0 += 48) output_block<3>(a, w.p.data(), vp, inv, w.o.data(), d0);
    if (a.HP - d0 == 32) output_block<2>(a, w.p.data(), vp, inv, w.o.data(), d0);
    if (a.HP - d0 == 16) output_block<1>(a, w.p.data(), vp, inv, w.o.data(), d0);
    const __mmask16 tail = (__mmask16)((1u << (a.D % 16)) - 1);
    for (int r = 0; r < n; ++r) {
        bf16* o = a.out + b * a.os[0] + h * a.os[1] + (t0 + r) * a.os[2];
        const float* src = w.o.data() + r * a.HP;
        int d = 0;
        for (; d + 16 <= a.D; d += 16)
            _mm256_storeu_si256((__m256i*)(o + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + d)));
        if (d < a.D)
            _mm256_mask_storeu_epi16(o + d, tail, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + d)));
    }
}

void* worker(void* arg) {
    Args& a = *static_cast<Args*>(arg);
    const int64_t heads = a.B * a.H;
    for (int64_t i; (i = a.next_pack.fetch_add(1)) < heads;) {
        pack_head(a, i);
        a.packed.fetch_add(1);
    }
    while (a.packed.load() < heads) {
    }  // every head packed before any rows run
    Scratch w;
    w.sc.resize((size_t)MR * a.SP);
    w.p.resize((size_t)MR * a.SP);
    w.q.resize((size_t)MR * a.D2 * 2);
    w.o.resize((size_t)MR * a.HP);
    const int64_t blocks = (a.T + MR - 1) / MR;
    for (int64_t i; (i = a.next.fetch_add(1)) < heads * blocks;) rows(a, w, i / blocks, i % blocks * MR);
    return nullptr;
}

}  // namespace

extern "C" int nd_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out,
                                 int64_t B, int64_t H, int64_t T, int64_t S, int64_t D,
                                 const int64_t* qs, const int64_t* ks, const int64_t* vs,
                                 const int64_t* os, float scale, int threads) {
    Args a;
    a.q = q; a.k = k; a.v = v; a.out = out;
    a.B = B; a.H = H; a.T = T; a.S = S; a.D = D;
    for (int i = 0; i < 3; ++i) {
        a.qs[i] = qs[i]; a.ks[i] = ks[i]; a.vs[i] = vs[i]; a.os[i] = os[i];
    }
    a.scale = scale;
    a.threads = threads < 1 ? 1 : threads;
    a.D2 = (int)((D + 1) / 2);
    a.HP = round_up((int)D, 16);
    a.SP = round_up((int)S, NK);
    std::vector<bf16> kp((size_t)B * H * a.D2 * a.SP * 2), vp((size_t)B * H * a.SP * a.HP);
    a.kp = kp.data();
    a.vp = vp.data();
    std::vector<pthread_t> tids(a.threads - 1);
    int started = 0;
    for (auto& t : tids) {
        if (pthread_create(&t, nullptr, worker, &a) != 0) break;
        ++started;
    }
    worker(&a);
    for (int i = 0; i < started; ++i) pthread_join(tids[i], nullptr);
    return 0;
}
