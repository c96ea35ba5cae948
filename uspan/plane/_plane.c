/* The data plane: established WireGuard sessions carried by a C thread without the GIL.
 *
 * Why: the trio shell's wake per packet batch costs ~270k instructions per ping; the
 * protocol work is ~10k (branch plane, proto/DESIGN.md). This thread owns the
 * per-packet state of the keypairs the core installs (send counters, replay windows,
 * roaming, per-peer traffic records) and hands up what it does not handle (punts).
 * The contract with the core is docs/dataplane.md.
 *
 * Layout: tables (peers, keypairs by local index, routes), the per-packet steps as
 * plain functions over buffers (tun_step, udp_step: no Python, no I/O, callable
 * synchronously), the thread (epoll, batched reads and sends around those steps), and
 * the Python surface.
 *
 * Locks, always taken in this order and never across a syscall:
 *   routes (rwlock) and index (rwlock) alone: lookups for a whole batch at once;
 *   peer->lock: roles, keypair counters and windows, endpoint, record (the thread takes
 *     it once per run of one peer in a batch);
 *   index (write) inside peer->lock: install, drop, the thread's confirm of `next`;
 *   news_lock inside peer->lock: dirty list, punt ring, the eventfd's count (written
 *     by wake_shell once no lock is held);
 *   gate_lock outside news_lock: the core's plan for handshake messages and what it
 *     judged (a handed-up initiation is counted and punted at once);
 *   retire_lock innermost: keypairs waiting to be freed;
 *   jobs_lock alone: the queue of route changes for the routes thread (route_run).
 * Freed keypairs wait for the thread's next batch boundary (epoch): a batch that looked
 * a keypair up keeps a valid pointer until it ends, and sees it dead under peer->lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stddef.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <netinet/udp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../csrc/handshake.h" /* the gate's verdict and cookie replies, as _gate.c */
#include "../csrc/segment.h" /* TSO/USO cuts and GRO merges over plain buffers */
#include "../wg/_transport.h" /* the message layout and sealing, as the core's _aead.c */

#define INITIATION_SIZE 148
#define RESPONSE_SIZE 92
#define COOKIE_REPLY_SIZE 64
#define MSG_COOKIE_REPLY 3
#define DEMUX_MARK 0xFF
#define BATCH 32
#define MAX_MTU 9216
#define SLOT (MAX_MTU + 128) /* one datagram or one packet with room to seal in place */
#define MAX_PACKET (SLOT - HEADER_SIZE - 2 * TAG_SIZE) /* an inner packet sealed in a slot */
#define CAPACITY 256   /* packets of the thread's batch: a few super-segments cut */
#define CUT_MAX 128    /* segments of one TSO/USO read (64 KiB cut at a small MTU) */
#define RX_BUFFERS 32  /* receives per recvmmsg, each room for a UDP_GRO buffer */
#define RX_BUFFER 65536
#define UDP_MAX_PAYLOAD (65535 - 20 - 8) /* one UDP_SEGMENT send */
#define PUNT_SLOTS 256
#define PUNT_UDP_RESERVED 64 /* of PUNT_SLOTS: UDP punts' alone (handshakes, review M4) */
#define PUNT_TUN_PER_PEER 128 /* a peer's TUN punts between collects: MAX_STAGED_PACKETS */
#define MAX_SOCKETS 8
#define REPLAY_WORDS 128
#define REPLAY_WINDOW (REPLAY_WORDS * 64 - 64)
#define REKEY_AFTER_MESSAGES (1ULL << 60)
#define REJECT_AFTER_MESSAGES (UINT64_MAX - (1ULL << 13)) /* 2^64 - 2^13 - 1 */
#define NS 1000000000ULL
#define REKEY_AFTER_TIME (120 * NS)
#define REJECT_AFTER_TIME (180 * NS)
#define REKEY_ON_RECEIVE_AGE ((180 - 10 - 5) * NS)
#define CLOCK_SLACK NS /* how far ahead of the clock a keypair's creation may be */
#define PEER_CHUNK 1024
#define PEER_CHUNKS 1024 /* up to a million peers */
#define NO_SLOT UINT32_MAX
#define GATE_LANE_MAX 256  /* lane records a plan may carry (the core's: MAX_TRUSTED, 64) */
#define GATE_ASK_AFTER 128 /* bad mac1s a calm plan drops before the core hears of them */
#define GATE_REPLIES 32    /* cookie replies per sendmmsg */

enum { PUNT_TUN = 1, PUNT_UDP = 2, PUNT_EGRESS = 3 };
enum { EVENT_CONFIRMED = 1 };
#define NEWS_URGENT (UINT64_C(1) << 32) /* the eventfd's count for punts and events */
/* What the TUN and sockets were set up for (the daemon's offload probe decides). */
enum { OFFLOAD_TUN_VNET = 1, OFFLOAD_TUN_USO = 2, OFFLOAD_UDP_GSO = 4 };

/* Counters: the first ones are the core's Drop values, then the plane's own. */
enum {
    C_BAD_LENGTH, C_BAD_TYPE, C_UNKNOWN_INDEX, C_EXPIRED_KEY, C_DECRYPT_FAILED, C_REPLAY,
    C_BAD_INNER_PACKET, C_NOT_ALLOWED_SOURCE, C_NO_ROUTE, C_NO_ENDPOINT,
    C_TUN_READS, C_UDP_READS, C_WAKES, C_SEALED, C_OPENED, C_KEEPALIVES, C_PUNTS,
    C_PUNTS_DROPPED, C_ROAMS, C_CONFIRMED, C_SEND_ERRORS,
    C_TUN_WRITE_ERRORS, C_FD_ERRORS, C_TUN_LOST, C_EPOLL_ERRORS, C_TSO_READS, C_GSO_SENDS,
    C_GRO_RECEIVES, C_MERGED_WRITES, C_TUN_PUNTS_DROPPED, C_UDP_PUNTS_DROPPED,
    C_EGRESS_PUNTS_DROPPED, C_STICKY_FAILED, C_COUNT
};
static const char *counter_names[C_COUNT] = {
    "bad_length", "bad_type", "unknown_index", "expired_key", "decrypt_failed", "replay",
    "bad_inner_packet", "not_allowed_source", "no_route", "no_endpoint",
    "tun_reads", "udp_reads", "wakes", "sealed", "opened", "keepalives", "punts",
    "punts_dropped", "roams", "confirmed", "send_errors",
    "tun_write_errors", "fd_errors", "tun_lost", "epoll_errors", "tso_reads", "gso_sends",
    "gro_receives", "merged_writes", "tun_punts_dropped", "udp_punts_dropped",
    "egress_punts_dropped", "sticky_failed"};

static EVP_CIPHER *chacha20_poly1305;

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} Address;

/* Where a peer's datagrams go (or a datagram came from). len 0: none. */
typedef struct {
    Address addr;
    socklen_t len;
    unsigned char local[16]; /* sticky source, local_len 0: none */
    int local_len;
    int ifindex;
    int relayed;
} Endpoint;

typedef struct Keypair Keypair;
typedef struct Peer Peer;

struct Keypair {
    uint32_t local_index, remote_index;
    Peer *peer;
    EVP_CIPHER_CTX *seal, *open;
    uint64_t created;
    int initiator;
    int live; /* under peer->lock: 0 once dropped */
    uint64_t send_counter;
    uint64_t replay_top;
    uint64_t replay[REPLAY_WORDS];
    uint64_t retired_at; /* the epoch it was retired in */
    Keypair *retired_next;
};

/* proto/timersync.py's TrafficRecord, times in ns (0: none), and the facts. */
typedef struct {
    uint64_t last_sent, last_received, data_sent_since_received, data_received_since_sent;
    int data_received_again, data_received_before_sent;
    uint64_t rx_bytes, tx_bytes;
    int roamed;
    Endpoint roam;
    int wants;
    int confirmed; /* the thread confirmed `next` (the last one, in confirmed_index): an
                    * event in the record, so no ring can overflow and lose it */
    uint32_t confirmed_index;
} Record;

struct Peer {
    pthread_mutex_t lock;
    uint32_t slot, generation; /* generation: under lock, and the GIL for the core */
    int live;
    Keypair *previous, *current, *next;
    Endpoint endpoint;
    Record record;
    int dirty;       /* under lock: the record has news */
    int listed;      /* under news_lock: on the dirty list */
    uint32_t tun_punts;      /* under news_lock: TUN punts in collect round punt_round */
    uint64_t punt_round;
    uint32_t dirty_next;
    uint32_t free_next; /* under the GIL: the free list of slots */
};

/* Routes: one open-addressing table per family keyed by (length, network bits), and
 * the count of prefixes of each length, so a lookup probes once per length present. */
typedef struct {
    uint64_t hi, lo; /* the network bits (IPv4: lo only) */
    uint32_t slot, generation;
    uint8_t length, used;
} Route;

typedef struct {
    Route *entries;
    size_t mask, count;
    size_t lengths[129];
    int width; /* 32 or 128 */
} RouteTable;

typedef struct {
    uint64_t hi, lo;
    int length, v6;
} Prefix;

/* One add_routes/remove_routes call, queued for the routes thread (see route_run). */
typedef struct RouteJob {
    struct RouteJob *next;
    uint32_t slot, generation; /* the peer's, when it was queued */
    int add;
    size_t n;
    Prefix prefixes[];
} RouteJob;

typedef struct {
    Keypair **entries;
    size_t mask, count;
} IndexTable;

typedef struct {
    int kind;
    uint64_t peer;
    uint16_t length;
    Endpoint source;
    int fd;
    int handed; /* an initiation the gate handed up (counted in Gate.handed until taken) */
    unsigned char data[SLOT];
} Punt;

/* The core's plan for handshake messages (uspan.wg.verdict.Plan), judged in the thread
 * as uspan/daemon/_gate.c judges them in the trio path, and what was judged since the
 * core last took it (gate_take). Off: every handshake message goes up. A collect moves
 * the counts to `taken`, and a handed-up initiation's count only with its punt (a
 * collect short of memory leaves punts in the ring): the core's budgets then know
 * exactly which handed-up initiations it has judged, and a new plan's hand_up leaves
 * room for those still in the ring. */
typedef struct {
    int on, under_load, has_secret;
    unsigned char mac1_key[HS_KEY_SIZE], cookie_key[HS_KEY_SIZE], secret[HS_KEY_SIZE];
    hs_macs macs; /* over the keys above, keyed at the first message judged */
    int64_t hand_up, cookies; /* what is left of the plan's budgets */
    unsigned char lane[GATE_LANE_MAX * HS_LANE_RECORD];
    size_t lane_len;
    int asked; /* the core was asked for a new plan since this one came */
    /* since the last collect: as uspan.wg.verdict.Counts, and overflowed: up but no room;
     * handed: the handed-up initiations in the punt ring */
    uint64_t bad_mac1, handed, cookies_sent, dropped, failed, overflowed;
    uint64_t taken[6]; /* the same, up to the last collect, for gate_take */
} Gate;

/* Room for a sticky source (IP_PKTINFO / IPV6_PKTINFO) and a UDP_SEGMENT or UDP_GRO. */
typedef union {
    char buffer[CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} Control;

/* The gate's cookie replies of one receive (all to its socket), made under gate_lock
 * and sent after it (gate_flush), with nonces drawn GATE_REPLIES at a time. */
typedef struct {
    struct mmsghdr msgs[GATE_REPLIES];
    struct iovec iov[GATE_REPLIES];
    Endpoint to[GATE_REPLIES];
    Control control[GATE_REPLIES];
    unsigned char data[GATE_REPLIES][HS_REPLY_SIZE];
    unsigned char nonces[GATE_REPLIES][HS_NONCE_SIZE];
    int count, fd, nonces_used;
    EVP_CIPHER_CTX *ctx;
} Replies;

/* One batch: the thread's own, or a synchronous call's. Item i's bytes are at data[i]:
 * slot i of the arena (SLOT bytes each), or for a receive a datagram inside one of the
 * arena's RX_BUFFER-byte receive buffers (a UDP_GRO buffer holds many). */
typedef struct {
    unsigned char *data[CAPACITY];
    size_t size[CAPACITY];
    Endpoint addr[CAPACITY];   /* UDP: the source; TUN: where the sealed message goes */
    int fd[CAPACITY];          /* UDP: the socket it came on */
    uint64_t owner[CAPACITY];  /* peer (slot | generation << 32), or UINT64_MAX */
    Keypair *keypair[CAPACITY];
    size_t offset[CAPACITY];   /* where the outgoing bytes start in data */
    size_t out[CAPACITY];      /* outgoing size, 0: nothing to send or write */
    unsigned char *arena;
    Replies *replies;          /* the thread's: cookie replies; NULL: none made (hooks) */
} Batch;

/* The thread's offload workspace (with OFFLOAD_TUN_VNET), allocated once. */
typedef struct {
    unsigned char *read;       /* one TUN read: virtio_net_hdr and a super-segment */
    unsigned char *merged;     /* one merged super-segment for the TUN */
    seg_merge *merge;          /* the plan of one batch's merge */
    seg_buf segments[CUT_MAX]; /* one read's cut */
    seg_buf packets[CAPACITY]; /* one batch's packets for the TUN */
} Offload;

typedef struct {
    PyObject_HEAD
    int tun_fd; /* the plane's own dups of the shell's fds (H2), -1: none */
    int sockets[MAX_SOCKETS], families[MAX_SOCKETS];
    int given[MAX_SOCKETS]; /* the shell's numbers of sockets[], for punts' sources */
    int socket_count;
    _Atomic int mtu;
    int offloads; /* OFFLOAD_* bits: set before the thread starts, then constant */
    int stop_fd, news_fd, epoll_fd;
    int routes_fd; /* eventfd: the routes thread's queue drained (routes_fileno) */
    pthread_t thread;
    int running;
    _Atomic uint64_t epoch; /* odd while the thread is in a wake (holding its fds) */
    _Atomic int slow_calls; /* Python calls holding keypair pointers without the GIL */
    _Atomic uint64_t counters[C_COUNT];
    pthread_mutex_t io_lock; /* the socket list */
    _Atomic(Peer *) chunks[PEER_CHUNKS];
    uint32_t peer_slots, free_slot;
    pthread_rwlock_t routes_lock;
    RouteTable routes4, routes6;
    /* Route changes while the thread runs: queued by the Python thread in order, applied
     * by the routes thread (route_run) on another core, beside the Python work of the
     * set; whatever reads or clears routes from Python waits for the queue first. */
    pthread_t router;
    int routing;                 /* the routes thread runs */
    pthread_mutex_t jobs_lock;   /* the fields below */
    pthread_cond_t jobs_queued;  /* a job, or jobs_stop */
    pthread_cond_t jobs_drained; /* jobs_pending reached 0 */
    RouteJob *jobs_head, *jobs_tail;
    size_t jobs_pending;         /* queued or being applied */
    int jobs_failed;             /* one found no memory (sync_routes raises) */
    int jobs_stop;
    RouteJob *staged_head, *staged_tail; /* the Python thread's, not yet handed over */
    size_t staged_jobs, staged_prefixes;
    pthread_rwlock_t index_lock;
    IndexTable index;
    pthread_mutex_t news_lock;
    int news;    /* records signalled since the last collect */
    int urgent;  /* punts or events signalled since the last collect */
    _Atomic uint64_t owed; /* eventfd count signalled and not yet written (wake_shell) */
    uint32_t dirty_head;
    Punt *punts;
    int punt_head, punt_count;
    int local_punts;     /* of punt_count: TUN and EGRESS ones (kept from the UDP reserve) */
    uint64_t punt_round; /* collects so far: a peer's TUN punt cap is per round */
    pthread_mutex_t retire_lock;
    Keypair *retired;
    pthread_mutex_t gate_lock;
    Gate gate;
    Replies *replies; /* the thread's cookie replies, sent after each receive */
    Batch *batch; /* the thread's */
    Offload *offload; /* the thread's, with OFFLOAD_TUN_VNET */
    unsigned long owner; /* the Python thread that initialised it: the only caller */
    int initialised;
} Plane;

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void
count(Plane *p, int counter, uint64_t by)
{
    atomic_fetch_add_explicit(&p->counters[counter], by, memory_order_relaxed);
}

static uint32_t
get_le32(const unsigned char *b)
{
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static uint64_t
mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t
peer_id(const Peer *peer)
{
    return (uint64_t)peer->generation << 32 | peer->slot;
}

static Peer *
peer_at(Plane *p, uint32_t slot)
{
    if (slot >= PEER_CHUNK * PEER_CHUNKS)
        return NULL;
    Peer *chunk = atomic_load_explicit(&p->chunks[slot / PEER_CHUNK], memory_order_acquire);
    return chunk ? &chunk[slot % PEER_CHUNK] : NULL;
}

/* --- The index table: local index -> keypair (linear probing) ------------------------ */

static size_t
index_home(const IndexTable *t, uint32_t index)
{
    return (size_t)mix(index) & t->mask;
}

static Keypair *
index_find(const IndexTable *t, uint32_t index)
{
    if (!t->entries)
        return NULL;
    for (size_t i = index_home(t, index);; i = (i + 1) & t->mask) {
        Keypair *k = t->entries[i];
        if (!k || k->local_index == index)
            return k;
    }
}

static int
index_grow(IndexTable *t)
{
    size_t size = t->entries ? (t->mask + 1) * 2 : 64;
    Keypair **entries = calloc(size, sizeof *entries);
    if (!entries)
        return -1;
    IndexTable grown = {entries, size - 1, t->count};
    for (size_t i = 0; t->entries && i <= t->mask; i++) {
        Keypair *k = t->entries[i];
        if (!k)
            continue;
        size_t j = index_home(&grown, k->local_index);
        while (entries[j])
            j = (j + 1) & grown.mask;
        entries[j] = k;
    }
    free(t->entries);
    *t = grown;
    return 0;
}

static int
index_add(IndexTable *t, Keypair *k)
{
    if ((!t->entries || (t->count + 1) * 4 > (t->mask + 1) * 3) && index_grow(t) < 0)
        return -1;
    size_t i = index_home(t, k->local_index);
    while (t->entries[i])
        i = (i + 1) & t->mask;
    t->entries[i] = k;
    t->count++;
    return 0;
}

static void
index_remove(IndexTable *t, uint32_t index)
{
    if (!t->entries)
        return;
    size_t i = index_home(t, index);
    while (t->entries[i] && t->entries[i]->local_index != index)
        i = (i + 1) & t->mask;
    if (!t->entries[i])
        return;
    t->entries[i] = NULL;
    t->count--;
    /* Backward shift: entries after the hole move into it if their home allows. */
    for (size_t j = (i + 1) & t->mask; t->entries[j]; j = (j + 1) & t->mask) {
        size_t home = index_home(t, t->entries[j]->local_index);
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            t->entries[i] = t->entries[j];
            t->entries[j] = NULL;
            i = j;
        }
    }
}

/* --- Routes: longest prefix match ---------------------------------------------------- */

static size_t
route_home(const RouteTable *t, uint64_t hi, uint64_t lo, int length)
{
    return (size_t)mix(hi * 0x9e3779b97f4a7c15ULL ^ lo ^ (uint64_t)length << 56) & t->mask;
}

#define HUGE_TABLE (2u << 20) /* bytes from which a route table is mapped on huge pages */

/* Zeroed entries for a table of `count` slots; from HUGE_TABLE bytes an anonymous map
 * advised to huge pages: each probe of a big table is a cache miss, and on 4 KiB pages
 * a TLB miss too (16 MiB at 200k routes: 4,096 pages, and as many faults to fill it). */
static Route *
route_entries(size_t count)
{
    size_t bytes = count * sizeof(Route);
    if (bytes < HUGE_TABLE)
        return calloc(count, sizeof(Route));
    void *entries = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
    if (entries == MAP_FAILED)
        return NULL;
    (void)madvise(entries, bytes, MADV_HUGEPAGE); /* a hint: without THP, small pages */
    return entries;
}

static void
route_entries_free(Route *entries, size_t count)
{
    if (count * sizeof(Route) < HUGE_TABLE)
        free(entries);
    else if (entries)
        munmap(entries, count * sizeof(Route));
}

static Route *
route_find(const RouteTable *t, uint64_t hi, uint64_t lo, int length)
{
    if (!t->entries)
        return NULL;
    for (size_t i = route_home(t, hi, lo, length);; i = (i + 1) & t->mask) {
        Route *r = &t->entries[i];
        if (!r->used)
            return NULL;
        if (r->length == length && r->lo == lo && r->hi == hi)
            return r;
    }
}

/* The table with room for `more` inserts, rehashed into `grown` (which then owns new
 * entries): 1, or 0 when it already has room, -1 without memory. It only reads `t`, so
 * apply_routes runs it under the read lock, the thread's lookups going on beside it
 * (a million-route rehash takes tens of milliseconds), and swaps under the write lock:
 * there is one writer at a time (apply_routes). */
static int
route_rebuilt(const RouteTable *t, size_t more, RouteTable *grown)
{
    size_t size = t->entries ? t->mask + 1 : 0, target = size ? size : 1024;
    while ((t->count + more + 1) * 4 > target * 3)
        target *= 2;
    if (target == size)
        return 0;
    Route *entries = route_entries(target);
    if (!entries)
        return -1;
    *grown = *t;
    grown->entries = entries;
    grown->mask = target - 1;
    for (size_t i = 0; t->entries && i <= t->mask; i++) {
        const Route *r = &t->entries[i];
        if (!r->used)
            continue;
        size_t j = route_home(grown, r->hi, r->lo, r->length);
        while (entries[j].used)
            j = (j + 1) & grown->mask;
        entries[j] = *r;
    }
    return 1;
}

static int
route_grow(RouteTable *t)
{
    RouteTable grown;
    int rebuilt = route_rebuilt(t, 1, &grown);
    if (rebuilt < 0)
        return -1;
    if (rebuilt == 1) {
        route_entries_free(t->entries, t->entries ? t->mask + 1 : 0);
        *t = grown;
    }
    return 0;
}

/* Insert or take over (hi, lo)/length for the peer (slot, generation); -1: no memory. */
static int
route_set(RouteTable *t, uint64_t hi, uint64_t lo, int length, uint32_t slot,
          uint32_t generation)
{
    Route *r = route_find(t, hi, lo, length);
    if (!r) {
        if ((!t->entries || (t->count + 1) * 4 > (t->mask + 1) * 3) && route_grow(t) < 0)
            return -1;
        size_t i = route_home(t, hi, lo, length);
        while (t->entries[i].used)
            i = (i + 1) & t->mask;
        r = &t->entries[i];
        r->hi = hi, r->lo = lo, r->length = (uint8_t)length, r->used = 1;
        t->count++;
        t->lengths[length]++;
    }
    r->slot = slot;
    r->generation = generation;
    return 0;
}

static void
route_delete(RouteTable *t, Route *r)
{
    size_t i = (size_t)(r - t->entries);
    t->lengths[r->length]--;
    t->count--;
    memset(r, 0, sizeof *r);
    for (size_t j = (i + 1) & t->mask; t->entries[j].used; j = (j + 1) & t->mask) {
        Route *e = &t->entries[j];
        size_t home = route_home(t, e->hi, e->lo, e->length);
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            t->entries[i] = *e;
            memset(e, 0, sizeof *e);
            i = j;
        }
    }
}

/* The network bits of a 128-bit address (hi, lo) under a prefix of `length` of `width`. */
static void
network_bits(uint64_t hi, uint64_t lo, int width, int length, uint64_t *out_hi,
             uint64_t *out_lo)
{
    int shift = width - length;
    if (shift == 0) {
        *out_hi = hi, *out_lo = lo;
    } else if (shift >= 128) {
        *out_hi = 0, *out_lo = 0;
    } else if (shift >= 64) {
        *out_hi = 0, *out_lo = hi >> (shift - 64);
    } else {
        *out_hi = hi >> shift;
        *out_lo = lo >> shift | hi << (64 - shift);
    }
}

/* The owner (slot | generation << 32) of the longest prefix holding the address (4 or 16
 * bytes), or UINT64_MAX. Under routes_lock (read). */
static uint64_t
route_lookup(const Plane *p, const unsigned char *address, int size)
{
    const RouteTable *t = size == 4 ? &p->routes4 : &p->routes6;
    uint64_t hi = 0, lo = 0;
    if (size == 4) {
        lo = (uint64_t)address[0] << 24 | address[1] << 16 | address[2] << 8 | address[3];
    } else {
        for (int i = 0; i < 8; i++) {
            hi = hi << 8 | address[i];
            lo = lo << 8 | address[8 + i];
        }
    }
    if (!t->count)
        return UINT64_MAX;
    for (int length = t->width; length >= 0; length--) {
        if (!t->lengths[length])
            continue;
        uint64_t bits_hi, bits_lo;
        network_bits(hi, lo, t->width, length, &bits_hi, &bits_lo);
        const Route *r = route_find(t, bits_hi, bits_lo, length);
        if (r)
            return (uint64_t)r->generation << 32 | r->slot;
    }
    return UINT64_MAX;
}

#define PREFETCH_AHEAD 8 /* prefixes: a table of 100k routes is megabytes, each probe a miss */
#define ROUTE_BATCH 4096 /* prefixes staged before the routes thread is woken */

/* Apply one call's route changes for the peer (slot, generation), without the GIL. Under
 * the read lock, beside the thread's lookups: the rehash an add needs, and a first probe
 * of every change's slots, so that the write lock is held for changes in cache (each
 * probe of a big table is a miss: the data thread waited for ~256 of them a hold, and
 * for the holder whenever it was preempted holding it). Then the rehashed table is
 * swapped in with the changes under one hold of the write lock. -1: no memory. The only
 * writer: the routes thread while it runs, else the Python thread. */
static int
apply_routes(Plane *self, uint32_t slot, uint32_t generation, const Prefix *prefixes,
             size_t n, int add)
{
    int failed = 0;
    RouteTable grown[2];
    int rebuilt[2] = {0, 0};
    Route *old[2] = {NULL, NULL};
    size_t old_size[2] = {0, 0};
    pthread_rwlock_rdlock(&self->routes_lock);
    if (add) {
        size_t more[2] = {0, 0};
        for (size_t i = 0; i < n; i++)
            more[prefixes[i].v6 != 0]++;
        for (int v6 = 0; v6 < 2 && !failed; v6++)
            failed = (rebuilt[v6] = route_rebuilt(v6 ? &self->routes6 : &self->routes4,
                                                   more[v6], &grown[v6])) < 0;
    }
    const RouteTable *next[2] = {rebuilt[0] == 1 ? &grown[0] : &self->routes4,
                                 rebuilt[1] == 1 ? &grown[1] : &self->routes6};
    volatile uintptr_t warm = 0; /* the probes' results: kept, so that they are made */
    for (size_t i = 0; i < n && !failed; i++) {
        const Prefix *x = &prefixes[i];
        if (i + PREFETCH_AHEAD < n) {
            const Prefix *y = &prefixes[i + PREFETCH_AHEAD];
            const RouteTable *u = next[y->v6 != 0];
            if (u->entries)
                __builtin_prefetch(&u->entries[route_home(u, y->hi, y->lo, y->length)]);
        }
        warm ^= (uintptr_t)route_find(next[x->v6 != 0], x->hi, x->lo, x->length);
    }
    pthread_rwlock_unlock(&self->routes_lock);
    pthread_rwlock_wrlock(&self->routes_lock);
    for (int v6 = 0; v6 < 2; v6++) {
        RouteTable *t = v6 ? &self->routes6 : &self->routes4;
        if (rebuilt[v6] == 1 && !failed) {
            old[v6] = t->entries, old_size[v6] = t->entries ? t->mask + 1 : 0;
            *t = grown[v6];
        } else if (rebuilt[v6] == 1) {
            old[v6] = grown[v6].entries, old_size[v6] = grown[v6].mask + 1;
        }
    }
    for (size_t i = 0; i < n && !failed; i++) {
        const Prefix *x = &prefixes[i];
        RouteTable *t = x->v6 ? &self->routes6 : &self->routes4;
        if (i + PREFETCH_AHEAD < n) { /* its slot is a cache miss: fetched meanwhile */
            const Prefix *y = &prefixes[i + PREFETCH_AHEAD];
            const RouteTable *u = y->v6 ? &self->routes6 : &self->routes4;
            if (u->entries)
                __builtin_prefetch(&u->entries[route_home(u, y->hi, y->lo, y->length)], 1);
        }
        if (add) {
            failed = route_set(t, x->hi, x->lo, x->length, slot, generation) < 0;
        } else {
            Route *r = route_find(t, x->hi, x->lo, x->length);
            if (r && r->slot == slot && r->generation == generation)
                route_delete(t, r);
        }
    }
    pthread_rwlock_unlock(&self->routes_lock);
    route_entries_free(old[0], old_size[0]);
    route_entries_free(old[1], old_size[1]);
    return failed ? -1 : 0;
}

/* The routes thread: applies the queued calls in order, one write-lock hold each (the
 * data thread's lookups wait for at most one call's changes). A set of 100k adds and
 * 100k removes spent ~45 ms of its ~0.2 s in these tables (cache misses and a rehash of
 * 16 MiB) on the Python thread; here it runs while Python parses and slices the rest. */
static void *
route_run(void *arg)
{
    Plane *p = arg;
    pthread_mutex_lock(&p->jobs_lock);
    for (;;) {
        while (!p->jobs_head && !p->jobs_stop)
            pthread_cond_wait(&p->jobs_queued, &p->jobs_lock);
        if (p->jobs_stop)
            break;
        RouteJob *job = p->jobs_head;
        if (!(p->jobs_head = job->next))
            p->jobs_tail = NULL;
        pthread_mutex_unlock(&p->jobs_lock);
        int failed = apply_routes(p, job->slot, job->generation, job->prefixes, job->n,
                                  job->add) < 0;
        free(job);
        pthread_mutex_lock(&p->jobs_lock);
        p->jobs_failed |= failed;
        if (--p->jobs_pending == 0) { /* the waiters: drain_routes, and the shell's loop */
            pthread_cond_broadcast(&p->jobs_drained);
            pthread_mutex_unlock(&p->jobs_lock);
            uint64_t one = 1;
            if (write(p->routes_fd, &one, sizeof one) < 0) { /* saturated: readable */ }
            pthread_mutex_lock(&p->jobs_lock);
        }
    }
    pthread_mutex_unlock(&p->jobs_lock);
    return NULL;
}

/* Hand the staged jobs to the routes thread. Staged a batch at a time: a wake of the
 * thread per call (~780 for the removes set) cost context switches, and on a busy
 * machine each woken thread took the caller's core at once. The Python thread's only. */
static void
hand_over_routes(Plane *self)
{
    if (!self->staged_head)
        return;
    pthread_mutex_lock(&self->jobs_lock);
    if (self->jobs_tail)
        self->jobs_tail->next = self->staged_head;
    else
        self->jobs_head = self->staged_head;
    self->jobs_tail = self->staged_tail;
    self->jobs_pending += self->staged_jobs;
    pthread_cond_signal(&self->jobs_queued);
    pthread_mutex_unlock(&self->jobs_lock);
    self->staged_head = self->staged_tail = NULL;
    self->staged_jobs = self->staged_prefixes = 0;
}

/* Wait until every route change so far is applied (without the GIL; the Python
 * thread's); the failure, if one found no memory, stays for sync_routes. */
static void
drain_routes(Plane *self)
{
    hand_over_routes(self);
    pthread_mutex_lock(&self->jobs_lock);
    while (self->jobs_pending)
        pthread_cond_wait(&self->jobs_drained, &self->jobs_lock);
    pthread_mutex_unlock(&self->jobs_lock);
}

/* Stop the routes thread (what it had not applied is dropped: the plane is closing). */
static void
stop_router(Plane *self)
{
    if (!self->routing)
        return;
    pthread_mutex_lock(&self->jobs_lock);
    self->jobs_stop = 1;
    pthread_cond_signal(&self->jobs_queued);
    pthread_mutex_unlock(&self->jobs_lock);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->router, NULL);
    Py_END_ALLOW_THREADS
    self->routing = 0;
    hand_over_routes(self);
    while (self->jobs_head) {
        RouteJob *job = self->jobs_head;
        self->jobs_head = job->next;
        free(job);
    }
    self->jobs_tail = NULL;
    self->jobs_pending = 0;
}

/* --- Keypairs: sealing, opening, the replay window ----------------------------------- */

/* Seal the `length` bytes at message + HEADER_SIZE in place (room for padding and the
 * tag after them, within `capacity` bytes at message) with the keypair's next counter:
 * the message's size, 0 on failure or if it would not fit (then nothing is written and
 * the counter is unchanged). Under the peer's lock; the caller checked the counter is
 * below REJECT. */
static size_t
seal_message(Keypair *k, unsigned char *message, size_t length, size_t mtu, size_t capacity)
{
    unsigned char nonce[NONCE_SIZE] = {0};
    size_t padded = padded_length(length, mtu);
    if (padded > capacity || capacity - padded < HEADER_SIZE + TAG_SIZE)
        return 0;
    memset(message + HEADER_SIZE + length, 0, padded - length);
    uint64_t counter = k->send_counter++;
    put_le32(message, MSG_TRANSPORT);
    put_le32(message + 4, k->remote_index);
    put_le64(message + 8, counter);
    put_le64(nonce + 4, counter);
    if (!seal_one(k->seal, nonce, message + HEADER_SIZE, (int)padded))
        return 0;
    return HEADER_SIZE + padded + TAG_SIZE;
}

/* Open a whole transport message (size >= 32) into plain (may be message +
 * HEADER_SIZE): 1 if the tag is right. Under the peer's lock. */
static int
open_message(Keypair *k, const unsigned char *message, size_t size, unsigned char *plain)
{
    return open_one(k->open, message, (int)(size - HEADER_SIZE - TAG_SIZE), plain);
}

/* uspan.wg.replay.ReplayWindow.accept (RFC 6479). Under the peer's lock. */
static int
replay_accept(Keypair *k, uint64_t counter)
{
    uint64_t top = k->replay_top;
    if (counter > top) {
        if (counter >= REJECT_AFTER_MESSAGES)
            return 0;
        uint64_t index = counter >> 6, current = top >> 6, gap = index - current;
        if (gap > REPLAY_WORDS)
            gap = REPLAY_WORDS;
        for (uint64_t i = 1; i <= gap; i++)
            k->replay[(current + i) & (REPLAY_WORDS - 1)] = 0;
        k->replay_top = counter;
        k->replay[index & (REPLAY_WORDS - 1)] |= 1ULL << (counter & 63);
        return 1;
    }
    if (top - counter > REPLAY_WINDOW)
        return 0;
    uint64_t bit = 1ULL << (counter & 63), *word = &k->replay[(counter >> 6) & (REPLAY_WORDS - 1)];
    if (*word & bit)
        return 0;
    *word |= bit;
    return 1;
}

/* ReplayWindow.accept_run: counters first .. first + count - 1 (count >= 1), all above
 * the top, at once; else 0 and nothing changes. */
static int
replay_accept_run(Keypair *k, uint64_t first, uint64_t count)
{
    uint64_t last = first + count - 1;
    if (first <= k->replay_top || count > REPLAY_WINDOW || last < first
        || last >= REJECT_AFTER_MESSAGES)
        return 0;
    replay_accept(k, last);
    for (uint64_t counter = first; counter < last;) {
        uint64_t bit = counter & 63, span = 64 - bit < last - counter ? 64 - bit : last - counter;
        uint64_t bits = span == 64 ? UINT64_MAX : ((1ULL << span) - 1) << bit;
        k->replay[(counter >> 6) & (REPLAY_WORDS - 1)] |= bits;
        counter += span;
    }
    return 1;
}

/* A keypair's age at `now`. A creation up to CLOCK_SLACK ahead is a batch that read the
 * clock just before the core installed (age 0); further ahead the clock is not to be
 * trusted, so the keypair fails closed as past every limit (install refuses such). */
static uint64_t
age(const Keypair *k, uint64_t now)
{
    if (now >= k->created)
        return now - k->created;
    return k->created - now <= CLOCK_SLACK ? 0 : UINT64_MAX;
}

static int
can_send(const Keypair *k, uint64_t now)
{
    return k && k->send_counter < REJECT_AFTER_MESSAGES && age(k, now) < REJECT_AFTER_TIME;
}

/* Hand a dropped keypair to the reclaimer (under the peer's lock). */
static void
retire(Plane *p, Keypair *k)
{
    if (!k->live) /* the thread's confirm retired it first */
        return;
    pthread_rwlock_wrlock(&p->index_lock);
    index_remove(&p->index, k->local_index);
    pthread_rwlock_unlock(&p->index_lock);
    k->live = 0;
    Peer *peer = k->peer;
    if (peer->previous == k)
        peer->previous = NULL;
    if (peer->current == k)
        peer->current = NULL;
    if (peer->next == k)
        peer->next = NULL;
    pthread_mutex_lock(&p->retire_lock);
    k->retired_at = atomic_load(&p->epoch);
    k->retired_next = p->retired;
    p->retired = k;
    pthread_mutex_unlock(&p->retire_lock);
}

static void
free_keypair(Keypair *k)
{
    EVP_CIPHER_CTX_free(k->seal); /* the providers cleanse the keys */
    EVP_CIPHER_CTX_free(k->open);
    OPENSSL_cleanse(k, sizeof *k);
    free(k);
}

/* Free the retired keypairs no batch or slow call can still hold (`all`: at close). */
static void
reclaim(Plane *p, int all)
{
    if (!all && atomic_load(&p->slow_calls))
        return;
    uint64_t epoch = atomic_load(&p->epoch);
    pthread_mutex_lock(&p->retire_lock);
    Keypair **link = &p->retired;
    while (*link) {
        Keypair *k = *link;
        if (all || k->retired_at % 2 == 0 || epoch > k->retired_at) {
            *link = k->retired_next;
            free_keypair(k);
        } else {
            link = &k->retired_next;
        }
    }
    pthread_mutex_unlock(&p->retire_lock);
}

/* --- News for the core: records, punts, events --------------------------------------- */

/* The first news of a kind since the last collect signals the eventfd (under
 * news_lock): records add 1, punts and events NEWS_URGENT, so a shell that read the
 * eventfd knows whether a collect can wait (records: the timers' sync, at most a second
 * later) or not, and is woken again for a punt while it waits, never per packet. The
 * count is owed here and written by wake_shell once no lock is held (review L6). */
static void
signal_news(Plane *p, int urgent)
{
    int *flag = urgent ? &p->urgent : &p->news;
    if (*flag)
        return;
    *flag = 1;
    atomic_fetch_add(&p->owed, urgent ? NEWS_URGENT : 1);
}

/* Write what signal_news owes, with no lock held: after each step of the thread, each
 * hook and each collect. No wake-up is lost: news is added, and its flag turned from 0
 * to 1, under news_lock before the count is owed; a collect drains the eventfd and
 * clears the flags under news_lock and then takes all news there is. A count written
 * after that drain stays in the eventfd (a wake that finds its news collected already);
 * one written before it belongs to news added before it, which that collect takes.
 * News added while a flag is 1 rides on the count its 0-to-1 turn owed, written at the
 * latest when the step that owed it ends, or the flag was cleared by a collect that took
 * it. */
static void
wake_shell(Plane *p)
{
    if (!atomic_load_explicit(&p->owed, memory_order_relaxed))
        return;
    uint64_t value = atomic_exchange(&p->owed, 0);
    if (value && write(p->news_fd, &value, sizeof value) < 0) { /* saturated: readable */ }
}

/* The peer's record has news (under its lock). */
static void
mark_dirty(Plane *p, Peer *peer)
{
    int urgent = peer->record.confirmed; /* the core mirrors a rotation at once */
    if (peer->dirty && !urgent)
        return;
    peer->dirty = 1;
    pthread_mutex_lock(&p->news_lock);
    if (!peer->listed) {
        peer->listed = 1;
        peer->dirty_next = p->dirty_head;
        p->dirty_head = peer->slot;
    }
    signal_news(p, urgent);
    pthread_mutex_unlock(&p->news_lock);
}

/* Recorder.sent of proto/timersync.py for the thread's data, and the send side's rekey
 * wish (the core records what it seals itself). */
static void
record_sent(Plane *p, Peer *peer, Keypair *k, uint64_t now, size_t size)
{
    Record *r = &peer->record;
    r->last_sent = now;
    r->data_received_since_sent = 0;
    if (!r->data_sent_since_received)
        r->data_sent_since_received = now;
    r->tx_bytes += size;
    if (k == peer->current && (k->send_counter > REKEY_AFTER_MESSAGES
                               || (k->initiator && age(k, now) > REKEY_AFTER_TIME)))
        r->wants |= 1;
    mark_dirty(p, peer);
}

/* Recorder.received, and the receive side's rekey wish. */
static void
record_received(Plane *p, Peer *peer, uint64_t now, size_t size, int data)
{
    Record *r = &peer->record;
    r->last_received = now;
    r->data_sent_since_received = 0;
    if (data) {
        if (!r->data_received_since_sent)
            r->data_received_since_sent = now;
        else
            r->data_received_again = 1;
        if (!r->last_sent)
            r->data_received_before_sent = 1;
    }
    r->rx_bytes += size;
    Keypair *k = peer->current;
    if (k && k->initiator && age(k, now) > REKEY_ON_RECEIVE_AGE)
        r->wants |= 2;
    mark_dirty(p, peer);
}

/* One punt into the ring, or dropped and counted (0). The ring is shared, so no kind may
 * starve another (review M4): TUN and EGRESS punts leave PUNT_UDP_RESERVED slots to UDP
 * ones (a local flood toward a peer without a session would else crowd out the
 * handshake that gives it one), and a peer's TUN punts stop at PUNT_TUN_PER_PEER per
 * collect (the core stages no more). `from`: the peer (under its lock), NULL for UDP. */
static int
punt(Plane *p, int kind, Peer *from, const unsigned char *data, size_t size,
     const Endpoint *source, int fd, int handed)
{
    static const int dropped[] = {[PUNT_TUN] = C_TUN_PUNTS_DROPPED,
                                  [PUNT_UDP] = C_UDP_PUNTS_DROPPED,
                                  [PUNT_EGRESS] = C_EGRESS_PUNTS_DROPPED};
    count(p, C_PUNTS, 1);
    pthread_mutex_lock(&p->news_lock);
    if (from && from->punt_round != p->punt_round) {
        from->punt_round = p->punt_round;
        from->tun_punts = 0;
    }
    int local = kind != PUNT_UDP;
    if (p->punt_count == PUNT_SLOTS || size > SLOT
        || (local && p->local_punts == PUNT_SLOTS - PUNT_UDP_RESERVED)
        || (kind == PUNT_TUN && from->tun_punts == PUNT_TUN_PER_PEER)) {
        pthread_mutex_unlock(&p->news_lock);
        count(p, C_PUNTS_DROPPED, 1);
        count(p, dropped[kind], 1);
        return 0;
    }
    p->local_punts += local;
    if (kind == PUNT_TUN)
        from->tun_punts++;
    Punt *slot = &p->punts[(p->punt_head + p->punt_count++) % PUNT_SLOTS];
    slot->kind = kind;
    slot->peer = from ? peer_id(from) : UINT64_MAX;
    slot->length = (uint16_t)size;
    memcpy(slot->data, data, size);
    if (source)
        slot->source = *source;
    else
        memset(&slot->source, 0, sizeof slot->source);
    slot->fd = fd;
    slot->handed = handed;
    signal_news(p, 1);
    pthread_mutex_unlock(&p->news_lock);
    return 1;
}

/* --- The per-packet steps ------------------------------------------------------------ */

/* An inner packet's routing address (destination, or source with `source`): its size
 * (4 or 16) and *address, or 0 if the packet is not a whole enough IP header. */
static int
inner_address(const unsigned char *packet, size_t size, int source,
              const unsigned char **address)
{
    int version = size ? packet[0] >> 4 : 0;
    if (version == 4 && size >= 20) {
        *address = packet + (source ? 12 : 16);
        return 4;
    }
    if (version == 6 && size >= 40) {
        *address = packet + (source ? 8 : 24);
        return 16;
    }
    return 0;
}

/* The IP packet's own length inside a padded plaintext, or 0 if it is not whole. */
static size_t
inner_length(const unsigned char *plain, size_t size)
{
    int version = size ? plain[0] >> 4 : 0;
    size_t total;
    if (version == 4 && size >= 20) {
        total = (size_t)(plain[2] << 8 | plain[3]);
        return total >= 20 && total <= size ? total : 0;
    }
    if (version == 6 && size >= 40) {
        total = 40 + (size_t)(plain[4] << 8 | plain[5]);
        return total <= size ? total : 0;
    }
    return 0;
}

static int
same_endpoint(const Endpoint *a, const Endpoint *b)
{
    if (a->len != b->len || a->local_len != b->local_len || a->ifindex != b->ifindex
        || a->relayed != b->relayed || memcmp(a->local, b->local, (size_t)a->local_len))
        return 0;
    if (a->addr.sa.sa_family == AF_INET)
        return b->addr.sa.sa_family == AF_INET && a->addr.v4.sin_port == b->addr.v4.sin_port
               && a->addr.v4.sin_addr.s_addr == b->addr.v4.sin_addr.s_addr;
    return b->addr.sa.sa_family == AF_INET6 && a->addr.v6.sin6_port == b->addr.v6.sin6_port
           && !memcmp(&a->addr.v6.sin6_addr, &b->addr.v6.sin6_addr, 16);
}

static Peer *
owner_peer(Plane *p, uint64_t owner)
{
    return owner == UINT64_MAX ? NULL : peer_at(p, (uint32_t)owner);
}

/* TUN -> UDP: b->size[i] bytes of inner packet at b->data[i] + HEADER_SIZE for i < n.
 * Each is routed, sealed in place (offset 0, out = size) with its peer's current
 * keypair and addressed (b->addr), or dropped, or punted. A packet for the previous
 * one's destination (the segments of one super-segment) takes its route. */
static void
tun_step(Plane *p, Batch *b, int n, uint64_t now)
{
    size_t mtu = (size_t)atomic_load_explicit(&p->mtu, memory_order_relaxed);
    const unsigned char *last = NULL;
    int last_size = 0;
    uint64_t last_owner = UINT64_MAX;
    pthread_rwlock_rdlock(&p->routes_lock);
    for (int i = 0; i < n; i++) {
        const unsigned char *address = NULL;
        int size = inner_address(b->data[i] + HEADER_SIZE, b->size[i], 0, &address);
        b->out[i] = 0;
        if (size && (size != last_size || memcmp(address, last, (size_t)size))) {
            last = address;
            last_size = size;
            last_owner = route_lookup(p, address, size);
        }
        b->owner[i] = size ? last_owner : UINT64_MAX;
        if (!size)
            count(p, C_BAD_INNER_PACKET, 1);
        else if (b->owner[i] == UINT64_MAX)
            count(p, C_NO_ROUTE, 1);
    }
    pthread_rwlock_unlock(&p->routes_lock);
    for (int i = 0; i < n;) {
        uint64_t owner = b->owner[i];
        int end = i + 1;
        while (end < n && b->owner[end] == owner)
            end++;
        Peer *peer = owner_peer(p, owner);
        if (peer) {
            pthread_mutex_lock(&peer->lock);
            if (!peer->live || peer->generation != owner >> 32) {
                count(p, C_NO_ROUTE, (uint64_t)(end - i));
            } else {
                for (int j = i; j < end; j++) {
                    Keypair *k = peer->current;
                    unsigned char *message = b->data[j];
                    if (!can_send(k, now)) {
                        punt(p, PUNT_TUN, peer, message + HEADER_SIZE, b->size[j], NULL, -1, 0);
                        continue;
                    }
                    if (!peer->endpoint.len && !peer->endpoint.relayed) {
                        count(p, C_NO_ENDPOINT, 1);
                        continue;
                    }
                    size_t size = seal_message(k, message, b->size[j], mtu, SLOT);
                    if (!size) { /* too long for its slot (C1), or OpenSSL failed */
                        count(p, HEADER_SIZE + padded_length(b->size[j], mtu) + TAG_SIZE > SLOT
                                     ? C_BAD_LENGTH : C_SEND_ERRORS, 1);
                        continue;
                    }
                    count(p, C_SEALED, 1);
                    if (peer->endpoint.relayed) { /* sent only if the ring takes it (L4) */
                        if (punt(p, PUNT_EGRESS, peer, message, size, NULL, -1, 0))
                            record_sent(p, peer, k, now, size);
                        continue;
                    }
                    record_sent(p, peer, k, now, size);
                    b->addr[j] = peer->endpoint;
                    b->offset[j] = 0;
                    b->out[j] = size;
                }
            }
            pthread_mutex_unlock(&peer->lock);
        }
        i = end;
    }
}

/* The peer's new endpoint after an authentic packet from elsewhere (under its lock). */
static void
roam(Plane *p, Peer *peer, const Endpoint *source)
{
    peer->endpoint = *source;
    peer->record.roamed = 1;
    peer->record.roam = *source;
    count(p, C_ROAMS, 1);
}

/* The first authentic packet under `next`: it becomes current (Peer.confirm_next). */
static void
confirm_next(Plane *p, Peer *peer)
{
    Keypair *next = peer->next;
    if (peer->previous)
        retire(p, peer->previous);
    peer->previous = peer->current;
    peer->current = next;
    peer->next = NULL;
    count(p, C_CONFIRMED, 1);
    peer->record.confirmed = 1; /* receive_message marks the peer dirty next */
    peer->record.confirmed_index = next->local_index;
}

/* --- The gate: handshake messages judged in the thread -------------------------------- */

static int gate_reply(Plane *p, Batch *b, int i, const unsigned char *source,
                      size_t source_len);
static void gate_flush(Plane *p, Replies *r);

/* A handshake message (an initiation or a response by type and size) by the core's plan
 * (uspan.wg.verdict.Plan), as _gate.c's judge: punted to the core, dropped, or answered
 * with a cookie reply, and counted for the core's load and budgets (gate_take): a
 * handed-up initiation as it is punted, under gate_lock, so a collect takes the two
 * together. One the ring has no room for is counted apart (overflowed, for the core's
 * load: it then hears of a flood before it is handed the flood). The core is asked
 * once for a new plan (urgent news) when a budget runs out or the ring overflows, or
 * when a calm plan has dropped GATE_ASK_AFTER bad mac1s since the last collect. Without
 * a plan every one goes up. */
static void
gate_judge(Plane *p, Batch *b, int i)
{
    Gate *g = &p->gate;
    unsigned char source[HS_SOURCE_SIZE];
    int up = 1, handed = 0, ask = 0;
    pthread_mutex_lock(&p->gate_lock);
    if (g->on) {
        size_t source_len = hs_source_key(&b->addr[i].addr.sa, source);
        int verdict = hs_classify(b->data[i], b->size[i], source, source_len, &g->macs,
                                  g->under_load);
        if (verdict == HS_BAD_MAC1) {
            up = 0;
            ask = ++g->bad_mac1 >= GATE_ASK_AFTER && !g->under_load;
        } else if (verdict == HS_UNPROVEN
                   && !hs_in_lane(source, source_len, g->lane, g->lane_len)) {
            handed = g->hand_up > 0;
            if (!handed) {
                up = 0;
                if (g->cookies > 0 && gate_reply(p, b, i, source, source_len)) {
                    g->cookies_sent++;
                    ask = --g->cookies == 0;
                } else {
                    g->dropped++;
                    ask = 1;
                }
            }
        }
    }
    if (up && punt(p, PUNT_UDP, NULL, b->data[i], b->size[i], &b->addr[i], b->fd[i], handed)) {
        if (handed) {
            g->handed++;
            ask = --g->hand_up == 0;
        }
    } else if (up && g->on) {
        g->overflowed++;
        ask = 1;
    }
    if (ask && !g->asked) {
        g->asked = 1;
        pthread_mutex_lock(&p->news_lock);
        signal_news(p, 1);
        pthread_mutex_unlock(&p->news_lock);
    }
    pthread_mutex_unlock(&p->gate_lock);
    if (b->replies && b->replies->count == GATE_REPLIES)
        gate_flush(p, b->replies);
}

/* One datagram's first look: 1 if it is a transport message to open (index in
 * *index), else 0 after punting or counting it. */
static int
classify(Plane *p, Batch *b, int i, uint32_t *index)
{
    const unsigned char *d = b->data[i];
    size_t size = b->size[i];
    if (size > SLOT) { /* cut by the kernel: longer than anything we take */
        count(p, C_BAD_LENGTH, 1);
        return 0;
    }
    if (size >= 1 && d[0] == DEMUX_MARK) {
        punt(p, PUNT_UDP, NULL, d, size, &b->addr[i], b->fd[i], 0);
        return 0;
    }
    if (size < 4) {
        count(p, C_BAD_LENGTH, 1);
        return 0;
    }
    if (d[1] || d[2] || d[3] || d[0] < 1 || d[0] > MSG_TRANSPORT) {
        count(p, C_BAD_TYPE, 1);
        return 0;
    }
    static const size_t sizes[] = {0, INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE};
    if (d[0] != MSG_TRANSPORT) {
        if (size != sizes[d[0]])
            count(p, C_BAD_LENGTH, 1);
        else if (d[0] == MSG_COOKIE_REPLY)
            punt(p, PUNT_UDP, NULL, d, size, &b->addr[i], b->fd[i], 0);
        else
            gate_judge(p, b, i);
        return 0;
    }
    if (size < HEADER_SIZE + TAG_SIZE) {
        count(p, C_BAD_LENGTH, 1);
        return 0;
    }
    *index = get_le32(d + 4);
    return 1;
}

/* One transport message of an installed keypair, under its peer's lock: opened in
 * place, replay-checked, roaming and confirming; 1 and the inner packet's size in
 * *inner (0: a keepalive) when authentic and fresh. */
static int
receive_message(Plane *p, Batch *b, int i, Keypair *k, uint64_t now, size_t *inner)
{
    unsigned char *d = b->data[i];
    size_t size = b->size[i];
    Peer *peer = k->peer;
    /* Only a keypair in a role opens (WireGuard's rule): one the core moved out of every
     * role is dead to the peer before drop() takes it from the index table; and a
     * dropped one is in none (retire empties its roles). */
    if (k != peer->current && k != peer->previous && k != peer->next) {
        count(p, C_UNKNOWN_INDEX, 1);
        return 0;
    }
    if (age(k, now) >= REJECT_AFTER_TIME) {
        count(p, C_EXPIRED_KEY, 1);
        return 0;
    }
    if (!open_message(k, d, size, d + HEADER_SIZE)) {
        count(p, C_DECRYPT_FAILED, 1);
        return 0;
    }
    count(p, C_OPENED, 1);
    if (!replay_accept(k, get_le64(d + 8))) {
        count(p, C_REPLAY, 1);
        return 0;
    }
    if (!same_endpoint(&b->addr[i], &peer->endpoint))
        roam(p, peer, &b->addr[i]);
    if (k == peer->next)
        confirm_next(p, peer);
    size_t plain = size - HEADER_SIZE - TAG_SIZE;
    record_received(p, peer, now, size, plain > 0);
    if (!plain) {
        count(p, C_KEEPALIVES, 1);
        return 0;
    }
    *inner = inner_length(d + HEADER_SIZE, plain);
    if (!*inner) {
        count(p, C_BAD_INNER_PACKET, 1);
        return 0;
    }
    return 1;
}

/* UDP -> TUN: b->size[i] bytes of datagram at b->data[i] from b->addr[i] on b->fd[i].
 * Transport messages are opened in place and their inner packets, when their source is
 * routed to the sending peer, marked for the TUN (offset HEADER_SIZE, out = size);
 * handshake and demux datagrams punted; the rest counted. */
static void
udp_step(Plane *p, Batch *b, int n, uint64_t now)
{
    uint32_t index[CAPACITY];
    int transport[CAPACITY];
    for (int i = 0; i < n; i++) {
        b->out[i] = 0;
        b->keypair[i] = NULL;
        transport[i] = classify(p, b, i, &index[i]);
    }
    pthread_rwlock_rdlock(&p->index_lock);
    for (int i = 0; i < n; i++)
        if (transport[i] && !(b->keypair[i] = index_find(&p->index, index[i])))
            count(p, C_UNKNOWN_INDEX, 1);
    pthread_rwlock_unlock(&p->index_lock);
    for (int i = 0; i < n;) {
        Keypair *k = b->keypair[i];
        int end = i + 1;
        if (k) {
            Peer *peer = k->peer;
            while (end < n && b->keypair[end] && b->keypair[end]->peer == peer)
                end++;
            pthread_mutex_lock(&peer->lock);
            for (int j = i; j < end; j++) {
                size_t inner;
                b->owner[j] = UINT64_MAX;
                if (receive_message(p, b, j, b->keypair[j], now, &inner)) {
                    b->owner[j] = peer_id(peer);
                    b->offset[j] = HEADER_SIZE;
                    b->out[j] = inner;
                }
            }
            pthread_mutex_unlock(&peer->lock);
        }
        i = end;
    }
    /* The inner sources, all under one read of the routes. */
    pthread_rwlock_rdlock(&p->routes_lock);
    for (int i = 0; i < n; i++) {
        const unsigned char *address = NULL;
        if (!b->out[i])
            continue;
        int size = inner_address(b->data[i] + HEADER_SIZE, b->out[i], 1, &address);
        if (route_lookup(p, address, size) != b->owner[i]) {
            count(p, C_NOT_ALLOWED_SOURCE, 1);
            b->out[i] = 0;
        }
    }
    pthread_rwlock_unlock(&p->routes_lock);
}

/* --- The thread: reads, the steps, sends and writes ---------------------------------- */

/* The TUN is read packet by packet into the arena's slots (at HEADER_SIZE: room for the
 * message header in front). A packet longer than a slot carries is cut short, and the
 * read returns the cut length or (tun_put_user of some kernels) the whole one: sealed as
 * read, the first is a mangled packet, the second runs into the next slots and sends
 * their plaintext to this packet's peer (review C1). A byte more than a slot carries is
 * asked for (the slot's tail room), so either shows as too long: dropped, bad_length. */
static int
read_tun(Plane *p, Batch *b)
{
    int n = 0, reads = 0;
    while (reads < BATCH) {
        b->data[n] = b->arena + (size_t)n * SLOT;
        ssize_t got = read(p->tun_fd, b->data[n] + HEADER_SIZE, MAX_PACKET + 1);
        if (got <= 0) /* drained (a TUN never reads empty: 0 is the other end gone) */
            break;
        reads++;
        if (got > MAX_PACKET)
            count(p, C_BAD_LENGTH, 1);
        else
            b->size[n++] = (size_t)got;
    }
    count(p, C_TUN_READS, (uint64_t)reads);
    return n;
}

/* With OFFLOAD_TUN_VNET each read is a virtio_net_hdr and a packet or TSO/USO
 * super-segment, cut by seg_cut straight into the arena's slots (ready to seal in
 * place); what it refuses (a malformed header, a cut too fine) is a bad inner packet.
 * A few reads per wake, so the other direction gets its turn. */
static int
read_tun_vnet(Plane *p, Batch *b)
{
    Offload *w = p->offload;
    size_t mtu = (size_t)atomic_load_explicit(&p->mtu, memory_order_relaxed);
    int n = 0, reads = 0;
    while (reads < BATCH && n + CUT_MAX <= CAPACITY) {
        ssize_t got = read(p->tun_fd, w->read, SEG_VNET_HDR_LEN + SEG_MAX_IP_PACKET + 1);
        if (got <= 0)
            break;
        reads++;
        if (got > SEG_VNET_HDR_LEN + SEG_MAX_IP_PACKET) { /* cut short, as in read_tun */
            count(p, C_BAD_LENGTH, 1);
            continue;
        }
        unsigned char *slot = b->arena + (size_t)n * SLOT;
        ptrdiff_t cut = got < SEG_VNET_HDR_LEN ? SEG_EINVAL
                        : seg_cut(w->read, w->read + SEG_VNET_HDR_LEN,
                                  (size_t)got - SEG_VNET_HDR_LEN, mtu, slot, SLOT, HEADER_SIZE,
                                  w->segments, CUT_MAX);
        if (cut < 0 || w->segments[0].size > MAX_PACKET) {
            count(p, C_BAD_INNER_PACKET, 1);
            continue;
        }
        if (w->read[1])
            count(p, C_TSO_READS, 1);
        for (ptrdiff_t j = 0; j < cut; j++, n++) {
            b->data[n] = b->arena + (size_t)n * SLOT;
            b->size[n] = w->segments[j].size;
        }
    }
    count(p, C_TUN_READS, (uint64_t)reads);
    return n;
}

/* The packets for the TUN, one write each. */
static void
write_tun(Plane *p, Batch *b, int n)
{
    for (int i = 0; i < n; i++)
        if (b->out[i] && write(p->tun_fd, b->data[i] + b->offset[i], b->out[i]) < 0)
            count(p, C_TUN_WRITE_ERRORS, 1);
}

/* With OFFLOAD_TUN_VNET: the batch's packets merged by flow (seg_merge: TCP, and UDP
 * with OFFLOAD_TUN_USO) into super-segments, each written behind its virtio_net_hdr; a
 * packet that merges with none goes alone behind a zero header (the kernel checks it). */
static void
write_tun_vnet(Plane *p, Batch *b, int n)
{
    Offload *w = p->offload;
    size_t k = 0;
    for (int i = 0; i < n; i++)
        if (b->out[i])
            w->packets[k++] = (seg_buf){b->data[i] + b->offset[i], b->out[i]};
    ptrdiff_t items = seg_merge_plan(w->merge, w->packets, k, p->offloads & OFFLOAD_TUN_USO);
    for (ptrdiff_t t = 0; t < items; t++) {
        seg_item item = seg_merge_item(w->merge, (size_t)t);
        unsigned char vnet[SEG_VNET_HDR_LEN];
        seg_merge_vnet(w->merge, (size_t)t, vnet);
        struct iovec parts[2] = {{vnet, SEG_VNET_HDR_LEN}, {w->packets[item.packet].data, item.size}};
        if (item.count > 1) {
            seg_merge_build(w->merge, (size_t)t, w->merged);
            parts[1].iov_base = w->merged;
            count(p, C_MERGED_WRITES, 1);
        }
        if (writev(p->tun_fd, parts, 2) < 0)
            count(p, C_TUN_WRITE_ERRORS, 1);
    }
}

static int
socket_for(Plane *p, int family)
{
    for (int i = 0; i < p->socket_count; i++)
        if (p->families[i] == family)
            return p->sockets[i];
    return -1;
}

/* A sticky source as IP_PKTINFO / IPV6_PKTINFO. */
static socklen_t
sticky_source(const Endpoint *e, Control *control)
{
    if (!e->local_len && !e->ifindex)
        return 0;
    struct cmsghdr *c = (struct cmsghdr *)control->buffer;
    if (e->addr.sa.sa_family == AF_INET) {
        struct in_pktinfo info = {0};
        info.ipi_ifindex = e->ifindex;
        if (e->local_len == 4)
            memcpy(&info.ipi_spec_dst, e->local, 4);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof info);
        memcpy(CMSG_DATA(c), &info, sizeof info);
        return CMSG_SPACE(sizeof info);
    }
    struct in6_pktinfo info = {0};
    info.ipi6_ifindex = (unsigned)e->ifindex;
    if (e->local_len == 16)
        memcpy(&info.ipi6_addr, e->local, 16);
    c->cmsg_level = IPPROTO_IPV6;
    c->cmsg_type = IPV6_PKTINFO;
    c->cmsg_len = CMSG_LEN(sizeof info);
    memcpy(CMSG_DATA(c), &info, sizeof info);
    return CMSG_SPACE(sizeof info);
}

/* sendmsg errors that mean the sticky source (address or interface) is not usable. */
static int
source_gone(int error)
{
    return error == EINVAL || error == EADDRNOTAVAIL || error == ENETUNREACH || error == ENODEV;
}

/* One send of the batch: a message, or with UDP_SEGMENT a run of them to one endpoint. */
typedef struct {
    int fd, first, open;
    size_t segment, segments, bytes;
    socklen_t sticky; /* the control bytes of the sticky source */
} Send;

/* The endpoint without its sticky source. A link-local address keeps its interface (its
 * scope, which the core keeps as ``%scope`` and Endpoint.without_source too: without it
 * the core's endpoint could not be sent to, and seemed a new address). 0 if there was
 * nothing to forget. */
static int
drop_source(Endpoint *e)
{
    int scope = e->addr.sa.sa_family == AF_INET6 && IN6_IS_ADDR_LINKLOCAL(&e->addr.v6.sin6_addr)
                    ? (int)e->addr.v6.sin6_scope_id : 0;
    if (!e->local_len && e->ifindex == scope)
        return 0;
    e->local_len = 0;
    memset(e->local, 0, sizeof e->local);
    e->ifindex = scope;
    return 1;
}

/* The sticky source of b's item `first` failed (its address or interface is gone): the
 * peer's endpoint forgets it, as the shell's sends have the core do
 * (Device.forget_source), and the core hears of it as a roam to the same address
 * without a source. Counted (sticky_failed). */
static void
forget_source(Plane *p, Batch *b, int first)
{
    count(p, C_STICKY_FAILED, 1);
    Peer *peer = owner_peer(p, b->owner[first]);
    if (!peer)
        return;
    pthread_mutex_lock(&peer->lock);
    Endpoint *e = &peer->endpoint;
    if (peer->live && peer_id(peer) == b->owner[first] && same_endpoint(e, &b->addr[first])
        && drop_source(e)) {
        peer->record.roamed = 1;
        peer->record.roam = *e;
        mark_dirty(p, peer);
    }
    pthread_mutex_unlock(&peer->lock);
}

/* A UDP_SEGMENT send the kernel refused, resent a datagram at a time: the device cannot
 * segment (EIO), or the route's MTU is below the segment size (EINVAL, EMSGSIZE), where a
 * single datagram may still go as IP fragments. A sticky source that is gone is dropped
 * for the rest, as in send_udp. */
static void
send_each(Plane *p, Batch *b, const Send *s, struct msghdr *h)
{
    struct iovec *iov = h->msg_iov;
    size_t n = h->msg_iovlen;
    int sticky = s->sticky != 0;
    h->msg_controllen = s->sticky;
    if (!sticky)
        h->msg_control = NULL;
    h->msg_iovlen = 1;
    for (size_t j = 0; j < n; j++) {
        h->msg_iov = &iov[j];
        int failed = sendmsg(s->fd, h, 0) < 0;
        if (failed && sticky && source_gone(errno)) {
            h->msg_control = NULL;
            h->msg_controllen = 0;
            sticky = 0;
            forget_source(p, b, s->first);
            failed = sendmsg(s->fd, h, 0) < 0;
        }
        if (failed)
            count(p, C_SEND_ERRORS, 1);
    }
}

/* The sealed messages to their endpoints, sendmmsg per run of one socket; a full
 * buffer is waited out briefly (the thread's one blocking send). With `gso`
 * (OFFLOAD_UDP_GSO) consecutive messages to one endpoint go as one UDP_SEGMENT send:
 * equal sizes but a shorter last, at most SEG_UDP_MAX_SEGMENTS and UDP_MAX_PAYLOAD. A
 * path that cannot segment (EIO) turns *gso off, as wireguard-go does, and the send's
 * datagrams go one by one. */
static void
send_udp(Plane *p, Batch *b, int n, const int fds[2], int *gso)
{
    struct mmsghdr msgs[CAPACITY];
    struct iovec iov[CAPACITY];
    Control control[CAPACITY];
    Send sends[CAPACITY];
    int m = 0, k = 0; /* sends, iovecs: a send's iovecs follow the previous send's */
    for (int i = 0; i < n; i++) {
        if (!b->out[i])
            continue;
        int fd = fds[b->addr[i].addr.sa.sa_family == AF_INET6];
        if (fd < 0) {
            count(p, C_SEND_ERRORS, 1);
            continue;
        }
        size_t size = b->out[i];
        iov[k++] = (struct iovec){b->data[i] + b->offset[i], size};
        Send *s = m ? &sends[m - 1] : NULL;
        if (*gso && s && s->open && s->fd == fd && size <= s->segment
            && s->segments < SEG_UDP_MAX_SEGMENTS && s->bytes + size <= UDP_MAX_PAYLOAD
            && same_endpoint(&b->addr[i], &b->addr[s->first])) {
            msgs[m - 1].msg_hdr.msg_iovlen++;
            s->segments++;
            s->bytes += size;
            s->open = size == s->segment;
            continue;
        }
        memset(&msgs[m], 0, sizeof msgs[m]);
        msgs[m].msg_hdr.msg_iov = &iov[k - 1];
        msgs[m].msg_hdr.msg_iovlen = 1;
        msgs[m].msg_hdr.msg_name = &b->addr[i].addr;
        msgs[m].msg_hdr.msg_namelen = b->addr[i].len;
        sends[m++] = (Send){fd, i, 1, size, 1, size, 0};
    }
    for (int j = 0; j < m; j++) {
        socklen_t space = sticky_source(&b->addr[sends[j].first], &control[j]);
        sends[j].sticky = space;
        if (sends[j].segments > 1) {
            struct cmsghdr *c = (struct cmsghdr *)(control[j].buffer + space);
            uint16_t segment = (uint16_t)sends[j].segment;
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof segment);
            memcpy(CMSG_DATA(c), &segment, sizeof segment);
            space += CMSG_SPACE(sizeof segment);
        }
        if (space) {
            msgs[j].msg_hdr.msg_control = control[j].buffer;
            msgs[j].msg_hdr.msg_controllen = space;
        }
    }
    for (int i = 0; i < m;) {
        int end = i + 1, waited = 0;
        while (end < m && sends[end].fd == sends[i].fd)
            end++;
        while (i < end) {
            int sent = sendmmsg(sends[i].fd, msgs + i, (unsigned)(end - i), 0);
            if (sent > 0) {
                for (int j = i; j < i + sent; j++)
                    if (sends[j].segments > 1)
                        count(p, C_GSO_SENDS, 1);
                i += sent;
            } else if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !waited) {
                struct pollfd w = {sends[i].fd, POLLOUT, 0};
                poll(&w, 1, 100);
                waited = 1;
            } else if (sent < 0 && sends[i].segments > 1) {
                if (errno == EIO) /* the device cannot segment: never again */
                    *gso = 0;
                send_each(p, b, &sends[i], &msgs[i].msg_hdr);
                i++;
            } else if (sent < 0 && sends[i].sticky && source_gone(errno)) {
                /* the sticky source address went away: resent a datagram at a time from
                 * what the kernel chooses, and forgotten, as the shell's sends do (the
                 * next roam brings a new one) */
                Send plain = sends[i];
                plain.sticky = 0;
                send_each(p, b, &plain, &msgs[i].msg_hdr);
                forget_source(p, b, sends[i].first);
                i++;
            } else { /* this one fails (e.g. unreachable): skip it */
                count(p, C_SEND_ERRORS, sends[i].segments);
                i++;
            }
        }
    }
}

/* The cookie reply to b's datagram i (under gate_lock), from the address it came to; 0
 * when none can be made (no fresh secret, no socket: a hook's batch). */
static int
gate_reply(Plane *p, Batch *b, int i, const unsigned char *source, size_t source_len)
{
    Replies *r = b->replies;
    Gate *g = &p->gate;
    if (!r || b->fd[i] < 0 || !g->has_secret || r->count == GATE_REPLIES
        || (r->count && r->fd != b->fd[i]))
        return 0;
    /* all used: gate_flush's draw failed (or plane_init's), and only a reply made flushes,
     * so the draw is tried again here (each reply made holds a copy of its nonce) */
    if (r->nonces_used == GATE_REPLIES
        && RAND_bytes(&r->nonces[0][0], sizeof r->nonces) == 1)
        r->nonces_used = 0;
    if (r->nonces_used == GATE_REPLIES)
        return 0;
    int k = r->count;
    if (!hs_cookie_reply(r->data[k], b->data[i], b->size[i], source, source_len,
                         r->nonces[r->nonces_used], &g->macs, g->cookie_key,
                         chacha20_poly1305, r->ctx))
        return 0;
    r->nonces_used++;
    r->fd = b->fd[i];
    r->to[k] = b->addr[i];
    r->iov[k] = (struct iovec){r->data[k], HS_REPLY_SIZE};
    struct msghdr *h = &r->msgs[k].msg_hdr;
    memset(h, 0, sizeof *h);
    h->msg_name = &r->to[k].addr;
    h->msg_namelen = r->to[k].len;
    h->msg_iov = &r->iov[k];
    h->msg_iovlen = 1;
    h->msg_controllen = sticky_source(&r->to[k], &r->control[k]);
    h->msg_control = h->msg_controllen ? r->control[k].buffer : NULL;
    r->count++;
    return 1;
}

/* The replies made, sent with sendmmsg (a full buffer drops the rest: a flood's answers
 * wait for nothing), what the kernel refused counted; fresh nonces for the next. */
static void
gate_flush(Plane *p, Replies *r)
{
    int done = 0;
    uint64_t failed = 0;
    while (done < r->count) {
        int sent = sendmmsg(r->fd, r->msgs + done, (unsigned)(r->count - done), MSG_DONTWAIT);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0) { /* this one refused (or a full buffer: all the rest) */
            int refused = sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)
                              ? r->count - done : 1;
            failed += (uint64_t)refused;
            done += refused;
            continue;
        }
        done += sent;
    }
    r->count = 0;
    if (failed) {
        pthread_mutex_lock(&p->gate_lock);
        p->gate.failed += failed;
        pthread_mutex_unlock(&p->gate_lock);
    }
    if (r->nonces_used && RAND_bytes(&r->nonces[0][0], sizeof r->nonces) == 1)
        r->nonces_used = 0; /* else gate_reply draws again when it has none left */
}

/* The source of a received datagram, with IP_PKTINFO / IPV6_PKTINFO when enabled; the
 * UDP_GRO segment size (0: one datagram). */
static int
source_of(Endpoint *e, struct msghdr *h)
{
    int gso = 0, whole = !(h->msg_flags & MSG_CTRUNC); /* cut: no sticky source, as none */
    e->len = h->msg_namelen;
    e->local_len = 0;
    e->ifindex = 0;
    e->relayed = 0;
    /* a message cut short (MSG_CTRUNC) ends with a header whose data is partial: each is
     * read only if its length covers the struct (review M1) */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO && whole
            && c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof info);
            /* the address replies leave from (ipi_addr is the header's destination, a
             * broadcast or multicast one too), as wireguard-go and _gate.c (review L1) */
            memcpy(e->local, &info.ipi_spec_dst, 4);
            e->local_len = 4;
            e->ifindex = info.ipi_ifindex;
        } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO && whole
                   && c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof info);
            memcpy(e->local, &info.ipi6_addr, 16);
            e->local_len = 16;
            e->ifindex = (int)info.ipi6_ifindex;
        } else if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO
                   && c->cmsg_len >= CMSG_LEN(sizeof gso)) {
            memcpy(&gso, CMSG_DATA(c), sizeof gso);
        }
    }
    if (e->addr.sa.sa_family == AF_INET6) { /* the scope stays: a link-local peer needs it */
        e->addr.v6.sin6_flowinfo = 0;
        if (!e->ifindex) /* no PKTINFO: the core still hears of the interface */
            e->ifindex = (int)e->addr.v6.sin6_scope_id;
    }
    return gso;
}

/* The batch's n datagrams opened and their packets written to the TUN. */
static void
deliver(Plane *p, Batch *b, int n, uint64_t now)
{
    if (!n)
        return;
    count(p, C_UDP_READS, (uint64_t)n);
    udp_step(p, b, n, now);
    (p->offloads & OFFLOAD_TUN_VNET ? write_tun_vnet : write_tun)(p, b, n);
}

/* Room for every control message a receive can carry (review M1): UDP_GRO and both
 * PKTINFOs (a dual-stack socket's IPv4-mapped datagram), and as much again for what a
 * socket set up elsewhere adds (timestamps); more is cut (MSG_CTRUNC). */
typedef union {
    char buffer[2 * (CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo))
                     + CMSG_SPACE(sizeof(int)))];
    struct cmsghdr align;
} ReceiveControl;

/* The thread's receive headers over the arena's receive buffers, set up once: recvmmsg
 * rewrites only the lengths of the messages it fills, which are reset after use. */
typedef struct {
    struct mmsghdr msgs[RX_BUFFERS];
    struct iovec iov[RX_BUFFERS];
    ReceiveControl control[RX_BUFFERS];
    Endpoint source[RX_BUFFERS];
} Receive;

static void
receive_reset(Receive *r, int i)
{
    r->msgs[i].msg_hdr.msg_namelen = sizeof r->source[i].addr;
    r->msgs[i].msg_hdr.msg_controllen = sizeof r->control[i];
}

static void
receive_init(Receive *r, Batch *b)
{
    memset(r, 0, sizeof *r);
    for (int i = 0; i < RX_BUFFERS; i++) {
        r->iov[i] = (struct iovec){b->arena + (size_t)i * RX_BUFFER, RX_BUFFER};
        r->msgs[i].msg_hdr.msg_iov = &r->iov[i];
        r->msgs[i].msg_hdr.msg_iovlen = 1;
        r->msgs[i].msg_hdr.msg_name = &r->source[i].addr;
        r->msgs[i].msg_hdr.msg_control = r->control[i].buffer;
        receive_reset(r, i);
    }
}

/* One recvmmsg from the socket into the arena's receive buffers; a UDP_GRO buffer is
 * cut at its segment size into datagrams. The datagrams are delivered a full batch at a
 * time. */
static void
receive_udp(Plane *p, Batch *b, Receive *r, int fd, uint64_t now)
{
    struct mmsghdr *msgs = r->msgs;
    Endpoint *source = r->source;
    int got = recvmmsg(fd, msgs, RX_BUFFERS, MSG_DONTWAIT, NULL), n = 0;
    for (int i = 0; i < got; i++) {
        int gso = source_of(&source[i], &msgs[i].msg_hdr);
        /* a truncated datagram is too long to be ours: classify counts it */
        size_t size = msgs[i].msg_hdr.msg_flags & MSG_TRUNC ? SLOT + 1 : msgs[i].msg_len;
        size_t step = gso > 0 && (size_t)gso < size ? (size_t)gso : size;
        if (step < size)
            count(p, C_GRO_RECEIVES, 1);
        for (size_t at = 0;; at += step) {
            if (n == CAPACITY) {
                deliver(p, b, n, now);
                n = 0;
            }
            b->data[n] = (unsigned char *)r->iov[i].iov_base + at;
            b->size[n] = size - at < step ? size - at : step;
            b->addr[n] = source[i];
            b->fd[n++] = fd;
            if (at + step >= size)
                break;
        }
        receive_reset(r, i);
    }
    deliver(p, b, n, now);
    if (b->replies && b->replies->count)
        gate_flush(p, b->replies);
}

/* Something the shell must act on (the TUN lost, the thread ended): counted by the
 * caller, and the eventfd signalled so the shell looks at the counters. */
static void
alarm_news(Plane *p)
{
    pthread_mutex_lock(&p->news_lock);
    signal_news(p, 1);
    pthread_mutex_unlock(&p->news_lock);
    wake_shell(p);
}

static void *
plane_run(void *arg)
{
    Plane *p = arg;
    Batch *b = p->batch;
    int vnet = p->offloads & OFFLOAD_TUN_VNET, gso = p->offloads & OFFLOAD_UDP_GSO;
    struct epoll_event events[MAX_SOCKETS + 2];
    Receive receive;
    receive_init(&receive, b);
    for (;;) {
        int n = epoll_wait(p->epoll_fd, events, MAX_SOCKETS + 2, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            count(p, C_EPOLL_ERRORS, 1); /* the thread ends: the shell must hear of it */
            alarm_news(p);
            return NULL;
        }
        count(p, C_WAKES, 1);
        /* The wake's fds, taken with the epoch made odd under io_lock: set_sockets closes
         * the fds it replaces only once the epoch moves on, and this wake skips events of
         * fds no longer listed (waited on before the change). */
        int fds[2], listed[MAX_SOCKETS], listed_count;
        pthread_mutex_lock(&p->io_lock);
        atomic_fetch_add(&p->epoch, 1);
        fds[0] = socket_for(p, AF_INET);
        fds[1] = socket_for(p, AF_INET6);
        listed_count = p->socket_count;
        memcpy(listed, p->sockets, sizeof(int) * (size_t)listed_count);
        pthread_mutex_unlock(&p->io_lock);
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            if (fd == p->stop_fd) {
                atomic_fetch_add(&p->epoch, 1);
                return NULL;
            }
            int known = fd == p->tun_fd;
            for (int i = 0; i < listed_count && !known; i++)
                known = listed[i] == fd;
            if (!known)
                continue;
            if (events[e].events & (EPOLLHUP | EPOLLERR)) { /* gone or broken: else a spin */
                epoll_ctl(p->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
                count(p, C_FD_ERRORS, 1);
                if (fd == p->tun_fd) {
                    count(p, C_TUN_LOST, 1);
                    alarm_news(p);
                }
                continue;
            }
            uint64_t now = now_ns();
            if (fd == p->tun_fd) {
                int got = vnet ? read_tun_vnet(p, b) : read_tun(p, b);
                tun_step(p, b, got, now);
                send_udp(p, b, got, fds, &gso);
            } else {
                receive_udp(p, b, &receive, fd, now);
            }
            wake_shell(p);
        }
        atomic_fetch_add(&p->epoch, 1);
    }
    return NULL;
}

/* --- Workspaces: allocated once (the thread's) or per hook call ---------------------- */

/* A batch with an arena of `slots` slots, item i at slot i; NULL without memory. */
static Batch *
batch_new(int slots)
{
    Batch *b = malloc(sizeof *b + (size_t)slots * SLOT);
    if (!b)
        return NULL;
    b->arena = (unsigned char *)(b + 1);
    b->replies = NULL;
    for (int i = 0; i < slots; i++)
        b->data[i] = b->arena + (size_t)i * SLOT;
    return b;
}

_Static_assert(CAPACITY * SLOT >= RX_BUFFERS * RX_BUFFER, "the arena holds the receives");

static void
offload_free(Offload *w)
{
    if (!w)
        return;
    free(w->read);
    free(w->merged);
    free(w->merge);
    free(w);
}

/* The thread's offload workspace; NULL without memory. */
static Offload *
offload_new(void)
{
    Offload *w = calloc(1, sizeof *w);
    uint32_t seed = 0;
    if (!w)
        return NULL;
    w->read = malloc(SEG_VNET_HDR_LEN + SEG_MAX_IP_PACKET + 1); /* + 1: a cut read shows */
    w->merged = malloc(SEG_MAX_IP_PACKET);
    w->merge = malloc(seg_merge_bytes(CAPACITY));
    if (!w->read || !w->merged || !w->merge
        || getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        offload_free(w);
        return NULL;
    }
    seg_merge_init(w->merge, CAPACITY, seed);
    return w;
}

/* --- Python surface ------------------------------------------------------------------ */

static PyObject *
endpoint_tuple(const Endpoint *e)
{
    int v6 = e->addr.sa.sa_family == AF_INET6;
    const void *address = v6 ? (const void *)&e->addr.v6.sin6_addr : (const void *)&e->addr.v4.sin_addr;
    int port = ntohs(v6 ? e->addr.v6.sin6_port : e->addr.v4.sin_port);
    return Py_BuildValue("(y#iy#i)", (const char *)address, (Py_ssize_t)(v6 ? 16 : 4), port,
                         (const char *)e->local, (Py_ssize_t)e->local_len, e->ifindex);
}

/* An Endpoint from packed address bytes; -1 with ValueError if malformed. */
static int
make_endpoint(Endpoint *e, const Py_buffer *address, int port, const Py_buffer *local,
              int ifindex, int relayed)
{
    memset(e, 0, sizeof *e);
    e->relayed = relayed;
    if (port < 0 || port > 65535 || (local->len && local->len != address->len)
        || (address->len != 0 && address->len != 4 && address->len != 16)) {
        PyErr_SetString(PyExc_ValueError, "address and local must be 4 or 16 bytes, port a u16");
        return -1;
    }
    if (address->len == 4) {
        e->addr.v4.sin_family = AF_INET;
        e->addr.v4.sin_port = htons((uint16_t)port);
        memcpy(&e->addr.v4.sin_addr, address->buf, 4);
        e->len = sizeof e->addr.v4;
    } else if (address->len == 16) {
        e->addr.v6.sin6_family = AF_INET6;
        e->addr.v6.sin6_port = htons((uint16_t)port);
        memcpy(&e->addr.v6.sin6_addr, address->buf, 16);
        if (IN6_IS_ADDR_LINKLOCAL(&e->addr.v6.sin6_addr)) /* its scope: the interface */
            e->addr.v6.sin6_scope_id = (uint32_t)ifindex;
        e->len = sizeof e->addr.v6;
    }
    memcpy(e->local, local->buf, (size_t)local->len);
    e->local_len = (int)local->len;
    e->ifindex = ifindex;
    return 0;
}

/* The live peer of an id, or NULL with KeyError (a stale or unknown id). */
static Peer *
peer_of(Plane *p, PyObject *id)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(id);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetObject(PyExc_KeyError, id);
        return NULL;
    }
    uint32_t slot = (uint32_t)value;
    Peer *peer = slot < p->peer_slots ? peer_at(p, slot) : NULL;
    if (!peer || !peer->live || peer->generation != value >> 32) {
        PyErr_SetObject(PyExc_KeyError, id);
        return NULL;
    }
    return peer;
}

/* One Python thread calls a plane (docs/dataplane.md): seal and open retake the GIL
 * holding a peer's lock, which another Python thread holding the GIL and waiting for
 * that lock would deadlock, and close() frees what a call in another thread holds. */
static int
check_owner(Plane *p)
{
    if (p->initialised && PyThread_get_thread_ident() != p->owner) {
        PyErr_SetString(PyExc_RuntimeError, "a plane is called from the thread that made it only");
        return -1;
    }
    return 0;
}

static int
check_open(Plane *p)
{
    if (!p->initialised) {
        PyErr_SetString(PyExc_ValueError, "plane is closed");
        return -1;
    }
    return check_owner(p);
}

static int
as_int(PyObject *arg)
{
    long value = PyLong_AsLong(arg);
    if ((value == -1 && PyErr_Occurred()) || value < INT_MIN || value > INT_MAX) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "not an int");
        return -1;
    }
    return (int)value;
}

/* The thread reads and writes fds without blocking (a blocking one would hang it and
 * close()): set O_NONBLOCK on the open file description, shared with the shell's fd. */
static int
set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* The plane's own copy of a shell's fd (close-on-exec, non-blocking): the shell may close
 * and reuse its number, never the thread's. -1 with OSError. */
static int
own_fd(int fd)
{
    int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (set_nonblocking(copy) < 0) {
        close(copy);
        return -1;
    }
    return copy;
}

/* The TUN set up as the flags say (review H3): a virtio_net_hdr on every packet exactly
 * when OFFLOAD_TUN_VNET (else every read is misparsed), and an MTU its packets fit a slot
 * at (C1: a longer packet would be dropped, however the MTU got there, but a TUN made so
 * is refused at once). An fd that is no TUN (a test's socket pair) is taken as it is.
 * -1 with ValueError or OSError. */
static int
check_tun(int fd, int offloads)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) {
        if (errno == ENOTTY || errno == EINVAL)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (!(ifr.ifr_flags & IFF_VNET_HDR) != !(offloads & OFFLOAD_TUN_VNET)) {
        PyErr_SetString(PyExc_ValueError, ifr.ifr_flags & IFF_VNET_HDR
                                              ? "the TUN has IFF_VNET_HDR: pass OFFLOAD_TUN_VNET"
                                              : "OFFLOAD_TUN_VNET needs a TUN with IFF_VNET_HDR");
        return -1;
    }
    int probe = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int asked = probe < 0 ? -1 : ioctl(probe, SIOCGIFMTU, &ifr);
    if (probe >= 0)
        close(probe);
    if (asked == 0 && ifr.ifr_mtu > MAX_PACKET) { /* not found (another netns): reads drop */
        PyErr_Format(PyExc_ValueError, "TUN MTU %d above the plane's %d", ifr.ifr_mtu,
                     MAX_PACKET);
        return -1;
    }
    return 0;
}

static void
close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* Sockets (the shell's fds) become the thread's, as dups; the dups they replace are
 * closed once the thread is past the wake it may be using them in. */
static int
set_socket_list(Plane *p, PyObject *sockets)
{
    PyObject *items = PySequence_Fast(sockets, "sockets must be a list of fds");
    if (!items)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    int given[MAX_SOCKETS], fds[MAX_SOCKETS], families[MAX_SOCKETS], made = 0;
    if (n > MAX_SOCKETS) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_ValueError, "too many sockets");
        return -1;
    }
    for (; made < n; made++) {
        Address a;
        socklen_t len = sizeof a;
        given[made] = as_int(PySequence_Fast_GET_ITEM(items, made));
        if (given[made] == -1 && PyErr_Occurred())
            break;
        if (getsockname(given[made], &a.sa, &len) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        families[made] = a.sa.sa_family;
        if ((fds[made] = own_fd(given[made])) < 0)
            break;
    }
    Py_DECREF(items);
    if (made < n) {
        close_fds(fds, made);
        return -1;
    }
    pthread_mutex_lock(&p->io_lock);
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(p->epoll_fd, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            for (int j = 0; j < i; j++)
                epoll_ctl(p->epoll_fd, EPOLL_CTL_DEL, fds[j], NULL);
            pthread_mutex_unlock(&p->io_lock);
            close_fds(fds, (int)n);
            return -1;
        }
    }
    int old[MAX_SOCKETS], old_count = p->socket_count;
    memcpy(old, p->sockets, sizeof(int) * (size_t)old_count);
    for (int i = 0; i < old_count; i++) /* ENOENT: a hung-up one the thread let go */
        epoll_ctl(p->epoll_fd, EPOLL_CTL_DEL, old[i], NULL);
    memcpy(p->sockets, fds, sizeof(int) * (size_t)n);
    memcpy(p->given, given, sizeof(int) * (size_t)n);
    memcpy(p->families, families, sizeof(int) * (size_t)n);
    p->socket_count = (int)n;
    uint64_t epoch = atomic_load(&p->epoch);
    pthread_mutex_unlock(&p->io_lock);
    if (epoch % 2) { /* the thread is in a wake that may hold the old ones */
        Py_BEGIN_ALLOW_THREADS
        while (atomic_load(&p->epoch) == epoch) {
            struct timespec pause = {0, 50000};
            nanosleep(&pause, NULL);
        }
        Py_END_ALLOW_THREADS
    }
    close_fds(old, old_count);
    return 0;
}

static void release_plane(Plane *self);

static int
plane_init(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tun_fd", "sockets", "mtu", "offloads", NULL};
    int tun_fd, mtu, offloads = 0;
    PyObject *sockets;
    if (self->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "plane already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOi|$i", kwlist, &tun_fd, &sockets, &mtu,
                                     &offloads))
        return -1;
    if (mtu <= 0 || mtu > MAX_MTU) {
        PyErr_Format(PyExc_ValueError, "mtu must be 1..%d", MAX_MTU);
        return -1;
    }
    if (offloads & ~(OFFLOAD_TUN_VNET | OFFLOAD_TUN_USO | OFFLOAD_UDP_GSO)
        || (offloads & OFFLOAD_TUN_USO && !(offloads & OFFLOAD_TUN_VNET))) {
        PyErr_SetString(PyExc_ValueError, "offloads: OFFLOAD_* bits, USO only with VNET");
        return -1;
    }
    /* From a zeroed object (new, or released): locks first, fds -1, so that
     * release_plane undoes any part of what follows. */
    pthread_mutex_init(&self->io_lock, NULL);
    pthread_mutex_init(&self->news_lock, NULL);
    pthread_mutex_init(&self->retire_lock, NULL);
    pthread_mutex_init(&self->gate_lock, NULL);
    pthread_rwlock_init(&self->routes_lock, NULL);
    pthread_rwlock_init(&self->index_lock, NULL);
    pthread_mutex_init(&self->jobs_lock, NULL);
    pthread_cond_init(&self->jobs_queued, NULL);
    pthread_cond_init(&self->jobs_drained, NULL);
    self->tun_fd = self->stop_fd = self->news_fd = self->epoll_fd = self->routes_fd = -1;
    atomic_store(&self->mtu, mtu);
    self->routes4.width = 32;
    self->routes6.width = 128;
    self->dirty_head = self->free_slot = NO_SLOT;
    self->offloads = offloads;
    self->batch = batch_new(CAPACITY);
    self->offload = offloads & OFFLOAD_TUN_VNET ? offload_new() : NULL;
    self->punts = malloc(sizeof(Punt) * PUNT_SLOTS);
    self->replies = calloc(1, sizeof *self->replies);
    if (!self->batch || !self->punts || !self->replies
        || !(self->replies->ctx = EVP_CIPHER_CTX_new())
        || (offloads & OFFLOAD_TUN_VNET && !self->offload)) {
        PyErr_NoMemory();
        goto failed;
    }
    self->batch->replies = self->replies;
    self->replies->nonces_used = GATE_REPLIES; /* none drawn yet */
    gate_flush(self, self->replies);
    self->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->news_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->routes_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (self->stop_fd < 0 || self->news_fd < 0 || self->routes_fd < 0 || self->epoll_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto failed;
    }
    if ((tun_fd >= 0 && ((self->tun_fd = own_fd(tun_fd)) < 0 /* -1: no TUN (test hooks) */
                         || check_tun(self->tun_fd, offloads) < 0))
        || set_socket_list(self, sockets) < 0)
        goto failed;
    self->owner = PyThread_get_thread_ident();
    self->initialised = 1;
    return 0;
failed:
    release_plane(self);
    return -1;
}

static PyObject *
plane_start(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "plane already started");
        return NULL;
    }
    int fds[2] = {self->stop_fd, self->tun_fd};
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(self->epoll_fd, EPOLL_CTL_ADD, fds[i], &ev) < 0 && errno != EEXIST)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* Signals are the Python thread's: blocked in the plane thread (it inherits the
     * mask), none interrupts its syscalls (EINTR) or runs a handler on it. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int failed = pthread_create(&self->router, NULL, route_run, self) != 0;
    self->routing = !failed;
    failed = failed || pthread_create(&self->thread, NULL, plane_run, self) != 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (failed) {
        stop_router(self);
        PyErr_SetString(PyExc_RuntimeError, "cannot start the plane thread");
        return NULL;
    }
    self->running = 1;
    Py_RETURN_NONE;
}

static void
stop_thread(Plane *self)
{
    if (!self->running)
        return;
    uint64_t one = 1;
    if (write(self->stop_fd, &one, sizeof one) < 0) { /* cannot fail: a fresh eventfd */ }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->running = 0;
}

static void
free_tables(Plane *self)
{
    for (uint32_t c = 0; c < PEER_CHUNKS; c++) {
        Peer *chunk = atomic_load(&self->chunks[c]);
        if (!chunk)
            continue;
        for (uint32_t i = 0; i < PEER_CHUNK && c * PEER_CHUNK + i < self->peer_slots; i++) {
            Peer *peer = &chunk[i];
            pthread_mutex_lock(&peer->lock);
            peer->previous = peer->current = peer->next = NULL;
            pthread_mutex_unlock(&peer->lock);
            pthread_mutex_destroy(&peer->lock);
        }
        free(chunk);
        atomic_store(&self->chunks[c], NULL);
    }
    for (size_t i = 0; self->index.entries && i <= self->index.mask; i++)
        if (self->index.entries[i])
            free_keypair(self->index.entries[i]);
    free(self->index.entries);
    for (int v6 = 0; v6 < 2; v6++) {
        RouteTable *t = v6 ? &self->routes6 : &self->routes4;
        route_entries_free(t->entries, t->entries ? t->mask + 1 : 0);
    }
    memset(&self->index, 0, sizeof self->index);
    reclaim(self, 1);
}

/* Everything the plane holds, freed and zeroed (close, and a failed init): the object
 * is then as new, and may be initialised again. */
static void
release_plane(Plane *self)
{
    stop_thread(self);
    stop_router(self);
    free_tables(self);
    int fds[5] = {self->stop_fd, self->news_fd, self->routes_fd, self->epoll_fd, self->tun_fd};
    close_fds(fds, 5);
    close_fds(self->sockets, self->socket_count);
    free(self->batch);
    offload_free(self->offload);
    free(self->punts);
    if (self->replies) {
        EVP_CIPHER_CTX_free(self->replies->ctx);
        free(self->replies);
    }
    OPENSSL_cleanse(&self->gate, sizeof self->gate);
    pthread_mutex_destroy(&self->gate_lock);
    pthread_mutex_destroy(&self->io_lock);
    pthread_mutex_destroy(&self->news_lock);
    pthread_mutex_destroy(&self->retire_lock);
    pthread_rwlock_destroy(&self->routes_lock);
    pthread_rwlock_destroy(&self->index_lock);
    pthread_mutex_destroy(&self->jobs_lock);
    pthread_cond_destroy(&self->jobs_queued);
    pthread_cond_destroy(&self->jobs_drained);
    memset((char *)self + offsetof(Plane, tun_fd), 0, sizeof *self - offsetof(Plane, tun_fd));
}

static PyObject *
plane_close(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_owner(self) < 0)
        return NULL;
    if (self->initialised)
        release_plane(self);
    Py_RETURN_NONE;
}

static PyObject *
plane_fileno(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->news_fd);
}

static PyObject *
plane_set_mtu(Plane *self, PyObject *arg)
{
    int mtu = as_int(arg);
    if (mtu == -1 && PyErr_Occurred())
        return NULL;
    if (mtu <= 0 || mtu > MAX_MTU)
        return PyErr_Format(PyExc_ValueError, "mtu must be 1..%d", MAX_MTU);
    atomic_store(&self->mtu, mtu);
    Py_RETURN_NONE;
}

static PyObject *
plane_set_sockets(Plane *self, PyObject *arg)
{
    if (check_open(self) < 0 || set_socket_list(self, arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
plane_add_peer(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    uint32_t slot = self->free_slot;
    Peer *peer;
    if (slot != NO_SLOT) {
        peer = peer_at(self, slot);
        self->free_slot = peer->free_next;
    } else {
        slot = self->peer_slots;
        if (slot >= PEER_CHUNK * PEER_CHUNKS)
            return PyErr_Format(PyExc_ValueError, "more than %d peers", PEER_CHUNK * PEER_CHUNKS);
        if (slot % PEER_CHUNK == 0) {
            Peer *chunk = calloc(PEER_CHUNK, sizeof(Peer));
            if (!chunk)
                return PyErr_NoMemory();
            for (int i = 0; i < PEER_CHUNK; i++) {
                pthread_mutex_init(&chunk[i].lock, NULL);
                chunk[i].slot = slot + (uint32_t)i;
            }
            atomic_store_explicit(&self->chunks[slot / PEER_CHUNK], chunk, memory_order_release);
        }
        self->peer_slots++;
        peer = peer_at(self, slot);
    }
    pthread_mutex_lock(&peer->lock);
    peer->generation++;
    peer->live = 1;
    memset(&peer->endpoint, 0, sizeof peer->endpoint);
    memset(&peer->record, 0, sizeof peer->record);
    peer->dirty = 0;
    uint64_t id = peer_id(peer);
    pthread_mutex_unlock(&peer->lock);
    return PyLong_FromUnsignedLongLong(id);
}

/* Remove every route of the peer (under routes_lock, write). */
static void
clear_peer_routes(Plane *self, const Peer *peer)
{
    RouteTable *tables[2] = {&self->routes4, &self->routes6};
    for (int t = 0; t < 2; t++) {
        RouteTable *table = tables[t];
        for (size_t i = 0; table->entries && i <= table->mask;) {
            Route *r = &table->entries[i];
            if (r->used && r->slot == peer->slot && r->generation == peer->generation)
                route_delete(table, r); /* shifts another entry into i: look again */
            else
                i++;
        }
    }
}

static PyObject *
plane_remove_peer(Plane *self, PyObject *arg)
{
    Peer *peer;
    if (check_open(self) < 0 || !(peer = peer_of(self, arg)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS /* a scan of the route tables: milliseconds at a million */
    drain_routes(self);
    pthread_rwlock_wrlock(&self->routes_lock);
    clear_peer_routes(self, peer);
    pthread_rwlock_unlock(&self->routes_lock);
    Py_END_ALLOW_THREADS
    /* Its keypairs: every installed one points at it. */
    Keypair *mine[64];
    for (;;) {
        int n = 0;
        pthread_rwlock_rdlock(&self->index_lock);
        for (size_t i = 0; self->index.entries && i <= self->index.mask && n < 64; i++)
            if (self->index.entries[i] && self->index.entries[i]->peer == peer)
                mine[n++] = self->index.entries[i];
        pthread_rwlock_unlock(&self->index_lock);
        if (!n)
            break;
        pthread_mutex_lock(&peer->lock);
        for (int i = 0; i < n; i++)
            retire(self, mine[i]);
        pthread_mutex_unlock(&peer->lock);
    }
    pthread_mutex_lock(&peer->lock);
    peer->live = 0;
    peer->generation++; /* the old id is stale from here */
    memset(&peer->endpoint, 0, sizeof peer->endpoint);
    memset(&peer->record, 0, sizeof peer->record);
    peer->dirty = 0;
    pthread_mutex_unlock(&peer->lock);
    peer->free_next = self->free_slot;
    self->free_slot = peer->slot;
    reclaim(self, 0);
    Py_RETURN_NONE;
}

static PyObject *
plane_set_endpoint(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"peer", "address", "port", "local", "ifindex", "relayed", NULL};
    PyObject *id;
    Py_buffer address, local = {0};
    int port, ifindex = 0, relayed = 0;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "Oy*i|$y*ip", kwlist, &id, &address, &port,
                                        &local, &ifindex, &relayed))
        return NULL;
    Endpoint e;
    static char empty[1];
    Py_buffer none = {.buf = empty, .len = 0};
    Peer *peer = peer_of(self, id);
    int ok = peer && make_endpoint(&e, &address, port, local.buf ? &local : &none, ifindex,
                                   relayed) == 0;
    PyBuffer_Release(&address);
    if (local.buf)
        PyBuffer_Release(&local);
    if (!ok)
        return NULL;
    pthread_mutex_lock(&peer->lock);
    peer->endpoint = e;
    pthread_mutex_unlock(&peer->lock);
    Py_RETURN_NONE;
}

/* The sticky source of the peer's endpoint, whatever it is now (the thread may have
 * roamed it since the core last heard): a set_endpoint of the core's older view would
 * undo that roam. The record's pending roam loses its source too. */
static PyObject *
plane_clear_source(Plane *self, PyObject *arg)
{
    Peer *peer;
    if (check_open(self) < 0 || !(peer = peer_of(self, arg)))
        return NULL;
    pthread_mutex_lock(&peer->lock);
    drop_source(&peer->endpoint);
    drop_source(&peer->record.roam); /* a pending roam keeps its scope too */
    pthread_mutex_unlock(&peer->lock);
    Py_RETURN_NONE;
}

/* A uspan.wg.prefix int as (bits, length, family); -1 with ValueError if malformed. */
static int
parse_prefix(PyObject *item, Prefix *out)
{
    unsigned char bytes[18] = {0}; /* 136 bits: tag up to 129 << 1 | 1 above bit 128 */
    if (!PyLong_Check(item) || _PyLong_Sign(item) < 0
        || _PyLong_AsByteArray((PyLongObject *)item, bytes, sizeof bytes, 1, 0
#if PY_VERSION_HEX >= 0x030D0000
                               , 1
#endif
                               ) < 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "not a prefix int");
        return -1;
    }
    uint64_t low = 0, high = 0;
    for (int i = 7; i >= 0; i--) {
        low = low << 8 | bytes[i];
        high = high << 8 | bytes[8 + i];
    }
    unsigned tag_high = (unsigned)(bytes[16] | bytes[17] << 8);
    if (tag_high) { /* IPv6: the tag above bit 128 */
        out->v6 = 1, out->length = (int)(tag_high >> 1), out->hi = high, out->lo = low;
        if (!(tag_high & 1) || out->length > 128)
            goto bad;
        if (out->length < 128 && (out->length <= 64 ? high || (out->length < 64 && low >> out->length)
                                                    : high >> (out->length - 64)))
            goto bad;
        return 0;
    }
    if (high)
        goto bad;
    uint64_t tag = low >> 32;
    out->v6 = 0, out->length = (int)(tag >> 1), out->hi = 0, out->lo = low & 0xffffffffULL;
    if ((tag & 1) || out->length > 32 || (out->length < 32 && out->lo >> out->length))
        goto bad;
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "not a prefix int");
    return -1;
}

static PyObject *
change_routes(Plane *self, PyObject *args, PyObject *kwds, int add)
{
    static char *kwlist[] = {"peer", "prefixes", NULL};
    PyObject *id, *list;
    Peer *peer;
    if (check_open(self) < 0 || !PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &id, &list)
        || !(peer = peer_of(self, id)))
        return NULL;
    PyObject *items = PySequence_Fast(list, "prefixes must be a list");
    if (!items)
        return NULL;
    size_t n = (size_t)PySequence_Fast_GET_SIZE(items);
    RouteJob *job = malloc(sizeof *job + sizeof(Prefix) * n);
    if (!job) {
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < n; i++) {
        if (parse_prefix(PySequence_Fast_GET_ITEM(items, (Py_ssize_t)i), &job->prefixes[i]) < 0) {
            free(job);
            Py_DECREF(items);
            return NULL;
        }
    }
    Py_DECREF(items);
    job->next = NULL;
    job->slot = peer->slot, job->generation = peer->generation;
    job->add = add, job->n = n;
    if (self->routing) { /* staged, then queued: the routes thread applies it */
        if (self->staged_tail)
            self->staged_tail->next = job;
        else
            self->staged_head = job;
        self->staged_tail = job;
        self->staged_jobs++;
        if ((self->staged_prefixes += n) >= ROUTE_BATCH)
            hand_over_routes(self);
        Py_RETURN_NONE;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = apply_routes(self, job->slot, job->generation, job->prefixes, n, add) < 0;
    Py_END_ALLOW_THREADS
    free(job);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* An eventfd the routes thread signals each time its queue drains: a shell waits on it
 * for routes_pending() to reach 0 (read it, then look again) instead of polling. */
static PyObject *
plane_routes_fileno(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->routes_fd);
}

static PyObject *
plane_routes_pending(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    hand_over_routes(self);
    pthread_mutex_lock(&self->jobs_lock);
    size_t pending = self->jobs_pending;
    pthread_mutex_unlock(&self->jobs_lock);
    return PyLong_FromSize_t(pending);
}

static PyObject *
plane_sync_routes(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    drain_routes(self);
    pthread_mutex_lock(&self->jobs_lock);
    failed = self->jobs_failed;
    self->jobs_failed = 0;
    pthread_mutex_unlock(&self->jobs_lock);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *
plane_add_routes(Plane *self, PyObject *args, PyObject *kwds)
{
    return change_routes(self, args, kwds, 1);
}

static PyObject *
plane_remove_routes(Plane *self, PyObject *args, PyObject *kwds)
{
    return change_routes(self, args, kwds, 0);
}

static PyObject *
plane_clear_routes(Plane *self, PyObject *arg)
{
    Peer *peer;
    if (check_open(self) < 0 || !(peer = peer_of(self, arg)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    drain_routes(self);
    pthread_rwlock_wrlock(&self->routes_lock);
    clear_peer_routes(self, peer);
    pthread_rwlock_unlock(&self->routes_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
plane_route(Plane *self, PyObject *arg)
{
    Py_buffer address;
    if (check_open(self) < 0 || PyObject_GetBuffer(arg, &address, PyBUF_SIMPLE) < 0)
        return NULL;
    if (address.len != 4 && address.len != 16) {
        PyBuffer_Release(&address);
        PyErr_SetString(PyExc_ValueError, "address must be 4 or 16 bytes");
        return NULL;
    }
    uint64_t owner;
    Py_BEGIN_ALLOW_THREADS
    drain_routes(self);
    pthread_rwlock_rdlock(&self->routes_lock);
    owner = route_lookup(self, address.buf, (int)address.len);
    pthread_rwlock_unlock(&self->routes_lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&address);
    if (owner == UINT64_MAX)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(owner);
}

static EVP_CIPHER_CTX *
keyed(const void *key, int encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && !EVP_CipherInit_ex2(ctx, chacha20_poly1305, key, NULL, encrypt, NULL)) {
        EVP_CIPHER_CTX_free(ctx);
        ctx = NULL;
    }
    return ctx;
}

static int
as_index(PyObject *arg, uint32_t *index)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if ((value == (unsigned long long)-1 && PyErr_Occurred()) || value > UINT32_MAX) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "an index is a u32");
        return -1;
    }
    *index = (uint32_t)value;
    return 0;
}

static PyObject *
plane_install(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"peer", "local_index", "remote_index", "send_key", "recv_key",
                             "created", "initiator", NULL};
    PyObject *id, *local, *remote;
    Py_buffer send_key, recv_key;
    unsigned long long created;
    int initiator;
    uint32_t local_index, remote_index;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OOOy*y*Kp", kwlist, &id, &local, &remote,
                                        &send_key, &recv_key, &created, &initiator))
        return NULL;
    Peer *peer = NULL;
    Keypair *k = NULL;
    int ok = send_key.len == KEY_SIZE && recv_key.len == KEY_SIZE;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "keys must be 32 bytes");
    ok = ok && as_index(local, &local_index) == 0 && as_index(remote, &remote_index) == 0
         && (peer = peer_of(self, id)) != NULL;
    if (ok) {
        k = calloc(1, sizeof *k);
        if (k) {
            k->seal = keyed(send_key.buf, 1);
            k->open = keyed(recv_key.buf, 0);
        }
        if (!k || !k->seal || !k->open) {
            if (k)
                free_keypair(k);
            k = NULL;
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up ChaCha20-Poly1305");
            ok = 0;
        }
    }
    PyBuffer_Release(&send_key);
    PyBuffer_Release(&recv_key);
    if (ok && created > now_ns() + CLOCK_SLACK) {
        free_keypair(k);
        return PyErr_Format(PyExc_ValueError, "created %llu is in the future", created);
    }
    if (!ok)
        return NULL;
    k->local_index = local_index;
    k->remote_index = remote_index;
    k->peer = peer;
    k->created = created;
    k->initiator = initiator;
    k->live = 1;
    pthread_mutex_lock(&peer->lock);
    pthread_rwlock_wrlock(&self->index_lock);
    int taken = index_find(&self->index, local_index) != NULL;
    int added = !taken && index_add(&self->index, k) == 0;
    pthread_rwlock_unlock(&self->index_lock);
    pthread_mutex_unlock(&peer->lock);
    if (!added) {
        free_keypair(k);
        if (taken)
            return PyErr_Format(PyExc_ValueError, "local index %u is installed", local_index);
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

/* The installed keypair of a local index, NULL (no exception) if none. */
static Keypair *
keypair_of(Plane *self, uint32_t index)
{
    pthread_rwlock_rdlock(&self->index_lock);
    Keypair *k = index_find(&self->index, index);
    pthread_rwlock_unlock(&self->index_lock);
    return k;
}

static PyObject *
plane_assign(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"peer", "previous", "current", "next", NULL};
    PyObject *id;
    long long roles[3];
    Peer *peer;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OLLL", kwlist, &id, &roles[0], &roles[1],
                                        &roles[2])
        || !(peer = peer_of(self, id)))
        return NULL;
    Keypair *keys[3] = {NULL, NULL, NULL};
    /* Looked up under the peer's lock: the thread's confirm retires `previous` under it,
     * and a keypair retired between a lookup and the lock would be freed in a role. */
    pthread_mutex_lock(&peer->lock);
    for (int i = 0; i < 3; i++) {
        if (roles[i] == -1)
            continue;
        if (roles[i] < 0 || roles[i] > UINT32_MAX
            || !(keys[i] = keypair_of(self, (uint32_t)roles[i])) || keys[i]->peer != peer
            || !keys[i]->live) {
            pthread_mutex_unlock(&peer->lock);
            return PyErr_Format(PyExc_KeyError, "%lld is not a keypair of this peer", roles[i]);
        }
    }
    peer->previous = keys[0];
    peer->current = keys[1];
    peer->next = keys[2];
    pthread_mutex_unlock(&peer->lock);
    Py_RETURN_NONE;
}

static PyObject *
plane_drop(Plane *self, PyObject *arg)
{
    uint32_t index;
    if (check_open(self) < 0 || as_index(arg, &index) < 0)
        return NULL;
    Keypair *k = keypair_of(self, index);
    if (k) {
        /* Only the GIL holder installs or drops, so k stays installed until here. */
        pthread_mutex_lock(&k->peer->lock);
        retire(self, k);
        pthread_mutex_unlock(&k->peer->lock);
    }
    reclaim(self, 0);
    Py_RETURN_NONE;
}

/* The keypair of a local index for a slow-path call, locked, with slow_calls held;
 * NULL with KeyError. release_keypair undoes it. */
static Keypair *
claim_keypair(Plane *self, uint32_t index)
{
    atomic_fetch_add(&self->slow_calls, 1);
    Keypair *k = keypair_of(self, index);
    if (k) {
        pthread_mutex_lock(&k->peer->lock);
        if (k->live)
            return k;
        pthread_mutex_unlock(&k->peer->lock);
    }
    atomic_fetch_sub(&self->slow_calls, 1);
    PyErr_Format(PyExc_KeyError, "%u", index);
    return NULL;
}

static void
release_keypair(Plane *self, Keypair *k)
{
    pthread_mutex_unlock(&k->peer->lock);
    atomic_fetch_sub(&self->slow_calls, 1);
}

static PyObject *
plane_expire_sending(Plane *self, PyObject *arg)
{
    uint32_t index;
    Keypair *k;
    if (check_open(self) < 0 || as_index(arg, &index) < 0 || !(k = claim_keypair(self, index)))
        return NULL;
    k->send_counter = REJECT_AFTER_MESSAGES;
    release_keypair(self, k);
    Py_RETURN_NONE;
}

static PyObject *
plane_send_counter(Plane *self, PyObject *arg)
{
    uint32_t index;
    Keypair *k;
    if (check_open(self) < 0 || as_index(arg, &index) < 0 || !(k = claim_keypair(self, index)))
        return NULL;
    uint64_t counter = k->send_counter;
    release_keypair(self, k);
    return PyLong_FromUnsignedLongLong(counter);
}

/* A counter argument: 0 and *out, or 1 if it is outside 0..2^64-1 (never accepted). */
static int
as_counter(PyObject *arg, uint64_t *out)
{
    *out = PyLong_AsUnsignedLongLong(arg);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 1;
    }
    return 0;
}

static PyObject *
plane_accept(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"local_index", "counter", NULL};
    PyObject *index_arg, *counter_arg;
    uint32_t index;
    uint64_t counter;
    Keypair *k;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &index_arg, &counter_arg)
        || as_index(index_arg, &index) < 0 || !(k = claim_keypair(self, index)))
        return NULL;
    int ok = !as_counter(counter_arg, &counter) && replay_accept(k, counter);
    release_keypair(self, k);
    return PyBool_FromLong(ok);
}

static PyObject *
plane_accept_run(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"local_index", "first", "count", NULL};
    PyObject *index_arg, *first_arg, *count_arg;
    uint32_t index;
    uint64_t first, n;
    Keypair *k;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &index_arg, &first_arg,
                                        &count_arg)
        || as_index(index_arg, &index) < 0)
        return NULL;
    if (as_counter(count_arg, &n) || n == 0)
        return PyErr_Format(PyExc_ValueError, "count must be at least 1");
    if (!(k = claim_keypair(self, index)))
        return NULL;
    int ok = !as_counter(first_arg, &first) && replay_accept_run(k, first, n);
    release_keypair(self, k);
    return PyBool_FromLong(ok);
}

/* seal's and open's arguments: the local index, and the list as a tuple of our own
 * (reading an item may run Python code that changes the list); NULL with an exception. */
static PyObject *
index_and_items(Plane *self, PyObject *args, PyObject *kwds, char **kwlist, uint32_t *index)
{
    PyObject *index_arg, *list;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &index_arg, &list)
        || as_index(index_arg, index) < 0)
        return NULL;
    return PySequence_Tuple(list);
}

static PyObject *
plane_seal(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"local_index", "packets", NULL};
    uint32_t index;
    PyObject *packets = index_and_items(self, args, kwds, kwlist, &index);
    if (!packets)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(packets);
    size_t mtu = (size_t)atomic_load(&self->mtu);
    size_t *lengths = PyMem_Malloc(sizeof(size_t) * (size_t)(n ? n : 1));
    PyObject *out = lengths ? PyList_New(n) : PyErr_NoMemory();
    for (Py_ssize_t i = 0; out && i < n; i++) {
        Py_buffer view;
        PyObject *datagram = NULL;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(packets, i), &view, PyBUF_SIMPLE) == 0) {
            if (view.len > MAX_MTU)
                PyErr_SetString(PyExc_ValueError, "packet larger than the largest MTU");
            else
                datagram = PyBytes_FromStringAndSize(
                    NULL, HEADER_SIZE + padded_length((size_t)view.len, mtu) + TAG_SIZE);
            if (datagram)
                memcpy(PyBytes_AS_STRING(datagram) + HEADER_SIZE, view.buf, (size_t)view.len);
            lengths[i] = (size_t)view.len;
            PyBuffer_Release(&view);
        }
        if (!datagram)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, datagram);
    }
    Py_DECREF(packets);
    Keypair *k = out ? claim_keypair(self, index) : NULL;
    if (!k) {
        Py_XDECREF(out);
        PyMem_Free(lengths);
        return NULL;
    }
    Py_ssize_t sealed = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS /* not recorded: the core counts and times what it seals */
    for (; sealed < n && k->send_counter < REJECT_AFTER_MESSAGES; sealed++) {
        PyObject *datagram = PyList_GET_ITEM(out, sealed);
        size_t length = lengths[sealed];
        size_t size = seal_message(k, (unsigned char *)PyBytes_AS_STRING(datagram), length, mtu,
                                   (size_t)PyBytes_GET_SIZE(datagram));
        if (!size) {
            failed = 1;
            break;
        }
        count(self, C_SEALED, 1);
    }
    Py_END_ALLOW_THREADS
    release_keypair(self, k);
    PyMem_Free(lengths);
    if (failed) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal");
        return NULL;
    }
    if (PyList_SetSlice(out, sealed, n, NULL) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
plane_open(Plane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"local_index", "datagrams", NULL};
    uint32_t index;
    PyObject *items = index_and_items(self, args, kwds, kwlist, &index);
    if (!items)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    PyObject *messages = PyTuple_New(n), *plains = PyList_New(n);
    for (Py_ssize_t i = 0; messages && plains && i < n; i++) {
        PyObject *item = PyBytes_FromObject(PyTuple_GET_ITEM(items, i)), *plain = NULL;
        if (item && (PyBytes_GET_SIZE(item) < HEADER_SIZE + TAG_SIZE
                     || PyBytes_GET_SIZE(item) > INT_MAX))
            PyErr_SetString(PyExc_ValueError, "not a transport message's length");
        else if (item)
            plain = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(item) - HEADER_SIZE - TAG_SIZE);
        if (!plain) {
            Py_XDECREF(item);
            Py_CLEAR(plains);
            break;
        }
        PyTuple_SET_ITEM(messages, i, item);
        PyList_SET_ITEM(plains, i, plain);
    }
    Py_DECREF(items);
    Keypair *k = plains && messages ? claim_keypair(self, index) : NULL;
    if (!k) {
        Py_XDECREF(messages);
        Py_XDECREF(plains);
        return NULL;
    }
    unsigned char *ok = PyMem_Malloc((size_t)(n ? n : 1));
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *message = PyTuple_GET_ITEM(messages, i);
            ok[i] = (unsigned char)open_message(
                k, (const unsigned char *)PyBytes_AS_STRING(message),
                (size_t)PyBytes_GET_SIZE(message),
                (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(plains, i)));
            if (ok[i])
                count(self, C_OPENED, 1);
        }
        Py_END_ALLOW_THREADS
    }
    release_keypair(self, k);
    Py_DECREF(messages);
    if (!ok) {
        Py_DECREF(plains);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!ok[i]) /* a forgery's bytes are dropped unseen */
            PyList_SetItem(plains, i, Py_NewRef(Py_None));
    PyMem_Free(ok);
    return plains;
}

static PyObject *
record_tuple(uint64_t id, const Record *r)
{
    PyObject *roamed = r->roamed ? endpoint_tuple(&r->roam) : Py_NewRef(Py_None);
    if (!roamed)
        return NULL;
    return Py_BuildValue("(KKKKKNNKKNi)", (unsigned long long)id,
                         (unsigned long long)r->last_sent, (unsigned long long)r->last_received,
                         (unsigned long long)r->data_sent_since_received,
                         (unsigned long long)r->data_received_since_sent,
                         PyBool_FromLong(r->data_received_again),
                         PyBool_FromLong(r->data_received_before_sent),
                         (unsigned long long)r->rx_bytes, (unsigned long long)r->tx_bytes,
                         roamed, r->wants);
}

static int
append_new(PyObject *list, PyObject *item)
{
    int failed = !item || PyList_Append(list, item) < 0;
    Py_XDECREF(item);
    return failed ? -1 : 0;
}

/* The shell's number of one of the plane's socket dups (-1: replaced since). */
static int
given_fd(Plane *p, int fd)
{
    int given = -1;
    pthread_mutex_lock(&p->io_lock);
    for (int i = 0; i < p->socket_count; i++)
        if (p->sockets[i] == fd)
            given = p->given[i];
    pthread_mutex_unlock(&p->io_lock);
    return given;
}

/* A punt as collect() returns it, or NULL. */
static PyObject *
punt_tuple(Plane *self, const Punt *x)
{
    PyObject *peer = x->peer == UINT64_MAX ? Py_NewRef(Py_None)
                                           : PyLong_FromUnsignedLongLong(x->peer);
    PyObject *source = Py_NewRef(Py_None), *e = NULL;
    if (x->kind == PUNT_UDP && (e = endpoint_tuple(&x->source))) {
        Py_SETREF(source, Py_BuildValue("(OOOOi)", PyTuple_GET_ITEM(e, 0), PyTuple_GET_ITEM(e, 1),
                                        PyTuple_GET_ITEM(e, 2), PyTuple_GET_ITEM(e, 3),
                                        given_fd(self, x->fd)));
        Py_DECREF(e);
    } else if (x->kind == PUNT_UDP) {
        Py_CLEAR(source);
    }
    PyObject *out = peer && source ? Py_BuildValue("(iOy#O)", x->kind, peer, (const char *)x->data,
                                                   (Py_ssize_t)x->length, source)
                                   : NULL;
    Py_XDECREF(peer);
    Py_XDECREF(source);
    return out;
}

/* A dirty peer's record (and its confirm event) appended, and only then reset: 0, or -1
 * with the record kept (review L10). Under the GIL; takes the peer's lock. */
static int
collect_record(Plane *self, Peer *peer, PyObject *records, PyObject *events)
{
    pthread_mutex_lock(&peer->lock);
    int failed = 0;
    if (peer->live && peer->dirty) {
        uint64_t id = peer_id(peer);
        const Record *r = &peer->record;
        Py_ssize_t before = PyList_GET_SIZE(records);
        failed = append_new(records, record_tuple(id, r)) < 0;
        if (!failed && r->confirmed
            && append_new(events, Py_BuildValue("(iKk)", EVENT_CONFIRMED, (unsigned long long)id,
                                                (unsigned long)r->confirmed_index)) < 0) {
            PyList_SetSlice(records, before, before + 1, NULL);
            failed = 1;
        }
        if (!failed) {
            memset(&peer->record, 0, sizeof peer->record);
            peer->dirty = 0;
        }
    }
    pthread_mutex_unlock(&peer->lock);
    return failed ? -1 : 0;
}

/* News since the last collect. Nothing is lost to a MemoryError (review L10): records
 * are reset and punts leave the ring only once their Python objects are in the lists;
 * what did not fit stays (its peers listed again) and is signalled for the next collect,
 * and what was built is returned. The ring's punts are read in place (the thread only
 * writes past punt_count) and their slots cleansed once taken (L11). */
static PyObject *
plane_collect(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    uint64_t value;
    uint32_t *slots = PyMem_Malloc(sizeof(uint32_t) * ((size_t)self->peer_slots + 1));
    PyObject *records = PyList_New(0), *punt_list = PyList_New(0), *event_list = PyList_New(0);
    PyObject *out = PyTuple_New(3);
    if (!slots || !records || !punt_list || !event_list || !out) {
        PyMem_Free(slots);
        Py_XDECREF(records);
        Py_XDECREF(punt_list);
        Py_XDECREF(event_list);
        Py_XDECREF(out);
        return PyErr_NoMemory();
    }
    PyTuple_SET_ITEM(out, 0, records);
    PyTuple_SET_ITEM(out, 1, punt_list);
    PyTuple_SET_ITEM(out, 2, event_list);
    int dirty = 0, punt_count, punt_head;
    uint32_t room = self->peer_slots + 1; /* every peer listed once: the walk fits */
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->gate_lock);
    Gate *g = &self->gate;
    uint64_t *counts[6] = {&g->bad_mac1, NULL, &g->cookies_sent, &g->dropped, &g->failed,
                           &g->overflowed}; /* handed: with the punts taken, below */
    for (int c = 0; c < 6; c++) {
        if (counts[c]) {
            g->taken[c] += *counts[c];
            *counts[c] = 0;
        }
    }
    pthread_mutex_lock(&self->news_lock);
    if (read(self->news_fd, &value, sizeof value) < 0) { /* EAGAIN: nothing signalled */ }
    self->news = self->urgent = 0;
    uint32_t s = self->dirty_head;
    for (; s != NO_SLOT && (uint32_t)dirty < room;) {
        Peer *peer = peer_at(self, s);
        slots[dirty++] = s;
        peer->listed = 0;
        s = peer->dirty_next;
    }
    self->dirty_head = s; /* NO_SLOT, or what did not fit: the next collect's */
    if (s != NO_SLOT)
        signal_news(self, 0);
    punt_count = self->punt_count;
    punt_head = self->punt_head;
    pthread_mutex_unlock(&self->news_lock);
    pthread_mutex_unlock(&self->gate_lock);
    Py_END_ALLOW_THREADS
    int i = dirty - 1, taken = 0, local = 0, handed = 0;
    for (; i >= 0 && collect_record(self, peer_at(self, slots[i]), records, event_list) == 0; i--)
        ; /* oldest first */
    for (int j = i; j >= 0; j--) { /* not collected: listed again */
        Peer *peer = peer_at(self, slots[j]);
        pthread_mutex_lock(&peer->lock);
        if (peer->dirty) {
            peer->dirty = 0;
            mark_dirty(self, peer);
        }
        pthread_mutex_unlock(&peer->lock);
    }
    for (; i < 0 && taken < punt_count; taken++) {
        const Punt *x = &self->punts[(punt_head + taken) % PUNT_SLOTS];
        if (append_new(punt_list, punt_tuple(self, x)) < 0)
            break;
        local += x->kind != PUNT_UDP;
        handed += x->handed;
    }
    PyMem_Free(slots);
    pthread_mutex_lock(&self->gate_lock);
    self->gate.handed -= (uint64_t)handed;
    self->gate.taken[1] += (uint64_t)handed;
    pthread_mutex_lock(&self->news_lock);
    for (int j = 0; j < taken; j++) {
        Punt *x = &self->punts[(punt_head + j) % PUNT_SLOTS];
        OPENSSL_cleanse(x->data, x->length);
    }
    self->punt_head = (punt_head + taken) % PUNT_SLOTS;
    self->punt_count -= taken;
    self->local_punts -= local;
    self->punt_round++;
    if (i >= 0 || taken < punt_count)
        signal_news(self, 1);
    pthread_mutex_unlock(&self->news_lock);
    pthread_mutex_unlock(&self->gate_lock);
    wake_shell(self);
    reclaim(self, 0);
    if (i >= 0 || taken < punt_count)
        PyErr_Clear(); /* a MemoryError: the rest waits, signalled */
    return out;
}

static PyObject *
plane_counters(Plane *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < C_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(
            atomic_load_explicit(&self->counters[i], memory_order_relaxed));
        if (!v || PyDict_SetItemString(d, counter_names[i], v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

PyDoc_STRVAR(set_gate_doc,
"set_gate(mac1_key, cookie_key, secret, under_load, hand_up, cookies, lane, /)\n"
"set_gate()\n"
"--\n\n"
"The core's plan for handshake messages (uspan.wg.verdict.Plan's fields), or none: every\n"
"one goes up. The thread drops those with a bad mac1; under load, of the initiations\n"
"without a valid mac2 from outside the lane (records of a length byte and a source key\n"
"padded to 18 bytes), it hands up ``hand_up``, answers ``cookies`` more with a cookie\n"
"reply and drops the rest. What it did since the last collect counts against the new\n"
"budgets: collect, gate_take, then plan from its counts.");

static PyObject *
plane_set_gate(Plane *self, PyObject *args)
{
    Py_buffer mac1, cookie, secret, lane;
    int under_load;
    long long hand_up, cookies;
    Gate *g = &self->gate;
    if (check_open(self) < 0)
        return NULL;
    if (PyTuple_GET_SIZE(args) == 0) {
        pthread_mutex_lock(&self->gate_lock);
        g->on = g->has_secret = 0;
        OPENSSL_cleanse(g->mac1_key, sizeof g->mac1_key);
        OPENSSL_cleanse(g->cookie_key, sizeof g->cookie_key);
        OPENSSL_cleanse(g->secret, sizeof g->secret);
        OPENSSL_cleanse(&g->macs, sizeof g->macs);
        pthread_mutex_unlock(&self->gate_lock);
        Py_RETURN_NONE;
    }
    if (!PyArg_ParseTuple(args, "y*y*z*pLLy*:set_gate", &mac1, &cookie, &secret,
                          &under_load, &hand_up, &cookies, &lane))
        return NULL;
    PyObject *result = NULL;
    if (mac1.len != HS_KEY_SIZE || cookie.len != HS_KEY_SIZE
        || (secret.buf && secret.len != HS_KEY_SIZE))
        PyErr_SetString(PyExc_ValueError, "keys and the secret are 32 bytes");
    else if (lane.len % HS_LANE_RECORD || lane.len > (Py_ssize_t)sizeof g->lane)
        PyErr_Format(PyExc_ValueError, "the lane: up to %d records of %d bytes",
                     GATE_LANE_MAX, HS_LANE_RECORD);
    else {
        pthread_mutex_lock(&self->gate_lock);
        g->on = 1;
        g->under_load = under_load;
        memcpy(g->mac1_key, mac1.buf, HS_KEY_SIZE);
        memcpy(g->cookie_key, cookie.buf, HS_KEY_SIZE);
        g->has_secret = secret.buf != NULL;
        if (g->has_secret)
            memcpy(g->secret, secret.buf, HS_KEY_SIZE);
        else /* none fresh: the last one is not kept either */
            OPENSSL_cleanse(g->secret, sizeof g->secret);
        OPENSSL_cleanse(&g->macs, sizeof g->macs); /* the last keys' states */
        hs_macs_init(&g->macs, g->mac1_key, g->has_secret ? g->secret : NULL);
        g->hand_up = hand_up > (long long)g->handed ? hand_up - (long long)g->handed : 0;
        g->cookies = cookies > (long long)g->cookies_sent
                         ? cookies - (long long)g->cookies_sent : 0;
        memcpy(g->lane, lane.buf, (size_t)lane.len);
        g->lane_len = (size_t)lane.len;
        g->asked = 0;
        pthread_mutex_unlock(&self->gate_lock);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&mac1);
    PyBuffer_Release(&cookie);
    PyBuffer_Release(&secret);
    PyBuffer_Release(&lane);
    return result;
}

PyDoc_STRVAR(gate_take_doc,
"gate_take()\n"
"--\n\n"
"What the gate judged up to the last collect, since the last take: (bad_mac1,\n"
"handed_up, cookies, dropped, send_failed, overflowed), as uspan.wg.verdict.Counts.");

static PyObject *
plane_gate_take(Plane *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    Gate *g = &self->gate;
    uint64_t taken[6];
    pthread_mutex_lock(&self->gate_lock);
    memcpy(taken, g->taken, sizeof taken);
    memset(g->taken, 0, sizeof g->taken);
    pthread_mutex_unlock(&self->gate_lock);
    return Py_BuildValue("(KKKKKK)", taken[0], taken[1], taken[2], taken[3], taken[4],
                         taken[5]);
}

/* Test hooks: the thread's steps run synchronously on given bytes at a given time. */

/* A hook's arguments (a list of at most BATCH items, the time) as a tuple, and a batch
 * to fill; NULL with an exception. */
static Batch *
hook_batch(Plane *self, PyObject *args, PyObject **items, unsigned long long *now)
{
    PyObject *list;
    if (check_open(self) < 0 || !PyArg_ParseTuple(args, "OK", &list, now)
        || !(*items = PySequence_Tuple(list)))
        return NULL;
    Batch *b = PyTuple_GET_SIZE(*items) <= BATCH ? batch_new(BATCH) : NULL;
    if (!b) {
        Py_CLEAR(*items);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "at most %d items", BATCH);
    }
    return b;
}

/* Run a step on the batch as the thread would (keypair pointers held as a slow call),
 * with the routes of every call before it. */
static void
run_hook(Plane *self, void (*step)(Plane *, Batch *, int, uint64_t), Batch *b, int n,
         uint64_t now)
{
    atomic_fetch_add(&self->slow_calls, 1);
    Py_BEGIN_ALLOW_THREADS
    drain_routes(self);
    step(self, b, n, now);
    wake_shell(self);
    Py_END_ALLOW_THREADS
    atomic_fetch_sub(&self->slow_calls, 1);
}

static PyObject *
plane_tun_step(Plane *self, PyObject *args)
{
    PyObject *packets;
    unsigned long long now;
    Batch *b = hook_batch(self, args, &packets, &now);
    if (!b)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(packets);
    for (Py_ssize_t i = 0; i < n; i++) {
        char *data;
        Py_ssize_t size;
        if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(packets, i), &data, &size) < 0
            || size > MAX_PACKET) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "packet too large");
            free(b);
            Py_DECREF(packets);
            return NULL;
        }
        memcpy(b->data[i] + HEADER_SIZE, data, (size_t)size);
        b->size[i] = (size_t)size;
    }
    Py_DECREF(packets);
    run_hook(self, tun_step, b, (int)n, now);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        if (!b->out[i])
            continue;
        PyObject *e = endpoint_tuple(&b->addr[i]);
        if (append_new(out, e ? Py_BuildValue("(y#N)", (const char *)b->data[i] + b->offset[i],
                                              (Py_ssize_t)b->out[i], e) : NULL) < 0)
            Py_CLEAR(out);
    }
    free(b);
    return out;
}

static PyObject *
plane_udp_step(Plane *self, PyObject *args)
{
    PyObject *items;
    unsigned long long now;
    Batch *b = hook_batch(self, args, &items, &now);
    if (!b)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    static char empty[1];
    Py_buffer none = {.buf = empty, .len = 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer data, address;
        int port, ifindex = 0;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(items, i), "y*y*i|i", &data, &address, &port,
                              &ifindex)) {
            free(b);
            Py_DECREF(items);
            return NULL;
        }
        int bad = data.len > SLOT || make_endpoint(&b->addr[i], &address, port, &none, ifindex, 0) < 0;
        if (!bad) {
            memcpy(b->data[i], data.buf, (size_t)data.len);
            b->size[i] = (size_t)data.len;
            b->fd[i] = -1;
        }
        PyBuffer_Release(&data);
        PyBuffer_Release(&address);
        if (bad) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "datagram too large");
            free(b);
            Py_DECREF(items);
            return NULL;
        }
    }
    Py_DECREF(items);
    run_hook(self, udp_step, b, (int)n, now);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < n; i++)
        if (b->out[i] && append_new(out, PyBytes_FromStringAndSize(
                                             (const char *)b->data[i] + b->offset[i],
                                             (Py_ssize_t)b->out[i])) < 0)
            Py_CLEAR(out);
    free(b);
    return out;
}

/* A failed __init__ deallocates with its exception set: that is kept for the caller
 * (reporting it against self here would resurrect self and free it twice). */
static void
plane_dealloc(Plane *self)
{
    if (self->initialised) /* any thread: no call can be running on it any more */
        release_plane(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef plane_methods[] = {
    {"start", (PyCFunction)plane_start, METH_NOARGS, "Start the thread."},
    {"close", (PyCFunction)plane_close, METH_NOARGS, "Stop and join the thread; free keys."},
    {"fileno", (PyCFunction)plane_fileno, METH_NOARGS, "The eventfd: readable when collect() has news."},
    {"set_mtu", (PyCFunction)plane_set_mtu, METH_O, "The MTU sealing pads within."},
    {"set_sockets", (PyCFunction)plane_set_sockets, METH_O, "The UDP fds, after a rebind."},
    {"add_peer", (PyCFunction)plane_add_peer, METH_NOARGS, "A new peer's id."},
    {"remove_peer", (PyCFunction)plane_remove_peer, METH_O, "Drop a peer, its keypairs and routes."},
    {"set_endpoint", (PyCFunction)(void (*)(void))plane_set_endpoint, METH_VARARGS | METH_KEYWORDS,
     "Where the peer's datagrams go."},
    {"clear_source", (PyCFunction)plane_clear_source, METH_O, "Forget the endpoint's sticky source."},
    {"add_routes", (PyCFunction)(void (*)(void))plane_add_routes, METH_VARARGS | METH_KEYWORDS, "Route prefixes to the peer."},
    {"remove_routes", (PyCFunction)(void (*)(void))plane_remove_routes, METH_VARARGS | METH_KEYWORDS, "Remove the peer's prefixes."},
    {"clear_routes", (PyCFunction)plane_clear_routes, METH_O, "Remove all of the peer's prefixes."},
    {"routes_pending", (PyCFunction)plane_routes_pending, METH_NOARGS, "Route changes queued and not yet applied."},
    {"routes_fileno", (PyCFunction)plane_routes_fileno, METH_NOARGS, "An eventfd signalled when the route queue drains."},
    {"sync_routes", (PyCFunction)plane_sync_routes, METH_NOARGS, "Wait until the queued route changes are applied."},
    {"route", (PyCFunction)plane_route, METH_O, "The owner of an address, or None."},
    {"install", (PyCFunction)(void (*)(void))plane_install, METH_VARARGS | METH_KEYWORDS,
     "Install a keypair."},
    {"assign", (PyCFunction)(void (*)(void))plane_assign, METH_VARARGS | METH_KEYWORDS, "The peer's previous, current, next."},
    {"drop", (PyCFunction)plane_drop, METH_O, "Drop a keypair."},
    {"expire_sending", (PyCFunction)plane_expire_sending, METH_O, "Counter := REJECT."},
    {"seal", (PyCFunction)(void (*)(void))plane_seal, METH_VARARGS | METH_KEYWORDS, "Seal packets with a keypair."},
    {"open", (PyCFunction)(void (*)(void))plane_open, METH_VARARGS | METH_KEYWORDS, "Open transport messages of a keypair."},
    {"accept", (PyCFunction)(void (*)(void))plane_accept, METH_VARARGS | METH_KEYWORDS, "The replay window's verdict."},
    {"accept_run", (PyCFunction)(void (*)(void))plane_accept_run, METH_VARARGS | METH_KEYWORDS, "A run's, all or nothing."},
    {"send_counter", (PyCFunction)plane_send_counter, METH_O, "The next counter."},
    {"collect", (PyCFunction)plane_collect, METH_NOARGS, "Records, punts and events."},
    {"counters", (PyCFunction)plane_counters, METH_NOARGS, "Drops and the plane's counts."},
    {"set_gate", (PyCFunction)plane_set_gate, METH_VARARGS, set_gate_doc},
    {"gate_take", (PyCFunction)plane_gate_take, METH_NOARGS, gate_take_doc},
    {"_tun_step", (PyCFunction)plane_tun_step, METH_VARARGS, "Test hook: TUN packets -> datagrams."},
    {"_udp_step", (PyCFunction)plane_udp_step, METH_VARARGS, "Test hook: datagrams -> TUN packets."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "uspan.plane._plane.Plane",
    .tp_doc = PyDoc_STR("Plane(tun_fd, sockets, mtu, *, offloads=0): established sessions in a C thread."),
    .tp_basicsize = sizeof(Plane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)plane_init,
    .tp_dealloc = (destructor)plane_dealloc,
    .tp_methods = plane_methods,
};

static struct PyModuleDef plane_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "uspan.plane._plane",
    .m_doc = "The data plane thread (docs/dataplane.md).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__plane(void)
{
    chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    if (!chacha20_poly1305) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no ChaCha20-Poly1305");
        return NULL;
    }
    if (PyType_Ready(&PlaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&plane_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Plane", (PyObject *)&PlaneType) < 0
        || PyModule_AddIntConstant(m, "PUNT_TUN", PUNT_TUN) < 0
        || PyModule_AddIntConstant(m, "PUNT_UDP", PUNT_UDP) < 0
        || PyModule_AddIntConstant(m, "PUNT_EGRESS", PUNT_EGRESS) < 0
        || PyModule_AddIntConstant(m, "EVENT_CONFIRMED", EVENT_CONFIRMED) < 0
        || PyModule_AddIntConstant(m, "NEWS_URGENT", (long)NEWS_URGENT) < 0
        || PyModule_AddIntConstant(m, "OFFLOAD_TUN_VNET", OFFLOAD_TUN_VNET) < 0
        || PyModule_AddIntConstant(m, "OFFLOAD_TUN_USO", OFFLOAD_TUN_USO) < 0
        || PyModule_AddIntConstant(m, "OFFLOAD_UDP_GSO", OFFLOAD_UDP_GSO) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
