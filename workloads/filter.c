/*
 * filter.c - a video-analytics style guest: a 3x3 box blur over grayscale
 * frames.
 *
 * Why it exists: offloading per-frame image processing (AR, camera
 * analytics) to a nearby edge node is the classic cloudlet use case.  This
 * guest is compute-bound with a moderate, steady working set, and it keeps a
 * little state across frames (frame counter, running checksum of outputs), so
 * a migration in the middle of a stream must carry that state over for the
 * stream to continue seamlessly.
 *
 * Two ways in:
 *   - filter_blur (bytes): the host ships a frame in and gets the blurred
 *     frame back; this exercises the bytes ABI with large payloads;
 *   - filter_frame (numeric): the guest synthesises the frame itself from a
 *     seed, so benchmarks can measure compute without copying pixels across
 *     the host boundary.
 * Both feed the same frame counter and running checksum, and for the same
 * pixels both produce the same per-frame checksum (FNV-1a of the blurred
 * pixels, header excluded).
 *
 * Blur definition: each output pixel is the rounded mean of the input pixels
 * in its 3x3 neighbourhood that lie inside the frame (so edges average fewer
 * pixels instead of inventing padding):
 *   out = (sum + count / 2) / count.
 */
#include "cloudlet_abi.h"

#define FRAME_MAX_DIM 1024
#define HEADER 4

static uint32_t frames;        /* frames processed, both entry points */
static uint32_t state;         /* running checksum over all outputs */

/* Scratch for the blur: one u16 column sum per x.  Kept across calls so
 * steady-state frames do not allocate. */
static uint16_t *colsum;
static uint32_t colsum_cap;

/* filter_frame's persistent source and destination frames (they are part of
 * the VM's heap and so part of every snapshot, like a real frame pool). */
static uint8_t *fsrc, *fdst;
static uint32_t fcap;

/* Scratch copy of the input for the rare case it aliases the output. */
static uint8_t *incopy;
static uint32_t incopy_cap;

static int grow(uint8_t **buf, uint32_t *cap, uint32_t need)
{
    if (need <= *cap)
        return 1;
    /* Contents are dead whenever we grow, so free+malloc beats realloc. */
    free(*buf);
    *buf = malloc(need);
    *cap = *buf ? need : 0;
    return *buf != NULL;
}

/* Separable-ish blur: for each row, first sum the (up to) 3 rows vertically
 * into colsum, then slide horizontally over colsum.  9 reads per pixel
 * become about 6, and the only scratch memory is one row of u16. */
static int blur(const uint8_t *src, uint8_t *dst, uint32_t w, uint32_t h)
{
    if (w > colsum_cap) {
        free(colsum);
        colsum = malloc((size_t)w * sizeof *colsum);
        colsum_cap = colsum ? w : 0;
        if (!colsum)
            return 0;
    }
    for (uint32_t y = 0; y < h; y++) {
        uint32_t y0 = y > 0 ? y - 1 : 0;
        uint32_t y1 = y + 1 < h ? y + 1 : y;
        uint32_t vc = y1 - y0 + 1;
        for (uint32_t x = 0; x < w; x++) {
            uint32_t s = 0;
            for (uint32_t r = y0; r <= y1; r++)
                s += src[(size_t)r * w + x];
            colsum[x] = (uint16_t)s;
        }
        uint8_t *out = dst + (size_t)y * w;
        for (uint32_t x = 0; x < w; x++) {
            uint32_t x0 = x > 0 ? x - 1 : 0;
            uint32_t x1 = x + 1 < w ? x + 1 : x;
            uint32_t cnt = vc * (x1 - x0 + 1);
            uint32_t s = 0;
            for (uint32_t c = x0; c <= x1; c++)
                s += colsum[c];
            out[x] = (uint8_t)((s + cnt / 2) / cnt);
        }
    }
    return 1;
}

/* Account for one finished frame; returns its checksum.  The running state
 * is order-dependent on purpose: replaying the same frames in another order
 * after a botched migration must show up as a different filter_state(). */
static uint32_t account(const uint8_t *pixels, size_t n)
{
    uint32_t chk = cloudlet_fnv1a(CLOUDLET_FNV_INIT, pixels, n);
    frames++;
    state = cloudlet_fnv1a_u32(cloudlet_fnv1a_u32(state, chk), frames);
    return chk;
}

/* Bytes: input {w u16le, h u16le, w*h pixels}; output the blurred frame in
 * the same format.  Anything malformed (length mismatch, zero dimension)
 * yields 0 output bytes and does not count as a frame. */
CLOUDLET_EXPORT("filter_blur")
int64_t filter_blur(int32_t ptr, int32_t len)
{
    if (!cloudlet_in_range(ptr, len) || len < HEADER)
        return cloudlet_output_empty();
    const uint8_t *in = (const uint8_t *)(uintptr_t)(uint32_t)ptr;
    uint32_t w = cloudlet_get_u16le(in), h = cloudlet_get_u16le(in + 2);
    uint64_t npix = (uint64_t)w * h;
    if (w == 0 || h == 0 || (uint64_t)(uint32_t)len != HEADER + npix)
        return cloudlet_output_empty();

    /* If the host fed our previous output back in (zero-copy chaining),
     * the output buffer is about to be overwritten: copy the input aside. */
    const uint8_t *ob = cloudlet_out_buf;
    if (ob && in < ob + cloudlet_out_cap && ob < in + len) {
        if (!grow(&incopy, &incopy_cap, (uint32_t)len))
            return cloudlet_output_empty();
        memcpy(incopy, in, (size_t)len);
        in = incopy;
    }

    uint8_t *out = cloudlet_out_reserve((uint32_t)len);
    if (!out)
        return cloudlet_output_empty();
    if (!blur(in + HEADER, out + HEADER, w, h))
        return cloudlet_output_empty();
    memcpy(out, in, HEADER);
    account(out + HEADER, (size_t)npix);
    return cloudlet_output(out, (uint32_t)len);
}

/* Numeric: synthesise a w x h frame from `seed` (xorshift32, 4 pixels per
 * draw, little endian), blur it, return the FNV-1a of the blurred pixels.
 * w and h are clamped to 1..1024 rather than rejected, because the result is
 * a checksum and has no spare error value. */
CLOUDLET_EXPORT("filter_frame")
int32_t filter_frame(int32_t w, int32_t h, int32_t seed)
{
    if (w < 1) w = 1;
    if (w > FRAME_MAX_DIM) w = FRAME_MAX_DIM;
    if (h < 1) h = 1;
    if (h > FRAME_MAX_DIM) h = FRAME_MAX_DIM;
    uint32_t n = (uint32_t)w * (uint32_t)h;

    if (n > fcap) {
        free(fsrc);
        free(fdst);
        fsrc = malloc(n);
        fdst = malloc(n);
        fcap = (fsrc && fdst) ? n : 0;
        if (!fcap) {
            free(fsrc);
            free(fdst);
            fsrc = fdst = NULL;
            return 0;
        }
    }

    uint32_t s = cloudlet_seed((uint32_t)seed);
    for (uint32_t i = 0; i < n; i += 4) {
        uint32_t r = cloudlet_xorshift32(&s);
        for (uint32_t k = 0; k < 4 && i + k < n; k++)
            fsrc[i + k] = (uint8_t)(r >> (8 * k));
    }

    if (!blur(fsrc, fdst, (uint32_t)w, (uint32_t)h))
        return 0;
    return (int32_t)account(fdst, n);
}

CLOUDLET_EXPORT("filter_frames")
int32_t filter_frames(void)
{
    return (int32_t)frames;
}

CLOUDLET_EXPORT("filter_state")
int32_t filter_state(void)
{
    return (int32_t)state;
}
