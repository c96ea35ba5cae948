/* uspan/csrc/handshake.c leaves no key on the stack (tests/unit/test_handshake_library.py).
 * A thread runs the gate's work on a stack of our own: keying the MACs, a verdict that
 * reaches the cookie (mac2 checked under load), a cookie reply. Then the stack is
 * searched for a half of any key it held: the mac1 key, the cookie key, the cookie
 * secret, the cookie, the cookie's keyed state, the reply's XChaCha20 subkey. Prints "ok",
 * or what it found where. Built at -O0, where every local lives on the stack, and with
 * -z now: a lazy binding's first call in the thread saves the vector registers on its
 * stack, which the new thread inherited from main's work on the same keys. */
#define _GNU_SOURCE
#include "../../uspan/csrc/handshake.c"

#include <openssl/rand.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define STACK_SIZE (256 * 1024)

static unsigned char mac1_key[HS_KEY_SIZE], cookie_key[HS_KEY_SIZE], secret[HS_KEY_SIZE];
static unsigned char nonce[HS_NONCE_SIZE], initiation[HS_INITIATION_SIZE];
static const unsigned char source[6] = {127, 0, 0, 1, 0x9c, 0x41};
static hs_macs macs; /* the caller's, not the stack's (the plane keeps it in its Gate) */
static EVP_CIPHER *cipher;
static EVP_CIPHER_CTX *ctx;
static int verdict = -1, made;

/* One step of the gate's work per thread, each on a fresh stack: the public calls, and
 * the parts whose stack a later part of the same call would overwrite. */
static void *
work(void *arg)
{
    unsigned char reply[HS_REPLY_SIZE], subkey[HS_KEY_SIZE];
    switch (*(const int *)arg) {
    case 0: /* keying the MACs (a verdict's first) */
        hs_macs_init(&macs, mac1_key, secret);
        macs_keyed(&macs);
        break;
    case 1: /* under load: mac2 checked against the cookie */
        verdict = hs_classify(initiation, sizeof initiation, source, sizeof source, &macs, 1);
        break;
    case 2:
        made = hs_cookie_reply(reply, initiation, sizeof initiation, source, sizeof source,
                               nonce, &macs, cookie_key, cipher, ctx);
        break;
    default: /* the reply's subkey (into the caller's buffer, which it cleanses) */
        hchacha20(cookie_key, nonce, subkey);
        OPENSSL_cleanse(subkey, sizeof subkey);
    }
    return NULL;
}

/* Either half of `key` on the stack: 1, and where, printed. */
static int
search(const unsigned char *stack, int step, const char *name, const void *key, size_t len)
{
    int found = 0;
    for (size_t half = 0; half < len; half += len / 2)
        for (size_t at = 0; at + len / 2 <= STACK_SIZE; at++)
            if (!memcmp(stack + at, (const unsigned char *)key + half, len / 2)) {
                printf("step %d: %s[%zu:] at %zu\n", step, name, half, at);
                found = 1;
            }
    return found;
}

int
main(void)
{
    cipher = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    ctx = EVP_CIPHER_CTX_new();
    if (!cipher || !ctx || RAND_bytes(mac1_key, sizeof mac1_key) != 1
        || RAND_bytes(cookie_key, sizeof cookie_key) != 1 || RAND_bytes(secret, sizeof secret) != 1
        || RAND_bytes(nonce, sizeof nonce) != 1 || RAND_bytes(initiation, sizeof initiation) != 1)
        return 2;
    memset(initiation, 0, 4);
    initiation[0] = MSG_INITIATION;
    hs_keyed keyed;
    hs_key(&keyed, mac1_key, sizeof mac1_key);
    hs_mac(&keyed, initiation, sizeof initiation - 2 * HS_MAC_SIZE,
           initiation + sizeof initiation - 2 * HS_MAC_SIZE); /* mac1 right, mac2 random */
    unsigned char cookie[HS_MAC_SIZE], subkey[HS_KEY_SIZE];
    hs_key(&keyed, secret, sizeof secret);
    hs_mac(&keyed, source, sizeof source, cookie);
    hs_keyed cookie_keyed;
    hs_key(&cookie_keyed, cookie, sizeof cookie);
    hchacha20(cookie_key, nonce, subkey);

    unsigned char *stack = aligned_alloc(4096, STACK_SIZE);
    int found = 0;
    for (int step = 0; step < 4; step++) {
        pthread_attr_t attr;
        pthread_t thread;
        if (!stack)
            return 2;
        memset(stack, 0, STACK_SIZE);
        if (pthread_attr_init(&attr) || pthread_attr_setstack(&attr, stack, STACK_SIZE)
            || pthread_create(&thread, &attr, work, &step) || pthread_join(thread, NULL))
            return 2;
        if (verdict != (step ? HS_UNPROVEN : -1) || made != (step >= 2)) {
            printf("step %d: verdict %d, reply made %d\n", step, verdict, made);
            return 1;
        }
        found |= search(stack, step, "mac1_key", mac1_key, sizeof mac1_key)
                 | search(stack, step, "cookie_key", cookie_key, sizeof cookie_key)
                 | search(stack, step, "secret", secret, sizeof secret)
                 | search(stack, step, "cookie", cookie, sizeof cookie)
                 | search(stack, step, "cookie_keyed", cookie_keyed.h, sizeof cookie_keyed.h)
                 | search(stack, step, "subkey", subkey, sizeof subkey);
    }
    if (!found)
        printf("ok\n");
    free(stack);
    return found;
}
