/* The gate: handshake messages judged in the thread by the core's plan, as
 * uspan/daemon/_gate.c judges them in the trio path, and the cookie replies it sends. */
#include "plane.h"

/* The cookie reply to b's datagram i (under gate_lock), from the address it came to; 0
 * when none can be made (no fresh secret, no socket: a hook's batch). */
static int
gate_reply(Plane *p, Batch *b, int i, const unsigned char *source, size_t source_len)
{
    Replies *r = b->replies;
    Gate *g = &p->gate;
    if (!r || b->fd[i] < 0 || !g->has_secret || r->count == GATE_REPLIES
        || (r->count && r->fd != b->fd[i]))
        return 0;
    /* all used: pl_gate_flush's draw failed (or plane_init's), and only a reply made flushes,
     * so the draw is tried again here (each reply made holds a copy of its nonce) */
    if (r->nonces_used == GATE_REPLIES
        && RAND_bytes(&r->nonces[0][0], sizeof r->nonces) == 1)
        r->nonces_used = 0;
    if (r->nonces_used == GATE_REPLIES)
        return 0;
    int k = r->count;
    if (!hs_cookie_reply(r->data[k], b->data[i], b->size[i], source, source_len,
                         r->nonces[r->nonces_used], &g->macs, g->cookie_key,
                         pl_chacha20_poly1305, r->ctx))
        return 0;
    r->nonces_used++;
    r->fd = b->fd[i];
    r->to[k] = b->addr[i];
    r->iov[k] = (struct iovec){r->data[k], HS_REPLY_SIZE};
    struct msghdr *h = &r->msgs[k].msg_hdr;
    memset(h, 0, sizeof *h);
    h->msg_name = &r->to[k].addr;
    h->msg_namelen = r->to[k].len;
    h->msg_iov = &r->iov[k];
    h->msg_iovlen = 1;
    h->msg_controllen = pl_sticky_source(&r->to[k], &r->control[k]);
    h->msg_control = h->msg_controllen ? r->control[k].buffer : NULL;
    r->count++;
    return 1;
}

/* The replies made, sent with sendmmsg (a full buffer drops the rest: a flood's answers
 * wait for nothing), what the kernel refused counted; fresh nonces for the next. */
void
pl_gate_flush(Plane *p, Replies *r)
{
    int done = 0;
    uint64_t failed = 0;
    while (done < r->count) {
        int sent = sendmmsg(r->fd, r->msgs + done, (unsigned)(r->count - done), MSG_DONTWAIT);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0) { /* this one refused (or a full buffer: all the rest) */
            int refused = sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)
                              ? r->count - done : 1;
            failed += (uint64_t)refused;
            done += refused;
            continue;
        }
        done += sent;
    }
    r->count = 0;
    if (failed) {
        pthread_mutex_lock(&p->gate_lock);
        p->gate.failed += failed;
        pthread_mutex_unlock(&p->gate_lock);
    }
    if (r->nonces_used && RAND_bytes(&r->nonces[0][0], sizeof r->nonces) == 1)
        r->nonces_used = 0; /* else gate_reply draws again when it has none left */
}

/* A handshake message (an initiation or a response by type and size) by the core's plan
 * (uspan.wg.verdict.Plan), as _gate.c's judge: punted to the core, dropped, or answered
 * with a cookie reply, and counted for the core's load and budgets (gate_take): a
 * handed-up initiation as it is punted, under gate_lock, so a collect takes the two
 * together. One the ring has no room for is counted apart (overflowed, for the core's
 * load: it then hears of a flood before it is handed the flood). The core is asked
 * once for a new plan (urgent news) when a budget runs out or the ring overflows, or
 * when a calm plan has dropped GATE_ASK_AFTER bad mac1s since the last collect. Without
 * a plan every one goes up. */
void
pl_gate_judge(Plane *p, Batch *b, int i)
{
    Gate *g = &p->gate;
    unsigned char source[HS_SOURCE_SIZE];
    int up = 1, handed = 0, ask = 0;
    pthread_mutex_lock(&p->gate_lock);
    if (g->on) {
        size_t source_len = hs_source_key(&b->addr[i].addr.sa, source);
        int verdict = hs_classify(b->data[i], b->size[i], source, source_len, &g->macs,
                                  g->under_load);
        if (verdict == HS_BAD_MAC1) {
            up = 0;
            ask = ++g->bad_mac1 >= GATE_ASK_AFTER && !g->under_load;
        } else if (verdict == HS_UNPROVEN
                   && !hs_in_lane(source, source_len, g->lane, g->lane_len)) {
            handed = g->hand_up > 0;
            if (!handed) {
                up = 0;
                if (g->cookies > 0 && gate_reply(p, b, i, source, source_len)) {
                    g->cookies_sent++;
                    ask = --g->cookies == 0;
                } else {
                    g->dropped++;
                    ask = 1;
                }
            }
        }
    }
    if (up && pl_punt(p, PUNT_UDP, NULL, b->data[i], b->size[i], &b->addr[i], b->fd[i], handed)) {
        if (handed) {
            g->handed++;
            ask = --g->hand_up == 0;
        }
    } else if (up && g->on) {
        g->overflowed++;
        ask = 1;
    }
    if (ask && !g->asked) {
        g->asked = 1;
        pthread_mutex_lock(&p->news_lock);
        pl_signal_news(p, 1);
        pthread_mutex_unlock(&p->news_lock);
    }
    pthread_mutex_unlock(&p->gate_lock);
    if (b->replies && b->replies->count == GATE_REPLIES)
        pl_gate_flush(p, b->replies);
}

/* The core's plan (see the binding's set_gate): what the gate judged since the last
 * collect counts against the new budgets. */
void
pl_gate_set(Plane *self, const unsigned char *mac1, const unsigned char *cookie,
         const unsigned char *secret, int under_load, long long hand_up, long long cookies,
         const unsigned char *lane, size_t lane_len)
{
    Gate *g = &self->gate;
    pthread_mutex_lock(&self->gate_lock);
    g->on = 1;
    g->under_load = under_load;
    memcpy(g->mac1_key, mac1, HS_KEY_SIZE);
    memcpy(g->cookie_key, cookie, HS_KEY_SIZE);
    g->has_secret = secret != NULL;
    if (g->has_secret)
        memcpy(g->secret, secret, HS_KEY_SIZE);
    else /* none fresh: the last one is not kept either */
        OPENSSL_cleanse(g->secret, sizeof g->secret);
    OPENSSL_cleanse(&g->macs, sizeof g->macs); /* the last keys' states */
    hs_macs_init(&g->macs, g->mac1_key, g->has_secret ? g->secret : NULL);
    g->hand_up = hand_up > (long long)g->handed ? hand_up - (long long)g->handed : 0;
    g->cookies = cookies > (long long)g->cookies_sent
                     ? cookies - (long long)g->cookies_sent : 0;
    memcpy(g->lane, lane, lane_len);
    g->lane_len = lane_len;
    g->asked = 0;
    pthread_mutex_unlock(&self->gate_lock);
}

/* No plan: every handshake message goes up, and the keys are cleansed. */
void
pl_gate_clear(Plane *self)
{
    Gate *g = &self->gate;
    pthread_mutex_lock(&self->gate_lock);
    g->on = g->has_secret = 0;
    OPENSSL_cleanse(g->mac1_key, sizeof g->mac1_key);
    OPENSSL_cleanse(g->cookie_key, sizeof g->cookie_key);
    OPENSSL_cleanse(g->secret, sizeof g->secret);
    OPENSSL_cleanse(&g->macs, sizeof g->macs);
    pthread_mutex_unlock(&self->gate_lock);
}

/* What the gate judged up to the last collect, since the last take. */
void
pl_gate_take(Plane *self, uint64_t taken[6])
{
    Gate *g = &self->gate;
    pthread_mutex_lock(&self->gate_lock);
    memcpy(taken, g->taken, sizeof g->taken);
    memset(g->taken, 0, sizeof g->taken);
    pthread_mutex_unlock(&self->gate_lock);
}
