/*
 * vdi.c - an interactive, VDI-style session: a small framebuffer that is
 * redrawn in response to keyboard and pointer events.
 *
 * Why it exists: Cloudlet's pitch is that an interactive session can follow
 * its user between edge nodes.  This guest is the stand-in for such a
 * session.  Each event is cheap (a few hundred bytes of pixels change), so it
 * is the workload for per-event latency measurements, and its state (screen,
 * text cursor, pointer, pending dirty regions) is exactly the kind of thing
 * that must survive a snapshot/migrate/restore without the user noticing.
 * vdi_checksum() lets a test compare the session before and after migration.
 *
 * Model:
 *   - screen: w x h bytes, one byte per pixel, default 256 x 192, 0 = background;
 *   - keys draw an 8x8 glyph derived from the key code at a text cursor that
 *     advances, wraps, and scrolls the whole screen up at the bottom;
 *     code 10/13 = newline, 8 = backspace;
 *   - clicks invert a 16x16 square;
 *   - the pointer is a 4x4 XOR sprite (XOR so that erasing it restores the
 *     pixels underneath without a save-under buffer; it is hidden around every
 *     other drawing operation so that XOR never sees changed pixels);
 *   - every change is recorded as a dirty rectangle, merged with the pending
 *     ones, until the client takes a frame (vdi_frame / vdi_events), as a
 *     remote-display protocol would send only the changed regions.
 *
 * vdi_init() deliberately starts with an empty dirty list: a client that
 * (re)connects fetches the whole screen anyway.
 */
#include "cloudlet_abi.h"

#define VDI_DEFAULT_W 256
#define VDI_DEFAULT_H 192
#define VDI_MAX_DIM 1024
#define GLYPH 8
#define CLICK 16
#define SPRITE 4
/* Bounded so the frame encoding stays small and merging stays O(n^2) cheap;
 * when full, the new region is merged into its cheapest neighbour. */
#define MAX_DIRTY 32

enum { EV_KEY = 1, EV_CLICK = 2, EV_MOVE = 3 };
#define EVENT_SIZE 5

/* Half-open rectangle [x0, x1) x [y0, y1) in screen coordinates. */
typedef struct {
    int32_t x0, y0, x1, y1;
} rect_t;

static uint8_t *screen;
static int32_t scr_w, scr_h;
static int32_t cur_col, cur_row;   /* text cursor, in glyph cells */
static int32_t ptr_x, ptr_y;       /* pointer sprite top-left, in pixels */
static int32_t ptr_shown;          /* sprite currently drawn on screen? */

static rect_t dirty[MAX_DIRTY];
static int32_t ndirty;

/* ---------------------------------------------------------------------------
 * Rectangles
 * ------------------------------------------------------------------------- */

static int32_t min32(int32_t a, int32_t b) { return a < b ? a : b; }
static int32_t max32(int32_t a, int32_t b) { return a > b ? a : b; }

/* Clip the rectangle at (x, y) of size (w, h) to the screen.  64-bit maths
 * because event coordinates come from the host and x + w may overflow. */
static rect_t clip_rect(int64_t x, int64_t y, int64_t w, int64_t h)
{
    int64_t x0 = x < 0 ? 0 : x, y0 = y < 0 ? 0 : y;
    int64_t x1 = x + w, y1 = y + h;
    if (x1 > scr_w) x1 = scr_w;
    if (y1 > scr_h) y1 = scr_h;
    rect_t r = {0, 0, 0, 0};
    if (x0 < x1 && y0 < y1) {
        r.x0 = (int32_t)x0; r.y0 = (int32_t)y0;
        r.x1 = (int32_t)x1; r.y1 = (int32_t)y1;
    }
    return r;
}

static int rect_empty(rect_t r) { return r.x0 >= r.x1 || r.y0 >= r.y1; }

static rect_t rect_union(rect_t a, rect_t b)
{
    rect_t r = {min32(a.x0, b.x0), min32(a.y0, b.y0),
                max32(a.x1, b.x1), max32(a.y1, b.y1)};
    return r;
}

static int64_t rect_area(rect_t r)
{
    return (int64_t)(r.x1 - r.x0) * (int64_t)(r.y1 - r.y0);
}

/* Merge if the rectangles overlap or share an edge: sending one bigger
 * region is cheaper than two adjacent ones (typing a line of text collapses
 * into one strip).  Rectangles touching only at a corner are kept apart,
 * because their union would mostly be unchanged pixels. */
static int rect_mergeable(rect_t a, rect_t b)
{
    int32_t ox = min32(a.x1, b.x1) - max32(a.x0, b.x0);
    int32_t oy = min32(a.y1, b.y1) - max32(a.y0, b.y0);
    return ox >= 0 && oy >= 0 && (ox > 0 || oy > 0);
}

static void dirty_remove(int32_t i)
{
    /* Shift rather than swap so the frame lists regions in a stable,
     * mostly chronological order. */
    memmove(&dirty[i], &dirty[i + 1], (size_t)(ndirty - i - 1) * sizeof(rect_t));
    ndirty--;
}

static void dirty_add(rect_t r)
{
    if (rect_empty(r))
        return;
    for (;;) {
        int32_t i;
        for (i = 0; i < ndirty; i++)
            if (rect_mergeable(r, dirty[i]))
                break;
        if (i < ndirty) {
            /* The union may now touch regions it did not touch before, so
             * rescan from the start. */
            r = rect_union(r, dirty[i]);
            dirty_remove(i);
            continue;
        }
        if (ndirty < MAX_DIRTY)
            break;
        /* List full: absorb the region whose union grows the least. */
        int32_t best = 0;
        int64_t best_cost = INT64_MAX;
        for (i = 0; i < ndirty; i++) {
            int64_t cost = rect_area(rect_union(r, dirty[i])) - rect_area(dirty[i]);
            if (cost < best_cost) {
                best_cost = cost;
                best = i;
            }
        }
        r = rect_union(r, dirty[best]);
        dirty_remove(best);
    }
    dirty[ndirty++] = r;
}

/* ---------------------------------------------------------------------------
 * Drawing
 * ------------------------------------------------------------------------- */

static void xor_rect(rect_t r)
{
    for (int32_t y = r.y0; y < r.y1; y++) {
        uint8_t *row = screen + (size_t)y * (size_t)scr_w;
        for (int32_t x = r.x0; x < r.x1; x++)
            row[x] ^= 0xffu;
    }
}

static rect_t sprite_rect(void)
{
    return clip_rect(ptr_x, ptr_y, SPRITE, SPRITE);
}

/* Hide/show bracket every drawing operation so the XOR sprite is always
 * drawn over the final pixels.  The pair is pixel-neutral, so it adds no
 * dirty regions. */
static void sprite_hide(void)
{
    if (ptr_shown)
        xor_rect(sprite_rect());
}

static void sprite_show(void)
{
    if (ptr_shown)
        xor_rect(sprite_rect());
}

static int32_t text_cols(void) { return scr_w >= GLYPH ? scr_w / GLYPH : 1; }
static int32_t text_rows(void) { return scr_h >= GLYPH ? scr_h / GLYPH : 1; }

/* Scroll the text area up by one glyph row.  The whole screen changes, which
 * is the expensive case a remote display has to cope with. */
static void scroll_up(void)
{
    size_t w = (size_t)scr_w, h = (size_t)scr_h;
    size_t shift = h > GLYPH ? GLYPH : h;
    memmove(screen, screen + shift * w, (h - shift) * w);
    memset(screen + (h - shift) * w, 0, shift * w);
    dirty_add(clip_rect(0, 0, scr_w, scr_h));
}

static void newline(void)
{
    cur_col = 0;
    if (cur_row + 1 >= text_rows())
        scroll_up();
    else
        cur_row++;
}

/* Paint the glyph for `code` into its cell (or clear the cell when
 * code < 0).  The bitmap is a hash of the code, not a font: what matters for
 * the workload is that each key produces a distinctive, deterministic patch
 * of pixels. */
static void draw_cell(int32_t col, int32_t row, int32_t code)
{
    rect_t r = clip_rect((int64_t)col * GLYPH, (int64_t)row * GLYPH, GLYPH, GLYPH);
    if (rect_empty(r))
        return;
    uint32_t s = cloudlet_seed(cloudlet_mix32((uint32_t)code));
    uint64_t bits = 0;
    uint8_t fg = 0;
    if (code >= 0 && code != ' ') {
        bits = ((uint64_t)cloudlet_xorshift32(&s) << 32) | cloudlet_xorshift32(&s);
        fg = (uint8_t)(0x80u | ((uint32_t)code & 0x7fu));
    }
    for (int32_t y = r.y0; y < r.y1; y++) {
        int32_t gy = y - row * GLYPH;
        uint8_t *p = screen + (size_t)y * (size_t)scr_w;
        for (int32_t x = r.x0; x < r.x1; x++) {
            int32_t gx = x - col * GLYPH;
            /* Leave the last column and row blank as inter-glyph spacing. */
            int on = gx < GLYPH - 1 && gy < GLYPH - 1 &&
                     ((bits >> (gy * GLYPH + gx)) & 1u);
            p[x] = on ? fg : 0;
        }
    }
    dirty_add(r);
}

/* ---------------------------------------------------------------------------
 * Session state
 * ------------------------------------------------------------------------- */

CLOUDLET_EXPORT("vdi_init")
int32_t vdi_init(int32_t w, int32_t h)
{
    if (w < 1 || w > VDI_MAX_DIM || h < 1 || h > VDI_MAX_DIM)
        return -1;
    /* Allocate before freeing so a failed re-init leaves the old session. */
    uint8_t *s = malloc((size_t)w * (size_t)h);
    if (!s)
        return -1;
    free(screen);
    screen = s;
    scr_w = w;
    scr_h = h;
    memset(screen, 0, (size_t)w * (size_t)h);
    cur_col = cur_row = 0;
    ptr_x = ptr_y = 0;
    ptr_shown = 0;
    ndirty = 0;
    return w * h;
}

/* Every entry point initialises lazily, so a host can start sending events
 * to a freshly instantiated module without any setup call. */
static int ensure_screen(void)
{
    return screen != NULL || vdi_init(VDI_DEFAULT_W, VDI_DEFAULT_H) > 0;
}

static void do_key(int32_t code)
{
    sprite_hide();
    if (code == '\n' || code == '\r') {
        newline();
    } else if (code == '\b') {
        if (cur_col > 0) {
            cur_col--;
        } else if (cur_row > 0) {
            cur_row--;
            cur_col = text_cols() - 1;
        }
        draw_cell(cur_col, cur_row, -1);
    } else {
        draw_cell(cur_col, cur_row, code);
        if (++cur_col >= text_cols())
            newline();
    }
    sprite_show();
}

static void do_click(int32_t x, int32_t y)
{
    rect_t r = clip_rect(x, y, CLICK, CLICK);
    if (rect_empty(r))
        return;
    sprite_hide();
    xor_rect(r);
    sprite_show();
    dirty_add(r);
}

static void do_move(int32_t x, int32_t y)
{
    if (ptr_shown) {
        rect_t old = sprite_rect();
        xor_rect(old);
        dirty_add(old);
    }
    ptr_x = x;
    ptr_y = y;
    ptr_shown = 1;
    rect_t r = sprite_rect();
    xor_rect(r);
    dirty_add(r);
}

CLOUDLET_EXPORT("vdi_key")
int32_t vdi_key(int32_t code)
{
    if (!ensure_screen())
        return -1;
    do_key(code);
    return ndirty;
}

CLOUDLET_EXPORT("vdi_click")
int32_t vdi_click(int32_t x, int32_t y)
{
    if (!ensure_screen())
        return -1;
    do_click(x, y);
    return ndirty;
}

CLOUDLET_EXPORT("vdi_move")
int32_t vdi_move(int32_t x, int32_t y)
{
    if (!ensure_screen())
        return -1;
    do_move(x, y);
    return ndirty;
}

CLOUDLET_EXPORT("vdi_frame")
int32_t vdi_frame(void)
{
    if (!ensure_screen())
        return -1;
    int32_t n = ndirty;
    ndirty = 0;
    return n;
}

/* Bytes: a batch of 5-byte events {type u8, a u16le, b u16le}, applied in
 * order.  Batching is how a real remote-display client amortises round
 * trips.  Unknown types are skipped; a trailing partial event is ignored.
 * Output: u16le count, then count x {x, y, w, h} u16le; the dirty list is
 * then cleared (this call is a frame). */
CLOUDLET_EXPORT("vdi_events")
int64_t vdi_events(int32_t ptr, int32_t len)
{
    if (!cloudlet_in_range(ptr, len) || !ensure_screen())
        return cloudlet_output_empty();
    const uint8_t *in = (const uint8_t *)(uintptr_t)(uint32_t)ptr;
    for (int32_t off = 0; off + EVENT_SIZE <= len; off += EVENT_SIZE) {
        const uint8_t *ev = in + off;
        int32_t a = cloudlet_get_u16le(ev + 1);
        int32_t b = cloudlet_get_u16le(ev + 3);
        switch (ev[0]) {
        case EV_KEY:   do_key(a);      break;
        case EV_CLICK: do_click(a, b); break;
        case EV_MOVE:  do_move(a, b);  break;
        default:                       break;
        }
    }
    /* Reserve only after the events are consumed: the host may legally pass
     * our previous output buffer back as input. */
    uint32_t n = 2u + 8u * (uint32_t)ndirty;
    uint8_t *out = cloudlet_out_reserve(n);
    if (!out)
        return cloudlet_output_empty();
    cloudlet_put_u16le(out, (uint16_t)ndirty);
    for (int32_t i = 0; i < ndirty; i++) {
        uint8_t *o = out + 2 + 8 * i;
        /* Dimensions are capped at 1024, so every field fits in a u16. */
        cloudlet_put_u16le(o + 0, (uint16_t)dirty[i].x0);
        cloudlet_put_u16le(o + 2, (uint16_t)dirty[i].y0);
        cloudlet_put_u16le(o + 4, (uint16_t)(dirty[i].x1 - dirty[i].x0));
        cloudlet_put_u16le(o + 6, (uint16_t)(dirty[i].y1 - dirty[i].y0));
    }
    ndirty = 0;
    return cloudlet_output(out, n);
}

/* FNV-1a of every pixel plus the cursor state: two sessions with the same
 * checksum look and behave the same to the user, which is what a migration
 * test wants to assert. */
CLOUDLET_EXPORT("vdi_checksum")
int32_t vdi_checksum(void)
{
    if (!ensure_screen())
        return -1;
    uint32_t h = cloudlet_fnv1a(CLOUDLET_FNV_INIT, screen,
                                (size_t)scr_w * (size_t)scr_h);
    h = cloudlet_fnv1a_u32(h, (uint32_t)scr_w);
    h = cloudlet_fnv1a_u32(h, (uint32_t)scr_h);
    h = cloudlet_fnv1a_u32(h, (uint32_t)cur_col);
    h = cloudlet_fnv1a_u32(h, (uint32_t)cur_row);
    h = cloudlet_fnv1a_u32(h, (uint32_t)ptr_x);
    h = cloudlet_fnv1a_u32(h, (uint32_t)ptr_y);
    h = cloudlet_fnv1a_u32(h, (uint32_t)ptr_shown);
    return (int32_t)h;
}
