/* Handshake messages judged without the core (handshake.h). */
#include "handshake.h"

#include <netinet/in.h>
#include <string.h>
#include <openssl/crypto.h>

enum { MSG_INITIATION = 1, MSG_RESPONSE = 2, MSG_COOKIE_REPLY = 3 };

static const unsigned char zero_mac[HS_MAC_SIZE];

static uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void
put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* Keyed BLAKE2s with a 16-byte digest (RFC 7693), WireGuard's MAC. Here rather than
 * OpenSSL's BLAKE2SMAC: its EVP calls cost ~4,400 instructions a MAC, and the state after
 * the key's block is the same for every message under one key, so it is kept (``hs_keyed``)
 * and each message costs only its own blocks. */
static const uint32_t blake2s_iv[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                                       0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};
static const unsigned char blake2s_sigma[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

#define ROTR(v, n) (((v) >> (n)) | ((v) << (32 - (n))))
#define MIX(a, b, c, d, x, y)                                                            \
    do {                                                                                 \
        a += b + (x); d = ROTR(d ^ a, 16); c += d; b = ROTR(b ^ c, 12);                  \
        a += b + (y); d = ROTR(d ^ a, 8);  c += d; b = ROTR(b ^ c, 7);                   \
    } while (0)

static void
blake2s_compress(uint32_t h[8], const unsigned char block[64], uint64_t bytes, int last)
{
    uint32_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = le32(block + 4 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = blake2s_iv[i];
    }
    v[12] ^= (uint32_t)bytes;
    v[13] ^= (uint32_t)(bytes >> 32);
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 10; r++) {
        const unsigned char *s = blake2s_sigma[r];
        MIX(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        MIX(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        MIX(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        MIX(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        MIX(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        MIX(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        MIX(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        MIX(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
    OPENSSL_cleanse(m, sizeof m); /* a key's block, and the state a key gives */
    OPENSSL_cleanse(v, sizeof v);
}

/* The state after ``key`` (1-32 bytes) for 16-byte MACs. */
HS_API void
hs_key(hs_keyed *keyed, const unsigned char *key, size_t key_len)
{
    unsigned char block[64] = {0};
    memcpy(keyed->h, blake2s_iv, sizeof(keyed->h));
    keyed->h[0] ^= 0x01010000 ^ ((uint32_t)key_len << 8) ^ HS_MAC_SIZE;
    memcpy(block, key, key_len);
    blake2s_compress(keyed->h, block, 64, 0);
    OPENSSL_cleanse(block, sizeof block);
}

/* MAC(key, data) from the keyed state; ``len`` must not be 0 (the key's block would be
 * the last one then, and no MAC here is of nothing). */
HS_API void
hs_mac(const hs_keyed *keyed, const unsigned char *data, size_t len,
            unsigned char out[HS_MAC_SIZE])
{
    uint32_t h[8];
    unsigned char block[64] = {0};
    uint64_t bytes = 64;
    memcpy(h, keyed->h, sizeof(h));
    for (; len > 64; data += 64, len -= 64) {
        bytes += 64;
        blake2s_compress(h, data, bytes, 0);
    }
    memcpy(block, data, len);
    blake2s_compress(h, block, bytes + len, 1);
    for (int i = 0; i < 4; i++)
        put_le32(out + 4 * i, h[i]);
    OPENSSL_cleanse(h, sizeof h); /* began as the key's state */
}

HS_API void
hs_macs_init(hs_macs *macs, const unsigned char *mac1_key, const unsigned char *secret)
{
    macs->mac1_key = mac1_key;  /* NULL: only cookies are made with these */
    macs->secret_key = secret;
    macs->has_secret = secret != NULL;
    macs->keyed = 0;
}

static hs_macs *
macs_keyed(hs_macs *macs)
{
    if (!macs->keyed) {
        if (macs->mac1_key != NULL)
            hs_key(&macs->mac1, macs->mac1_key, HS_KEY_SIZE);
        if (macs->secret_key != NULL)
            hs_key(&macs->secret, macs->secret_key, HS_KEY_SIZE);
        macs->keyed = 1;
    }
    return macs;
}

/* Whether ``msg`` is an initiation or a response by its type and size: all a verdict
 * judges; everything else passes. */
HS_API int
hs_is_handshake(const unsigned char *msg, size_t len)
{
    return len >= 4 && !msg[1] && !msg[2] && !msg[3]
           && ((msg[0] == MSG_INITIATION && len == HS_INITIATION_SIZE)
               || (msg[0] == MSG_RESPONSE && len == HS_RESPONSE_SIZE));
}

/* The verdict on one datagram (see uspan.wg.verdict.classify_py, which it must match). */
HS_API int
hs_classify(const unsigned char *msg, size_t len, const unsigned char *source,
            size_t source_len, hs_macs *macs, int under_load)
{
    unsigned char mac[HS_MAC_SIZE], cookie[HS_MAC_SIZE];
    if (!hs_is_handshake(msg, len))
        return HS_PASS;
    macs_keyed(macs);
    hs_mac(&macs->mac1, msg, len - 2 * HS_MAC_SIZE, mac);
    if (CRYPTO_memcmp(mac, msg + len - 2 * HS_MAC_SIZE, HS_MAC_SIZE))
        return HS_BAD_MAC1;
    if (!under_load || msg[0] != MSG_INITIATION)
        return HS_PASS;
    if (!macs->has_secret || !memcmp(msg + len - HS_MAC_SIZE, zero_mac, HS_MAC_SIZE))
        return HS_UNPROVEN;
    hs_keyed cookie_keyed;
    hs_mac(&macs->secret, source, source_len, cookie);
    hs_key(&cookie_keyed, cookie, HS_MAC_SIZE);
    hs_mac(&cookie_keyed, msg, len - HS_MAC_SIZE, mac);
    int proven = !CRYPTO_memcmp(mac, msg + len - HS_MAC_SIZE, HS_MAC_SIZE);
    OPENSSL_cleanse(cookie, sizeof cookie); /* the cookie is mac2's key */
    OPENSSL_cleanse(&cookie_keyed, sizeof cookie_keyed);
    OPENSSL_cleanse(mac, sizeof mac);
    return proven ? HS_PROVEN : HS_UNPROVEN;
}

#define ROTL(v, n) (((v) << (n)) | ((v) >> (32 - (n))))
#define QUARTER(a, b, c, d)                                                              \
    do {                                                                                 \
        a += b; d ^= a; d = ROTL(d, 16); c += d; b ^= c; b = ROTL(b, 12);                \
        a += b; d ^= a; d = ROTL(d, 8);  c += d; b ^= c; b = ROTL(b, 7);                 \
    } while (0)

/* HChaCha20 (draft-irtf-cfrg-xchacha): the subkey of XChaCha20 from a key and the first
 * 16 bytes of the nonce. OpenSSL has no XChaCha20. */
static void
hchacha20(const unsigned char key[HS_KEY_SIZE], const unsigned char nonce[16],
          unsigned char out[HS_KEY_SIZE])
{
    uint32_t x[16] = {0x61707865, 0x3320646e, 0x79622d32, 0x6b206574};
    for (int i = 0; i < 8; i++)
        x[4 + i] = le32(key + 4 * i);
    for (int i = 0; i < 4; i++)
        x[12 + i] = le32(nonce + 4 * i);
    for (int i = 0; i < 10; i++) {
        QUARTER(x[0], x[4], x[8], x[12]);
        QUARTER(x[1], x[5], x[9], x[13]);
        QUARTER(x[2], x[6], x[10], x[14]);
        QUARTER(x[3], x[7], x[11], x[15]);
        QUARTER(x[0], x[5], x[10], x[15]);
        QUARTER(x[1], x[6], x[11], x[12]);
        QUARTER(x[2], x[7], x[8], x[13]);
        QUARTER(x[3], x[4], x[9], x[14]);
    }
    for (int i = 0; i < 4; i++) {
        put_le32(out + 4 * i, x[i]);
        put_le32(out + 16 + 4 * i, x[12 + i]);
    }
    OPENSSL_cleanse(x, sizeof x); /* the key, then the subkey */
}

/* The 64-byte cookie reply to initiation ``msg`` from ``source`` (whitepaper 5.4.7):
 * type 3, the initiator's sender index, the random ``nonce``, and the cookie
 * MAC(secret, source) sealed with XChaCha20-Poly1305 under ``cookie_key`` with the
 * message's mac1 as associated data. */
HS_API int
hs_cookie_reply(unsigned char reply[HS_REPLY_SIZE], const unsigned char *msg, size_t len,
                const unsigned char *source, size_t source_len,
                const unsigned char nonce[HS_NONCE_SIZE], hs_macs *macs,
                const unsigned char *cookie_key, const EVP_CIPHER *chacha20_poly1305,
                EVP_CIPHER_CTX *ctx)
{
    unsigned char cookie[HS_MAC_SIZE], subkey[HS_KEY_SIZE], iv[12] = {0};
    unsigned char *sealed = reply + 8 + HS_NONCE_SIZE;
    int written = 0;
    memset(reply, 0, 4);
    reply[0] = MSG_COOKIE_REPLY;
    memcpy(reply + 4, msg + 4, 4);
    memcpy(reply + 8, nonce, HS_NONCE_SIZE);
    if (!macs->has_secret || source_len == 0)
        return 0;
    hs_mac(&macs_keyed(macs)->secret, source, source_len, cookie);
    hchacha20(cookie_key, nonce, subkey);
    memcpy(iv + 4, nonce + 16, 8);
    int ok = EVP_EncryptInit_ex2(ctx, chacha20_poly1305, subkey, iv, NULL)
             && EVP_EncryptUpdate(ctx, NULL, &written, msg + len - 2 * HS_MAC_SIZE, HS_MAC_SIZE)
             && EVP_EncryptUpdate(ctx, sealed, &written, cookie, HS_MAC_SIZE)
             && written == HS_MAC_SIZE && EVP_EncryptFinal_ex(ctx, sealed + HS_MAC_SIZE, &written)
             && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, HS_MAC_SIZE, sealed + HS_MAC_SIZE);
    OPENSSL_cleanse(subkey, sizeof(subkey));
    OPENSSL_cleanse(cookie, sizeof(cookie));
    return ok;
}

/* The source key cookies are made for: IP bytes || port (big-endian). */
HS_API size_t
hs_source_key(const struct sockaddr *address, unsigned char out[HS_SOURCE_SIZE])
{
    if (address->sa_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)address;
        memcpy(out, &v4->sin_addr, 4);
        memcpy(out + 4, &v4->sin_port, 2);
        return 6;
    }
    const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)address;
    memcpy(out, &v6->sin6_addr, 16);
    memcpy(out + 16, &v6->sin6_port, 2);
    return 18;
}

/* Whether ``source`` is one of the lane's (the peers' endpoints): its mac2-less
 * initiations always go up, where the core's priority lane serves them. */
HS_API int
hs_in_lane(const unsigned char *source, size_t source_len, const unsigned char *lane,
           size_t lane_len)
{
    for (size_t at = 0; at + HS_LANE_RECORD <= lane_len; at += HS_LANE_RECORD)
        if (lane[at] == source_len && !memcmp(lane + at + 1, source, source_len))
            return 1;
    return 0;
}

