/* Segmentation offload over plain buffers: TSO/USO super-segments cut into packets, and
 * packets merged back into GRO super-segments by the kernel's rules.
 *
 * Why a library: the Python binding (uspan/daemon/_segment.c, behind uspan.daemon.gso)
 * and the C data-plane thread both cut and merge, and the thread never takes the GIL.
 * So nothing here touches a Python object, allocates, blocks or keeps global state:
 * buffers go in, lengths and plans come out, errors are negative return codes, and a
 * merge workspace lives in memory its caller owns (one per thread).
 *
 * Checksums follow uspan.daemon.gso: the TCP/UDP checksum of every cut segment is
 * complete (a UDP checksum of 0 is sent as 0xFFFF); a merged super-segment is
 * CHECKSUM_PARTIAL (its field holds the folded pseudo-header sum, and its virtio_net_hdr
 * asks the kernel to finish it), and every packet is verified before it is merged.
 *
 * segment.c is compiled into each extension that lists it among its sources, its
 * functions with hidden visibility: two extensions in one process never bind to each
 * other's copy.
 */
#ifndef USPAN_SEGMENT_H
#define USPAN_SEGMENT_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define SEG_API __attribute__((visibility("hidden")))
#else
#define SEG_API
#endif

#define SEG_MAX_IP_PACKET 65535
#define SEG_VNET_HDR_LEN 10     /* struct virtio_net_hdr, native byte order */
#define SEG_UDP_MAX_SEGMENTS 64 /* the kernel refuses more per UDP_SEGMENT send or USO write */

/* Return codes (negative: nothing was written). */
#define SEG_EINVAL (-1) /* inconsistent lengths or header fields */
#define SEG_ERANGE (-2) /* more packets or segments than there is room for */

/* A buffer: a packet to merge (only read), or a segment cut into the caller's memory. */
typedef struct {
    unsigned char *data;
    size_t size;
} seg_buf;

/* --- cutting a TSO/USO super-segment -------------------------------------------------
 *
 * A super-segment is an IP packet (ip_len bytes of IPv4/IPv6 header), a TCP or UDP header
 * (to hdr_len) and a payload cut into chunks of step bytes (the last may be shorter; an
 * empty payload is one segment). Segment i carries packet[:hdr_len] with its own IPv4
 * total length, ID (+i) and header checksum or IPv6 payload length, TCP sequence number
 * (+i*step) and flags (FIN/PSH only on the last, CWR only on the first) or UDP length,
 * and the full TCP/UDP checksum. */
typedef struct {
    const unsigned char *packet;
    size_t ip_len, hdr_len, step;
    size_t count;      /* segments: at least 1 */
    size_t last_chunk; /* the last segment's payload bytes */
    int v6, tcp;
} seg_split;

/* Fill *s for the len-byte packet; SEG_EINVAL unless the lengths are consistent with the
 * packet (len <= 65535, step > 0, ip_len at least the fixed IP header, the TCP data
 * offset or the 8-byte UDP header ending at hdr_len <= len). These checks guard memory
 * only: what a well-formed super-segment is, the caller decides (gso.segment does). */
SEG_API int seg_split_init(seg_split *s, const unsigned char *packet, size_t len,
                           size_t ip_len, size_t hdr_len, size_t step, int v6, int tcp);

/* The length of segment `index` (< s->count): hdr_len plus its payload chunk. */
static inline size_t
seg_split_len(const seg_split *s, size_t index)
{
    return s->hdr_len + (index + 1 < s->count ? s->step : s->last_chunk);
}

/* Write segments first .. first+n-1 (< s->count) into out[0] .. out[n-1], each
 * seg_split_len bytes, none overlapping the packet. Many per call: the loop stays in
 * here, where the per-segment work is inlined. */
SEG_API void seg_split_build(const seg_split *s, size_t first, size_t n,
                             unsigned char *const out[]);

/* --- a TUN read cut for sending ------------------------------------------------------
 *
 * What the send side does with each read from a TUN with IFF_VNET_HDR and TSO/USO: the
 * virtio_net_hdr and packet in, the packets to seal out, each at out + i * stride +
 * headroom (headroom: room for the WireGuard header in front; stride: the room for one
 * sealed message), described in segments[i]. The rules are uspan.daemon.gso.segment's:
 * GSO_NONE is one packet (a partial checksum completed if NEEDS_CSUM); TCPV4/TCPV6
 * (with or without ECN) and UDP_L4 are cut at gso_size, TCP finer if mtu - hdr_len is
 * less (a UDP datagram is never re-cut); the transport header length is the packet's.
 * Returns the number of segments; SEG_EINVAL for whatever gso.segment refuses (or a
 * packet over 65535 bytes), SEG_ERANGE if the segments are more than max_segments or
 * one does not fit in stride - headroom. */
SEG_API ptrdiff_t seg_cut(const unsigned char vnet[SEG_VNET_HDR_LEN],
                          const unsigned char *packet, size_t len, size_t mtu,
                          unsigned char *out, size_t stride, size_t headroom,
                          seg_buf *segments, size_t max_segments);

/* --- merging received packets (GRO) ---------------------------------------------------
 *
 * A plan takes the packets of one batch in order and groups consecutive segments of
 * each flow (TCPv4, TCPv6, and with `udp` UDPv4/UDPv6 for USO) into runs by the rules
 * of uspan.daemon.gso._Run: same headers but for lengths, IPv4 ID and TCP sequence,
 * contiguous, equal payloads (the last may be shorter), at most 64 KiB (and 64 UDP
 * segments), checksums verified; `udp` only where the TUN accepted USO. Its items are
 * the writes to the TUN, in order: a packet passed through unchanged behind a zero
 * virtio_net_hdr, or a merged run. */
typedef struct seg_merge seg_merge; /* opaque: flows, runs and the flow table */

/* The bytes a workspace for `capacity` packets needs; 0 if that is too many. */
SEG_API size_t seg_merge_bytes(size_t capacity);

/* A workspace in `memory` (seg_merge_bytes(capacity) bytes, aligned as malloc's). The
 * seed is xored into the flow hash: a random one per process (or per workspace) keeps a
 * peer from choosing inner ports whose flows all land in one cluster of the table. */
SEG_API seg_merge *seg_merge_init(void *memory, size_t capacity, uint32_t seed);

/* Plan the merge of packets[0..n): the number of items, or SEG_ERANGE if n is more than
 * the capacity. The packets' bytes must stay as they are until the items are built. */
SEG_API ptrdiff_t seg_merge_plan(seg_merge *m, const seg_buf *packets, size_t n, int udp);

/* Item k of the last plan. */
typedef struct {
    size_t packet; /* the index of its (first) packet in the plan's packets */
    size_t count;  /* packets it carries: 1 for one passed through unchanged */
    size_t size;   /* bytes it writes after the virtio_net_hdr */
} seg_item;

SEG_API seg_item seg_merge_item(const seg_merge *m, size_t k);

/* Item k's virtio_net_hdr: zeros for a single packet (GSO_NONE: the kernel checks it);
 * for a merged run NEEDS_CSUM from the transport header, gso_type TCPV4, TCPV6 or
 * UDP_L4, hdr_len and gso_size (the run's segment payload). */
SEG_API void seg_merge_vnet(const seg_merge *m, size_t k, unsigned char out[SEG_VNET_HDR_LEN]);

/* Write item k's packet (seg_merge_item(m, k).size bytes) into out: a merged run's
 * super-segment, or a single packet's copy. */
SEG_API void seg_merge_build(const seg_merge *m, size_t k, unsigned char *out);

#endif
