/* The per-packet steps: TUN packets routed and sealed (pl_tun_step), datagrams classified,
 * opened and checked (pl_udp_step), as plain functions over a batch's buffers. No I/O: the
 * thread runs them between its reads and its sends, and the test hooks run them alone. */
#include "plane.h"

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

/* TUN -> UDP: b->size[i] bytes of inner packet at b->data[i] + HEADER_SIZE for i < n.
 * Each is routed, sealed in place (offset 0, out = size) with its peer's current
 * keypair and addressed (b->addr), or dropped, or punted. A packet for the previous
 * one's destination (the segments of one super-segment) takes its route. */
void
pl_tun_step(Plane *p, Batch *b, int n, uint64_t now)
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
            last_owner = pl_route_lookup(p, address, size);
        }
        b->owner[i] = size ? last_owner : UINT64_MAX;
        if (!size)
            pl_count(p, C_BAD_INNER_PACKET, 1);
        else if (b->owner[i] == UINT64_MAX)
            pl_count(p, C_NO_ROUTE, 1);
    }
    pthread_rwlock_unlock(&p->routes_lock);
    for (int i = 0; i < n;) {
        uint64_t owner = b->owner[i];
        int end = i + 1;
        while (end < n && b->owner[end] == owner)
            end++;
        Peer *peer = pl_owner_peer(p, owner);
        if (peer) {
            pthread_mutex_lock(&peer->lock);
            if (!peer->live || peer->generation != owner >> 32) {
                pl_count(p, C_NO_ROUTE, (uint64_t)(end - i));
            } else {
                for (int j = i; j < end; j++) {
                    Keypair *k = peer->current;
                    unsigned char *message = b->data[j];
                    if (!pl_can_send(k, now)) {
                        pl_punt(p, PUNT_TUN, peer, message + HEADER_SIZE, b->size[j], NULL, -1, 0);
                        continue;
                    }
                    if (!peer->endpoint.len && !peer->endpoint.relayed) {
                        pl_count(p, C_NO_ENDPOINT, 1);
                        continue;
                    }
                    size_t size = pl_seal_message(k, message, b->size[j], mtu, SLOT);
                    if (!size) { /* too long for its slot (C1), or OpenSSL failed */
                        pl_count(p, HEADER_SIZE + padded_length(b->size[j], mtu) + TAG_SIZE > SLOT
                                     ? C_BAD_LENGTH : C_SEND_ERRORS, 1);
                        continue;
                    }
                    pl_count(p, C_SEALED, 1);
                    if (peer->endpoint.relayed) { /* sent only if the ring takes it (L4) */
                        if (pl_punt(p, PUNT_EGRESS, peer, message, size, NULL, -1, 0))
                            pl_record_sent(p, peer, k, now, size);
                        continue;
                    }
                    pl_record_sent(p, peer, k, now, size);
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
    pl_count(p, C_ROAMS, 1);
}

/* The first authentic packet under `next`: it becomes current (Peer.confirm_next). */
static void
confirm_next(Plane *p, Peer *peer)
{
    Keypair *next = peer->next;
    if (peer->previous)
        pl_retire(p, peer->previous);
    peer->previous = peer->current;
    peer->current = next;
    peer->next = NULL;
    pl_count(p, C_CONFIRMED, 1);
    peer->record.confirmed = 1; /* receive_message marks the peer dirty next */
    peer->record.confirmed_index = next->local_index;
}

/* One datagram's first look: 1 if it is a transport message to open (index in
 * *index), else 0 after punting or counting it. */
static int
classify(Plane *p, Batch *b, int i, uint32_t *index)
{
    const unsigned char *d = b->data[i];
    size_t size = b->size[i];
    if (size > SLOT) { /* cut by the kernel: longer than anything we take */
        pl_count(p, C_BAD_LENGTH, 1);
        return 0;
    }
    if (size >= 1 && d[0] == DEMUX_MARK) {
        pl_punt(p, PUNT_UDP, NULL, d, size, &b->addr[i], b->fd[i], 0);
        return 0;
    }
    if (size < 4) {
        pl_count(p, C_BAD_LENGTH, 1);
        return 0;
    }
    if (d[1] || d[2] || d[3] || d[0] < 1 || d[0] > MSG_TRANSPORT) {
        pl_count(p, C_BAD_TYPE, 1);
        return 0;
    }
    static const size_t sizes[] = {0, INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE};
    if (d[0] != MSG_TRANSPORT) {
        if (size != sizes[d[0]])
            pl_count(p, C_BAD_LENGTH, 1);
        else if (d[0] == MSG_COOKIE_REPLY)
            pl_punt(p, PUNT_UDP, NULL, d, size, &b->addr[i], b->fd[i], 0);
        else
            pl_gate_judge(p, b, i);
        return 0;
    }
    if (size < HEADER_SIZE + TAG_SIZE) {
        pl_count(p, C_BAD_LENGTH, 1);
        return 0;
    }
    *index = pl_get_le32(d + 4);
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
        pl_count(p, C_UNKNOWN_INDEX, 1);
        return 0;
    }
    if (pl_age(k, now) >= REJECT_AFTER_TIME) {
        pl_count(p, C_EXPIRED_KEY, 1);
        return 0;
    }
    if (!pl_open_message(k, d, size, d + HEADER_SIZE)) {
        pl_count(p, C_DECRYPT_FAILED, 1);
        return 0;
    }
    pl_count(p, C_OPENED, 1);
    if (!pl_replay_accept(k, get_le64(d + 8))) {
        pl_count(p, C_REPLAY, 1);
        return 0;
    }
    if (!pl_same_endpoint(&b->addr[i], &peer->endpoint))
        roam(p, peer, &b->addr[i]);
    if (k == peer->next)
        confirm_next(p, peer);
    size_t plain = size - HEADER_SIZE - TAG_SIZE;
    pl_record_received(p, peer, now, size, plain > 0);
    if (!plain) {
        pl_count(p, C_KEEPALIVES, 1);
        return 0;
    }
    *inner = inner_length(d + HEADER_SIZE, plain);
    if (!*inner) {
        pl_count(p, C_BAD_INNER_PACKET, 1);
        return 0;
    }
    return 1;
}

/* UDP -> TUN: b->size[i] bytes of datagram at b->data[i] from b->addr[i] on b->fd[i].
 * Transport messages are opened in place and their inner packets, when their source is
 * routed to the sending peer, marked for the TUN (offset HEADER_SIZE, out = size);
 * handshake and demux datagrams punted; the rest counted. */
void
pl_udp_step(Plane *p, Batch *b, int n, uint64_t now)
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
        if (transport[i] && !(b->keypair[i] = pl_index_find(&p->index, index[i])))
            pl_count(p, C_UNKNOWN_INDEX, 1);
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
                    b->owner[j] = pl_peer_id(peer);
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
        if (pl_route_lookup(p, address, size) != b->owner[i]) {
            pl_count(p, C_NOT_ALLOWED_SOURCE, 1);
            b->out[i] = 0;
        }
    }
    pthread_rwlock_unlock(&p->routes_lock);
}
