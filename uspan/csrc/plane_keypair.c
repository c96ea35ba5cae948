/* Keypairs: keyed from the core's keys, installed by local index, given roles,
 * retired and reclaimed once no batch holds them. Sealing, opening and the replay window,
 * on the per-packet path, are inline in plane.h. */
#include "plane.h"

EVP_CIPHER *pl_chacha20_poly1305;

/* The cipher fetched once, at import: -1 if OpenSSL has none. */
int
pl_crypto_init(void)
{
    pl_chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    return pl_chacha20_poly1305 ? 0 : -1;
}

static EVP_CIPHER_CTX *
keyed(const void *key, int encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx && !EVP_CipherInit_ex2(ctx, pl_chacha20_poly1305, key, NULL, encrypt, NULL)) {
        EVP_CIPHER_CTX_free(ctx);
        ctx = NULL;
    }
    return ctx;
}

/* A keypair with its two keyed contexts (32-byte keys), not yet installed; NULL if
 * OpenSSL could not set it up. */
Keypair *
pl_keypair_new(const void *send_key, const void *recv_key)
{
    Keypair *k = calloc(1, sizeof *k);
    if (k) {
        k->seal = keyed(send_key, 1);
        k->open = keyed(recv_key, 0);
    }
    if (!k || !k->seal || !k->open) {
        if (k)
            pl_free_keypair(k);
        return NULL;
    }
    return k;
}

/* Install a new keypair (its fields set, live) under its peer's lock: 0, PL_TAKEN if its
 * local index is installed, PL_NO_MEMORY; on failure it is still the caller's. */
int
pl_install(Plane *self, Keypair *k)
{
    Peer *peer = k->peer;
    pthread_mutex_lock(&peer->lock);
    pthread_rwlock_wrlock(&self->index_lock);
    int taken = pl_index_find(&self->index, k->local_index) != NULL;
    int added = !taken && pl_index_add(&self->index, k) == 0;
    pthread_rwlock_unlock(&self->index_lock);
    pthread_mutex_unlock(&peer->lock);
    return added ? 0 : taken ? PL_TAKEN : PL_NO_MEMORY;
}

/* The installed keypair of a local index, NULL (no exception) if none. */
Keypair *
pl_keypair_of(Plane *self, uint32_t index)
{
    pthread_rwlock_rdlock(&self->index_lock);
    Keypair *k = pl_index_find(&self->index, index);
    pthread_rwlock_unlock(&self->index_lock);
    return k;
}

/* The peer's previous, current and next by local index (-1: none): 0, or 1 + the role
 * whose index is no live keypair of the peer (then nothing changes). Looked up under the
 * peer's lock: the thread's confirm retires `previous` under it, and a keypair retired
 * between a lookup and the lock would be freed in a role. */
int
pl_assign(Plane *self, Peer *peer, const long long roles[3])
{
    Keypair *keys[3] = {NULL, NULL, NULL};
    pthread_mutex_lock(&peer->lock);
    for (int i = 0; i < 3; i++) {
        if (roles[i] == -1)
            continue;
        if (roles[i] < 0 || roles[i] > UINT32_MAX
            || !(keys[i] = pl_keypair_of(self, (uint32_t)roles[i])) || keys[i]->peer != peer
            || !keys[i]->live) {
            pthread_mutex_unlock(&peer->lock);
            return 1 + i;
        }
    }
    peer->previous = keys[0];
    peer->current = keys[1];
    peer->next = keys[2];
    pthread_mutex_unlock(&peer->lock);
    return 0;
}

/* The keypair of a local index for a slow-path call, locked, with slow_calls held;
 * NULL if none is installed. release_keypair undoes it. */
Keypair *
pl_claim_keypair(Plane *self, uint32_t index)
{
    atomic_fetch_add(&self->slow_calls, 1);
    Keypair *k = pl_keypair_of(self, index);
    if (k) {
        pthread_mutex_lock(&k->peer->lock);
        if (k->live)
            return k;
        pthread_mutex_unlock(&k->peer->lock);
    }
    atomic_fetch_sub(&self->slow_calls, 1);
    return NULL;
}

void
pl_release_keypair(Plane *self, Keypair *k)
{
    pthread_mutex_unlock(&k->peer->lock);
    atomic_fetch_sub(&self->slow_calls, 1);
}

/* Drop the keypair of a local index, if one is installed. Only the GIL holder installs
 * or drops, so it stays installed between the lookup and the retire. */
void
pl_drop(Plane *self, uint32_t index)
{
    Keypair *k = pl_keypair_of(self, index);
    if (k) {
        pthread_mutex_lock(&k->peer->lock);
        pl_retire(self, k);
        pthread_mutex_unlock(&k->peer->lock);
    }
    pl_reclaim(self, 0);
}

/* ReplayWindow.accept_run: counters first .. first + count - 1 (count >= 1), all above
 * the top, at once; else 0 and nothing changes. */
int
pl_replay_accept_run(Keypair *k, uint64_t first, uint64_t count)
{
    uint64_t last = first + count - 1;
    if (first <= k->replay_top || count > REPLAY_WINDOW || last < first
        || last >= REJECT_AFTER_MESSAGES)
        return 0;
    pl_replay_accept(k, last);
    for (uint64_t counter = first; counter < last;) {
        uint64_t bit = counter & 63, span = 64 - bit < last - counter ? 64 - bit : last - counter;
        uint64_t bits = span == 64 ? UINT64_MAX : ((1ULL << span) - 1) << bit;
        k->replay[(counter >> 6) & (REPLAY_WORDS - 1)] |= bits;
        counter += span;
    }
    return 1;
}

/* Hand a dropped keypair to the reclaimer (under the peer's lock). */
void
pl_retire(Plane *p, Keypair *k)
{
    if (!k->live) /* the thread's confirm retired it first */
        return;
    pthread_rwlock_wrlock(&p->index_lock);
    pl_index_remove(&p->index, k->local_index);
    pthread_rwlock_unlock(&p->index_lock);
    k->live = 0;
    Peer *peer = k->peer;
    if (peer->previous == k)
        peer->previous = NULL;
    if (peer->current == k)
        peer->current = NULL;
    if (peer->next == k)
        peer->next = NULL;
    pthread_mutex_lock(&p->retire_lock);
    k->retired_at = atomic_load(&p->epoch);
    k->retired_next = p->retired;
    p->retired = k;
    pthread_mutex_unlock(&p->retire_lock);
}

void
pl_free_keypair(Keypair *k)
{
    EVP_CIPHER_CTX_free(k->seal); /* the providers cleanse the keys */
    EVP_CIPHER_CTX_free(k->open);
    OPENSSL_cleanse(k, sizeof *k);
    free(k);
}

/* Free the retired keypairs no batch or slow call can still hold (`all`: at close). */
void
pl_reclaim(Plane *p, int all)
{
    if (!all && atomic_load(&p->slow_calls))
        return;
    uint64_t epoch = atomic_load(&p->epoch);
    pthread_mutex_lock(&p->retire_lock);
    Keypair **link = &p->retired;
    while (*link) {
        Keypair *k = *link;
        if (all || k->retired_at % 2 == 0 || epoch > k->retired_at) {
            *link = k->retired_next;
            pl_free_keypair(k);
        } else {
            link = &k->retired_next;
        }
    }
    pthread_mutex_unlock(&p->retire_lock);
}
