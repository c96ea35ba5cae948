/* Segmentation offload over plain buffers (segment.h says what and why).
 *
 * Why C: the numpy columns of gso._split cost ~1.95 us and ~18.6k instructions per
 * 1,408-byte packet, most of it per-call overhead; here each segment is one copy of the
 * header and payload chunk, a few stores and one checksum pass. gso.coalesce cost ~1.5 us
 * per received packet in Python and numpy; the plan here takes the same decisions as
 * gso._coalesce_python, packet by packet, and builds the same bytes.
 *
 * Checksums are sums of little-endian 64-bit words: 2**16 and 2**64 are both 1
 * modulo 0xFFFF, so the sum is congruent to the little-endian 16-bit word sum
 * (gso's convention), and the folded value written little-endian is the big-endian
 * field, exactly as gso._put_le16 writes it.
 */
#include "segment.h"

#include <string.h>

#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_CWR 0x80
#define IPV4_DF 0x40
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define FNV_BASIS 2166136261u

static inline uint64_t
load_le64(const unsigned char *p)
{
    uint64_t value;
    memcpy(&value, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    value = __builtin_bswap64(value);
#endif
    return value;
}

/* A number congruent modulo 0xFFFF to the little-endian word sum of data (odd length:
 * the last byte is a low byte), below 2**32. 64-bit words with their carries counted:
 * 2**64 is 1 modulo 0xFFFF too. */
static uint64_t
sum_le(const unsigned char *data, size_t len)
{
    uint64_t sum = 0, carries = 0, rest = 0;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t word = load_le64(data + i);
        sum += word;
        carries += sum < word;
    }
    for (; i + 2 <= len; i += 2)
        rest += (uint32_t)data[i] | (uint32_t)data[i + 1] << 8;
    if (i < len)
        rest += data[i];
    return sum % 0xFFFF + carries + rest;
}

/* gso._fold of a nonzero sum: its residue modulo 0xFFFF in 1..0xFFFF. */
static inline unsigned
fold(uint64_t total)
{
    unsigned folded = (unsigned)(total % 0xFFFF);
    return folded ? folded : 0xFFFF;
}

static inline unsigned
swap16(unsigned value)
{
    return ((value & 0xFF) << 8) | (value >> 8);
}

static inline void
put_be16(unsigned char *p, unsigned value)
{
    p[0] = (unsigned char)(value >> 8);
    p[1] = (unsigned char)value;
}

static inline void
put_le16(unsigned char *p, unsigned value)
{
    p[0] = (unsigned char)value;
    p[1] = (unsigned char)(value >> 8);
}

/* --- split ---------------------------------------------------------------------------- */

int
seg_split_init(seg_split *s, const unsigned char *packet, size_t len, size_t ip_len,
               size_t hdr_len, size_t step, int v6, int tcp)
{
    /* ip_len and hdr_len are bounded by len (<= 65535) before any arithmetic on them;
     * the TCP data offset is read only once the 20-byte TCP header is known to fit. */
    if (len > SEG_MAX_IP_PACKET || step == 0 || ip_len < (v6 ? 40u : 20u) || ip_len > len
        || hdr_len > len || hdr_len < ip_len + (tcp ? 20 : 8) || (!tcp && hdr_len != ip_len + 8)
        || (tcp && (size_t)(packet[ip_len + 12] >> 4) * 4 != hdr_len - ip_len))
        return SEG_EINVAL;
    size_t size = len - hdr_len, full = size / step, tail = size - full * step;
    int short_last = tail || !size; /* a shorter last chunk, or the one empty segment */
    *s = (seg_split){packet, ip_len, hdr_len, step, full + (size_t)short_last,
                     short_last ? tail : step, v6, tcp};
    return 0;
}

/* Segment `index` into out; inlined into both loops that call it (seg_split_build and
 * seg_cut), where a call per segment cost ~20 instructions of ~1,850. */
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
static inline void
build(const seg_split *s, size_t index, unsigned char *out)
{
    int last = index + 1 == s->count;
    size_t chunk = last ? s->last_chunk : s->step;
    const unsigned char *packet = s->packet;
    size_t ip_len = s->ip_len, hdr_len = s->hdr_len;
    unsigned total = (unsigned)(hdr_len + chunk), l4_len = (unsigned)(total - ip_len);
    unsigned char *l4 = out + ip_len;
    memcpy(out, packet, hdr_len);
    memcpy(out + hdr_len, packet + hdr_len + index * s->step, chunk);
    if (s->v6) {
        put_be16(out + 4, total - 40);
    } else {
        unsigned ip_id = ((unsigned)packet[4] << 8 | packet[5]) + (unsigned)index;
        put_be16(out + 2, total);
        put_be16(out + 4, ip_id & 0xFFFF);
        out[10] = out[11] = 0;
        put_le16(out + 10, 0xFFFF - fold(sum_le(out, ip_len)));
    }
    /* The pseudo-header: addresses, protocol, transport length. */
    uint64_t pseudo = s->v6 ? sum_le(packet + 8, 32) : sum_le(packet + 12, 8);
    pseudo += swap16(l4_len);
    if (s->tcp) {
        const unsigned char *at = packet + ip_len + 4;
        uint32_t seq = (uint32_t)at[0] << 24 | (uint32_t)at[1] << 16 | (uint32_t)at[2] << 8
                       | at[3];
        seq += (uint32_t)(index * s->step);
        l4[4] = (unsigned char)(seq >> 24);
        l4[5] = (unsigned char)(seq >> 16);
        l4[6] = (unsigned char)(seq >> 8);
        l4[7] = (unsigned char)seq;
        unsigned flags = packet[ip_len + 13];
        if (!last)
            flags &= ~(unsigned)(TCP_FIN | TCP_PSH);
        if (index > 0)
            flags &= ~(unsigned)TCP_CWR;
        l4[13] = (unsigned char)flags;
        l4[16] = l4[17] = 0;
        pseudo += PROTO_TCP << 8;
        put_le16(l4 + 16, 0xFFFF - fold(pseudo + sum_le(l4, l4_len)));
    } else {
        put_be16(l4 + 4, l4_len);
        l4[6] = l4[7] = 0;
        pseudo += PROTO_UDP << 8;
        unsigned value = 0xFFFF - fold(pseudo + sum_le(l4, l4_len));
        put_le16(l4 + 6, value ? value : 0xFFFF);
    }
}

void
seg_split_build(const seg_split *s, size_t first, size_t n, unsigned char *const out[])
{
    for (size_t i = 0; i < n; i++)
        build(s, first + i, out[i]);
}

/* --- a TUN read cut for sending ----------------------------------------------------------- */

#define GSO_ECN 0x80

/* gso._split's checks of a TCP/UDP super-segment: its IP and full header lengths and the
 * payload step, or SEG_EINVAL. */
static int
super_segment(const unsigned char *packet, size_t len, unsigned flags, unsigned csum_start,
              unsigned gso_size, size_t mtu, int v6, int tcp, seg_split *s)
{
    if (len < (v6 ? 40u : 20u) || packet[0] >> 4 != (v6 ? 6u : 4u))
        return SEG_EINVAL;
    size_t ip_len;
    if (v6) {
        ip_len = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM ? csum_start : 40;
        if (ip_len < 40)
            return SEG_EINVAL;
    } else {
        ip_len = (size_t)(packet[0] & 0x0F) * 4;
        if (ip_len < 20 || (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM && csum_start != ip_len)
            || packet[9] != (tcp ? PROTO_TCP : PROTO_UDP))
            return SEG_EINVAL;
    }
    /* The transport header length comes from the packet: the kernel's hdr_len may cover
     * the whole first segment on the forwarding path. */
    size_t l4_len = tcp && len > ip_len + 12 ? (size_t)(packet[ip_len + 12] >> 4) * 4 : 8;
    size_t hdr_len = ip_len + l4_len;
    if ((tcp && l4_len < 20) || hdr_len > len)
        return SEG_EINVAL;
    /* TCP may be cut finer if the MTU shrank; UDP datagram boundaries are the sender's. */
    size_t step = gso_size;
    if (tcp && (mtu <= hdr_len || mtu - hdr_len < step))
        step = mtu > hdr_len ? mtu - hdr_len : 0;
    return seg_split_init(s, packet, len, ip_len, hdr_len, step, v6, tcp);
}

ptrdiff_t
seg_cut(const unsigned char vnet[SEG_VNET_HDR_LEN], const unsigned char *packet, size_t len,
        size_t mtu, unsigned char *out, size_t stride, size_t headroom, seg_buf *segments,
        size_t max_segments)
{
    uint16_t fields[4]; /* hdr_len, gso_size, csum_start, csum_offset */
    memcpy(fields, vnet + 2, sizeof fields);
    unsigned flags = vnet[0], gso_type = vnet[1] & ~(unsigned)GSO_ECN;
    if (gso_type == 0) { /* one packet, its partial checksum completed if it has one */
        size_t at = (size_t)fields[2] + fields[3];
        if (len > SEG_MAX_IP_PACKET || (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM && at + 2 > len))
            return SEG_EINVAL;
        if (max_segments < 1 || headroom > stride || len > stride - headroom)
            return SEG_ERANGE;
        unsigned char *into = out + headroom;
        memcpy(into, packet, len);
        if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            size_t start = fields[2] < len ? fields[2] : len;
            unsigned value = 0xFFFF - fold(sum_le(into + start, len - start));
            put_le16(into + at, value ? value : 0xFFFF);
        }
        segments[0] = (seg_buf){into, len};
        return 1;
    }
    int tcp = gso_type == GSO_TCPV4 || gso_type == GSO_TCPV6;
    if (!tcp && gso_type != GSO_UDP_L4)
        return SEG_EINVAL;
    int v6 = tcp ? gso_type == GSO_TCPV6 : len > 0 && packet[0] >> 4 == 6;
    seg_split s;
    if (super_segment(packet, len, flags, fields[2], fields[1], mtu, v6, tcp, &s) < 0)
        return SEG_EINVAL;
    if (s.count > max_segments || headroom > stride
        || seg_split_len(&s, 0) > stride - headroom)
        return SEG_ERANGE;
    for (size_t i = 0; i < s.count; i++) {
        unsigned char *into = out + i * stride + headroom;
        build(&s, i, into);
        segments[i] = (seg_buf){into, seg_split_len(&s, i)};
    }
    return (ptrdiff_t)s.count;
}

/* --- merge ---------------------------------------------------------------------------- */

static inline unsigned
be16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static inline uint32_t
be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Whether the checksum of a 20-byte IPv4 header verifies: sum_le of it is 0 modulo
 * 0xFFFF, unrolled (sum_le is a call, and this runs for every packet). */
static inline int
ipv4_header_ok(const unsigned char *d)
{
    uint64_t low = load_le64(d), sum = low + load_le64(d + 8);
    uint32_t tail = (uint32_t)d[16] | (uint32_t)d[17] << 8 | (uint32_t)d[18] << 16
                    | (uint32_t)d[19] << 24;
    return (sum % 0xFFFF + (sum < low) + tail) % 0xFFFF == 0;
}

/* gso._flow of one packet: a GRO candidate (`candidate`) with its flow key
 * (addresses, up to 4 port bytes, protocol) and lengths; payload -1: it cannot merge
 * but ends its flow's run. */
typedef struct {
    const unsigned char *data;
    size_t size;
    const unsigned char *addresses, *ports;
    unsigned addresses_len, ports_len, proto, ip_len, hdr_len;
    uint32_t hash;
    long payload;
    int candidate, v6, ok;
} Packet;

static void
flow(Packet *p, int udp, uint32_t basis)
{
    const unsigned char *d = p->data;
    size_t size = p->size;
    int simple, mergeable;
    p->candidate = 0;
    if (size < 28)
        return;
    unsigned version = d[0] >> 4;
    if (version == 4) {
        p->proto = d[9];
        p->ip_len = (d[0] & 0x0F) * 4;
        p->addresses = d + 12;
        p->addresses_len = 8;
        /* The header checksum too: merging rewrites it, and the kernel drops a packet
         * whose header does not verify. */
        simple = p->ip_len == 20 && be16(d + 2) == size && !(be16(d + 6) & 0xBFFF)
                 && ipv4_header_ok(d);
    } else if (version == 6 && size >= 48) {
        p->proto = d[6];
        p->ip_len = 40;
        p->addresses = d + 8;
        p->addresses_len = 32;
        simple = be16(d + 4) == size - 40;
    } else {
        return;
    }
    size_t ip_len = p->ip_len;
    if (p->proto == PROTO_TCP) {
        if (size < ip_len + 20)
            return;
        p->hdr_len = (unsigned)ip_len + (d[ip_len + 12] >> 4) * 4;
        unsigned flags = d[ip_len + 13];
        mergeable = (flags == TCP_ACK || flags == (TCP_ACK | TCP_PSH))
                    && ip_len + 20 <= p->hdr_len && p->hdr_len < size;
    } else if (p->proto == PROTO_UDP) {
        p->hdr_len = (unsigned)ip_len + 8;
        /* A zero checksum field: "none" over IPv4, invalid over IPv6; neither merges. */
        mergeable = udp && p->hdr_len < size && be16(d + ip_len + 4) == size - ip_len
                    && (d[ip_len + 6] || d[ip_len + 7]);
    } else {
        return;
    }
    p->candidate = 1;
    p->v6 = version == 6;
    p->ports = d + ip_len;
    p->ports_len = size > ip_len ? (size - ip_len < 4 ? (unsigned)(size - ip_len) : 4) : 0;
    uint32_t hash = basis ^ p->proto ^ p->ports_len << 8;
    for (unsigned i = 0; i < p->addresses_len; i++)
        hash = (hash ^ p->addresses[i]) * 16777619u;
    for (unsigned i = 0; i < p->ports_len; i++)
        hash = (hash ^ p->ports[i]) * 16777619u;
    p->hash = hash;
    p->payload = simple && mergeable ? (long)(size - p->hdr_len) : -1;
}

static int
same_flow(const Packet *a, const Packet *b)
{
    return a->hash == b->hash && a->proto == b->proto && a->addresses_len == b->addresses_len
           && a->ports_len == b->ports_len
           && !memcmp(a->addresses, b->addresses, a->addresses_len)
           && !memcmp(a->ports, b->ports, a->ports_len);
}

/* gso.l4_checksum_ok of a mergeable packet: the pseudo-header and the transport
 * header and payload sum to 0 modulo 0xFFFF. */
static int
checksum_ok(const Packet *p)
{
    size_t l4_len = p->size - p->ip_len;
    uint64_t total = sum_le(p->addresses, p->addresses_len) + (p->proto << 8)
                     + swap16((unsigned)l4_len) + sum_le(p->data + p->ip_len, l4_len);
    return total % 0xFFFF == 0;
}

/* gso._Run: consecutive segments of one flow; members linked through `next`. */
typedef struct {
    ptrdiff_t head, last;
    size_t size;
    long gso_size;
    unsigned count;
    uint32_t next_seq;
    int verified, ended, fixed_id, psh;  /* fixed_id: -1 not known yet */
} Run;

static int
accepts(const Run *run, const Packet *head, const Packet *p)
{
    const unsigned char *h = head->data, *d = p->data;
    size_t ip_len = head->ip_len;
    if (run->ended || p->payload > run->gso_size || run->size + (size_t)p->payload > SEG_MAX_IP_PACKET)
        return 0;
    if (head->v6) {
        if (memcmp(h, d, 4) || h[7] != d[7])  /* class, flow label, hop limit */
            return 0;
    } else {
        if (h[1] != d[1] || h[8] != d[8] || h[6] >> 5 != d[6] >> 5)  /* TOS, TTL, DF */
            return 0;
        unsigned head_id = be16(h + 4), ip_id = be16(d + 4);
        int fixed = (h[6] & IPV4_DF) && ip_id == head_id;
        if (!fixed && ip_id != ((head_id + run->count) & 0xFFFF))
            return 0;
        if (run->fixed_id >= 0 && fixed != run->fixed_id)
            return 0;
    }
    if (head->proto == PROTO_TCP)  /* ack, data offset and reserved bits, window, options */
        return be32(d + ip_len + 4) == run->next_seq && be32(d + ip_len + 8) == be32(h + ip_len + 8)
               && d[ip_len + 12] == h[ip_len + 12] && be16(d + ip_len + 14) == be16(h + ip_len + 14)
               && !memcmp(d + ip_len + 20, h + ip_len + 20, head->hdr_len - ip_len - 20);
    return run->count < SEG_UDP_MAX_SEGMENTS;
}

static void
start_run(Run *run, const Packet *p, ptrdiff_t index)
{
    run->head = run->last = index;
    run->size = p->size;
    run->gso_size = p->payload;
    run->count = 1;
    run->verified = p->ok;
    run->ended = run->psh = 0;
    run->fixed_id = -1;
    run->next_seq = 0;
    if (p->proto == PROTO_TCP) {
        run->next_seq = be32(p->data + p->ip_len + 4) + (uint32_t)p->payload;
        run->psh = run->ended = (p->data[p->ip_len + 13] & TCP_PSH) != 0;
    }
}

static void
append(Run *run, const Packet *head, const Packet *p, ptrdiff_t index, ptrdiff_t *next)
{
    if (!head->v6)
        run->fixed_id = be16(p->data + 4) == be16(head->data + 4);
    next[run->last] = index;
    run->last = index;
    run->size += (size_t)p->payload;
    run->count++;
    if (p->payload < run->gso_size)
        run->ended = 1;
    if (head->proto == PROTO_TCP) {
        run->next_seq += (uint32_t)p->payload;
        if (p->data[p->ip_len + 13] & TCP_PSH)
            run->psh = run->ended = 1;
    }
}

/* The flows of a batch, by flow hash: open addressing with linear probing, at least
 * twice as many slots as packets and never deleted from, so a packet finds its flow's
 * run in about one probe (a search of the open runs took ~19 ms for 4,096 flows).
 * packet: a packet of the flow, plus one (0: an empty slot); run: the run its next
 * packet may join, -1 if none. */
typedef struct {
    uint32_t packet;
    int32_t run;
} Slot;

static size_t
table_size(size_t n)
{
    size_t size = 2;
    while (size < 2 * n)
        size *= 2;
    return size;
}

/* p's flow's slot, claimed (with no run) if the flow is new. */
static Slot *
flow_slot(Slot *table, size_t mask, const Packet *packets, const Packet *p, ptrdiff_t index)
{
    uint32_t mixed = p->hash ^ p->hash >> 16;  /* FNV's low bits alone mix poorly */
    mixed *= 0x45D9F3Bu;
    mixed ^= mixed >> 16;
    for (size_t at = mixed & mask;; at = (at + 1) & mask) {
        Slot *slot = &table[at];
        if (slot->packet == 0) {
            slot->packet = (uint32_t)index + 1;
            slot->run = -1;
            return slot;
        }
        if (same_flow(&packets[slot->packet - 1], p))
            return slot;
    }
}

/* The workspace: packets[] the plan's view of its input, runs[] its runs, items[] in
 * output order (each a run index or ~packet index for a packet passed through alone),
 * next[] the links from each run member to the next, table[] the flows. Carved out of
 * the caller's memory by seg_merge_init, in this order. */
struct seg_merge {
    size_t capacity;
    uint32_t basis; /* FNV's offset basis xored with the seed */
    Packet *packets;
    Run *runs;
    ptrdiff_t *items, *next;
    Slot *table;
};

/* The flow table and the indices in it are 32-bit. */
#define MAX_CAPACITY (INT32_MAX / 2)

/* size rounded up to a multiple of 16: every part stays aligned as malloc's memory. */
static size_t
aligned(size_t size)
{
    return (size + 15) & ~(size_t)15;
}

/* Where each part of a workspace for `count` packets starts in its memory, and its end. */
typedef struct {
    size_t packets, runs, indices, table, end;
} Layout;

static Layout
layout(size_t count)
{
    Layout at;
    at.packets = aligned(sizeof(seg_merge));
    at.runs = at.packets + aligned(count * sizeof(Packet));
    at.indices = at.runs + aligned(count * sizeof(Run));
    at.table = at.indices + aligned(2 * count * sizeof(ptrdiff_t));
    at.end = at.table + table_size(count) * sizeof(Slot);
    return at;
}

size_t
seg_merge_bytes(size_t capacity)
{
    return capacity > MAX_CAPACITY ? 0 : layout(capacity ? capacity : 1).end;
}

seg_merge *
seg_merge_init(void *memory, size_t capacity, uint32_t seed)
{
    size_t count = capacity ? capacity : 1;
    Layout at = layout(count);
    unsigned char *base = memory;
    seg_merge *m = memory;
    m->capacity = capacity;
    m->basis = FNV_BASIS ^ seed;
    m->packets = (Packet *)(base + at.packets);
    m->runs = (Run *)(base + at.runs);
    m->items = (ptrdiff_t *)(base + at.indices);
    m->next = m->items + count;
    m->table = (Slot *)(base + at.table);
    return m;
}

/* The merge plan (gso._merge_each's rules). Returns the number of items. */
ptrdiff_t
seg_merge_plan(seg_merge *m, const seg_buf *buffers, size_t count, int udp)
{
    if (count > m->capacity)
        return SEG_ERANGE;
    Packet *packets = m->packets;
    Run *runs = m->runs;
    ptrdiff_t *items = m->items, *next = m->next, n = (ptrdiff_t)count;
    size_t slots = table_size(count), mask = slots - 1;
    Slot *table = m->table;
    memset(table, 0, slots * sizeof(Slot));
    ptrdiff_t n_items = 0, n_runs = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        Packet *p = &packets[i];
        p->data = buffers[i].data;
        p->size = buffers[i].size;
        flow(p, udp, m->basis);
        if (!p->candidate) {
            items[n_items++] = ~i;
            continue;
        }
        Slot *slot = flow_slot(table, mask, packets, p, i);
        Run *run = slot->run >= 0 ? &runs[slot->run] : NULL;
        if (p->payload < 0) {
            slot->run = -1;
            items[n_items++] = ~i;
            continue;
        }
        p->ok = checksum_ok(p);
        const Packet *head = run != NULL ? &packets[run->head] : NULL;
        if (run != NULL && run->verified && head->proto == p->proto
            && head->hdr_len == p->hdr_len && accepts(run, head, p)) {
            if (p->ok) {
                append(run, head, p, i, next);
            } else {  /* passed through alone; nothing after it can follow the run */
                slot->run = -1;
                items[n_items++] = ~i;
            }
            continue;
        }
        start_run(&runs[n_runs], p, i);
        slot->run = (int32_t)n_runs;
        items[n_items++] = n_runs++;
    }
    return n_items;
}

seg_item
seg_merge_item(const seg_merge *m, size_t k)
{
    ptrdiff_t item = m->items[k];
    if (item < 0)
        return (seg_item){(size_t)~item, 1, m->packets[~item].size};
    const Run *run = &m->runs[item];
    return (seg_item){(size_t)run->head, run->count, run->size};
}

/* gso._Run.build of a merged run into out (run->size bytes). */
static void
build_run(const Run *run, const Packet *packets, const ptrdiff_t *next, unsigned char *out)
{
    const Packet *head = &packets[run->head];
    size_t ip_len = head->ip_len, hdr_len = head->hdr_len, at = hdr_len;
    memcpy(out, head->data, hdr_len);
    for (ptrdiff_t i = run->head;; i = next[i]) {
        size_t chunk = packets[i].size - hdr_len;
        memcpy(out + at, packets[i].data + hdr_len, chunk);
        at += chunk;
        if (i == run->last)
            break;
    }
    unsigned l4_len = (unsigned)(run->size - ip_len), check_at;
    if (head->v6) {
        put_be16(out + 4, l4_len);
    } else {
        put_be16(out + 2, (unsigned)run->size);
        out[10] = out[11] = 0;
        put_le16(out + 10, 0xFFFF - fold(sum_le(out, ip_len)));
    }
    if (head->proto == PROTO_TCP) {
        if (run->psh)
            out[ip_len + 13] |= TCP_PSH;
        check_at = (unsigned)ip_len + 16;
    } else {
        put_be16(out + ip_len + 4, l4_len);
        check_at = (unsigned)ip_len + 6;
    }
    /* CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not inverted. */
    const unsigned char *addresses = head->v6 ? out + 8 : out + 12;
    uint64_t pseudo = sum_le(addresses, head->v6 ? 32 : 8) + (head->proto << 8) + swap16(l4_len);
    put_le16(out + check_at, fold(pseudo));
}


void
seg_merge_build(const seg_merge *m, size_t k, unsigned char *out)
{
    seg_item item = seg_merge_item(m, k);
    if (item.count == 1)
        memcpy(out, m->packets[item.packet].data, item.size);
    else
        build_run(&m->runs[m->items[k]], m->packets, m->next, out);
}

void
seg_merge_vnet(const seg_merge *m, size_t k, unsigned char out[SEG_VNET_HDR_LEN])
{
    memset(out, 0, SEG_VNET_HDR_LEN);
    ptrdiff_t item = m->items[k];
    if (item < 0 || m->runs[item].count == 1)
        return;
    const Run *run = &m->runs[item];
    const Packet *head = &m->packets[run->head];
    /* CHECKSUM_PARTIAL from the transport header on; the fields in native byte order, as
     * the TUN wants them. */
    uint16_t fields[4] = {(uint16_t)head->hdr_len, (uint16_t)run->gso_size,
                          (uint16_t)head->ip_len, head->proto == PROTO_TCP ? 16 : 6};
    out[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    out[1] = head->proto == PROTO_UDP ? GSO_UDP_L4 : head->v6 ? GSO_TCPV6 : GSO_TCPV4;
    memcpy(out + 2, fields, sizeof fields);
}
