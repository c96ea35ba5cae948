/* Segmentation offload in C: the per-segment work of TSO/USO splitting
 * (uspan.daemon.gso._split) and the GRO merge of packets into super-segments
 * (uspan.daemon.gso.coalesce).
 *
 * Why split: the numpy columns of gso._split cost ~1.95 us and ~18.6k instructions per
 * 1,408-byte packet, most of it per-call overhead. Here each segment is one copy of the
 * header and payload chunk, a few stores and one checksum pass.
 *
 * split(packet, ip_len, hdr_len, step, v6, tcp) does what gso._split does after its
 * checks (which stay in Python, with their OffloadError messages): per segment copy
 * packet[:hdr_len] and the payload chunk, set the IPv4 total length, ID (+index) and
 * header checksum or the IPv6 payload length, the TCP sequence number (+index*step) and
 * flags (FIN/PSH only on the last, CWR only on the first) or the UDP length, and the
 * full TCP/UDP checksum over the pseudo-header (a UDP checksum of 0 is sent as 0xFFFF).
 * The output bytes are allocated with the GIL held, then filled with it released.
 *
 * Checksums are sums of little-endian 64-bit words: 2**16 and 2**64 are both 1
 * modulo 0xFFFF, so the sum is congruent to the little-endian 16-bit word sum
 * (gso's convention), and the folded value written little-endian is the big-endian
 * field, exactly as gso._put_le16 writes it.
 *
 * Why coalesce: gso.coalesce cost ~1.5 us per received packet in Python and numpy.
 * coalesce(packets, udp) takes the same decisions as gso._coalesce_python, packet by
 * packet, and builds the same bytes: the flows, checksum checks and merge plan with
 * the GIL released, the output objects allocated with it held, then filled without it.
 *
 * Why batches and split_gro: gso_batches' Python loop cost ~2.1k instructions per
 * datagram sent, split_gro's slices ~3k per datagram received (with the pairing);
 * batches(datagrams, max_bytes, max_segments) takes its decisions and joins its buffers,
 * split_gro(data, gso_size) copies each datagram out once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define MAX_IP_PACKET 65535

/* FNV-1a's offset basis, xored with a random value at import: a peer cannot choose inner
 * ports whose flows all land in one cluster of the merge's hash table. */
static uint32_t hash_seed = 2166136261u;

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

typedef struct {
    const unsigned char *packet;
    size_t ip_len, hdr_len, step, size;
    int v6, tcp;
} Split;

/* Build segment `index` (payload `chunk` bytes) into out. */
static void
build(const Split *s, unsigned char *out, size_t index, size_t chunk, int last)
{
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

PyDoc_STRVAR(split_doc,
"split(packet, ip_len, hdr_len, step, v6, tcp, /) -> list[bytes]\n\n"
"The segments of a checked TSO/USO super-segment (what uspan.daemon.gso._split\n"
"builds after its checks): payload chunks of step bytes, each with its own headers\n"
"and checksums.");

static PyObject *
split(PyObject *module, PyObject *args)
{
    Py_buffer packet;
    Py_ssize_t ip_len, hdr_len, step;
    int v6, tcp;
    if (!PyArg_ParseTuple(args, "y*nnnpp:split", &packet, &ip_len, &hdr_len, &step,
                           &v6, &tcp))
        return NULL;
    Py_ssize_t len = packet.len;
    /* Python checks all this with its own messages; here it only guards memory. */
    /* ip_len and hdr_len are bounded by len (<= 65535) before any arithmetic on them. */
    if (len > MAX_IP_PACKET || step <= 0 || ip_len < (v6 ? 40 : 20) || ip_len > len
        || hdr_len < 0 || hdr_len > len || hdr_len - ip_len < (tcp ? 20 : 8)
        || (!tcp && hdr_len - ip_len != 8)
        || (tcp && (Py_ssize_t)(((const unsigned char *)packet.buf)[ip_len + 12] >> 4) * 4
                       != hdr_len - ip_len)) {
        PyBuffer_Release(&packet);
        PyErr_SetString(PyExc_ValueError, "split: inconsistent header lengths");
        return NULL;
    }
    Split s = {packet.buf, (size_t)ip_len, (size_t)hdr_len, (size_t)step,
               (size_t)(len - hdr_len), v6, tcp};
    size_t full = s.size / s.step, count = full + (s.size % s.step || !s.size);
    PyObject *out = PyList_New((Py_ssize_t)count);
    if (out == NULL) {
        PyBuffer_Release(&packet);
        return NULL;
    }
    for (size_t i = 0; i < count; i++) {
        size_t chunk = i < full ? s.step : s.size - full * s.step;
        PyObject *item = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(s.hdr_len + chunk));
        if (item == NULL) {
            Py_DECREF(out);
            PyBuffer_Release(&packet);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    /* Nothing else holds the new bytes; the exported packet cannot be resized. */
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(out, (Py_ssize_t)i);
        build(&s, (unsigned char *)PyBytes_AS_STRING(item), i,
              (size_t)PyBytes_GET_SIZE(item) - s.hdr_len, i + 1 == count);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&packet);
    return out;
}

/* --- coalesce ------------------------------------------------------------------------ */

#define TCP_ACK 0x10
#define IPV4_DF 0x40
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define VNET_HDR_LEN 10
#define UDP_MAX_SEGMENTS 64  /* gso.UDP_MAX_SEGMENTS: the kernel refuses more per USO write */

static PyObject *vnet_none;  /* 10 zero bytes: GSO_NONE, the kernel checks the packet */

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
flow(Packet *p, int udp)
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
    uint32_t hash = hash_seed ^ p->proto ^ p->ports_len << 8;
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
    Py_ssize_t head, last;
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
    if (run->ended || p->payload > run->gso_size || run->size + (size_t)p->payload > MAX_IP_PACKET)
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
    return run->count < UDP_MAX_SEGMENTS;
}

static void
start_run(Run *run, const Packet *p, Py_ssize_t index)
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
append(Run *run, const Packet *head, const Packet *p, Py_ssize_t index, Py_ssize_t *next)
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
table_size(Py_ssize_t n)
{
    size_t size = 2;
    while (size < 2 * (size_t)n)
        size *= 2;
    return size;
}

/* p's flow's slot, claimed (with no run) if the flow is new. */
static Slot *
flow_slot(Slot *table, size_t mask, const Packet *packets, const Packet *p, Py_ssize_t index)
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

/* The merge plan (gso._merge_each's rules): items[] in output order, each a run index
 * or ~packet index for a packet passed through alone. Returns the number of items. */
static Py_ssize_t
plan(Packet *packets, Py_ssize_t n, int udp, Run *runs, Py_ssize_t *items, Py_ssize_t *next,
     Slot *table, size_t mask)
{
    Py_ssize_t n_items = 0, n_runs = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Packet *p = &packets[i];
        flow(p, udp);
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

/* gso._Run.build of a merged run into out (run->size bytes). */
static void
build_run(const Run *run, const Packet *packets, const Py_ssize_t *next, unsigned char *out)
{
    const Packet *head = &packets[run->head];
    size_t ip_len = head->ip_len, hdr_len = head->hdr_len, at = hdr_len;
    memcpy(out, head->data, hdr_len);
    for (Py_ssize_t i = run->head;; i = next[i]) {
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

/* The virtio_net_hdr of a merged run: CHECKSUM_PARTIAL from the transport header on. */
static PyObject *
vnet_header(const Run *run, const Packet *head)
{
    unsigned csum_offset = head->proto == PROTO_TCP ? 16 : 6;
    uint8_t gso_type = head->proto == PROTO_UDP ? GSO_UDP_L4 : head->v6 ? GSO_TCPV6 : GSO_TCPV4;
    uint16_t fields[4] = {(uint16_t)head->hdr_len, (uint16_t)run->gso_size,
                          (uint16_t)head->ip_len, (uint16_t)csum_offset};
    unsigned char buffer[VNET_HDR_LEN] = {VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type};
    memcpy(buffer + 2, fields, sizeof fields);  /* native byte order, as the TUN wants */
    return PyBytes_FromStringAndSize((const char *)buffer, VNET_HDR_LEN);
}

/* A new list of the items of ``sequence`` as bytes (other buffers copied): a list of
 * our own first, since converting an item may run Python code. */
static PyObject *
bytes_list(PyObject *sequence)
{
    PyObject *list = PySequence_List(sequence);
    for (Py_ssize_t i = 0; list != NULL && i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyBytes_CheckExact(item)) {
            PyObject *copy = PyBytes_FromObject(item);
            if (copy == NULL)
                Py_CLEAR(list);
            else {
                PyList_SET_ITEM(list, i, copy);
                Py_DECREF(item);
            }
        }
    }
    return list;
}

PyDoc_STRVAR(coalesce_doc,
"coalesce(packets, udp, /) -> list[tuple[bytes, bytes]]\n\n"
"The (virtio_net_hdr, packet) pairs uspan.daemon.gso.coalesce writes for packets:\n"
"consecutive segments of each flow merged into GSO super-segments by GRO's rules.");

static PyObject *
coalesce(PyObject *module, PyObject *args)
{
    PyObject *sequence, *out = NULL;
    int udp;
    if (!PyArg_ParseTuple(args, "Op:coalesce", &sequence, &udp))
        return NULL;
    /* The list keeps the bytes alive (and bytes do not change) until we return. */
    PyObject *list = bytes_list(sequence);
    if (list == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n > INT32_MAX / 2) {  /* the flow table's indices */
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    size_t count = n ? (size_t)n : 1;
    Packet *packets = PyMem_Calloc(count, sizeof(Packet));
    Run *runs = PyMem_Calloc(count, sizeof(Run));
    Py_ssize_t *indices = PyMem_Calloc(2 * count, sizeof(Py_ssize_t));
    size_t slots = table_size(n);
    Slot *table = PyMem_Calloc(slots, sizeof(Slot));
    if (packets == NULL || runs == NULL || indices == NULL || table == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t *items = indices, *next = indices + count;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        packets[i].data = (const unsigned char *)PyBytes_AS_STRING(item);
        packets[i].size = (size_t)PyBytes_GET_SIZE(item);
    }
    Py_ssize_t n_items;
    Py_BEGIN_ALLOW_THREADS
    n_items = plan(packets, n, udp, runs, items, next, table, slots - 1);
    Py_END_ALLOW_THREADS
    out = PyList_New(n_items);
    if (out == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < n_items; k++) {
        Py_ssize_t item = items[k];
        PyObject *pair = NULL;
        if (item < 0 || runs[item].count == 1) {
            PyObject *packet = PyList_GET_ITEM(list, item < 0 ? ~item : runs[item].head);
            pair = PyTuple_Pack(2, vnet_none, packet);
        } else {  /* the merged bytes are filled in below */
            PyObject *vnet = vnet_header(&runs[item], &packets[runs[item].head]);
            PyObject *merged = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)runs[item].size);
            if (vnet != NULL && merged != NULL)
                pair = PyTuple_Pack(2, vnet, merged);
            Py_XDECREF(vnet);
            Py_XDECREF(merged);
        }
        if (pair == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, k, pair);
    }
    /* Only this function holds the new bytes yet. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n_items; k++) {
        Py_ssize_t item = items[k];
        if (item >= 0 && runs[item].count > 1) {
            PyObject *merged = PyTuple_GET_ITEM(PyList_GET_ITEM(out, k), 1);
            build_run(&runs[item], packets, next, (unsigned char *)PyBytes_AS_STRING(merged));
        }
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(packets);
    PyMem_Free(runs);
    PyMem_Free(indices);
    PyMem_Free(table);
    Py_DECREF(list);
    return out;
}

PyDoc_STRVAR(batches_doc,
"batches(datagrams, max_bytes, max_segments) -> [(buffer, segment size)]\n\n"
"gso.gso_batches in one pass: runs of datagrams as long as the first (the last may be\n"
"shorter) joined into one UDP_SEGMENT buffer, a lone datagram as itself with size 0.");

static PyObject *
batches(PyObject *module, PyObject *args)
{
    PyObject *datagrams;
    Py_ssize_t max_bytes, max_segments;
    if (!PyArg_ParseTuple(args, "Onn", &datagrams, &max_bytes, &max_segments))
        return NULL;
    PyObject *items = bytes_list(datagrams);
    if (items == NULL)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0, end; out != NULL && i < count; i = end) {
        Py_ssize_t size = PyBytes_GET_SIZE(PyList_GET_ITEM(items, i)), total = size;
        for (end = i + 1; end < count; end++) {
            Py_ssize_t length = PyBytes_GET_SIZE(PyList_GET_ITEM(items, end));
            if (length > size || end - i >= max_segments || total + length > max_bytes
                || PyBytes_GET_SIZE(PyList_GET_ITEM(items, end - 1)) != size)
                break;
            total += length;
        }
        PyObject *buffer;
        if (end - i == 1) {
            buffer = Py_NewRef(PyList_GET_ITEM(items, i));
            size = 0;
        }
        else if ((buffer = PyBytes_FromStringAndSize(NULL, total)) != NULL) {
            char *at = PyBytes_AS_STRING(buffer);
            for (Py_ssize_t k = i; k < end; k++) {
                PyObject *item = PyList_GET_ITEM(items, k);
                memcpy(at, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
                at += PyBytes_GET_SIZE(item);
            }
        }
        PyObject *pair = buffer == NULL ? NULL : Py_BuildValue("(Nn)", buffer, size);
        if (pair == NULL || PyList_Append(out, pair) < 0)
            Py_CLEAR(out);
        Py_XDECREF(pair);
    }
    Py_DECREF(items);
    return out;
}

PyDoc_STRVAR(split_gro_doc,
"split_gro(data, gso_size) -> [bytes]\n\n"
"gso.split_gro in one pass: a coalesced receive cut into its datagrams (gso_size 0 or\n"
"at least the length: the whole as one).");

static PyObject *
split_gro(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*n", &view, &size))
        return NULL;
    Py_ssize_t length = view.len;
    if (size <= 0 || length <= size)
        size = length > 0 ? length : 1;
    PyObject *out = PyList_New((length + size - 1) / size + (length == 0));
    for (Py_ssize_t i = 0, at = 0; out != NULL && i < PyList_GET_SIZE(out); i++, at += size) {
        Py_ssize_t piece = length - at < size ? length - at : size;
        PyObject *datagram = PyBytes_FromStringAndSize((const char *)view.buf + at, piece);
        if (datagram == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, datagram);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"split_gro", (PyCFunction)split_gro, METH_VARARGS, split_gro_doc},
    {"batches", (PyCFunction)batches, METH_VARARGS, batches_doc},
    {"split", (PyCFunction)split, METH_VARARGS, split_doc},
    {"coalesce", (PyCFunction)coalesce, METH_VARARGS, coalesce_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef segment_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "uspan.daemon._segment",
    .m_doc = "TSO/USO super-segments split and GRO-merged (uspan.daemon.gso), in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    vnet_none = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN);
    if (vnet_none == NULL)
        return NULL;
    memset(PyBytes_AS_STRING(vnet_none), 0, VNET_HDR_LEN);
    uint32_t seed;
    if (getrandom(&seed, sizeof seed, 0) == (ssize_t)sizeof seed)
        hash_seed ^= seed;
    PyObject *module = PyModule_Create(&segment_module);
    if (module != NULL && PyModule_AddIntMacro(module, UDP_MAX_SEGMENTS) < 0)
        Py_CLEAR(module);
    return module;
}
