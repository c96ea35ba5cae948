/* The plane's tables: keypairs by local index, and the routes (longest prefix match),
 * with the routes thread that applies route changes beside the Python thread. Their
 * lookups, on the per-packet path, are inline in plane.h. */
#include "plane.h"

/* --- The index table: local index -> keypair (linear probing) ------------------------ */

static int
index_grow(IndexTable *t)
{
    size_t size = t->entries ? (t->mask + 1) * 2 : 64;
    Keypair **entries = calloc(size, sizeof *entries);
    if (!entries)
        return -1;
    IndexTable grown = {entries, size - 1, t->count};
    for (size_t i = 0; t->entries && i <= t->mask; i++) {
        Keypair *k = t->entries[i];
        if (!k)
            continue;
        size_t j = pl_index_home(&grown, k->local_index);
        while (entries[j])
            j = (j + 1) & grown.mask;
        entries[j] = k;
    }
    free(t->entries);
    *t = grown;
    return 0;
}

int
pl_index_add(IndexTable *t, Keypair *k)
{
    if ((!t->entries || (t->count + 1) * 4 > (t->mask + 1) * 3) && index_grow(t) < 0)
        return -1;
    size_t i = pl_index_home(t, k->local_index);
    while (t->entries[i])
        i = (i + 1) & t->mask;
    t->entries[i] = k;
    t->count++;
    return 0;
}

void
pl_index_remove(IndexTable *t, uint32_t index)
{
    if (!t->entries)
        return;
    size_t i = pl_index_home(t, index);
    while (t->entries[i] && t->entries[i]->local_index != index)
        i = (i + 1) & t->mask;
    if (!t->entries[i])
        return;
    t->entries[i] = NULL;
    t->count--;
    /* Backward shift: entries after the hole move into it if their home allows. */
    for (size_t j = (i + 1) & t->mask; t->entries[j]; j = (j + 1) & t->mask) {
        size_t home = pl_index_home(t, t->entries[j]->local_index);
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            t->entries[i] = t->entries[j];
            t->entries[j] = NULL;
            i = j;
        }
    }
}

/* --- Routes: longest prefix match ---------------------------------------------------- */

#define HUGE_TABLE (2u << 20) /* bytes from which a route table is mapped on huge pages */

/* Zeroed entries for a table of `count` slots; from HUGE_TABLE bytes an anonymous map
 * advised to huge pages: each probe of a big table is a cache miss, and on 4 KiB pages
 * a TLB miss too (16 MiB at 200k routes: 4,096 pages, and as many faults to fill it). */
static Route *
route_entries(size_t count)
{
    size_t bytes = count * sizeof(Route);
    if (bytes < HUGE_TABLE)
        return calloc(count, sizeof(Route));
    void *entries = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
    if (entries == MAP_FAILED)
        return NULL;
    (void)madvise(entries, bytes, MADV_HUGEPAGE); /* a hint: without THP, small pages */
    return entries;
}

void
pl_route_entries_free(Route *entries, size_t count)
{
    if (count * sizeof(Route) < HUGE_TABLE)
        free(entries);
    else if (entries)
        munmap(entries, count * sizeof(Route));
}

/* The table with room for `more` inserts, rehashed into `grown` (which then owns new
 * entries): 1, or 0 when it already has room, -1 without memory. It only reads `t`, so
 * pl_apply_routes runs it under the read lock, the thread's lookups going on beside it
 * (a million-route rehash takes tens of milliseconds), and swaps under the write lock:
 * there is one writer at a time (pl_apply_routes). */
static int
route_rebuilt(const RouteTable *t, size_t more, RouteTable *grown)
{
    size_t size = t->entries ? t->mask + 1 : 0, target = size ? size : 1024;
    while ((t->count + more + 1) * 4 > target * 3)
        target *= 2;
    if (target == size)
        return 0;
    Route *entries = route_entries(target);
    if (!entries)
        return -1;
    *grown = *t;
    grown->entries = entries;
    grown->mask = target - 1;
    for (size_t i = 0; t->entries && i <= t->mask; i++) {
        const Route *r = &t->entries[i];
        if (!r->used)
            continue;
        size_t j = pl_route_home(grown, r->hi, r->lo, r->length);
        while (entries[j].used)
            j = (j + 1) & grown->mask;
        entries[j] = *r;
    }
    return 1;
}

static int
route_grow(RouteTable *t)
{
    RouteTable grown;
    int rebuilt = route_rebuilt(t, 1, &grown);
    if (rebuilt < 0)
        return -1;
    if (rebuilt == 1) {
        pl_route_entries_free(t->entries, t->entries ? t->mask + 1 : 0);
        *t = grown;
    }
    return 0;
}

/* Insert or take over (hi, lo)/length for the peer (slot, generation); -1: no memory. */
static int
route_set(RouteTable *t, uint64_t hi, uint64_t lo, int length, uint32_t slot,
          uint32_t generation)
{
    Route *r = pl_route_find(t, hi, lo, length);
    if (!r) {
        if ((!t->entries || (t->count + 1) * 4 > (t->mask + 1) * 3) && route_grow(t) < 0)
            return -1;
        size_t i = pl_route_home(t, hi, lo, length);
        while (t->entries[i].used)
            i = (i + 1) & t->mask;
        r = &t->entries[i];
        r->hi = hi, r->lo = lo, r->length = (uint8_t)length, r->used = 1;
        t->count++;
        t->lengths[length]++;
    }
    r->slot = slot;
    r->generation = generation;
    return 0;
}

static void
route_delete(RouteTable *t, Route *r)
{
    size_t i = (size_t)(r - t->entries);
    t->lengths[r->length]--;
    t->count--;
    memset(r, 0, sizeof *r);
    for (size_t j = (i + 1) & t->mask; t->entries[j].used; j = (j + 1) & t->mask) {
        Route *e = &t->entries[j];
        size_t home = pl_route_home(t, e->hi, e->lo, e->length);
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            t->entries[i] = *e;
            memset(e, 0, sizeof *e);
            i = j;
        }
    }
}

#define PREFETCH_AHEAD 8 /* prefixes: a table of 100k routes is megabytes, each probe a miss */
#define ROUTE_BATCH 4096 /* prefixes staged before the routes thread is woken */

/* Apply one call's route changes for the peer (slot, generation), without the GIL. Under
 * the read lock, beside the thread's lookups: the rehash an add needs, and a first probe
 * of every change's slots, so that the write lock is held for changes in cache (each
 * probe of a big table is a miss: the data thread waited for ~256 of them a hold, and
 * for the holder whenever it was preempted holding it). Then the rehashed table is
 * swapped in with the changes under one hold of the write lock. -1: no memory. The only
 * writer: the routes thread while it runs, else the Python thread. */
int
pl_apply_routes(Plane *self, uint32_t slot, uint32_t generation, const Prefix *prefixes,
             size_t n, int add)
{
    int failed = 0;
    RouteTable grown[2];
    int rebuilt[2] = {0, 0};
    Route *old[2] = {NULL, NULL};
    size_t old_size[2] = {0, 0};
    pthread_rwlock_rdlock(&self->routes_lock);
    if (add) {
        size_t more[2] = {0, 0};
        for (size_t i = 0; i < n; i++)
            more[prefixes[i].v6 != 0]++;
        for (int v6 = 0; v6 < 2 && !failed; v6++)
            failed = (rebuilt[v6] = route_rebuilt(v6 ? &self->routes6 : &self->routes4,
                                                   more[v6], &grown[v6])) < 0;
    }
    const RouteTable *next[2] = {rebuilt[0] == 1 ? &grown[0] : &self->routes4,
                                 rebuilt[1] == 1 ? &grown[1] : &self->routes6};
    volatile uintptr_t warm = 0; /* the probes' results: kept, so that they are made */
    for (size_t i = 0; i < n && !failed; i++) {
        const Prefix *x = &prefixes[i];
        if (i + PREFETCH_AHEAD < n) {
            const Prefix *y = &prefixes[i + PREFETCH_AHEAD];
            const RouteTable *u = next[y->v6 != 0];
            if (u->entries)
                __builtin_prefetch(&u->entries[pl_route_home(u, y->hi, y->lo, y->length)]);
        }
        warm ^= (uintptr_t)pl_route_find(next[x->v6 != 0], x->hi, x->lo, x->length);
    }
    pthread_rwlock_unlock(&self->routes_lock);
    pthread_rwlock_wrlock(&self->routes_lock);
    for (int v6 = 0; v6 < 2; v6++) {
        RouteTable *t = v6 ? &self->routes6 : &self->routes4;
        if (rebuilt[v6] == 1 && !failed) {
            old[v6] = t->entries, old_size[v6] = t->entries ? t->mask + 1 : 0;
            *t = grown[v6];
        } else if (rebuilt[v6] == 1) {
            old[v6] = grown[v6].entries, old_size[v6] = grown[v6].mask + 1;
        }
    }
    for (size_t i = 0; i < n && !failed; i++) {
        const Prefix *x = &prefixes[i];
        RouteTable *t = x->v6 ? &self->routes6 : &self->routes4;
        if (i + PREFETCH_AHEAD < n) { /* its slot is a cache miss: fetched meanwhile */
            const Prefix *y = &prefixes[i + PREFETCH_AHEAD];
            const RouteTable *u = y->v6 ? &self->routes6 : &self->routes4;
            if (u->entries)
                __builtin_prefetch(&u->entries[pl_route_home(u, y->hi, y->lo, y->length)], 1);
        }
        if (add) {
            failed = route_set(t, x->hi, x->lo, x->length, slot, generation) < 0;
        } else {
            Route *r = pl_route_find(t, x->hi, x->lo, x->length);
            if (r && r->slot == slot && r->generation == generation)
                route_delete(t, r);
        }
    }
    pthread_rwlock_unlock(&self->routes_lock);
    pl_route_entries_free(old[0], old_size[0]);
    pl_route_entries_free(old[1], old_size[1]);
    return failed ? -1 : 0;
}

/* The routes thread: applies the queued calls in order, one write-lock hold each (the
 * data thread's lookups wait for at most one call's changes). A set of 100k adds and
 * 100k removes spent ~45 ms of its ~0.2 s in these tables (cache misses and a rehash of
 * 16 MiB) on the Python thread; here it runs while Python parses and slices the rest. */
void *
pl_route_run(void *arg)
{
    Plane *p = arg;
    pthread_mutex_lock(&p->jobs_lock);
    for (;;) {
        while (!p->jobs_head && !p->jobs_stop)
            pthread_cond_wait(&p->jobs_queued, &p->jobs_lock);
        if (p->jobs_stop)
            break;
        RouteJob *job = p->jobs_head;
        if (!(p->jobs_head = job->next))
            p->jobs_tail = NULL;
        pthread_mutex_unlock(&p->jobs_lock);
        int failed = pl_apply_routes(p, job->slot, job->generation, job->prefixes, job->n,
                                  job->add) < 0;
        free(job);
        pthread_mutex_lock(&p->jobs_lock);
        p->jobs_failed |= failed;
        if (--p->jobs_pending == 0) { /* the waiters: pl_drain_routes, and the shell's loop */
            pthread_cond_broadcast(&p->jobs_drained);
            pthread_mutex_unlock(&p->jobs_lock);
            uint64_t one = 1;
            if (write(p->routes_fd, &one, sizeof one) < 0) { /* saturated: readable */ }
            pthread_mutex_lock(&p->jobs_lock);
        }
    }
    pthread_mutex_unlock(&p->jobs_lock);
    return NULL;
}

/* Hand the staged jobs to the routes thread. Staged a batch at a time: a wake of the
 * thread per call (~780 for the removes set) cost context switches, and on a busy
 * machine each woken thread took the caller's core at once. The Python thread's only. */
void
pl_hand_over_routes(Plane *self)
{
    if (!self->staged_head)
        return;
    pthread_mutex_lock(&self->jobs_lock);
    if (self->jobs_tail)
        self->jobs_tail->next = self->staged_head;
    else
        self->jobs_head = self->staged_head;
    self->jobs_tail = self->staged_tail;
    self->jobs_pending += self->staged_jobs;
    pthread_cond_signal(&self->jobs_queued);
    pthread_mutex_unlock(&self->jobs_lock);
    self->staged_head = self->staged_tail = NULL;
    self->staged_jobs = self->staged_prefixes = 0;
}

/* A call's changes staged for the routes thread while it runs (handed over a batch
 * at a time): 1 and the job is the thread's, else 0 (the caller applies it). The Python
 * thread's only. */
int
pl_stage_routes(Plane *self, RouteJob *job)
{
    if (!self->routing)
        return 0;
    if (self->staged_tail)
        self->staged_tail->next = job;
    else
        self->staged_head = job;
    self->staged_tail = job;
    self->staged_jobs++;
    if ((self->staged_prefixes += job->n) >= ROUTE_BATCH)
        pl_hand_over_routes(self);
    return 1;
}

/* Wait until every route change so far is applied (without the GIL; the Python
 * thread's); the failure, if one found no memory, stays for sync_routes. */
void
pl_drain_routes(Plane *self)
{
    pl_hand_over_routes(self);
    pthread_mutex_lock(&self->jobs_lock);
    while (self->jobs_pending)
        pthread_cond_wait(&self->jobs_drained, &self->jobs_lock);
    pthread_mutex_unlock(&self->jobs_lock);
}

/* Route changes queued and not yet applied (the staged ones handed over first). */
size_t
pl_routes_pending(Plane *self)
{
    pl_hand_over_routes(self);
    pthread_mutex_lock(&self->jobs_lock);
    size_t pending = self->jobs_pending;
    pthread_mutex_unlock(&self->jobs_lock);
    return pending;
}

/* Wait for every route change so far: 1 if one found no memory since the last sync. */
int
pl_sync_routes(Plane *self)
{
    pl_drain_routes(self);
    pthread_mutex_lock(&self->jobs_lock);
    int failed = self->jobs_failed;
    self->jobs_failed = 0;
    pthread_mutex_unlock(&self->jobs_lock);
    return failed;
}

/* Stop the routes thread (what it had not applied is dropped: the plane is closing);
 * it is joined, so the caller does not hold the GIL. */
void
pl_stop_router(Plane *self)
{
    if (!self->routing)
        return;
    pthread_mutex_lock(&self->jobs_lock);
    self->jobs_stop = 1;
    pthread_cond_signal(&self->jobs_queued);
    pthread_mutex_unlock(&self->jobs_lock);
    pthread_join(self->router, NULL);
    self->routing = 0;
    pl_hand_over_routes(self);
    while (self->jobs_head) {
        RouteJob *job = self->jobs_head;
        self->jobs_head = job->next;
        free(job);
    }
    self->jobs_tail = NULL;
    self->jobs_pending = 0;
}


/* Remove every route of the peer (under routes_lock, write). */
static void
clear_peer_routes(Plane *self, const Peer *peer)
{
    RouteTable *tables[2] = {&self->routes4, &self->routes6};
    for (int t = 0; t < 2; t++) {
        RouteTable *table = tables[t];
        for (size_t i = 0; table->entries && i <= table->mask;) {
            Route *r = &table->entries[i];
            if (r->used && r->slot == peer->slot && r->generation == peer->generation)
                route_delete(table, r); /* shifts another entry into i: look again */
            else
                i++;
        }
    }
}

/* Every route of the peer removed, after the changes queued before (a scan of the
 * tables: milliseconds at a million routes, so without the GIL). */
void
pl_clear_routes(Plane *self, const Peer *peer)
{
    pl_drain_routes(self);
    pthread_rwlock_wrlock(&self->routes_lock);
    clear_peer_routes(self, peer);
    pthread_rwlock_unlock(&self->routes_lock);
}

/* The owner of an address (4 or 16 bytes) by the routes of every change so far, or
 * UINT64_MAX. */
uint64_t
pl_route(Plane *self, const unsigned char *address, int size)
{
    pl_drain_routes(self);
    pthread_rwlock_rdlock(&self->routes_lock);
    uint64_t owner = pl_route_lookup(self, address, size);
    pthread_rwlock_unlock(&self->routes_lock);
    return owner;
}
