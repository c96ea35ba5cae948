/* The per-segment work of TSO/USO splitting (uspan.daemon.gso._split), in C.
 *
 * Why: the numpy columns of gso._split cost ~1.95 us and ~18.6k instructions per
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define MAX_IP_PACKET 65535

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

static PyMethodDef module_methods[] = {
    {"split", (PyCFunction)split, METH_VARARGS, split_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef segment_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "uspan.daemon._segment",
    .m_doc = "TSO/USO super-segment splitting (uspan.daemon.gso), per segment in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    return PyModule_Create(&segment_module);
}
