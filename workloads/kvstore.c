/*
 * kvstore.c - a stateful key-value service living entirely on the guest
 * heap.
 *
 * Why it exists: the point of migrating a VM (rather than restarting a
 * stateless function elsewhere) is that in-memory state comes along.  This
 * guest's state is a pointer-rich structure scattered over the malloc heap:
 * chained hash tables whose bucket arrays are reallocated as they grow and
 * whose nodes are freed and reused.  A snapshot that misses a page, or a
 * restore that relocates memory, corrupts it visibly, and kv_checksum /
 * kv_bytes_checksum let tests compare a store before and after migration.
 *
 * Two independent tables:
 *   - int32 -> int32 (numeric exports kv_put/kv_get/kv_has/kv_del/...);
 *   - byte string -> byte string (bytes exports kv_set/kv_lookup), where both
 *     key and value are arbitrary bytes and are copied into the heap.
 *
 * Tables never shrink: like most real stores, once memory is taken it stays
 * part of the VM's footprint, which is realistic for snapshot sizes.
 */
#include "cloudlet_abi.h"

#define INITIAL_BUCKETS 16u

/* Grow when count > 3/4 of buckets: keeps chains short without wasting
 * much memory on empty buckets. */
static int over_load(uint32_t count, uint32_t nbuckets)
{
    return (uint64_t)count * 4u > (uint64_t)nbuckets * 3u;
}

/* ---------------------------------------------------------------------------
 * int32 -> int32 table
 * ------------------------------------------------------------------------- */

typedef struct inode {
    struct inode *next;
    int32_t key;
    int32_t value;
} inode_t;

static inode_t **itab;
static uint32_t itab_n;      /* bucket count, power of two */
static uint32_t itab_count;

static uint32_t ihash(int32_t key)
{
    return cloudlet_mix32((uint32_t)key);
}

/* Rehash into a table twice the size.  On allocation failure the old table
 * stays: it is still correct, just with longer chains. */
static void itab_grow(void)
{
    uint32_t n = itab_n ? itab_n * 2u : INITIAL_BUCKETS;
    inode_t **t = calloc(n, sizeof *t);
    if (!t)
        return;
    for (uint32_t b = 0; b < itab_n; b++) {
        inode_t *e = itab[b];
        while (e) {
            inode_t *next = e->next;
            uint32_t nb = ihash(e->key) & (n - 1);
            e->next = t[nb];
            t[nb] = e;
            e = next;
        }
    }
    free(itab);
    itab = t;
    itab_n = n;
}

static inode_t **ifind(int32_t key)
{
    if (!itab_n)
        return NULL;
    inode_t **pp = &itab[ihash(key) & (itab_n - 1)];
    while (*pp && (*pp)->key != key)
        pp = &(*pp)->next;
    return pp;
}

/* Returns 1 if the key is new, 0 if its value was replaced, -1 if the heap
 * is exhausted (the store is unchanged). */
CLOUDLET_EXPORT("kv_put")
int32_t kv_put(int32_t key, int32_t value)
{
    if (!itab_n) {
        itab_grow();
        if (!itab_n)
            return -1;
    }
    inode_t **pp = ifind(key);
    if (*pp) {
        (*pp)->value = value;
        return 0;
    }
    inode_t *e = malloc(sizeof *e);
    if (!e)
        return -1;
    e->key = key;
    e->value = value;
    e->next = NULL;
    *pp = e;              /* append at the chain tail found by ifind */
    itab_count++;
    if (over_load(itab_count, itab_n))
        itab_grow();
    return 1;
}

/* The value, or -1 if the key is missing.  -1 is also a legal value, so
 * callers that store negative numbers must use kv_has to tell them apart;
 * the numeric ABI has only one i32 result to work with. */
CLOUDLET_EXPORT("kv_get")
int32_t kv_get(int32_t key)
{
    inode_t **pp = ifind(key);
    return (pp && *pp) ? (*pp)->value : -1;
}

CLOUDLET_EXPORT("kv_has")
int32_t kv_has(int32_t key)
{
    inode_t **pp = ifind(key);
    return pp && *pp;
}

CLOUDLET_EXPORT("kv_del")
int32_t kv_del(int32_t key)
{
    inode_t **pp = ifind(key);
    if (!pp || !*pp)
        return 0;
    inode_t *e = *pp;
    *pp = e->next;
    free(e);
    itab_count--;
    return 1;
}

CLOUDLET_EXPORT("kv_count")
int32_t kv_count(void)
{
    return (int32_t)itab_count;
}

/* Order-independent (a wrapping sum of per-pair hashes), so it does not
 * depend on bucket count or insertion history, only on the set of pairs:
 * two stores with the same contents agree even if one was rebuilt. */
static uint32_t pair_hash(uint32_t k, uint32_t v)
{
    return cloudlet_mix32(cloudlet_mix32(k + 0x9e3779b9u) ^ v);
}

CLOUDLET_EXPORT("kv_checksum")
int32_t kv_checksum(void)
{
    uint32_t acc = itab_count;
    for (uint32_t b = 0; b < itab_n; b++)
        for (inode_t *e = itab[b]; e; e = e->next)
            acc += pair_hash((uint32_t)e->key, (uint32_t)e->value);
    return (int32_t)acc;
}

/* ---------------------------------------------------------------------------
 * bytes -> bytes table
 * ------------------------------------------------------------------------- */

typedef struct bnode {
    struct bnode *next;
    uint32_t hash;
    uint32_t klen;
    uint32_t vlen;
    uint8_t *val;         /* separate allocation: values change size */
    uint8_t key[];        /* keys never change, so they live inline */
} bnode_t;

static bnode_t **btab;
static uint32_t btab_n;
static uint32_t btab_count;

static uint32_t bhash(const uint8_t *k, uint32_t n)
{
    return cloudlet_fnv1a(CLOUDLET_FNV_INIT, k, n);
}

static void btab_grow(void)
{
    uint32_t n = btab_n ? btab_n * 2u : INITIAL_BUCKETS;
    bnode_t **t = calloc(n, sizeof *t);
    if (!t)
        return;
    for (uint32_t b = 0; b < btab_n; b++) {
        bnode_t *e = btab[b];
        while (e) {
            bnode_t *next = e->next;
            uint32_t nb = e->hash & (n - 1);
            e->next = t[nb];
            t[nb] = e;
            e = next;
        }
    }
    free(btab);
    btab = t;
    btab_n = n;
}

static bnode_t **bfind(const uint8_t *k, uint32_t klen, uint32_t h)
{
    if (!btab_n)
        return NULL;
    bnode_t **pp = &btab[h & (btab_n - 1)];
    while (*pp && !((*pp)->hash == h && (*pp)->klen == klen &&
                    memcmp((*pp)->key, k, klen) == 0))
        pp = &(*pp)->next;
    return pp;
}

/* Heap copy of a value; empty values are stored as NULL so malloc(0)'s
 * implementation-defined result never matters. */
static int copy_value(const uint8_t *v, uint32_t n, uint8_t **out)
{
    *out = NULL;
    if (n == 0)
        return 1;
    *out = malloc(n);
    if (!*out)
        return 0;
    memcpy(*out, v, n);
    return 1;
}

/* Bytes: input "key=value", split at the first '=' (so keys cannot contain
 * '=', values can; both may be empty).  Stores a copy of value under key and
 * outputs the previous value (empty if the key was new).  Input without any
 * '=' is malformed and ignored, as is running out of heap; both output
 * nothing and leave the store unchanged. */
CLOUDLET_EXPORT("kv_set")
int64_t kv_set(int32_t ptr, int32_t len)
{
    if (!cloudlet_in_range(ptr, len))
        return cloudlet_output_empty();
    const uint8_t *in = (const uint8_t *)(uintptr_t)(uint32_t)ptr;
    const uint8_t *eq = memchr(in, '=', (size_t)len);
    if (!eq)
        return cloudlet_output_empty();
    uint32_t klen = (uint32_t)(eq - in);
    const uint8_t *val = eq + 1;
    uint32_t vlen = (uint32_t)len - klen - 1u;

    if (!btab_n) {
        btab_grow();
        if (!btab_n)
            return cloudlet_output_empty();
    }
    uint32_t h = bhash(in, klen);
    bnode_t **pp = bfind(in, klen, h);

    /* Everything we need from the input is copied before the output buffer
     * is touched: the host may pass our previous output back as input. */
    uint8_t *nv;
    if (!copy_value(val, vlen, &nv))
        return cloudlet_output_empty();

    if (*pp) {
        bnode_t *e = *pp;
        uint8_t *old = e->val;
        uint32_t oldlen = e->vlen;
        e->val = nv;
        e->vlen = vlen;
        int64_t r = cloudlet_output_copy(old, oldlen);
        free(old);
        return r;
    }

    bnode_t *e = malloc(sizeof *e + klen);
    if (!e) {
        free(nv);
        return cloudlet_output_empty();
    }
    e->next = NULL;
    e->hash = h;
    e->klen = klen;
    e->vlen = vlen;
    e->val = nv;
    memcpy(e->key, in, klen);
    *pp = e;
    btab_count++;
    if (over_load(btab_count, btab_n))
        btab_grow();
    return cloudlet_output_empty();
}

/* Bytes: input is a key, output its value (empty if missing; as with kv_get
 * a stored empty value looks the same as a missing key). */
CLOUDLET_EXPORT("kv_lookup")
int64_t kv_lookup(int32_t ptr, int32_t len)
{
    if (!cloudlet_in_range(ptr, len))
        return cloudlet_output_empty();
    const uint8_t *k = (const uint8_t *)(uintptr_t)(uint32_t)ptr;
    bnode_t **pp = bfind(k, (uint32_t)len, bhash(k, (uint32_t)len));
    if (!pp || !*pp)
        return cloudlet_output_empty();
    /* Copied rather than returning a pointer into the table, so the host
     * can never observe a value that a later kv_set frees. */
    return cloudlet_output_copy((*pp)->val, (*pp)->vlen);
}

CLOUDLET_EXPORT("kv_bytes_count")
int32_t kv_bytes_count(void)
{
    return (int32_t)btab_count;
}

/* Order-independent like kv_checksum, over (key bytes, value bytes). */
CLOUDLET_EXPORT("kv_bytes_checksum")
int32_t kv_bytes_checksum(void)
{
    uint32_t acc = btab_count;
    for (uint32_t b = 0; b < btab_n; b++)
        for (bnode_t *e = btab[b]; e; e = e->next) {
            uint32_t vh = cloudlet_fnv1a(CLOUDLET_FNV_INIT, e->val, e->vlen);
            acc += pair_hash(e->hash, vh);
        }
    return (int32_t)acc;
}
