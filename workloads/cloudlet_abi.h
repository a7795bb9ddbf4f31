/*
 * cloudlet_abi.h - the calling convention between the Cloudlet host and its
 * WebAssembly guests.
 *
 * Every workload is a single C file compiled as a WASI *reactor*
 * (-mexec-model=reactor): there is no main(), the host instantiates the
 * module, calls `_initialize` once if it is exported, and then calls exported
 * functions.  Nothing here imports anything from the host, so a module that
 * only uses this header, malloc/free and the string functions imports nothing.
 * That matters because a Cloudlet VM *is* the wasm instance: its whole state
 * is linear memory plus globals, which is what gets snapshotted and migrated.
 * Hidden state behind host imports (clocks, randomness, files) would make a
 * restored VM diverge from the original, so workloads are deterministic
 * functions of the sequence of calls they receive.
 *
 * Two kinds of exports:
 *
 *   Numeric:  plain i32/i64 parameters and results.
 *
 *   Bytes:    int64_t fn(int32_t ptr, int32_t len)
 *     1. host calls `cloudlet_input(len)`, gets a guest pointer to a buffer
 *        of at least `len` bytes (0 means the guest could not allocate);
 *     2. host writes the input bytes into linear memory ("memory") there;
 *     3. host calls fn(ptr, len);
 *     4. fn returns ((int64_t)out_ptr << 32) | out_len; the host reads
 *        out_len bytes at out_ptr.  The output stays valid until the next
 *        call into the module, so the host must copy it out first.
 *     A (ptr, len) that does not lie inside linear memory is treated as bad
 *     input (empty output) rather than trapping.
 *
 * Every module also exports `noop()` and `add(a, b)`, so the host and the
 * benchmarks can measure pure call overhead on any workload.
 *
 * Include this header exactly once, from the workload's single .c file: it
 * defines (non-static, because clang drops static functions even when they
 * carry export_name) the exported ABI functions.
 *
 * Configuration macros, to be defined before including:
 *   CLOUDLET_INPUT_STATIC  if defined (to a byte count), cloudlet_input uses
 *                          a fixed buffer of that size in .bss instead of
 *                          malloc.  Used by workloads that must be the only
 *                          thing growing linear memory (memhog).
 */
#ifndef CLOUDLET_ABI_H
#define CLOUDLET_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CLOUDLET_EXPORT(name) __attribute__((export_name(name)))

#define CLOUDLET_WASM_PAGE 65536u

/* ---------------------------------------------------------------------------
 * Input buffer
 * ------------------------------------------------------------------------- */

/* Make *buf (of capacity *cap) hold at least `need` bytes, never handing out a
 * null buffer for 0 bytes, so that NULL unambiguously means "could not
 * allocate". Grows geometrically so a stream of slightly larger requests does
 * not reallocate every call; free+malloc rather than realloc, because the old
 * contents (the previous input or output) are dead and copying them is waste. */
static inline uint8_t *cloudlet_grow(uint8_t **buf, uint32_t *cap, uint32_t need)
{
    if (need == 0)
        need = 1u;
    if (need > *cap) {
        uint32_t c = *cap ? *cap : 256u;
        while (c < need)
            c = c > 0x40000000u ? need : c * 2u;
        free(*buf);
        *buf = malloc(c);
        *cap = *buf ? c : 0;
    }
    return *buf;
}

#ifdef CLOUDLET_INPUT_STATIC
static uint8_t cloudlet_in_buf[CLOUDLET_INPUT_STATIC];

CLOUDLET_EXPORT("cloudlet_input")
int32_t cloudlet_input(int32_t len)
{
    if (len < 0 || (uint32_t)len > (uint32_t)CLOUDLET_INPUT_STATIC)
        return 0;
    return (int32_t)(uintptr_t)cloudlet_in_buf;
}
#else
static uint8_t *cloudlet_in_buf;
static uint32_t cloudlet_in_cap;

CLOUDLET_EXPORT("cloudlet_input")
int32_t cloudlet_input(int32_t len)
{
    if (len < 0)
        return 0;
    return (int32_t)(uintptr_t)cloudlet_grow(&cloudlet_in_buf, &cloudlet_in_cap,
                                             (uint32_t)len);
}
#endif

/* Is [ptr, ptr+len) inside linear memory?  Bytes functions check this so
 * that a confused host gets an empty answer instead of a trap. */
static inline int cloudlet_in_range(int32_t ptr, int32_t len)
{
    if (len < 0)
        return 0;
    uint64_t mem = (uint64_t)__builtin_wasm_memory_size(0) * CLOUDLET_WASM_PAGE;
    return (uint64_t)(uint32_t)ptr + (uint64_t)(uint32_t)len <= mem;
}

/* ---------------------------------------------------------------------------
 * Output
 * ------------------------------------------------------------------------- */

/* Pack an output slice into the i64 a bytes function returns. */
static inline int64_t cloudlet_output(const void *p, uint32_t n)
{
    return (int64_t)(((uint64_t)(uint32_t)(uintptr_t)p << 32) | (uint64_t)n);
}

/* The canonical empty result. */
static inline int64_t cloudlet_output_empty(void)
{
    return 0;
}

static uint8_t *cloudlet_out_buf;
static uint32_t cloudlet_out_cap;

/* A shared output buffer of at least n bytes, reused across calls (the ABI
 * only promises validity until the next call, so one buffer is enough).
 * Returns NULL if it cannot be allocated. */
static inline uint8_t *cloudlet_out_reserve(uint32_t n)
{
    return cloudlet_grow(&cloudlet_out_buf, &cloudlet_out_cap, n);
}

/* Copy n bytes into the shared output buffer and return them; on allocation
 * failure the result is empty. */
static inline int64_t cloudlet_output_copy(const void *src, uint32_t n)
{
    if (n == 0)
        return cloudlet_output_empty();
    uint8_t *o = cloudlet_out_reserve(n);
    if (!o)
        return cloudlet_output_empty();
    memcpy(o, src, n);
    return cloudlet_output(o, n);
}

/* ---------------------------------------------------------------------------
 * Small shared helpers (deterministic: no clock, no host randomness)
 * ------------------------------------------------------------------------- */

static inline uint16_t cloudlet_get_u16le(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline void cloudlet_put_u16le(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

#define CLOUDLET_FNV_INIT 2166136261u

static inline uint32_t cloudlet_fnv1a(uint32_t h, const void *data, size_t n)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

/* Feed a 32-bit value into an FNV-1a hash, byte by byte (little endian), so
 * checksums of mixed state do not depend on struct layout. */
static inline uint32_t cloudlet_fnv1a_u32(uint32_t h, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        h ^= (v >> (8 * i)) & 0xffu;
        h *= 16777619u;
    }
    return h;
}

/* Marsaglia xorshift32.  A zero state is a fixed point, so seeds are forced
 * nonzero: every seed (including 0) gives a usable stream. */
static inline uint32_t cloudlet_seed(uint32_t seed)
{
    seed ^= 0x9e3779b9u;
    return seed ? seed : 0x6d2b79f5u;
}

static inline uint32_t cloudlet_xorshift32(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

/* A good 32-bit integer mixer (murmur3 finaliser), for hashing keys. */
static inline uint32_t cloudlet_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    x *= 0xc2b2ae35u;
    x ^= x >> 16;
    return x;
}

/* ---------------------------------------------------------------------------
 * Exports common to every workload: call-overhead probes.
 * ------------------------------------------------------------------------- */

CLOUDLET_EXPORT("noop")
void noop(void)
{
}

CLOUDLET_EXPORT("add")
int32_t add(int32_t a, int32_t b)
{
    /* Wrapping add: signed overflow would be UB in C. */
    return (int32_t)((uint32_t)a + (uint32_t)b);
}

#endif /* CLOUDLET_ABI_H */
