/*
 * memhog.c - a memory-heavy guest, plus deliberately misbehaving entry points.
 *
 * Why it exists: snapshot and migration cost is dominated by memory, so the
 * host needs a guest whose memory footprint and write pattern it controls
 * exactly:
 *   - hog_grow makes linear memory large without touching it (fresh pages
 *     are zero, so a good snapshotter should find them nearly free);
 *   - hog_dirty / hog_fill dirty a chosen number of 4 KiB pages, which
 *     drives incremental-snapshot and pre-copy migration experiments;
 *   - hog_checksum verifies the region survived a round trip.
 * And for the host's isolation and resource limits:
 *   - hog_bomb grows memory until the host refuses (memory caps);
 *   - hog_spin never returns (fuel / epoch interruption, timeouts);
 *   - hog_trap traps on demand (trap handling, instance poisoning);
 *   - hog_recurse recurses to a given depth (wasm stack exhaustion).
 *
 * The "hog region" is [base, end) of linear memory, in whole 64 KiB wasm
 * pages, obtained only by memory.grow at the end of memory, so it never
 * overlaps anything malloc owns.  To keep it contiguous this module never
 * calls malloc at all: its cloudlet_input buffer is static (.bss), so hog is
 * the only thing that ever grows memory.  Inside the region, work is done on
 * 4 KiB pages (the host OS page size, which is what dirty tracking sees).
 */
#define CLOUDLET_INPUT_STATIC 65536
#include "cloudlet_abi.h"

#define HOG_PAGE 4096u                       /* dirtying granularity */
#define HOG_WORDS (HOG_PAGE / 4u)
#define SUBPAGES (CLOUDLET_WASM_PAGE / HOG_PAGE) /* 4 KiB pages per wasm page */
#define WASM_PAGES_PER_MIB 16u
#define MAX_WASM_PAGES 65536u                /* 4 GiB: the wasm32 limit */
#define SAMPLE_WORDS 8u                      /* words per page in checksums */

/* Region bounds in 64 KiB wasm pages (so 4 GiB = 65536 still fits). */
static uint32_t hog_base_page, hog_end_page;
/* Call counter mixed into hog_dirty's values, so that even a repeated seed
 * changes page contents: every hog_dirty call really dirties its pages. */
static uint32_t hog_generation;

static uint32_t region_subpages(void)
{
    return (hog_end_page - hog_base_page) * SUBPAGES;
}

static uint32_t *subpage(uint32_t i)
{
    uintptr_t addr = (uintptr_t)hog_base_page * CLOUDLET_WASM_PAGE +
                     (uintptr_t)i * HOG_PAGE;
    return (uint32_t *)addr;
}

/* Prepare to extend the region at the current end of memory.  Returns 0 if
 * memory was grown by someone else since our last growth, which would leave
 * a hole in the region (cannot happen while nothing here mallocs, but the
 * check keeps the region honest if that ever changes). */
static int region_at_memory_end(void)
{
    uint32_t cur = (uint32_t)__builtin_wasm_memory_size(0);
    if (hog_end_page == hog_base_page) {
        hog_base_page = hog_end_page = cur;
        return 1;
    }
    return hog_end_page == cur;
}

/* Grow so the region is at least `mib` MiB.  The new pages are left
 * untouched on purpose (zero pages cost a snapshot nothing if it is smart).
 * Returns the total linear memory size in MiB (rounded down), or -1 if the
 * memory could not be grown. */
CLOUDLET_EXPORT("hog_grow")
int32_t hog_grow(int32_t mib)
{
    if (mib < 0 || (uint32_t)mib > MAX_WASM_PAGES / WASM_PAGES_PER_MIB)
        return -1;
    uint32_t want = (uint32_t)mib * WASM_PAGES_PER_MIB;
    uint32_t have = hog_end_page - hog_base_page;
    if (want > have) {
        if (!region_at_memory_end())
            return -1;
        size_t old = __builtin_wasm_memory_grow(0, want - have);
        if (old == (size_t)-1)
            return -1;
        hog_end_page = (uint32_t)old + (want - have);
    }
    return (int32_t)(__builtin_wasm_memory_size(0) / WASM_PAGES_PER_MIB);
}

CLOUDLET_EXPORT("hog_mib")
int32_t hog_mib(void)
{
    return (int32_t)((hog_end_page - hog_base_page) / WASM_PAGES_PER_MIB);
}

/* Extra introspection for hosts that map dirty pages back to the region:
 * the region's size in 4 KiB pages and its start address in linear memory. */
CLOUDLET_EXPORT("hog_pages")
int32_t hog_pages(void)
{
    return (int32_t)region_subpages();
}

CLOUDLET_EXPORT("hog_base")
int32_t hog_base(void)
{
    return hog_end_page == hog_base_page
               ? 0
               : (int32_t)(hog_base_page * CLOUDLET_WASM_PAGE);
}

/* Dirty `npages` 4 KiB pages of the region chosen from `seed`.  Pages are
 * distinct as long as npages <= hog_pages(): they are visited along a
 * full-period LCG over the next power of two (Hull-Dobell: odd increment,
 * multiplier = 1 mod 4), skipping indices past the end, so the pattern is
 * scattered (defeats sequential-locality tricks) yet has no repeats.  The
 * page *choice* depends only on seed and region size; the written *values*
 * also depend on the call count.  Each page gets its first 8 words (what
 * hog_checksum samples) plus 8 words scattered across the page.
 * Returns an FNV-style checksum of (page index, values) written, or -1 if
 * the region is empty. */
CLOUDLET_EXPORT("hog_dirty")
int32_t hog_dirty(int32_t npages, int32_t seed)
{
    uint32_t n = region_subpages();
    if (n == 0)
        return -1;
    hog_generation++;

    uint32_t mask = 1;
    while (mask < n)
        mask <<= 1;
    mask -= 1;

    uint32_t ps = cloudlet_seed((uint32_t)seed);
    uint32_t x = cloudlet_xorshift32(&ps) & mask;
    uint32_t a = (cloudlet_xorshift32(&ps) & ~3u) | 1u;
    uint32_t c = cloudlet_xorshift32(&ps) | 1u;
    uint32_t vs = cloudlet_seed((uint32_t)seed ^ cloudlet_mix32(hog_generation));

    uint32_t h = CLOUDLET_FNV_INIT;
    for (int32_t i = 0; i < npages; i++) {
        do
            x = (a * x + c) & mask;
        while (x >= n);
        uint32_t *p = subpage(x);
        h = cloudlet_fnv1a_u32(h, x);
        for (uint32_t k = 0; k < SAMPLE_WORDS; k++) {
            uint32_t v = cloudlet_xorshift32(&vs);
            p[k] = v;
            h = cloudlet_fnv1a_u32(h, v);
        }
        for (uint32_t k = 0; k < 8; k++) {
            uint32_t v = cloudlet_xorshift32(&vs);
            /* one word somewhere in each 1/8th of the page (past the head) */
            uint32_t w = k * (HOG_WORDS / 8u) + SAMPLE_WORDS +
                         (v % (HOG_WORDS / 8u - SAMPLE_WORDS));
            p[w] = v;
            h = cloudlet_fnv1a_u32(h, v);
        }
    }
    return (int32_t)h;
}

/* Write `value` into every word of 4 KiB pages [start_page, start_page +
 * npages), clipped to the region.  Filling whole pages with one value is
 * what makes pages identical/compressible (or, with value 0, all-zero again)
 * on purpose.  Returns the number of pages written. */
CLOUDLET_EXPORT("hog_fill")
int32_t hog_fill(int32_t start_page, int32_t npages, int32_t value)
{
    int64_t s = start_page, e = (int64_t)start_page + npages;
    int64_t n = region_subpages();
    if (s < 0) s = 0;
    if (e > n) e = n;
    if (e <= s)
        return 0;
    for (int64_t i = s; i < e; i++) {
        uint32_t *p = subpage((uint32_t)i);
        for (uint32_t k = 0; k < HOG_WORDS; k++)
            p[k] = (uint32_t)value;
    }
    return (int32_t)(e - s);
}

/* Checksum of the region, sampling the first 8 words of every 4 KiB page
 * (reading every byte of a multi-GiB region would make verification slower
 * than the snapshot being verified).  Word-wise FNV-1a, seeded with the
 * region size so an empty region and a zero-filled one differ. */
CLOUDLET_EXPORT("hog_checksum")
int32_t hog_checksum(void)
{
    uint32_t n = region_subpages();
    uint32_t h = cloudlet_fnv1a_u32(CLOUDLET_FNV_INIT, n);
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t *p = subpage(i);
        for (uint32_t k = 0; k < SAMPLE_WORDS; k++)
            h = (h ^ p[k]) * 16777619u;
    }
    return (int32_t)h;
}

/* Memory bomb: grow one wasm page at a time until memory.grow fails (the
 * host's memory cap, or the 4 GiB wasm32 limit).  The pages join the hog
 * region (untouched), so hog_mib reflects the bomb.  Returns the total
 * memory size in 64 KiB pages. */
CLOUDLET_EXPORT("hog_bomb")
int32_t hog_bomb(void)
{
    int contiguous = region_at_memory_end();
    while (__builtin_wasm_memory_grow(0, 1) != (size_t)-1)
        if (contiguous)
            hog_end_page++;
    return (int32_t)__builtin_wasm_memory_size(0);
}

/* A guest that never yields: only fuel, epoch interruption or killing the
 * instance stops it.  The counter is volatile so the loop has an observable
 * side effect and cannot be deleted (an infinite loop without one may be
 * assumed to terminate). */
static volatile uint32_t spin_counter;

CLOUDLET_EXPORT("hog_spin")
void hog_spin(void)
{
    for (;;)
        spin_counter++;
}

CLOUDLET_EXPORT("hog_trap")
int32_t hog_trap(int32_t x)
{
    if (x != 0)
        __builtin_trap();   /* wasm `unreachable` */
    return 7;
}

/* Deep recursion that must consume real wasm stack frames.  The volatile
 * read after the recursive call keeps it a non-tail call (the read cannot be
 * hoisted before the call), and nothing has its address taken, so each
 * level uses the engine's native stack, not the shadow stack in linear
 * memory: a large n ends in the engine's "call stack exhausted" trap rather
 * than silently overwriting guest data. */
static volatile uint32_t recurse_sink = 1;

__attribute__((noinline)) static uint32_t recurse(int32_t n)
{
    if (n <= 0)
        return recurse_sink;
    uint32_t r = recurse(n - 1);
    return r * 3u + ((uint32_t)n & 7u) + recurse_sink;
}

/* Returns a value determined by n (for n <= 0: 1). */
CLOUDLET_EXPORT("hog_recurse")
int32_t hog_recurse(int32_t n)
{
    return (int32_t)recurse(n);
}
