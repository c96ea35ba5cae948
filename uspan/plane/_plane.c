/* The Python binding of the data plane (uspan/csrc/plane.h and the files it lists): the
 * Plane object over a core plane, its arguments parsed and its failures raised, the GIL
 * released around every core call that waits, joins or scans. The contract with the core
 * is docs/dataplane.md. The test hooks, at the end, run the per-packet steps
 * synchronously on given bytes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../csrc/plane.h"

/* The counters' names, in the order of plane.h's C_* values. */
static const char *counter_names[C_COUNT] = {
    "bad_length", "bad_type", "unknown_index", "expired_key", "decrypt_failed", "replay",
    "bad_inner_packet", "not_allowed_source", "no_route", "no_endpoint",
    "tun_reads", "udp_reads", "wakes", "sealed", "opened", "keepalives", "punts",
    "punts_dropped", "roams", "confirmed", "send_errors",
    "tun_write_errors", "fd_errors", "tun_lost", "epoll_errors", "tso_reads", "gso_sends",
    "gro_receives", "merged_writes", "tun_punts_dropped", "udp_punts_dropped",
    "egress_punts_dropped", "sticky_failed"};

typedef struct {
    PyObject_HEAD
    Plane core;
} PlaneObject;

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
    Peer *peer = slot < p->peer_slots ? pl_peer_at(p, slot) : NULL;
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
        pl_close_fds(fds, made);
        return -1;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS /* it waits for the thread's wake */
    failed = pl_set_sockets(p, fds, given, families, (int)n) < 0;
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void release_plane(Plane *self);

static int
plane_init(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
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
    int made = pl_init(self, mtu, offloads);
    if (made == PL_NO_MEMORY) {
        PyErr_NoMemory();
        goto failed;
    }
    if (made < 0) {
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
plane_start(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "plane already started");
        return NULL;
    }
    int started;
    Py_BEGIN_ALLOW_THREADS /* a failed start joins what it started */
    started = pl_start(self);
    Py_END_ALLOW_THREADS
    if (started == PL_ERRNO)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (started < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot start the plane thread");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Everything the plane holds, freed and zeroed (pl_release), the GIL released: it joins
 * the threads. */
static void
release_plane(Plane *self)
{
    Py_BEGIN_ALLOW_THREADS
    pl_release(self);
    Py_END_ALLOW_THREADS
}

static PyObject *
plane_close(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_owner(self) < 0)
        return NULL;
    if (self->initialised)
        release_plane(self);
    Py_RETURN_NONE;
}

static PyObject *
plane_fileno(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->news_fd);
}

static PyObject *
plane_set_mtu(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    int mtu = as_int(arg);
    if (mtu == -1 && PyErr_Occurred())
        return NULL;
    if (mtu <= 0 || mtu > MAX_MTU)
        return PyErr_Format(PyExc_ValueError, "mtu must be 1..%d", MAX_MTU);
    atomic_store(&self->mtu, mtu);
    Py_RETURN_NONE;
}

static PyObject *
plane_set_sockets(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    if (check_open(self) < 0 || set_socket_list(self, arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
plane_add_peer(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    uint64_t id;
    int added = pl_add_peer(self, &id);
    if (added == PL_FULL)
        return PyErr_Format(PyExc_ValueError, "more than %d peers", PEER_CHUNK * PEER_CHUNKS);
    if (added < 0)
        return PyErr_NoMemory();
    return PyLong_FromUnsignedLongLong(id);
}

static PyObject *
plane_remove_peer(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    Peer *peer;
    if (check_open(self) < 0 || !(peer = peer_of(self, arg)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS /* a scan of the route tables: milliseconds at a million */
    pl_clear_routes(self, peer);
    Py_END_ALLOW_THREADS
    pl_remove_peer(self, peer);
    Py_RETURN_NONE;
}

static PyObject *
plane_set_endpoint(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
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
    pl_set_endpoint(peer, &e);
    Py_RETURN_NONE;
}

/* The sticky source of the peer's endpoint forgotten (pl_clear_source). */
static PyObject *
plane_clear_source(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    Peer *peer;
    if (check_open(self) < 0 || !(peer = peer_of(self, arg)))
        return NULL;
    pl_clear_source(peer);
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
    if (pl_stage_routes(self, job)) /* staged, then queued: the routes thread applies it */
        Py_RETURN_NONE;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = pl_apply_routes(self, job->slot, job->generation, job->prefixes, n, add) < 0;
    Py_END_ALLOW_THREADS
    free(job);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* An eventfd the routes thread signals each time its queue drains: a shell waits on it
 * for routes_pending() to reach 0 (read it, then look again) instead of polling. */
static PyObject *
plane_routes_fileno(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->routes_fd);
}

static PyObject *
plane_routes_pending(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromSize_t(pl_routes_pending(self));
}

static PyObject *
plane_sync_routes(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = pl_sync_routes(self);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *
plane_add_routes(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
    return change_routes(self, args, kwds, 1);
}

static PyObject *
plane_remove_routes(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
    return change_routes(self, args, kwds, 0);
}

static PyObject *
plane_clear_routes(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    Peer *peer;
    if (check_open(self) < 0 || !(peer = peer_of(self, arg)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pl_clear_routes(self, peer);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
plane_route(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
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
    owner = pl_route(self, address.buf, (int)address.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&address);
    if (owner == UINT64_MAX)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(owner);
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
plane_install(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
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
        k = pl_keypair_new(send_key.buf, recv_key.buf);
        if (!k) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up ChaCha20-Poly1305");
            ok = 0;
        }
    }
    PyBuffer_Release(&send_key);
    PyBuffer_Release(&recv_key);
    if (ok && created > pl_now_ns() + CLOCK_SLACK) {
        pl_free_keypair(k);
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
    int installed = pl_install(self, k);
    if (installed < 0) {
        pl_free_keypair(k);
        if (installed == PL_TAKEN)
            return PyErr_Format(PyExc_ValueError, "local index %u is installed", local_index);
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyObject *
plane_assign(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
    static char *kwlist[] = {"peer", "previous", "current", "next", NULL};
    PyObject *id;
    long long roles[3];
    Peer *peer;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OLLL", kwlist, &id, &roles[0], &roles[1],
                                        &roles[2])
        || !(peer = peer_of(self, id)))
        return NULL;
    int bad = pl_assign(self, peer, roles);
    if (bad)
        return PyErr_Format(PyExc_KeyError, "%lld is not a keypair of this peer", roles[bad - 1]);
    Py_RETURN_NONE;
}

static PyObject *
plane_drop(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    uint32_t index;
    if (check_open(self) < 0 || as_index(arg, &index) < 0)
        return NULL;
    pl_drop(self, index);
    Py_RETURN_NONE;
}

/* pl_claim_keypair, or NULL with KeyError. pl_release_keypair undoes it. */
static Keypair *
claim_keypair(Plane *self, uint32_t index)
{
    Keypair *k = pl_claim_keypair(self, index);
    if (!k)
        PyErr_Format(PyExc_KeyError, "%u", index);
    return k;
}

static PyObject *
plane_expire_sending(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    uint32_t index;
    Keypair *k;
    if (check_open(self) < 0 || as_index(arg, &index) < 0 || !(k = claim_keypair(self, index)))
        return NULL;
    k->send_counter = REJECT_AFTER_MESSAGES;
    pl_release_keypair(self, k);
    Py_RETURN_NONE;
}

static PyObject *
plane_send_counter(PlaneObject *obj, PyObject *arg)
{
    Plane *self = &obj->core;
    uint32_t index;
    Keypair *k;
    if (check_open(self) < 0 || as_index(arg, &index) < 0 || !(k = claim_keypair(self, index)))
        return NULL;
    uint64_t counter = k->send_counter;
    pl_release_keypair(self, k);
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
plane_accept(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
    static char *kwlist[] = {"local_index", "counter", NULL};
    PyObject *index_arg, *counter_arg;
    uint32_t index;
    uint64_t counter;
    Keypair *k;
    if (check_open(self) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &index_arg, &counter_arg)
        || as_index(index_arg, &index) < 0 || !(k = claim_keypair(self, index)))
        return NULL;
    int ok = !as_counter(counter_arg, &counter) && pl_replay_accept(k, counter);
    pl_release_keypair(self, k);
    return PyBool_FromLong(ok);
}

static PyObject *
plane_accept_run(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
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
    int ok = !as_counter(first_arg, &first) && pl_replay_accept_run(k, first, n);
    pl_release_keypair(self, k);
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
plane_seal(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
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
        size_t size = pl_seal_message(k, (unsigned char *)PyBytes_AS_STRING(datagram), length, mtu,
                                   (size_t)PyBytes_GET_SIZE(datagram));
        if (!size) {
            failed = 1;
            break;
        }
        pl_count(self, C_SEALED, 1);
    }
    Py_END_ALLOW_THREADS
    pl_release_keypair(self, k);
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
plane_open(PlaneObject *obj, PyObject *args, PyObject *kwds)
{
    Plane *self = &obj->core;
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
            ok[i] = (unsigned char)pl_open_message(
                k, (const unsigned char *)PyBytes_AS_STRING(message),
                (size_t)PyBytes_GET_SIZE(message),
                (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(plains, i)));
            if (ok[i])
                pl_count(self, C_OPENED, 1);
        }
        Py_END_ALLOW_THREADS
    }
    pl_release_keypair(self, k);
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
        uint64_t id = pl_peer_id(peer);
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
plane_collect(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
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
    int dirty, punt_count, punt_head;
    uint32_t room = self->peer_slots + 1; /* every peer listed once: the walk fits */
    Py_BEGIN_ALLOW_THREADS
    dirty = pl_collect_begin(self, slots, room, &punt_count, &punt_head);
    Py_END_ALLOW_THREADS
    int i = dirty - 1, taken = 0, local = 0, handed = 0;
    for (; i >= 0 && collect_record(self, pl_peer_at(self, slots[i]), records, event_list) == 0; i--)
        ; /* oldest first */
    for (; i < 0 && taken < punt_count; taken++) {
        const Punt *x = &self->punts[(punt_head + taken) % PUNT_SLOTS];
        if (append_new(punt_list, punt_tuple(self, x)) < 0)
            break;
        local += x->kind != PUNT_UDP;
        handed += x->handed;
    }
    pl_collect_end(self, slots, i + 1, punt_head, punt_count, taken, local, handed);
    PyMem_Free(slots);
    if (i >= 0 || taken < punt_count)
        PyErr_Clear(); /* a MemoryError: the rest waits, signalled */
    return out;
}

static PyObject *
plane_counters(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
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
plane_set_gate(PlaneObject *obj, PyObject *args)
{
    Plane *self = &obj->core;
    Py_buffer mac1, cookie, secret, lane;
    int under_load;
    long long hand_up, cookies;
    if (check_open(self) < 0)
        return NULL;
    if (PyTuple_GET_SIZE(args) == 0) {
        pl_gate_clear(self);
        Py_RETURN_NONE;
    }
    if (!PyArg_ParseTuple(args, "y*y*z*pLLy*:set_gate", &mac1, &cookie, &secret,
                          &under_load, &hand_up, &cookies, &lane))
        return NULL;
    PyObject *result = NULL;
    if (mac1.len != HS_KEY_SIZE || cookie.len != HS_KEY_SIZE
        || (secret.buf && secret.len != HS_KEY_SIZE))
        PyErr_SetString(PyExc_ValueError, "keys and the secret are 32 bytes");
    else if (lane.len % HS_LANE_RECORD || lane.len > (Py_ssize_t)sizeof self->gate.lane)
        PyErr_Format(PyExc_ValueError, "the lane: up to %d records of %d bytes",
                     GATE_LANE_MAX, HS_LANE_RECORD);
    else {
        pl_gate_set(self, mac1.buf, cookie.buf, secret.buf, under_load, hand_up, cookies,
                    lane.buf, (size_t)lane.len);
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
plane_gate_take(PlaneObject *obj, PyObject *Py_UNUSED(ignored))
{
    Plane *self = &obj->core;
    if (check_open(self) < 0)
        return NULL;
    uint64_t taken[6];
    pl_gate_take(self, taken);
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
    Batch *b = PyTuple_GET_SIZE(*items) <= BATCH ? pl_batch_new(BATCH) : NULL;
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
    pl_drain_routes(self);
    step(self, b, n, now);
    pl_wake_shell(self);
    Py_END_ALLOW_THREADS
    atomic_fetch_sub(&self->slow_calls, 1);
}

static PyObject *
plane_tun_step(PlaneObject *obj, PyObject *args)
{
    Plane *self = &obj->core;
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
    run_hook(self, pl_tun_step, b, (int)n, now);
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
plane_udp_step(PlaneObject *obj, PyObject *args)
{
    Plane *self = &obj->core;
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
    run_hook(self, pl_udp_step, b, (int)n, now);
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
plane_dealloc(PlaneObject *obj)
{
    Plane *self = &obj->core;
    if (self->initialised) /* any thread: no call can be running on it any more */
        release_plane(self);
    Py_TYPE(obj)->tp_free((PyObject *)obj);
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
    .tp_basicsize = sizeof(PlaneObject),
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
    if (pl_crypto_init() < 0) {
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

