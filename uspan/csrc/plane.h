/* The data plane's core: established WireGuard sessions carried by a C thread without
 * the GIL. The Python binding is uspan/plane/_plane.c; nothing here includes Python.h.
 *
 * Why: the trio shell's wake per packet batch costs ~270k instructions per ping; the
 * protocol work is ~10k (branch plane, proto/DESIGN.md). This thread owns the
 * per-packet state of the keypairs the core installs (send counters, replay windows,
 * roaming, per-peer traffic records) and hands up what it does not handle (punts).
 * The contract with the core is docs/dataplane.md.
 *
 * Layout (uspan/csrc/): this header holds the types, the locks and the helpers of the
 * per-packet path (static inline, so that no per-packet step calls into another file);
 * plane.c a plane's life and its peers; plane_tables.c keypairs by local index and the
 * routes, with the routes thread; plane_keypair.c keys, retiring and reclaiming;
 * plane_news.c punts, collects and the eventfd; plane_steps.c the per-packet steps as
 * plain functions over buffers (pl_tun_step, pl_udp_step: no I/O, callable
 * synchronously); plane_gate.c handshake messages judged in the thread; plane_thread.c
 * the thread (epoll, batched reads and sends around the steps). Compiled into the
 * extension that lists them, with hidden visibility, as segment.c and handshake.c.
 *
 * Locks, always taken in this order and never across a syscall:
 *   routes (rwlock) and index (rwlock) alone: lookups for a whole batch at once;
 *   peer->lock: roles, keypair counters and windows, endpoint, record (the thread takes
 *     it once per run of one peer in a batch);
 *   index (write) inside peer->lock: install, drop, the thread's confirm of `next`;
 *   news_lock inside peer->lock: dirty list, punt ring, the eventfd's count (written
 *     by pl_wake_shell once no lock is held);
 *   gate_lock outside news_lock: the core's plan for handshake messages and what it
 *     judged (a handed-up initiation is counted and punted at once);
 *   retire_lock innermost: keypairs waiting to be freed;
 *   jobs_lock alone: the queue of route changes for the routes thread (pl_route_run).
 * Freed keypairs wait for the thread's next batch boundary (epoch): a batch that looked
 * a keypair up keeps a valid pointer until it ends, and sees it dead under peer->lock.
 */
#ifndef USPAN_PLANE_H
#define USPAN_PLANE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sendmmsg, recvmmsg, in6_pktinfo: as Python.h sets it */
#endif
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

#include "handshake.h" /* the gate's verdict and cookie replies, as _gate.c */
#include "segment.h" /* TSO/USO cuts and GRO merges over plain buffers */
#include "../wg/_transport.h" /* the message layout and sealing, as the core's _aead.c */

#if defined(__GNUC__)
#define PL_API __attribute__((visibility("hidden")))
#else
#define PL_API
#endif

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

/* What a core call that can fail returns (0: done). */
#define PL_NO_MEMORY (-1)
#define PL_ERRNO (-2)  /* a syscall failed: errno says why */
#define PL_NO_THREAD (-3)
#define PL_FULL (-4)   /* every peer slot taken */
#define PL_TAKEN (-5)  /* the local index is installed */

PL_API extern EVP_CIPHER *pl_chacha20_poly1305;

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

/* One add_routes/remove_routes call, queued for the routes thread (see pl_route_run). */
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
 * and sent after it (pl_gate_flush), with nonces drawn GATE_REPLIES at a time. */
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
     * by the routes thread (pl_route_run) on another core, beside the Python work of the
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
    _Atomic uint64_t owed; /* eventfd count signalled and not yet written (pl_wake_shell) */
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

/* --- Helpers of every file ----------------------------------------------------------- */

static inline uint64_t
pl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static inline void
pl_count(Plane *p, int counter, uint64_t by)
{
    atomic_fetch_add_explicit(&p->counters[counter], by, memory_order_relaxed);
}

static inline uint32_t
pl_get_le32(const unsigned char *b)
{
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static inline uint64_t
pl_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t
pl_peer_id(const Peer *peer)
{
    return (uint64_t)peer->generation << 32 | peer->slot;
}

static inline Peer *
pl_peer_at(Plane *p, uint32_t slot)
{
    if (slot >= PEER_CHUNK * PEER_CHUNKS)
        return NULL;
    Peer *chunk = atomic_load_explicit(&p->chunks[slot / PEER_CHUNK], memory_order_acquire);
    return chunk ? &chunk[slot % PEER_CHUNK] : NULL;
}

static inline Peer *
pl_owner_peer(Plane *p, uint64_t owner)
{
    return owner == UINT64_MAX ? NULL : pl_peer_at(p, (uint32_t)owner);
}

static inline int
pl_same_endpoint(const Endpoint *a, const Endpoint *b)
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

/* --- The index table: local index -> keypair (linear probing) ------------------------ */

static inline size_t
pl_index_home(const IndexTable *t, uint32_t index)
{
    return (size_t)pl_mix(index) & t->mask;
}

static inline Keypair *
pl_index_find(const IndexTable *t, uint32_t index)
{
    if (!t->entries)
        return NULL;
    for (size_t i = pl_index_home(t, index);; i = (i + 1) & t->mask) {
        Keypair *k = t->entries[i];
        if (!k || k->local_index == index)
            return k;
    }
}

/* --- Routes: longest prefix match ---------------------------------------------------- */

static inline size_t
pl_route_home(const RouteTable *t, uint64_t hi, uint64_t lo, int length)
{
    return (size_t)pl_mix(hi * 0x9e3779b97f4a7c15ULL ^ lo ^ (uint64_t)length << 56) & t->mask;
}

static inline Route *
pl_route_find(const RouteTable *t, uint64_t hi, uint64_t lo, int length)
{
    if (!t->entries)
        return NULL;
    for (size_t i = pl_route_home(t, hi, lo, length);; i = (i + 1) & t->mask) {
        Route *r = &t->entries[i];
        if (!r->used)
            return NULL;
        if (r->length == length && r->lo == lo && r->hi == hi)
            return r;
    }
}

/* The network bits of a 128-bit address (hi, lo) under a prefix of `length` of `width`. */
static inline void
pl_network_bits(uint64_t hi, uint64_t lo, int width, int length, uint64_t *out_hi,
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
static inline uint64_t
pl_route_lookup(const Plane *p, const unsigned char *address, int size)
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
        pl_network_bits(hi, lo, t->width, length, &bits_hi, &bits_lo);
        const Route *r = pl_route_find(t, bits_hi, bits_lo, length);
        if (r)
            return (uint64_t)r->generation << 32 | r->slot;
    }
    return UINT64_MAX;
}

/* --- Keypairs: sealing, opening, the replay window ----------------------------------- */

/* Seal the `length` bytes at message + HEADER_SIZE in place (room for padding and the
 * tag after them, within `capacity` bytes at message) with the keypair's next counter:
 * the message's size, 0 on failure or if it would not fit (then nothing is written and
 * the counter is unchanged). Under the peer's lock; the caller checked the counter is
 * below REJECT. */
static inline size_t
pl_seal_message(Keypair *k, unsigned char *message, size_t length, size_t mtu, size_t capacity)
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
static inline int
pl_open_message(Keypair *k, const unsigned char *message, size_t size, unsigned char *plain)
{
    return open_one(k->open, message, (int)(size - HEADER_SIZE - TAG_SIZE), plain);
}

/* uspan.wg.replay.ReplayWindow.accept (RFC 6479). Under the peer's lock. */
static inline int
pl_replay_accept(Keypair *k, uint64_t counter)
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

/* A keypair's age at `now`. A creation up to CLOCK_SLACK ahead is a batch that read the
 * clock just before the core installed (age 0); further ahead the clock is not to be
 * trusted, so the keypair fails closed as past every limit (install refuses such). */
static inline uint64_t
pl_age(const Keypair *k, uint64_t now)
{
    if (now >= k->created)
        return now - k->created;
    return k->created - now <= CLOCK_SLACK ? 0 : UINT64_MAX;
}

static inline int
pl_can_send(const Keypair *k, uint64_t now)
{
    return k && k->send_counter < REJECT_AFTER_MESSAGES && pl_age(k, now) < REJECT_AFTER_TIME;
}

/* --- News for the core: records ------------------------------------------------------ */

/* The first news of a kind since the last collect signals the eventfd (under
 * news_lock): records add 1, punts and events NEWS_URGENT, so a shell that read the
 * eventfd knows whether a collect can wait (records: the timers' sync, at most a second
 * later) or not, and is woken again for a punt while it waits, never per packet. The
 * count is owed here and written by pl_wake_shell once no lock is held (review L6). */
static inline void
pl_signal_news(Plane *p, int urgent)
{
    int *flag = urgent ? &p->urgent : &p->news;
    if (*flag)
        return;
    *flag = 1;
    atomic_fetch_add(&p->owed, urgent ? NEWS_URGENT : 1);
}

/* The peer's record has news (under its lock). */
static inline void
pl_mark_dirty(Plane *p, Peer *peer)
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
    pl_signal_news(p, urgent);
    pthread_mutex_unlock(&p->news_lock);
}

/* Recorder.sent of proto/timersync.py for the thread's data, and the send side's rekey
 * wish (the core records what it seals itself). */
static inline void
pl_record_sent(Plane *p, Peer *peer, Keypair *k, uint64_t now, size_t size)
{
    Record *r = &peer->record;
    r->last_sent = now;
    r->data_received_since_sent = 0;
    if (!r->data_sent_since_received)
        r->data_sent_since_received = now;
    r->tx_bytes += size;
    if (k == peer->current && (k->send_counter > REKEY_AFTER_MESSAGES
                               || (k->initiator && pl_age(k, now) > REKEY_AFTER_TIME)))
        r->wants |= 1;
    pl_mark_dirty(p, peer);
}

/* Recorder.received, and the receive side's rekey wish. */
static inline void
pl_record_received(Plane *p, Peer *peer, uint64_t now, size_t size, int data)
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
    if (k && k->initiator && pl_age(k, now) > REKEY_ON_RECEIVE_AGE)
        r->wants |= 2;
    pl_mark_dirty(p, peer);
}

/* --- plane.c: a plane's life and its peers ------------------------------------------- */

/* From a zeroed Plane: locks, workspaces, eventfds and epoll. 0, PL_NO_MEMORY or
 * PL_ERRNO; pl_release undoes any part of it. */
PL_API int pl_init(Plane *p, int mtu, int offloads);
/* The thread and the routes thread started: 0, PL_ERRNO or PL_NO_THREAD. Joins (on
 * failure), as pl_stop and pl_release do: the caller does not hold the GIL. */
PL_API int pl_start(Plane *p);
PL_API void pl_stop(Plane *p);
PL_API void pl_release(Plane *p);
PL_API void pl_close_fds(const int *fds, int n);
/* The thread's sockets (its own dups, with the shell's numbers and their families);
 * 0, or PL_ERRNO with the dups closed. Waits for the thread's wake. */
PL_API int pl_set_sockets(Plane *p, const int *fds, const int *given, const int *families,
                          int n);
PL_API Batch *pl_batch_new(int slots);
PL_API int pl_add_peer(Plane *p, uint64_t *id);
PL_API void pl_remove_peer(Plane *p, Peer *peer);
PL_API void pl_set_endpoint(Peer *peer, const Endpoint *e);
PL_API void pl_clear_source(Peer *peer);

/* --- plane_tables.c: the index table and routes -------------------------------------- */

PL_API int pl_index_add(IndexTable *t, Keypair *k);
PL_API void pl_index_remove(IndexTable *t, uint32_t index);
PL_API void pl_route_entries_free(Route *entries, size_t count);
PL_API int pl_apply_routes(Plane *self, uint32_t slot, uint32_t generation,
                           const Prefix *prefixes, size_t n, int add);
PL_API void *pl_route_run(void *arg);
PL_API int pl_stage_routes(Plane *self, RouteJob *job);
PL_API void pl_hand_over_routes(Plane *self);
PL_API void pl_drain_routes(Plane *self);
PL_API size_t pl_routes_pending(Plane *self);
PL_API int pl_sync_routes(Plane *self);
PL_API void pl_stop_router(Plane *self);
PL_API void pl_clear_routes(Plane *self, const Peer *peer);
PL_API uint64_t pl_route(Plane *self, const unsigned char *address, int size);

/* --- plane_keypair.c: keys, retiring and reclaiming ---------------------------------- */

PL_API int pl_crypto_init(void);
PL_API Keypair *pl_keypair_new(const void *send_key, const void *recv_key);
PL_API int pl_install(Plane *self, Keypair *k);
PL_API Keypair *pl_keypair_of(Plane *self, uint32_t index);
PL_API int pl_assign(Plane *self, Peer *peer, const long long roles[3]);
PL_API Keypair *pl_claim_keypair(Plane *self, uint32_t index);
PL_API void pl_release_keypair(Plane *self, Keypair *k);
PL_API void pl_drop(Plane *self, uint32_t index);
PL_API void pl_retire(Plane *p, Keypair *k);
PL_API void pl_free_keypair(Keypair *k);
PL_API void pl_reclaim(Plane *p, int all);
PL_API int pl_replay_accept_run(Keypair *k, uint64_t first, uint64_t count);

/* --- plane_news.c: punts, collects and the eventfd ----------------------------------- */

PL_API void pl_wake_shell(Plane *p);
PL_API int pl_punt(Plane *p, int kind, Peer *from, const unsigned char *data, size_t size,
                   const Endpoint *source, int fd, int handed);
PL_API void pl_alarm_news(Plane *p);
PL_API int pl_collect_begin(Plane *self, uint32_t *slots, uint32_t room, int *punt_count,
                            int *punt_head);
PL_API void pl_collect_end(Plane *self, const uint32_t *slots, int left, int punt_head,
                           int punt_count, int taken, int local, int handed);

/* --- plane_steps.c: the per-packet steps --------------------------------------------- */

PL_API void pl_tun_step(Plane *p, Batch *b, int n, uint64_t now);
PL_API void pl_udp_step(Plane *p, Batch *b, int n, uint64_t now);

/* --- plane_gate.c: handshake messages judged in the thread --------------------------- */

PL_API void pl_gate_judge(Plane *p, Batch *b, int i);
PL_API void pl_gate_flush(Plane *p, Replies *r);
PL_API void pl_gate_set(Plane *self, const unsigned char *mac1, const unsigned char *cookie,
                        const unsigned char *secret, int under_load, long long hand_up,
                        long long cookies, const unsigned char *lane, size_t lane_len);
PL_API void pl_gate_clear(Plane *self);
PL_API void pl_gate_take(Plane *self, uint64_t taken[6]);

/* --- plane_thread.c: the thread, its reads and sends --------------------------------- */

PL_API void *pl_run(void *arg);
PL_API socklen_t pl_sticky_source(const Endpoint *e, Control *control);
PL_API int pl_drop_source(Endpoint *e);

#endif
