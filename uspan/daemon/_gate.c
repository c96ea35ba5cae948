/* The compiled read path of a UDP socket under a handshake flood (uspan.daemon.gate).
 *
 * Why: under a spoofed flood of initiations with a valid mac1 (~280,000 a second from one
 * sender here), Python drains and answers ~20,000 a second (a cookie reply costs ~27 us
 * in the core), so a newcomer's first initiation is answered with a chance of a few per
 * cent. Here recvmmsg drains the socket in rounds of up to 64 datagrams into buffers
 * the caller owns, and each handshake message gets its verdict at C speed (a lone one,
 * or each piece of a receive the kernel coalesced that holds one, see holds_handshake):
 * ``hs_classify`` (uspan/csrc/handshake.c, which the data-plane thread shares: mac1,
 * and under load mac2 against the cookie secret). Bad mac1: dropped and counted. Under
 * load, initiations without a valid mac2 (unproven) are handed to Python while
 * ``hand_up`` allows (the core judges them as before), then answered here with a cookie
 * reply while ``cookies`` allows, sent with one sendmmsg;
 * the rest are dropped and counted. How many of each is the core's decision
 * (uspan.wg.admission), not this file's. Everything else (transport data, coalesced runs
 * of it, responses, cookie replies, proven initiations) goes to Python unchanged.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "../csrc/handshake.h" /* the verdict and the cookie reply */

#define BATCH 64
#define BUFFER_SIZE 65535
#define CONTROL_SIZE 128
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

static EVP_CIPHER *chacha20_poly1305;

/* Python's form of a socket address: (host, port) or (host, port, flowinfo, scope_id).
 * The last one made is kept: a read is mostly the same peer's datagrams as the last, and
 * making one (inet_ntop, a str, a tuple) is ~10k instructions, more than the rest of a
 * lone datagram's way through here. The GIL guards it. */
static struct sockaddr_storage last_address;
static socklen_t last_length;
static PyObject *last_tuple;

static PyObject *
address_tuple(const struct sockaddr_storage *address)
{
    char host[INET6_ADDRSTRLEN];
    socklen_t length = address->ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                                     : sizeof(struct sockaddr_in6);
    if (last_tuple != NULL && length == last_length && !memcmp(address, &last_address, length))
        return Py_NewRef(last_tuple);
    PyObject *tuple;
    if (address->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)address;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
        tuple = Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    } else {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)address;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
        tuple = Py_BuildValue("(siII)", host, ntohs(v6->sin6_port), ntohl(v6->sin6_flowinfo),
                              v6->sin6_scope_id);
    }
    if (tuple != NULL) {
        Py_XSETREF(last_tuple, Py_NewRef(tuple));
        memcpy(&last_address, address, length);
        last_length = length;
    }
    return tuple;
}

typedef struct {
    int gso_size;
    const struct cmsghdr *pktinfo;
} Control;

static Control
parse_control(struct msghdr *header)
{
    Control out = {0, NULL};
    for (struct cmsghdr *c = CMSG_FIRSTHDR(header); c != NULL; c = CMSG_NXTHDR(header, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            size_t size = c->cmsg_len - CMSG_LEN(0);
            if (size >= sizeof(int))
                memcpy(&out.gso_size, CMSG_DATA(c), sizeof(int));
            else if (size >= sizeof(uint16_t)) {
                uint16_t small;
                memcpy(&small, CMSG_DATA(c), sizeof(small));
                out.gso_size = small;
            }
        } else if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO
                    && c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo)))
                   || (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO
                       && c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo)))) {
            out.pktinfo = c;
        }
    }
    return out;
}

/* The control message that sends a reply from the address the message came to. */
static size_t
reply_control(const Control *control, unsigned char *out)
{
    const struct cmsghdr *in = control->pktinfo;
    if (in == NULL)
        return 0;
    struct cmsghdr *c = (struct cmsghdr *)out;
    if (in->cmsg_level == IPPROTO_IP) {
        struct in_pktinfo received, info;
        memcpy(&received, CMSG_DATA(in), sizeof(received));
        memset(&info, 0, sizeof(info));
        info.ipi_ifindex = received.ipi_ifindex;
        info.ipi_spec_dst = received.ipi_spec_dst;
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(info));
        memcpy(CMSG_DATA(c), &info, sizeof(info));
        return CMSG_SPACE(sizeof(info));
    }
    c->cmsg_level = IPPROTO_IPV6;
    c->cmsg_type = IPV6_PKTINFO;
    c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
    memcpy(CMSG_DATA(c), CMSG_DATA(in), sizeof(struct in6_pktinfo));
    return CMSG_SPACE(sizeof(struct in6_pktinfo));
}

typedef struct {
    struct mmsghdr headers[BATCH];
    struct iovec iovecs[BATCH];
    struct sockaddr_storage addresses[BATCH];
    unsigned char controls[BATCH][CONTROL_SIZE];
    unsigned char data[BATCH][HS_REPLY_SIZE];
    unsigned char nonces[BATCH][HS_NONCE_SIZE]; /* drawn for a whole batch: RAND_bytes costs
                                                ~7k instructions a call */
    int count;
} Replies;

/* Send the replies gathered; returns how many the kernel refused. */
static long
flush_replies(int fd, Replies *replies)
{
    long failed = 0;
    int done = 0;
    while (done < replies->count) {
        int sent = sendmmsg(fd, replies->headers + done, replies->count - done, MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            failed += replies->count - done;  /* a full buffer: the flood's answers wait not */
            break;
        }
        if (sent == 0)
            sent = 1, failed++;
        done += sent;
    }
    replies->count = 0;
    return failed;
}

static int
hand_up(PyObject *out, const unsigned char *data, size_t len,
        const struct sockaddr_storage *address, const Control *control)
{
    PyObject *pktinfo = control->pktinfo == NULL
        ? PyBytes_FromStringAndSize(NULL, 0)
        : PyBytes_FromStringAndSize((const char *)CMSG_DATA(control->pktinfo),
                                    control->pktinfo->cmsg_len - CMSG_LEN(0));
    PyObject *item = pktinfo == NULL ? NULL
        : Py_BuildValue("(y#NNi)", (const char *)data, (Py_ssize_t)len, address_tuple(address),
                        pktinfo, control->gso_size);
    if (item == NULL)
        return -1;
    int failed = PyList_Append(out, item);
    Py_DECREF(item);
    return failed;
}

PyDoc_STRVAR(read_doc,
"read(fd, buffer, rounds, limit, mac1_key, cookie_key, secret, under_load, hand_up,\n"
"     cookies, lane, /)\n"
"--\n\n"
"Drain the non-blocking UDP socket ``fd`` in up to ``rounds`` recvmmsg calls of up to 64\n"
"datagrams into ``buffer`` (writable, 64 x 65535 bytes), each asking for no more than\n"
"could still go up: at most ``limit`` receives go up, as the Python read's ``limit``\n"
"(the loop's pass stays bounded when nothing is judged here); a coalesced receive\n"
"that holds a handshake message is judged piece by piece, and each piece that passes\n"
"is an entry of its own (gso_size 0), so a receive may give up to 64 entries. Returns\n"
"(received, counts):\n"
"received is a list of (data, address, pktinfo, gso_size) for Python, counts a tuple\n"
"(truncated, bad_mac1, handed_up, cookies_sent, dropped, send_failed), where handed_up\n"
"counts the unproven initiations among received (at most ``hand_up``; those from the\n"
"``lane``, records of a length byte and a source key padded to 18 bytes, always go up\n"
"and are not counted), cookies_sent those answered here (at most ``cookies``) and\n"
"dropped the unproven rest. ``secret`` is the cookie secret (32 bytes) or None when\n"
"there is none fresh.");

/* One read's judge: its budgets and keys, what it did, and the replies it gathered. */
typedef struct {
    int fd, under_load, nonces_ready;
    long hand_budget, cookie_budget;
    long bad_mac1, handed, cookies_sent, dropped, failed;
    const unsigned char *secret, *cookie_key, *lane;
    size_t lane_len;
    hs_macs macs;
    Replies *replies;  /* made at the read's first cookie: 27 KiB that reads answering
                          nothing never touch */
    EVP_CIPHER_CTX *ctx;
    PyObject *out;
} Judge;

/* Judge one datagram (``control``'s gso_size 0): drop it, answer it with a cookie, or
 * hand it up. -1 with a Python exception set on failure. */
static int
judge(Judge *j, const unsigned char *message, size_t len,
      const struct sockaddr_storage *address, socklen_t address_len, const Control *control)
{
    unsigned char source[HS_SOURCE_SIZE];
    size_t source_len = hs_source_key((const struct sockaddr *)address, source);
    int verdict = hs_classify(message, len, source, source_len, &j->macs, j->under_load);
    if (verdict == HS_BAD_MAC1) {
        j->bad_mac1++;
        return 0;
    }
    if (verdict == HS_UNPROVEN && hs_in_lane(source, source_len, j->lane, j->lane_len))
        verdict = HS_PASS;
    if (verdict == HS_UNPROVEN && j->handed >= j->hand_budget) {
        if (j->cookies_sent >= j->cookie_budget || j->secret == NULL) {
            j->dropped++;
            return 0;
        }
        if (j->replies == NULL) {
            j->replies = PyMem_Malloc(sizeof(Replies));
            if (j->replies != NULL)
                j->replies->count = 0;  /* at once: the error path sends what is there */
            j->ctx = EVP_CIPHER_CTX_new();
            if (j->replies == NULL || j->ctx == NULL) {
                PyErr_NoMemory();
                return -1;
            }
        }
        Replies *replies = j->replies;
        int r = replies->count;
        if (!j->nonces_ready) {
            if (RAND_bytes(&replies->nonces[0][0], sizeof(replies->nonces)) != 1) {
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL gave no random bytes");
                return -1;
            }
            j->nonces_ready = 1;
        }
        if (!hs_cookie_reply(replies->data[r], message, len, source, source_len,
                             replies->nonces[r], &j->macs, j->cookie_key, chacha20_poly1305,
                             j->ctx)) {
            j->dropped++;
            return 0;
        }
        struct msghdr *reply = &replies->headers[r].msg_hdr;
        memcpy(&replies->addresses[r], address, address_len);
        replies->iovecs[r].iov_base = replies->data[r];
        replies->iovecs[r].iov_len = HS_REPLY_SIZE;
        memset(reply, 0, sizeof(*reply));
        reply->msg_name = &replies->addresses[r];
        reply->msg_namelen = address_len;
        reply->msg_iov = &replies->iovecs[r];
        reply->msg_iovlen = 1;
        size_t control_len = reply_control(control, replies->controls[r]);
        reply->msg_control = control_len ? replies->controls[r] : NULL;
        reply->msg_controllen = control_len;
        j->cookies_sent++;
        if (++replies->count == BATCH) {
            j->failed += flush_replies(j->fd, replies);
            j->nonces_ready = 0;
        }
        return 0;
    }
    if (verdict == HS_UNPROVEN)
        j->handed++;
    return hand_up(j->out, message, len, address, control);
}

/* Whether a receive the kernel coalesced (UDP GRO: one source, ``gso``-byte pieces) holds
 * a handshake message. Those are judged piece by piece, as lone datagrams: a flood from
 * one source through a NIC that coalesces must not reach the core whole (up to 64
 * initiations a receive, each a judgement in Python). A run of transport data goes up
 * whole, as the kernel coalesced it. */
static int
holds_handshake(const unsigned char *data, size_t len, size_t gso)
{
    for (size_t at = 0; at < len; at += gso)
        if (hs_is_handshake(data + at, len - at < gso ? len - at : gso))
            return 1;
    return 0;
}

static PyObject *
gate_read(PyObject *module, PyObject *args)
{
    (void)module;
    int fd, rounds, under_load;
    Py_ssize_t limit;
    long hand_budget, cookie_budget;
    Py_buffer buffer, mac1_key, cookie_key, secret, lane;
    if (!PyArg_ParseTuple(args, "iw*iny*y*z*plly*:read", &fd, &buffer, &rounds, &limit,
                          &mac1_key, &cookie_key, &secret, &under_load, &hand_budget,
                          &cookie_budget, &lane))
        return NULL;
    PyObject *result = NULL;
    int ok = 0;
    long truncated = 0;
    Judge j = {.fd = fd, .under_load = under_load, .hand_budget = hand_budget,
               .cookie_budget = cookie_budget, .secret = secret.buf,
               .cookie_key = cookie_key.buf, .lane = lane.buf, .lane_len = (size_t)lane.len};
    if (buffer.len < (Py_ssize_t)BATCH * BUFFER_SIZE || mac1_key.len != HS_KEY_SIZE
        || cookie_key.len != HS_KEY_SIZE || (secret.buf != NULL && secret.len != HS_KEY_SIZE)) {
        PyErr_SetString(PyExc_ValueError, "buffer of 64 x 65535 bytes and 32-byte keys needed");
        goto done;
    }
    j.out = PyList_New(0);
    if (j.out == NULL)
        goto done;
    hs_macs_init(&j.macs, mac1_key.buf, secret.buf);  /* secret NULL for None */
    struct mmsghdr headers[BATCH];
    struct iovec iovecs[BATCH];
    struct sockaddr_storage addresses[BATCH];
    unsigned char controls[BATCH][CONTROL_SIZE];
    unsigned char *data = buffer.buf;
    for (int round = 0; round < rounds; round++) {
        Py_ssize_t room = limit - PyList_GET_SIZE(j.out); /* each datagram read may go up */
        int want = room < BATCH ? (int)room : BATCH;
        if (want <= 0)
            break;
        for (int i = 0; i < want; i++) {
            iovecs[i].iov_base = data + (size_t)i * BUFFER_SIZE;
            iovecs[i].iov_len = BUFFER_SIZE;
            memset(&headers[i], 0, sizeof(headers[i]));
            headers[i].msg_hdr.msg_name = &addresses[i];
            headers[i].msg_hdr.msg_namelen = sizeof(addresses[i]);
            headers[i].msg_hdr.msg_iov = &iovecs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
            headers[i].msg_hdr.msg_control = controls[i];
            headers[i].msg_hdr.msg_controllen = CONTROL_SIZE;
        }
        int got = recvmmsg(fd, headers, (unsigned int)want, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            continue;  /* EINTR, or a queued ICMP error: the next datagram may be fine */
        }
        for (int i = 0; i < got; i++) {
            struct msghdr *header = &headers[i].msg_hdr;
            if (header->msg_flags & (MSG_CTRUNC | MSG_TRUNC)) {
                truncated++;
                continue;
            }
            Control control = parse_control(header);
            const unsigned char *message = iovecs[i].iov_base;
            size_t len = headers[i].msg_len, gso = (size_t)control.gso_size;
            int failed = 0;
            if (gso == 0 || len <= gso) {
                control.gso_size = 0;
                failed = judge(&j, message, len, &addresses[i], header->msg_namelen, &control);
            } else if (!holds_handshake(message, len, gso)) {
                failed = hand_up(j.out, message, len, &addresses[i], &control);
            } else {
                control.gso_size = 0;
                for (size_t at = 0; at < len && !failed; at += gso)
                    failed = judge(&j, message + at, len - at < gso ? len - at : gso,
                                   &addresses[i], header->msg_namelen, &control);
            }
            if (failed < 0)
                goto done;
        }
        if (got < want)
            break;
    }
    ok = 1;
done:
    /* On an error too (a MemoryError midway): the cookies made are budget spent, and
       their datagrams are read; the caller then sees only the exception. */
    if (j.replies != NULL)
        j.failed += flush_replies(fd, j.replies);
    if (ok)
        result = Py_BuildValue("(O(llllll))", j.out, truncated, j.bad_mac1, j.handed,
                               j.cookies_sent, j.dropped, j.failed);
    Py_XDECREF(j.out);
    PyMem_Free(j.replies);
    EVP_CIPHER_CTX_free(j.ctx);
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&mac1_key);
    PyBuffer_Release(&cookie_key);
    PyBuffer_Release(&secret);
    PyBuffer_Release(&lane);
    return result;
}

PyDoc_STRVAR(classify_doc,
"classify(data, source, mac1_key, secret, under_load, /)\n"
"--\n\n"
"The verdict on one datagram from ``source`` (IP bytes || port): 0 pass, 1 bad mac1,\n"
"2 proven (valid mac2), 3 unproven (under load, an initiation without a valid mac2).");

static PyObject *
gate_classify(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer data, source, mac1_key, secret;
    int under_load;
    if (!PyArg_ParseTuple(args, "y*y*y*z*p:classify", &data, &source, &mac1_key, &secret,
                          &under_load))
        return NULL;
    PyObject *result = NULL;
    hs_macs macs;
    if (mac1_key.len != HS_KEY_SIZE || (secret.buf != NULL && secret.len != HS_KEY_SIZE))
        PyErr_SetString(PyExc_ValueError, "keys must be 32 bytes");
    else {
        hs_macs_init(&macs, mac1_key.buf, secret.buf);
        result = PyLong_FromLong(hs_classify(data.buf, data.len, source.buf, source.len,
                                             &macs, under_load));
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&source);
    PyBuffer_Release(&mac1_key);
    PyBuffer_Release(&secret);
    return result;
}

PyDoc_STRVAR(seal_doc,
"cookie_reply(msg, source, secret, cookie_key, /)\n"
"--\n\n"
"The 64-byte cookie reply ``read`` sends to initiation ``msg`` from ``source``.");

static PyObject *
gate_cookie_reply(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer buffers[4];
    PyObject *result = NULL;
    unsigned char reply[HS_REPLY_SIZE], nonce[HS_NONCE_SIZE];
    if (!PyArg_ParseTuple(args, "y*y*y*y*:cookie_reply", &buffers[0], &buffers[1],
                          &buffers[2], &buffers[3]))
        return NULL;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    hs_macs macs;
    if (buffers[0].len != HS_INITIATION_SIZE || buffers[2].len != HS_KEY_SIZE
        || buffers[3].len != HS_KEY_SIZE || (buffers[1].len != 6 && buffers[1].len != 18))
        PyErr_SetString(PyExc_ValueError,
                        "an initiation, a source key (IP || port: 6 or 18 bytes) and 32-byte keys");
    else {
        hs_macs_init(&macs, NULL, buffers[2].buf);
        if (ctx == NULL || RAND_bytes(nonce, HS_NONCE_SIZE) != 1
            || !hs_cookie_reply(reply, buffers[0].buf, buffers[0].len, buffers[1].buf,
                                buffers[1].len, nonce, &macs, buffers[3].buf,
                                chacha20_poly1305, ctx))
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not seal a cookie reply");
        else
            result = PyBytes_FromStringAndSize((const char *)reply, HS_REPLY_SIZE);
    }
    EVP_CIPHER_CTX_free(ctx);
    for (int i = 0; i < 4; i++)
        PyBuffer_Release(&buffers[i]);
    return result;
}

static PyMethodDef module_methods[] = {
    {"read", gate_read, METH_VARARGS, read_doc},
    {"classify", gate_classify, METH_VARARGS, classify_doc},
    {"cookie_reply", gate_cookie_reply, METH_VARARGS, seal_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef gate_module = {
    PyModuleDef_HEAD_INIT, "uspan.daemon._gate",
    "The compiled read path of a UDP socket under a handshake flood.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__gate(void)
{
    chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    if (chacha20_poly1305 == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL lacks ChaCha20-Poly1305");
        return NULL;
    }
    PyObject *module = PyModule_Create(&gate_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "BATCH", BATCH) < 0
        || PyModule_AddIntConstant(module, "BUFFER_SIZE", BUFFER_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
