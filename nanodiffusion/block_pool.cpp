// A pool of torch's big CPU blocks for low memory's UNet run (malloc.py's pooled_blocks). Low
// memory has glibc map every block of 256 KiB or more apart and unmap it when it is freed
// (malloc.malloc_returns_big_blocks), so that freed blocks never stay resident in its heap;
// but then every new block's pages are faulted in and zeroed anew: an SD 1.5 UNet call at
// 512 px allocates 1.5 GB of such blocks, most of them the sizes the call before freed.
// While the pool is on, torch's CPU allocator is this one: a block of MIN bytes or more comes
// from the blocks freed since (its pages resident already), else from a new mapping; a freed
// one is kept for the next request, up to `cap` bytes of them. A request takes the smallest
// kept block that is large enough, shrunk to its size (mremap, in place: the tail's pages go
// back), else the largest smaller one grown to it (mremap: only the growth is new pages), so
// the kept blocks are the memory the run freed, whatever the sizes asked next, and the pool
// holds little more than the run's live blocks at its peak. Smaller blocks and every block
// while the pool is off go to torch's own allocator, which frees them too.
//
// Built by malloc.py with g++ against torch's c10 headers and loaded with ctypes. The pool is
// made torch's CPU allocator at its first start and stays so, on or off (torch's packed
// convolution weights are freed through whatever allocator is current then, even blocks
// another allocated): `release` frees its own blocks and hands any other pointer to torch's.
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t MIN = 256 << 10;  // as malloc.MMAP_THRESHOLD: smaller blocks stay in the heap
constexpr size_t PAGE = 4096, HUGE = 2 << 20;

struct Pool final : c10::Allocator {
    c10::Allocator* base = nullptr;  // torch's own CPU allocator
    std::mutex mu;
    std::unordered_map<void*, size_t> mine;  // this pool's blocks, live or kept: their bytes
    std::multimap<size_t, void*> kept;       // the freed ones, by size
    size_t cap = 0, kept_bytes = 0, mapped = 0, reused = 0, resized = 0, fresh = 0;
    std::atomic<bool> on{false};

    // under mu: a kept block made n bytes, or nullptr where none is kept
    void* take(size_t n) {
        if (kept.empty()) return nullptr;
        auto it = kept.lower_bound(n);
        if (it == kept.end()) --it;  // all smaller: the largest
        const size_t m = it->first;
        void* p = it->second;
        kept.erase(it);
        kept_bytes -= m;
        mine.erase(p);
        if (m != n) {
            void* q = mremap(p, m, n, MREMAP_MAYMOVE);
            if (q == MAP_FAILED) {
                munmap(p, m);
                mapped -= m;
                return nullptr;
            }
            p = q;
            mapped = mapped - m + n;
            ++resized;
        } else {
            ++reused;
        }
        mine[p] = n;
        return p;
    }

    c10::DataPtr allocate(size_t bytes) override {
        if (bytes < MIN || !on) return base->allocate(bytes);
        const size_t n = (bytes + PAGE - 1) / PAGE * PAGE;
        void* p;
        {
            std::lock_guard<std::mutex> g(mu);
            p = take(n);
        }
        if (p == nullptr) {
            p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) return base->allocate(bytes);  // torch's, and its error
            if (n >= HUGE) madvise(p, n, MADV_HUGEPAGE);  // one fault per 2 MiB where THP allows
            std::lock_guard<std::mutex> g(mu);
            mine[p] = n;
            mapped += n;
            ++fresh;
        }
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }

    static void release(void* p);

    c10::DeleterFnPtr raw_deleter() const override { return &release; }

    void copy_data(void* dest, const void* src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }

    // under mu: the kept blocks unmapped
    void drop_kept() {
        for (auto& kv : kept) {
            mine.erase(kv.second);
            munmap(kv.second, kv.first);
            mapped -= kv.first;
        }
        kept.clear();
        kept_bytes = 0;
    }
};

// never destroyed: blocks may be freed while the process exits, after static destructors ran
Pool& pool = *new Pool;

void Pool::release(void* p) {
    std::unique_lock<std::mutex> g(pool.mu);
    auto it = pool.mine.find(p);
    if (it == pool.mine.end()) {  // torch's own (allocated before the pool, or small)
        g.unlock();
        pool.base->raw_deleter()(p);
        return;
    }
    const size_t n = it->second;
    if (pool.on && n <= pool.cap) {
        while (pool.kept_bytes + n > pool.cap) {  // the smallest kept blocks make room
            auto e = pool.kept.begin();
            pool.mine.erase(e->second);
            munmap(e->second, e->first);
            pool.mapped -= e->first;
            pool.kept_bytes -= e->first;
            pool.kept.erase(e);
        }
        pool.kept.emplace(n, p);
        pool.kept_bytes += n;
    } else {
        pool.mine.erase(it);
        munmap(p, n);
        pool.mapped -= n;
    }
}

}  // namespace

// cap > 0: the pool on, keeping up to cap bytes of freed blocks; 0: off, the kept blocks
// unmapped (live ones are unmapped as they are freed)
extern "C" int nd_block_pool(int64_t cap) {
    std::lock_guard<std::mutex> g(pool.mu);
    if (cap > 0) {
        if (pool.base == nullptr) {
            pool.base = c10::GetCPUAllocator();
            c10::SetCPUAllocator(&pool, 0);  // priority 0: as torch's own, which it replaces
        }
        pool.cap = (size_t)cap;
        pool.on = true;
    } else {
        pool.on = false;
        pool.drop_kept();
    }
    return 0;
}

// out (the address of 6 int64s): bytes mapped (live and kept), bytes kept, requests served by a
// kept block as it was, by one resized, by a new mapping; whether the pool is on
extern "C" int nd_block_pool_stats(int64_t out) {
    std::lock_guard<std::mutex> g(pool.mu);
    int64_t* o = reinterpret_cast<int64_t*>(out);
    o[0] = (int64_t)pool.mapped;
    o[1] = (int64_t)pool.kept_bytes;
    o[2] = (int64_t)pool.reused;
    o[3] = (int64_t)pool.resized;
    o[4] = (int64_t)pool.fresh;
    o[5] = pool.on;
    return 0;
}
