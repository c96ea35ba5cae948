/* News for the core: punts into the ring, the eventfd written with no lock held, and
 * the core's collect (records, punts, events). Records, on the per-packet path, are
 * inline in plane.h. */
#include "plane.h"

/* Write what pl_signal_news owes, with no lock held: after each step of the thread, each
 * hook and each collect. No wake-up is lost: news is added, and its flag turned from 0
 * to 1, under news_lock before the count is owed; a collect drains the eventfd and
 * clears the flags under news_lock and then takes all news there is. A count written
 * after that drain stays in the eventfd (a wake that finds its news collected already);
 * one written before it belongs to news added before it, which that collect takes.
 * News added while a flag is 1 rides on the count its 0-to-1 turn owed, written at the
 * latest when the step that owed it ends, or the flag was cleared by a collect that took
 * it. */
void
pl_wake_shell(Plane *p)
{
    if (!atomic_load_explicit(&p->owed, memory_order_relaxed))
        return;
    uint64_t value = atomic_exchange(&p->owed, 0);
    if (value && write(p->news_fd, &value, sizeof value) < 0) { /* saturated: readable */ }
}

/* One punt into the ring, or dropped and counted (0). The ring is shared, so no kind may
 * starve another (review M4): TUN and EGRESS punts leave PUNT_UDP_RESERVED slots to UDP
 * ones (a local flood toward a peer without a session would else crowd out the
 * handshake that gives it one), and a peer's TUN punts stop at PUNT_TUN_PER_PEER per
 * collect (the core stages no more). `from`: the peer (under its lock), NULL for UDP. */
int
pl_punt(Plane *p, int kind, Peer *from, const unsigned char *data, size_t size,
     const Endpoint *source, int fd, int handed)
{
    static const int dropped[] = {[PUNT_TUN] = C_TUN_PUNTS_DROPPED,
                                  [PUNT_UDP] = C_UDP_PUNTS_DROPPED,
                                  [PUNT_EGRESS] = C_EGRESS_PUNTS_DROPPED};
    pl_count(p, C_PUNTS, 1);
    pthread_mutex_lock(&p->news_lock);
    if (from && from->punt_round != p->punt_round) {
        from->punt_round = p->punt_round;
        from->tun_punts = 0;
    }
    int local = kind != PUNT_UDP;
    if (p->punt_count == PUNT_SLOTS || size > SLOT
        || (local && p->local_punts == PUNT_SLOTS - PUNT_UDP_RESERVED)
        || (kind == PUNT_TUN && from->tun_punts == PUNT_TUN_PER_PEER)) {
        pthread_mutex_unlock(&p->news_lock);
        pl_count(p, C_PUNTS_DROPPED, 1);
        pl_count(p, dropped[kind], 1);
        return 0;
    }
    p->local_punts += local;
    if (kind == PUNT_TUN)
        from->tun_punts++;
    Punt *slot = &p->punts[(p->punt_head + p->punt_count++) % PUNT_SLOTS];
    slot->kind = kind;
    slot->peer = from ? pl_peer_id(from) : UINT64_MAX;
    slot->length = (uint16_t)size;
    memcpy(slot->data, data, size);
    if (source)
        slot->source = *source;
    else
        memset(&slot->source, 0, sizeof slot->source);
    slot->fd = fd;
    slot->handed = handed;
    pl_signal_news(p, 1);
    pthread_mutex_unlock(&p->news_lock);
    return 1;
}

/* Something the shell must act on (the TUN lost, the thread ended): counted by the
 * caller, and the eventfd signalled so the shell looks at the counters. */
void
pl_alarm_news(Plane *p)
{
    pthread_mutex_lock(&p->news_lock);
    pl_signal_news(p, 1);
    pthread_mutex_unlock(&p->news_lock);
    pl_wake_shell(p);
}

/* A collect's first half, without the GIL: what the gate judged moves to its taken
 * counts (a handed-up initiation's with its punt, in collect_end), the eventfd is
 * drained and the flags cleared, and the dirty list walked into `slots` (at most `room`:
 * what did not fit stays listed, signalled for the next collect). The ring's punts are
 * read in place (the thread only writes past punt_count). Returns the peers listed. */
int
pl_collect_begin(Plane *self, uint32_t *slots, uint32_t room, int *punt_count, int *punt_head)
{
    int dirty = 0;
    uint64_t value;
    pthread_mutex_lock(&self->gate_lock);
    Gate *g = &self->gate;
    uint64_t *counts[6] = {&g->bad_mac1, NULL, &g->cookies_sent, &g->dropped, &g->failed,
                           &g->overflowed}; /* handed: with the punts taken, below */
    for (int c = 0; c < 6; c++) {
        if (counts[c]) {
            g->taken[c] += *counts[c];
            *counts[c] = 0;
        }
    }
    pthread_mutex_lock(&self->news_lock);
    if (read(self->news_fd, &value, sizeof value) < 0) { /* EAGAIN: nothing signalled */ }
    self->news = self->urgent = 0;
    uint32_t s = self->dirty_head;
    for (; s != NO_SLOT && (uint32_t)dirty < room;) {
        Peer *peer = pl_peer_at(self, s);
        slots[dirty++] = s;
        peer->listed = 0;
        s = peer->dirty_next;
    }
    self->dirty_head = s; /* NO_SLOT, or what did not fit: the next collect's */
    if (s != NO_SLOT)
        pl_signal_news(self, 0);
    *punt_count = self->punt_count;
    *punt_head = self->punt_head;
    pthread_mutex_unlock(&self->news_lock);
    pthread_mutex_unlock(&self->gate_lock);
    return dirty;
}

/* A collect's second half: the first `left` peers of `slots` whose records were not
 * collected (a MemoryError) are listed again; the `taken` punts (`local` of them TUN or
 * EGRESS, `handed` handed-up initiations) leave the ring, their slots cleansed (L11);
 * what is left is signalled for the next collect. */
void
pl_collect_end(Plane *self, const uint32_t *slots, int left, int punt_head, int punt_count,
            int taken, int local, int handed)
{
    for (int j = left - 1; j >= 0; j--) { /* not collected: listed again */
        Peer *peer = pl_peer_at(self, slots[j]);
        pthread_mutex_lock(&peer->lock);
        if (peer->dirty) {
            peer->dirty = 0;
            pl_mark_dirty(self, peer);
        }
        pthread_mutex_unlock(&peer->lock);
    }
    pthread_mutex_lock(&self->gate_lock);
    self->gate.handed -= (uint64_t)handed;
    self->gate.taken[1] += (uint64_t)handed;
    pthread_mutex_lock(&self->news_lock);
    for (int j = 0; j < taken; j++) {
        Punt *x = &self->punts[(punt_head + j) % PUNT_SLOTS];
        OPENSSL_cleanse(x->data, x->length);
    }
    self->punt_head = (punt_head + taken) % PUNT_SLOTS;
    self->punt_count -= taken;
    self->local_punts -= local;
    self->punt_round++;
    if (left > 0 || taken < punt_count)
        pl_signal_news(self, 1);
    pthread_mutex_unlock(&self->news_lock);
    pthread_mutex_unlock(&self->gate_lock);
    pl_wake_shell(self);
    pl_reclaim(self, 0);
}
