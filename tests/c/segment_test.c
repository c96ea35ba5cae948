/* uspan/csrc/segment.c as the data-plane thread uses it: with no Python in the build,
 * buffers and a workspace of its own, a flow-hash seed of its choosing. What the binding
 * cannot show: the seed (it changes no output, only where flows land in the table), the
 * error codes behind the binding's own checks (and seg_cut's, under the sanitizers), and
 * that the file compiles alone.
 *
 * Built and run by tests/unit/test_segment_library.py; prints "ok" and exits 0, or names
 * the first failed check and exits 1. The .c is included so that the seed's effect on
 * the flow hash (a static) can be seen.
 */
#include "../../uspan/csrc/segment.c"

#include <stdio.h>
#include <stdlib.h>

#define CHECK(condition)                                                                  \
    do {                                                                                  \
        if (!(condition)) {                                                               \
            printf("FAILED line %d: %s\n", __LINE__, #condition);                         \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

enum { SEGMENTS = 45, STEP = 1368, V4_HDR = 52, V6_HDR = 48 };

static unsigned char super4[V4_HDR + SEGMENTS * STEP], super6[V6_HDR + SEGMENTS * STEP];
static unsigned char cut[SEGMENTS][1500], merged[65536], slots[SEGMENTS * 1500];

/* A TCPv4 super-segment (ACK|PSH, 12 option bytes) or a UDPv6 one. */
static void
make(unsigned char *p, size_t len, int v6)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (unsigned char)(i * 7 + 3);
    if (v6) {
        memset(p, 0, 8);
        p[0] = 0x60;
        p[6] = PROTO_UDP;
        p[7] = 64;
    } else {
        memset(p, 0, 20);
        p[0] = 0x45;
        p[6] = IPV4_DF;
        p[8] = 64;
        p[9] = PROTO_TCP;
        memcpy(p + 12, "\x0a\x00\x00\x01\x0a\x00\x00\x02", 8);
        p[20 + 12] = 8 << 4;
        p[20 + 13] = TCP_ACK | TCP_PSH;
    }
}

/* Cut `packet` into `cut` and merge the pieces back with a workspace seeded `seed`:
 * one item carrying every segment, whose bytes are the super-segment's but for the
 * lengths and checksums the build rewrites. */
static void
round_trip(const unsigned char *packet, size_t len, size_t ip_len, size_t hdr_len, int v6,
           int tcp, uint32_t seed)
{
    seg_split s;
    CHECK(seg_split_init(&s, packet, len, ip_len, hdr_len, STEP, v6, tcp) == 0);
    CHECK(s.count == SEGMENTS && seg_split_len(&s, SEGMENTS - 1) == hdr_len + STEP);
    unsigned char *outs[SEGMENTS];
    seg_buf bufs[SEGMENTS];
    for (size_t i = 0; i < SEGMENTS; i++) {
        outs[i] = cut[i];
        bufs[i] = (seg_buf){cut[i], seg_split_len(&s, i)};
    }
    seg_split_build(&s, 0, 10, outs); /* in two calls: the index carries over */
    seg_split_build(&s, 10, SEGMENTS - 10, outs + 10);

    size_t bytes = seg_merge_bytes(SEGMENTS);
    void *memory = malloc(bytes);
    CHECK(memory != NULL);
    seg_merge *m = seg_merge_init(memory, SEGMENTS, seed);
    CHECK(m->basis == (FNV_BASIS ^ seed));
    CHECK(seg_merge_plan(m, bufs, SEGMENTS, !tcp) == 1);
    seg_item item = seg_merge_item(m, 0);
    CHECK(item.packet == 0 && item.count == SEGMENTS && item.size == len);
    unsigned char vnet[SEG_VNET_HDR_LEN];
    seg_merge_vnet(m, 0, vnet);
    uint16_t fields[4];
    memcpy(fields, vnet + 2, sizeof fields);
    CHECK(vnet[0] == VIRTIO_NET_HDR_F_NEEDS_CSUM);
    CHECK(vnet[1] == (tcp ? (v6 ? GSO_TCPV6 : GSO_TCPV4) : GSO_UDP_L4));
    CHECK(fields[0] == hdr_len && fields[1] == STEP && fields[2] == ip_len);
    CHECK(fields[3] == (tcp ? 16 : 6));
    seg_merge_build(m, 0, merged);
    size_t check_at = ip_len + (tcp ? 16 : 6);
    CHECK(!memcmp(merged + hdr_len, packet + hdr_len, len - hdr_len));
    CHECK(!memcmp(merged + check_at + 2, packet + check_at + 2, hdr_len - check_at - 2));
    CHECK(v6 ? be16(merged + 4) == len - 40 : be16(merged + 2) == len && ipv4_header_ok(merged));
    /* The seed moves the flow's hash, and with it the table slot. */
    uint32_t hash = m->packets[0].hash;
    seg_merge *other = seg_merge_init(memory, SEGMENTS, seed ^ 0x9E3779B9u);
    CHECK(seg_merge_plan(other, bufs, SEGMENTS, !tcp) == 1);
    CHECK(other->packets[0].hash != hash);
    free(memory);
}

int
main(void)
{
    make(super4, sizeof super4, 0);
    make(super6, sizeof super6, 1);
    round_trip(super4, sizeof super4, 20, V4_HDR, 0, 1, 0);
    round_trip(super6, sizeof super6, 40, V6_HDR, 1, 0, 0xDEADBEEFu);

    /* Inconsistent lengths are refused, whatever the caller passes. */
    seg_split s;
    CHECK(seg_split_init(&s, super4, sizeof super4, 20, V4_HDR, 0, 0, 1) == SEG_EINVAL);
    CHECK(seg_split_init(&s, super4, sizeof super4, 20, 40, STEP, 0, 1) == SEG_EINVAL);
    CHECK(seg_split_init(&s, super4, sizeof super4, 20, 29, STEP, 0, 0) == SEG_EINVAL);
    CHECK(seg_split_init(&s, super4, 70000, 20, V4_HDR, STEP, 0, 1) == SEG_EINVAL);
    CHECK(seg_split_init(&s, super4, 30, 20, V4_HDR, STEP, 0, 1) == SEG_EINVAL);
    CHECK(seg_split_init(&s, super4, sizeof super4, SIZE_MAX - 4, V4_HDR, 1, 0, 1)
          == SEG_EINVAL);
    CHECK(seg_split_init(&s, super4, V4_HDR, 20, V4_HDR, STEP, 0, 1) == 0 && s.count == 1);

    /* The send side: a TSO read cut into sealing slots, 16 bytes of headroom each. */
    seg_buf out[SEGMENTS];
    unsigned char vnet[SEG_VNET_HDR_LEN] = {VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_TCPV4};
    uint16_t fields[4] = {V4_HDR, STEP, 20, 16};
    memcpy(vnet + 2, fields, sizeof fields);
    CHECK(seg_cut(vnet, super4, sizeof super4, 1500, slots, 1500, 16, out, SEGMENTS)
          == SEGMENTS);
    CHECK(out[1].data == slots + 1516 && out[1].size == V4_HDR + STEP);
    unsigned char *last[1] = {merged};
    CHECK(seg_split_init(&s, super4, sizeof super4, 20, V4_HDR, STEP, 0, 1) == 0);
    seg_split_build(&s, SEGMENTS - 1, 1, last); /* the same segment as seg_split cuts */
    CHECK(!memcmp(out[SEGMENTS - 1].data, merged, V4_HDR + STEP));
    CHECK(seg_cut(vnet, super4, sizeof super4, 1500, slots, 1500, 16, out, SEGMENTS - 1)
          == SEG_ERANGE);
    CHECK(seg_cut(vnet, super4, sizeof super4, 1500, slots, V4_HDR + STEP + 15, 16, out,
                  SEGMENTS) == SEG_ERANGE);
    CHECK(seg_cut(vnet, super4, 30, 1500, slots, 1500, 16, out, SEGMENTS) == SEG_EINVAL);
    vnet[1] = 0; /* GSO_NONE: a partial checksum whose field lies past the end */
    fields[2] = sizeof super4 - 10;
    fields[3] = 9;
    memcpy(vnet + 2, fields, sizeof fields);
    CHECK(seg_cut(vnet, super4, sizeof super4, 1500, slots, sizeof slots, 0, out, 1)
          == SEG_EINVAL);
    fields[3] = 8;
    memcpy(vnet + 2, fields, sizeof fields);
    CHECK(seg_cut(vnet, super4, sizeof super4, 1500, slots, sizeof slots, 0, out, 1) == 1);

    /* A workspace never plans more packets than it holds; too large a one is refused. */
    CHECK(seg_merge_bytes((size_t)INT32_MAX) == 0 && seg_merge_bytes(0) > 0);
    void *memory = malloc(seg_merge_bytes(2));
    CHECK(memory != NULL);
    seg_merge *m = seg_merge_init(memory, 2, 1);
    seg_buf three[3] = {{super4, 20}, {super4, 20}, {super4, 20}};
    CHECK(seg_merge_plan(m, three, 3, 0) == SEG_ERANGE);
    CHECK(seg_merge_plan(m, three, 2, 0) == 2 && seg_merge_item(m, 1).count == 1);
    free(memory);
    printf("ok\n");
    return 0;
}
