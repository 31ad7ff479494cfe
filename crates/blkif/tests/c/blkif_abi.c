/*
 * ABI cross-check for the blkif crate, built against Xen's own headers.
 *
 * Compiled by tests/abi_cross_check.rs with gcc, once natively (x86_64 layout) and
 * once with -m32 (i386 = x86_32-abi layout). Two modes:
 *
 *   blkif_abi layout
 *       Prints "name value" lines: sizeof/offsetof of every blkif struct and of the
 *       shared-ring header, ring sizes per order, and the protocol constants.
 *
 *   blkif_abi ring <file> <order> <start> <seed> <count> <sectors> <lbs> <max_indirect>
 *       Acts as a frontend written with the official ring.h macros. <file> holds the
 *       shared ring (4096 << order bytes) followed by a pool of indirect-descriptor
 *       pages, 8 per ring slot (a descriptor page's "gref" is its index in the pool).
 *       The ring indices start at <start> (set after SHARED_RING_INIT) so they wrap at
 *       2^32. In turns with the Rust backend (over stdin/stdout, no sleeps):
 *         - push a batch of mixed requests in two parts, printing one "REQ ..." line
 *           per request (its fields as this compiler laid them out), checking the
 *           notify decision of each RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then
 *           "PUSHED <k>";
 *         - wait for "GO" on stdin, then consume the responses with RING_COPY_RESPONSE
 *           and RING_FINAL_CHECK_FOR_RESPONSES, checking every id, operation and
 *           status against what this generator expects.
 *       Ends with "DONE <count>" and exit status 0, or a message on stderr and 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ring.h leaves the barriers to the includer: xen_mb() and friends for interface
 * version >= 0x00030208, mb() and friends (what it maps them to) for older ones, which
 * is what a program that asks for no version gets. Define both ways. */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/xen-compat.h>
#if __XEN_INTERFACE_VERSION__ >= 0x00030208
#define xen_mb() mb()
#define xen_rmb() rmb()
#define xen_wmb() wmb()
#endif

#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#define PAGE 4096u
#define POOL_PAGES_PER_SLOT BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
#define SEGS_PER_PAGE (PAGE / sizeof(struct blkif_request_segment))
#define ID_BASE 0xA5C3000000000000ULL

#define FAIL(...)                                                                 \
    do {                                                                          \
        fprintf(stderr, "blkif_abi (%zu-bit): ", sizeof(void *) * 8);             \
        fprintf(stderr, __VA_ARGS__);                                             \
        fputc('\n', stderr);                                                      \
        exit(1);                                                                  \
    } while (0)

#define P(name, value) printf("%s %lld\n", name, (long long)(value))
#define OFF(type, field) P(#type "." #field, offsetof(struct type, field))
#define SIZE(type) P(#type ".size", sizeof(struct type))

static int layout(void)
{
    SIZE(blkif_request);
    OFF(blkif_request, operation);
    OFF(blkif_request, nr_segments);
    OFF(blkif_request, handle);
    OFF(blkif_request, id);
    OFF(blkif_request, sector_number);
    OFF(blkif_request, seg);

    SIZE(blkif_request_segment);
    OFF(blkif_request_segment, gref);
    OFF(blkif_request_segment, first_sect);
    OFF(blkif_request_segment, last_sect);

    SIZE(blkif_request_discard);
    OFF(blkif_request_discard, operation);
    OFF(blkif_request_discard, flag);
    OFF(blkif_request_discard, handle);
    OFF(blkif_request_discard, id);
    OFF(blkif_request_discard, sector_number);
    OFF(blkif_request_discard, nr_sectors);

    SIZE(blkif_request_indirect);
    OFF(blkif_request_indirect, operation);
    OFF(blkif_request_indirect, indirect_op);
    OFF(blkif_request_indirect, nr_segments);
    OFF(blkif_request_indirect, id);
    OFF(blkif_request_indirect, sector_number);
    OFF(blkif_request_indirect, handle);
    OFF(blkif_request_indirect, indirect_grefs);

    /* Xen's blkif.h has no blkif_request_other (Linux's common.h does): an unknown
     * opcode is answered from the common header of struct blkif_request. */
    P("blkif_request_other.operation", offsetof(struct blkif_request, operation));
    P("blkif_request_other.id", offsetof(struct blkif_request, id));

    SIZE(blkif_response);
    OFF(blkif_response, id);
    OFF(blkif_response, operation);
    OFF(blkif_response, status);

    OFF(blkif_sring, req_prod);
    OFF(blkif_sring, req_event);
    OFF(blkif_sring, rsp_prod);
    OFF(blkif_sring, rsp_event);
    OFF(blkif_sring, pvt);
    OFF(blkif_sring, __pad);
    OFF(blkif_sring, ring);
    P("blkif_sring_entry.size", sizeof(union blkif_sring_entry));

    for (int order = 0; order <= 4; order++) {
        char name[32];
        snprintf(name, sizeof(name), "ring_size.%d", order);
        P(name, __CONST_RING_SIZE(blkif, PAGE << order));
    }

    P("BLKIF_OP_READ", BLKIF_OP_READ);
    P("BLKIF_OP_WRITE", BLKIF_OP_WRITE);
    P("BLKIF_OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER);
    P("BLKIF_OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE);
    P("BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1);
    P("BLKIF_OP_DISCARD", BLKIF_OP_DISCARD);
    P("BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT);
    P("BLKIF_RSP_OKAY", BLKIF_RSP_OKAY);
    P("BLKIF_RSP_ERROR", BLKIF_RSP_ERROR);
    P("BLKIF_RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP);
    P("BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE);
    P("BLKIF_MAX_SEGMENTS_PER_REQUEST", BLKIF_MAX_SEGMENTS_PER_REQUEST);
    P("BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    P("SEGS_PER_INDIRECT_PAGE", SEGS_PER_PAGE);
    printf("XEN_IO_PROTO_ABI_NATIVE %s\n", XEN_IO_PROTO_ABI_NATIVE);
    return 0;
}

/* ---- the frontend ---------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64*: deterministic for a given seed. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static unsigned below(unsigned n) { return (unsigned)(rnd() % n); }

struct expect {
    uint8_t operation;
    int16_t status;
};

struct config {
    uint64_t sectors;
    unsigned lbs;
    unsigned max_indirect;
    unsigned ring_bytes;
    unsigned char *mem;
};

/* The descriptor every valid indirect request carries at index n (the Rust side
 * recomputes it to check what it parsed). */
static struct blkif_request_segment indirect_descriptor(uint64_t id, unsigned n, unsigned lbs)
{
    struct blkif_request_segment s;
    memset(&s, 0, sizeof(s));
    s.gref = (uint32_t)(id * 2654435761u) + n;
    if (lbs == 512) {
        s.first_sect = n % 8;
        s.last_sect = s.first_sect + (n / 8) % (8 - s.first_sect);
    } else {
        s.first_sect = 0;
        s.last_sect = 7;
    }
    return s;
}

static uint64_t valid_sector(const struct config *c)
{
    return (rnd() % (c->sectors - 8 * 4096)) & ~7ULL;
}

static void valid_segment(struct blkif_request_segment *s, const struct config *c)
{
    s->gref = (uint32_t)rnd();
    if (c->lbs == 512) {
        s->first_sect = below(8);
        s->last_sect = s->first_sect + below(8 - s->first_sect);
    } else {
        s->first_sect = 0;
        s->last_sect = 7;
    }
}

enum kind {
    K_READ, K_WRITE, K_FLUSH_EMPTY, K_BARRIER_EMPTY, K_FLUSH_DATA, K_DISCARD, K_DISCARD_SECURE,
    K_INDIRECT_READ, K_INDIRECT_WRITE, K_RESERVED_1, K_UNKNOWN_OP, K_READ_NO_SEGS,
    K_TOO_MANY_SEGS, K_LAST_SECT_OUTSIDE, K_LAST_BEFORE_FIRST, K_BEYOND_END, K_OVERFLOW,
    K_INDIRECT_BAD_OP, K_INDIRECT_TOO_MANY, K_INDIRECT_BAD_DESCRIPTOR, K_DISCARD_BEYOND_END,
    K_INDIRECT_NO_SEGS, K_MISALIGNED, NKINDS
};

static void write_descriptors(const struct config *c, RING_IDX slot, uint64_t id, unsigned nseg,
                              struct blkif_request_indirect *ind, int bad_index)
{
    unsigned pages = (nseg + SEGS_PER_PAGE - 1) / SEGS_PER_PAGE;
    for (unsigned p = 0; p < pages; p++)
        ind->indirect_grefs[p] = slot * POOL_PAGES_PER_SLOT + p;
    for (unsigned n = 0; n < nseg; n++) {
        struct blkif_request_segment s = indirect_descriptor(id, n, c->lbs);
        if ((int)n == bad_index) {
            s.first_sect = 6;
            s.last_sect = 3;
        }
        unsigned page = ind->indirect_grefs[n / SEGS_PER_PAGE];
        struct blkif_request_segment *dst =
            (struct blkif_request_segment *)(c->mem + c->ring_bytes + (size_t)page * PAGE);
        dst[n % SEGS_PER_PAGE] = s;
    }
}

/* Fills the slot at `idx` with request number `seq` and says what answer it expects. */
static struct expect fill(blkif_front_ring_t *front, const struct config *c, RING_IDX idx,
                          uint64_t seq)
{
    union blkif_sring_entry *slot = (union blkif_sring_entry *)RING_GET_REQUEST(front, idx);
    struct blkif_request *rw = &slot->req;
    struct blkif_request_discard *d = (struct blkif_request_discard *)slot;
    struct blkif_request_indirect *ind = (struct blkif_request_indirect *)slot;
    RING_IDX slot_index = idx & (RING_SIZE(front) - 1);
    uint64_t id = ID_BASE + seq;
    struct expect e = { 0, BLKIF_RSP_OKAY };
    unsigned kind = below(NKINDS);
    unsigned n;

    memset(slot, 0, sizeof(*slot));
    if (kind == K_MISALIGNED && c->lbs == 512)
        kind = K_READ; /* nothing can be misaligned with 512-byte blocks */

    switch (kind) {
    case K_READ:
    case K_WRITE:
    case K_FLUSH_DATA:
        rw->operation = kind == K_READ ? BLKIF_OP_READ
                        : kind == K_WRITE ? BLKIF_OP_WRITE : BLKIF_OP_FLUSH_DISKCACHE;
        rw->nr_segments = 1 + below(BLKIF_MAX_SEGMENTS_PER_REQUEST);
        rw->handle = (blkif_vdev_t)rnd();
        rw->id = id;
        rw->sector_number = valid_sector(c);
        for (n = 0; n < rw->nr_segments; n++)
            valid_segment(&rw->seg[n], c);
        e.operation = rw->operation;
        break;
    case K_FLUSH_EMPTY:
    case K_BARRIER_EMPTY:
        rw->operation = kind == K_FLUSH_EMPTY ? BLKIF_OP_FLUSH_DISKCACHE : BLKIF_OP_WRITE_BARRIER;
        rw->id = id;
        rw->sector_number = rnd(); /* ignored without segments */
        e.operation = rw->operation;
        break;
    case K_DISCARD:
    case K_DISCARD_SECURE:
    case K_DISCARD_BEYOND_END:
        d->operation = BLKIF_OP_DISCARD;
        d->flag = kind == K_DISCARD_SECURE ? BLKIF_DISCARD_SECURE : 0;
        d->handle = (blkif_vdev_t)rnd();
        d->id = id;
        if (kind == K_DISCARD_BEYOND_END) {
            d->sector_number = c->sectors - 8;
            d->nr_sectors = 16;
            e.status = BLKIF_RSP_ERROR;
        } else {
            d->sector_number = valid_sector(c);
            d->nr_sectors = 8 * (1 + below(64));
        }
        e.operation = BLKIF_OP_DISCARD;
        break;
    case K_INDIRECT_READ:
    case K_INDIRECT_WRITE:
    case K_INDIRECT_BAD_DESCRIPTOR: {
        unsigned nseg = below(16) == 0 ? c->max_indirect : 1 + below(1100);
        if (nseg > c->max_indirect)
            nseg = c->max_indirect;
        ind->operation = BLKIF_OP_INDIRECT;
        ind->indirect_op = kind == K_INDIRECT_WRITE ? BLKIF_OP_WRITE : BLKIF_OP_READ;
        ind->nr_segments = nseg;
        ind->id = id;
        ind->sector_number = valid_sector(c);
        ind->handle = (blkif_vdev_t)rnd();
        write_descriptors(c, slot_index, id, nseg, ind,
                          kind == K_INDIRECT_BAD_DESCRIPTOR ? (int)below(nseg) : -1);
        e.operation = ind->indirect_op;
        if (kind == K_INDIRECT_BAD_DESCRIPTOR)
            e.status = BLKIF_RSP_ERROR;
        break;
    }
    case K_RESERVED_1:
    case K_UNKNOWN_OP:
        rw->operation = kind == K_RESERVED_1 ? BLKIF_OP_RESERVED_1 : 7 + below(249);
        rw->id = id;
        e.operation = rw->operation;
        e.status = BLKIF_RSP_EOPNOTSUPP;
        break;
    case K_READ_NO_SEGS:
        rw->operation = BLKIF_OP_READ;
        rw->id = id;
        rw->sector_number = valid_sector(c);
        e.operation = BLKIF_OP_READ;
        e.status = BLKIF_RSP_ERROR;
        break;
    case K_TOO_MANY_SEGS:
        rw->operation = BLKIF_OP_WRITE;
        rw->nr_segments = 12 + below(244);
        rw->id = id;
        rw->sector_number = valid_sector(c);
        for (n = 0; n < BLKIF_MAX_SEGMENTS_PER_REQUEST; n++)
            valid_segment(&rw->seg[n], c);
        e.operation = BLKIF_OP_WRITE;
        e.status = BLKIF_RSP_ERROR;
        break;
    case K_LAST_SECT_OUTSIDE:
    case K_LAST_BEFORE_FIRST:
        rw->operation = BLKIF_OP_READ;
        rw->nr_segments = 1 + below(BLKIF_MAX_SEGMENTS_PER_REQUEST);
        rw->id = id;
        rw->sector_number = valid_sector(c);
        for (n = 0; n < rw->nr_segments; n++)
            valid_segment(&rw->seg[n], c);
        n = below(rw->nr_segments);
        if (kind == K_LAST_SECT_OUTSIDE) {
            rw->seg[n].first_sect = 0;
            rw->seg[n].last_sect = 8 + below(248);
        } else {
            rw->seg[n].first_sect = 5;
            rw->seg[n].last_sect = 2;
        }
        e.operation = BLKIF_OP_READ;
        e.status = BLKIF_RSP_ERROR;
        break;
    case K_BEYOND_END:
    case K_OVERFLOW:
    case K_MISALIGNED:
        rw->operation = BLKIF_OP_WRITE;
        rw->nr_segments = 2;
        rw->id = id;
        rw->sector_number = kind == K_BEYOND_END ? c->sectors - 8
                            : kind == K_OVERFLOW ? UINT64_MAX - 7 : valid_sector(c) + 1;
        for (n = 0; n < 2; n++) {
            rw->seg[n].gref = (uint32_t)rnd();
            rw->seg[n].first_sect = 0;
            rw->seg[n].last_sect = 7;
        }
        e.operation = BLKIF_OP_WRITE;
        e.status = BLKIF_RSP_ERROR;
        break;
    case K_INDIRECT_BAD_OP:
        ind->operation = BLKIF_OP_INDIRECT;
        ind->indirect_op = 2 + below(254);
        ind->nr_segments = 1;
        ind->id = id;
        ind->sector_number = valid_sector(c);
        write_descriptors(c, slot_index, id, 1, ind, -1);
        e.operation = ind->indirect_op; /* blkback answers with the inner op */
        e.status = BLKIF_RSP_ERROR;
        break;
    case K_INDIRECT_TOO_MANY:
    case K_INDIRECT_NO_SEGS:
        ind->operation = BLKIF_OP_INDIRECT;
        ind->indirect_op = BLKIF_OP_READ;
        ind->nr_segments =
            kind == K_INDIRECT_NO_SEGS ? 0 : c->max_indirect + 1 + below(65535 - c->max_indirect);
        ind->id = id;
        ind->sector_number = valid_sector(c);
        ind->indirect_grefs[0] = (uint32_t)rnd();
        e.operation = BLKIF_OP_READ;
        e.status = BLKIF_RSP_ERROR;
        break;
    }

    /* Describe the request as laid out by this compiler. */
    switch (rw->operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE:
        printf("REQ rw %" PRIu64 " %u %u %u %" PRIu64, rw->id, rw->operation, rw->nr_segments,
               rw->handle, rw->sector_number);
        for (n = 0; n < BLKIF_MAX_SEGMENTS_PER_REQUEST; n++)
            printf(" %u:%u:%u", rw->seg[n].gref, rw->seg[n].first_sect, rw->seg[n].last_sect);
        printf("\n");
        break;
    case BLKIF_OP_DISCARD:
        printf("REQ discard %" PRIu64 " %u %u %" PRIu64 " %" PRIu64 "\n", d->id, d->flag,
               d->handle, d->sector_number, d->nr_sectors);
        break;
    case BLKIF_OP_INDIRECT:
        printf("REQ indirect %" PRIu64 " %u %u %u %" PRIu64, ind->id, ind->indirect_op,
               ind->nr_segments, ind->handle, ind->sector_number);
        for (n = 0; n < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; n++)
            printf(" %u", ind->indirect_grefs[n]);
        printf("\n");
        break;
    default:
        printf("REQ other %" PRIu64 " %u\n", rw->id, rw->operation);
        break;
    }
    return e;
}

static int ring(int argc, char **argv)
{
    if (argc != 10)
        FAIL("usage: ring <file> <order> <start> <seed> <count> <sectors> <lbs> <max_indirect>");
    unsigned order = (unsigned)strtoul(argv[3], NULL, 0);
    RING_IDX start = (RING_IDX)strtoul(argv[4], NULL, 0);
    rng_state = strtoull(argv[5], NULL, 0) | 1;
    uint64_t count = strtoull(argv[6], NULL, 0);
    struct config c;
    c.sectors = strtoull(argv[7], NULL, 0);
    c.lbs = (unsigned)strtoul(argv[8], NULL, 0);
    c.max_indirect = (unsigned)strtoul(argv[9], NULL, 0);
    c.ring_bytes = PAGE << order;

    int fd = open(argv[2], O_RDWR);
    if (fd < 0)
        FAIL("open %s: %s", argv[2], strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0)
        FAIL("fstat: %s", strerror(errno));
    c.mem = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (c.mem == MAP_FAILED)
        FAIL("mmap: %s", strerror(errno));

    blkif_sring_t *sring = (blkif_sring_t *)c.mem;
    blkif_front_ring_t front;
    SHARED_RING_INIT(sring);
    /* Start the indices near 2^32 so they wrap during the run. */
    sring->req_prod = sring->rsp_prod = start;
    sring->req_event = sring->rsp_event = start + 1;
    FRONT_RING_ATTACH(&front, sring, start, c.ring_bytes);
    if ((size_t)st.st_size < c.ring_bytes + (size_t)RING_SIZE(&front) * POOL_PAGES_PER_SLOT * PAGE)
        FAIL("file too small for the descriptor pool");

    struct expect *expected = calloc(count, sizeof(*expected));
    if (!expected)
        FAIL("out of memory");

    printf("READY %u\n", RING_SIZE(&front));
    fflush(stdout);

    uint64_t seq = 0, answered = 0;
    char line[64];
    while (seq < count) {
        unsigned free_slots = RING_FREE_REQUESTS(&front);
        if (free_slots != RING_SIZE(&front))
            FAIL("%u free slots, expected an empty ring of %u", free_slots, RING_SIZE(&front));
        unsigned k = below(4) == 0 ? free_slots : 1 + below(free_slots);
        if (k > count - seq)
            k = (unsigned)(count - seq);
        unsigned first = 1 + below(k), j;
        int notify;

        for (j = 0; j < first; j++, seq++)
            expected[seq] = fill(&front, &c, front.req_prod_pvt++, seq);
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
        /* The backend re-armed req_event with RING_FINAL_CHECK_FOR_REQUESTS. */
        if (!notify)
            FAIL("first push of a batch did not ask for a notification");
        for (; j < k; j++, seq++)
            expected[seq] = fill(&front, &c, front.req_prod_pvt++, seq);
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
        /* ...and has not run since: req_event is behind, no second notification. */
        if (notify)
            FAIL("second push of a batch asked for a notification");
        printf("PUSHED %u\n", k);
        fflush(stdout);

        if (!fgets(line, sizeof(line), stdin))
            FAIL("backend closed the pipe");
        if (strncmp(line, "GO", 2) != 0)
            FAIL("unexpected line from the backend: %s", line);

        unsigned got = 0;
        int more;
        do {
            while (RING_HAS_UNCONSUMED_RESPONSES(&front)) {
                struct blkif_response rsp;
                RING_COPY_RESPONSE(&front, front.rsp_cons, &rsp);
                front.rsp_cons++;
                if (answered >= seq)
                    FAIL("more responses than requests");
                uint64_t want_id = ID_BASE + answered;
                struct expect e = expected[answered];
                if (rsp.id != want_id || rsp.operation != e.operation || rsp.status != e.status)
                    FAIL("response %" PRIu64 ": got id %#" PRIx64 " op %u status %d, expected id %#" PRIx64
                         " op %u status %d",
                         answered, rsp.id, rsp.operation, rsp.status, want_id, e.operation,
                         e.status);
                answered++;
                got++;
            }
            RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
        } while (more);
        if (got != k)
            FAIL("batch of %u requests got %u responses", k, got);
    }
    if (front.req_prod_pvt != start + (RING_IDX)count || front.rsp_cons != front.req_prod_pvt)
        FAIL("indices out of step at the end");
    printf("DONE %" PRIu64 " %u\n", answered, front.rsp_cons);
    fflush(stdout);
    free(expected);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "layout") == 0)
        return layout();
    if (argc >= 2 && strcmp(argv[1], "ring") == 0)
        return ring(argc, argv);
    FAIL("usage: blkif_abi layout | ring ...");
}
