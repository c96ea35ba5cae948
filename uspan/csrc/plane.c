/* A plane's life (its workspaces, locks, fds and threads, from init to release) and its
 * peers' slots. */
#include "plane.h"

/* --- Workspaces: allocated once (the thread's) or per hook call ---------------------- */

/* A batch with an arena of `slots` slots, item i at slot i; NULL without memory. */
Batch *
pl_batch_new(int slots)
{
    Batch *b = malloc(sizeof *b + (size_t)slots * SLOT);
    if (!b)
        return NULL;
    b->arena = (unsigned char *)(b + 1);
    b->replies = NULL;
    for (int i = 0; i < slots; i++)
        b->data[i] = b->arena + (size_t)i * SLOT;
    return b;
}

_Static_assert(CAPACITY * SLOT >= RX_BUFFERS * RX_BUFFER, "the arena holds the receives");

static void
offload_free(Offload *w)
{
    if (!w)
        return;
    free(w->read);
    free(w->merged);
    free(w->merge);
    free(w);
}

/* The thread's offload workspace; NULL without memory. */
static Offload *
offload_new(void)
{
    Offload *w = calloc(1, sizeof *w);
    uint32_t seed = 0;
    if (!w)
        return NULL;
    w->read = malloc(SEG_VNET_HDR_LEN + SEG_MAX_IP_PACKET + 1); /* + 1: a cut read shows */
    w->merged = malloc(SEG_MAX_IP_PACKET);
    w->merge = malloc(seg_merge_bytes(CAPACITY));
    if (!w->read || !w->merged || !w->merge
        || getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        offload_free(w);
        return NULL;
    }
    seg_merge_init(w->merge, CAPACITY, seed);
    return w;
}

/* --- Life ---------------------------------------------------------------------------- */

int
pl_init(Plane *self, int mtu, int offloads)
{
    /* From a zeroed object (new, or released): locks first, fds -1, so that
     * pl_release undoes any part of what follows. */
    pthread_mutex_init(&self->io_lock, NULL);
    pthread_mutex_init(&self->news_lock, NULL);
    pthread_mutex_init(&self->retire_lock, NULL);
    pthread_mutex_init(&self->gate_lock, NULL);
    pthread_rwlock_init(&self->routes_lock, NULL);
    pthread_rwlock_init(&self->index_lock, NULL);
    pthread_mutex_init(&self->jobs_lock, NULL);
    pthread_cond_init(&self->jobs_queued, NULL);
    pthread_cond_init(&self->jobs_drained, NULL);
    self->tun_fd = self->stop_fd = self->news_fd = self->epoll_fd = self->routes_fd = -1;
    atomic_store(&self->mtu, mtu);
    self->routes4.width = 32;
    self->routes6.width = 128;
    self->dirty_head = self->free_slot = NO_SLOT;
    self->offloads = offloads;
    self->batch = pl_batch_new(CAPACITY);
    self->offload = offloads & OFFLOAD_TUN_VNET ? offload_new() : NULL;
    self->punts = malloc(sizeof(Punt) * PUNT_SLOTS);
    self->replies = calloc(1, sizeof *self->replies);
    if (!self->batch || !self->punts || !self->replies
        || !(self->replies->ctx = EVP_CIPHER_CTX_new())
        || (offloads & OFFLOAD_TUN_VNET && !self->offload))
        return PL_NO_MEMORY;
    self->batch->replies = self->replies;
    self->replies->nonces_used = GATE_REPLIES; /* none drawn yet */
    pl_gate_flush(self, self->replies);
    self->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->news_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->routes_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    self->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (self->stop_fd < 0 || self->news_fd < 0 || self->routes_fd < 0 || self->epoll_fd < 0)
        return PL_ERRNO;
    return 0;
}

int
pl_start(Plane *self)
{
    int fds[2] = {self->stop_fd, self->tun_fd};
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(self->epoll_fd, EPOLL_CTL_ADD, fds[i], &ev) < 0 && errno != EEXIST)
            return PL_ERRNO;
    }
    /* Signals are the Python thread's: blocked in the plane thread (it inherits the
     * mask), none interrupts its syscalls (EINTR) or runs a handler on it. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int failed = pthread_create(&self->router, NULL, pl_route_run, self) != 0;
    self->routing = !failed;
    failed = failed || pthread_create(&self->thread, NULL, pl_run, self) != 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (failed) {
        pl_stop_router(self);
        return PL_NO_THREAD;
    }
    self->running = 1;
    return 0;
}

static void
stop_thread(Plane *self)
{
    if (!self->running)
        return;
    uint64_t one = 1;
    if (write(self->stop_fd, &one, sizeof one) < 0) { /* cannot fail: a fresh eventfd */ }
    pthread_join(self->thread, NULL);
    self->running = 0;
}

/* Both threads stopped and joined. */
void
pl_stop(Plane *self)
{
    stop_thread(self);
    pl_stop_router(self);
}

static void
free_tables(Plane *self)
{
    for (uint32_t c = 0; c < PEER_CHUNKS; c++) {
        Peer *chunk = atomic_load(&self->chunks[c]);
        if (!chunk)
            continue;
        for (uint32_t i = 0; i < PEER_CHUNK && c * PEER_CHUNK + i < self->peer_slots; i++) {
            Peer *peer = &chunk[i];
            pthread_mutex_lock(&peer->lock);
            peer->previous = peer->current = peer->next = NULL;
            pthread_mutex_unlock(&peer->lock);
            pthread_mutex_destroy(&peer->lock);
        }
        free(chunk);
        atomic_store(&self->chunks[c], NULL);
    }
    for (size_t i = 0; self->index.entries && i <= self->index.mask; i++)
        if (self->index.entries[i])
            pl_free_keypair(self->index.entries[i]);
    free(self->index.entries);
    for (int v6 = 0; v6 < 2; v6++) {
        RouteTable *t = v6 ? &self->routes6 : &self->routes4;
        pl_route_entries_free(t->entries, t->entries ? t->mask + 1 : 0);
    }
    memset(&self->index, 0, sizeof self->index);
    pl_reclaim(self, 1);
}

/* Everything the plane holds, freed and zeroed (close, and a failed init): the plane
 * is then as new, and may be initialised again. Joins the threads (the caller does not
 * hold the GIL). */
void
pl_release(Plane *self)
{
    pl_stop(self);
    free_tables(self);
    int fds[5] = {self->stop_fd, self->news_fd, self->routes_fd, self->epoll_fd, self->tun_fd};
    pl_close_fds(fds, 5);
    pl_close_fds(self->sockets, self->socket_count);
    free(self->batch);
    offload_free(self->offload);
    free(self->punts);
    if (self->replies) {
        EVP_CIPHER_CTX_free(self->replies->ctx);
        free(self->replies);
    }
    OPENSSL_cleanse(&self->gate, sizeof self->gate);
    pthread_mutex_destroy(&self->gate_lock);
    pthread_mutex_destroy(&self->io_lock);
    pthread_mutex_destroy(&self->news_lock);
    pthread_mutex_destroy(&self->retire_lock);
    pthread_rwlock_destroy(&self->routes_lock);
    pthread_rwlock_destroy(&self->index_lock);
    pthread_mutex_destroy(&self->jobs_lock);
    pthread_cond_destroy(&self->jobs_queued);
    pthread_cond_destroy(&self->jobs_drained);
    memset(self, 0, sizeof *self);
}

void
pl_close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* Sockets (the shell's fds, as the plane's dups) become the thread's; the dups they
 * replace are closed once the thread is past the wake it may be using them in. */
int
pl_set_sockets(Plane *p, const int *fds, const int *given, const int *families, int n)
{
    pthread_mutex_lock(&p->io_lock);
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(p->epoll_fd, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int error = errno;
            for (int j = 0; j < i; j++)
                epoll_ctl(p->epoll_fd, EPOLL_CTL_DEL, fds[j], NULL);
            pthread_mutex_unlock(&p->io_lock);
            pl_close_fds(fds, n);
            errno = error;
            return PL_ERRNO;
        }
    }
    int old[MAX_SOCKETS], old_count = p->socket_count;
    memcpy(old, p->sockets, sizeof(int) * (size_t)old_count);
    for (int i = 0; i < old_count; i++) /* ENOENT: a hung-up one the thread let go */
        epoll_ctl(p->epoll_fd, EPOLL_CTL_DEL, old[i], NULL);
    memcpy(p->sockets, fds, sizeof(int) * (size_t)n);
    memcpy(p->given, given, sizeof(int) * (size_t)n);
    memcpy(p->families, families, sizeof(int) * (size_t)n);
    p->socket_count = n;
    uint64_t epoch = atomic_load(&p->epoch);
    pthread_mutex_unlock(&p->io_lock);
    if (epoch % 2) { /* the thread is in a wake that may hold the old ones */
        while (atomic_load(&p->epoch) == epoch) {
            struct timespec pause = {0, 50000};
            nanosleep(&pause, NULL);
        }
    }
    pl_close_fds(old, old_count);
    return 0;
}

/* --- Peers --------------------------------------------------------------------------- */

/* A new peer in a free slot (or a new one): 0 and its id, PL_FULL or PL_NO_MEMORY. */
int
pl_add_peer(Plane *self, uint64_t *id)
{
    uint32_t slot = self->free_slot;
    Peer *peer;
    if (slot != NO_SLOT) {
        peer = pl_peer_at(self, slot);
        self->free_slot = peer->free_next;
    } else {
        slot = self->peer_slots;
        if (slot >= PEER_CHUNK * PEER_CHUNKS)
            return PL_FULL;
        if (slot % PEER_CHUNK == 0) {
            Peer *chunk = calloc(PEER_CHUNK, sizeof(Peer));
            if (!chunk)
                return PL_NO_MEMORY;
            for (int i = 0; i < PEER_CHUNK; i++) {
                pthread_mutex_init(&chunk[i].lock, NULL);
                chunk[i].slot = slot + (uint32_t)i;
            }
            atomic_store_explicit(&self->chunks[slot / PEER_CHUNK], chunk, memory_order_release);
        }
        self->peer_slots++;
        peer = pl_peer_at(self, slot);
    }
    pthread_mutex_lock(&peer->lock);
    peer->generation++;
    peer->live = 1;
    memset(&peer->endpoint, 0, sizeof peer->endpoint);
    memset(&peer->record, 0, sizeof peer->record);
    peer->dirty = 0;
    *id = pl_peer_id(peer);
    pthread_mutex_unlock(&peer->lock);
    return 0;
}

/* A peer's keypairs retired, its state reset and its slot freed; the caller cleared its
 * routes first. The old id is stale from here. */
void
pl_remove_peer(Plane *self, Peer *peer)
{
    /* Its keypairs: every installed one points at it. */
    Keypair *mine[64];
    for (;;) {
        int n = 0;
        pthread_rwlock_rdlock(&self->index_lock);
        for (size_t i = 0; self->index.entries && i <= self->index.mask && n < 64; i++)
            if (self->index.entries[i] && self->index.entries[i]->peer == peer)
                mine[n++] = self->index.entries[i];
        pthread_rwlock_unlock(&self->index_lock);
        if (!n)
            break;
        pthread_mutex_lock(&peer->lock);
        for (int i = 0; i < n; i++)
            pl_retire(self, mine[i]);
        pthread_mutex_unlock(&peer->lock);
    }
    pthread_mutex_lock(&peer->lock);
    peer->live = 0;
    peer->generation++; /* the old id is stale from here */
    memset(&peer->endpoint, 0, sizeof peer->endpoint);
    memset(&peer->record, 0, sizeof peer->record);
    peer->dirty = 0;
    pthread_mutex_unlock(&peer->lock);
    peer->free_next = self->free_slot;
    self->free_slot = peer->slot;
    pl_reclaim(self, 0);
}

void
pl_set_endpoint(Peer *peer, const Endpoint *e)
{
    pthread_mutex_lock(&peer->lock);
    peer->endpoint = *e;
    pthread_mutex_unlock(&peer->lock);
}

/* The sticky source of the peer's endpoint, whatever it is now (the thread may have
 * roamed it since the core last heard): a set_endpoint of the core's older view would
 * undo that roam. The record's pending roam loses its source too. */
void
pl_clear_source(Peer *peer)
{
    pthread_mutex_lock(&peer->lock);
    pl_drop_source(&peer->endpoint);
    pl_drop_source(&peer->record.roam); /* a pending roam keeps its scope too */
    pthread_mutex_unlock(&peer->lock);
}
