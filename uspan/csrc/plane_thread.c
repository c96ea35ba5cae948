/* The thread: epoll, batched reads from the TUN and the sockets, the per-packet steps,
 * sends and writes (with the offloads the daemon's probe chose), and what it learns of
 * the sockets' sources (sticky sources, roaming). */
#include "plane.h"

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
            pl_count(p, C_BAD_LENGTH, 1);
        else
            b->size[n++] = (size_t)got;
    }
    pl_count(p, C_TUN_READS, (uint64_t)reads);
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
            pl_count(p, C_BAD_LENGTH, 1);
            continue;
        }
        unsigned char *slot = b->arena + (size_t)n * SLOT;
        ptrdiff_t cut = got < SEG_VNET_HDR_LEN ? SEG_EINVAL
                        : seg_cut(w->read, w->read + SEG_VNET_HDR_LEN,
                                  (size_t)got - SEG_VNET_HDR_LEN, mtu, slot, SLOT, HEADER_SIZE,
                                  w->segments, CUT_MAX);
        if (cut < 0 || w->segments[0].size > MAX_PACKET) {
            pl_count(p, C_BAD_INNER_PACKET, 1);
            continue;
        }
        if (w->read[1])
            pl_count(p, C_TSO_READS, 1);
        for (ptrdiff_t j = 0; j < cut; j++, n++) {
            b->data[n] = b->arena + (size_t)n * SLOT;
            b->size[n] = w->segments[j].size;
        }
    }
    pl_count(p, C_TUN_READS, (uint64_t)reads);
    return n;
}

/* The packets for the TUN, one write each. */
static void
write_tun(Plane *p, Batch *b, int n)
{
    for (int i = 0; i < n; i++)
        if (b->out[i] && write(p->tun_fd, b->data[i] + b->offset[i], b->out[i]) < 0)
            pl_count(p, C_TUN_WRITE_ERRORS, 1);
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
            pl_count(p, C_MERGED_WRITES, 1);
        }
        if (writev(p->tun_fd, parts, 2) < 0)
            pl_count(p, C_TUN_WRITE_ERRORS, 1);
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

/* One control message of `size` bytes in `control`; its space. */
static socklen_t
put_control(Control *control, int level, int type, const void *data, size_t size)
{
    struct cmsghdr *c = (struct cmsghdr *)control->buffer;
    c->cmsg_level = level;
    c->cmsg_type = type;
    c->cmsg_len = CMSG_LEN(size);
    memcpy(CMSG_DATA(c), data, size);
    return CMSG_SPACE(size);
}

/* A sticky source as IP_PKTINFO / IPV6_PKTINFO. */
socklen_t
pl_sticky_source(const Endpoint *e, Control *control)
{
    if (!e->local_len && !e->ifindex)
        return 0;
    if (e->addr.sa.sa_family == AF_INET) {
        struct in_pktinfo info = {0};
        info.ipi_ifindex = e->ifindex;
        if (e->local_len == 4)
            memcpy(&info.ipi_spec_dst, e->local, 4);
        return put_control(control, IPPROTO_IP, IP_PKTINFO, &info, sizeof info);
    }
    struct in6_pktinfo info = {0};
    info.ipi6_ifindex = (unsigned)e->ifindex;
    if (e->local_len == 16)
        memcpy(&info.ipi6_addr, e->local, 16);
    return put_control(control, IPPROTO_IPV6, IPV6_PKTINFO, &info, sizeof info);
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
int
pl_drop_source(Endpoint *e)
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
    pl_count(p, C_STICKY_FAILED, 1);
    Peer *peer = pl_owner_peer(p, b->owner[first]);
    if (!peer)
        return;
    pthread_mutex_lock(&peer->lock);
    Endpoint *e = &peer->endpoint;
    if (peer->live && pl_peer_id(peer) == b->owner[first] && pl_same_endpoint(e, &b->addr[first])
        && pl_drop_source(e)) {
        peer->record.roamed = 1;
        peer->record.roam = *e;
        pl_mark_dirty(p, peer);
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
            pl_count(p, C_SEND_ERRORS, 1);
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
            pl_count(p, C_SEND_ERRORS, 1);
            continue;
        }
        size_t size = b->out[i];
        iov[k++] = (struct iovec){b->data[i] + b->offset[i], size};
        Send *s = m ? &sends[m - 1] : NULL;
        if (*gso && s && s->open && s->fd == fd && size <= s->segment
            && s->segments < SEG_UDP_MAX_SEGMENTS && s->bytes + size <= UDP_MAX_PAYLOAD
            && pl_same_endpoint(&b->addr[i], &b->addr[s->first])) {
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
        socklen_t space = pl_sticky_source(&b->addr[sends[j].first], &control[j]);
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
                        pl_count(p, C_GSO_SENDS, 1);
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
                pl_count(p, C_SEND_ERRORS, sends[i].segments);
                i++;
            }
        }
    }
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
    pl_count(p, C_UDP_READS, (uint64_t)n);
    pl_udp_step(p, b, n, now);
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
            pl_count(p, C_GRO_RECEIVES, 1);
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
        pl_gate_flush(p, b->replies);
}

void *
pl_run(void *arg)
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
            pl_count(p, C_EPOLL_ERRORS, 1); /* the thread ends: the shell must hear of it */
            pl_alarm_news(p);
            return NULL;
        }
        pl_count(p, C_WAKES, 1);
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
                pl_count(p, C_FD_ERRORS, 1);
                if (fd == p->tun_fd) {
                    pl_count(p, C_TUN_LOST, 1);
                    pl_alarm_news(p);
                }
                continue;
            }
            uint64_t now = pl_now_ns();
            if (fd == p->tun_fd) {
                int got = vnet ? read_tun_vnet(p, b) : read_tun(p, b);
                pl_tun_step(p, b, got, now);
                send_udp(p, b, got, fds, &gso);
            } else {
                receive_udp(p, b, &receive, fd, now);
            }
            pl_wake_shell(p);
        }
        atomic_fetch_add(&p->epoch, 1);
    }
    return NULL;
}
