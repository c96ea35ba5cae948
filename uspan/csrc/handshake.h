/* Handshake messages judged without the core: mac1, mac2 against the cookie secret, the
 * priority lane, and the cookie reply (WireGuard whitepaper 5.4.4-5.4.7).
 *
 * Why a library: a flood of initiations is judged where the socket is read, which is the
 * gated read (uspan/daemon/_gate.c, behind uspan.daemon.gate) in the trio path and the
 * data-plane thread (uspan/csrc/plane_gate.c) otherwise; both must give the verdict of
 * uspan.wg.verdict.classify_py. Nothing here touches a Python object, allocates or keeps
 * global state (the thread never takes the GIL); the cipher for cookie replies is the
 * caller's. Compiled into each extension that lists it, with hidden visibility.
 */
#ifndef USPAN_HANDSHAKE_H
#define USPAN_HANDSHAKE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <openssl/evp.h>

#if defined(__GNUC__)
#define HS_API __attribute__((visibility("hidden")))
#else
#define HS_API
#endif

#define HS_INITIATION_SIZE 148
#define HS_RESPONSE_SIZE 92
#define HS_MAC_SIZE 16
#define HS_KEY_SIZE 32
#define HS_NONCE_SIZE 24
#define HS_REPLY_SIZE 64
#define HS_SOURCE_SIZE 18 /* the longest source key: IPv6 address || port */
#define HS_LANE_RECORD 19 /* the key's length, then the key zero-padded to 18 */

/* Verdicts (uspan.wg.verdict): pass to the core, bad mac1, proven (a valid mac2 under
 * load), unproven (under load, an initiation without a valid mac2). */
enum { HS_PASS = 0, HS_BAD_MAC1 = 1, HS_PROVEN = 2, HS_UNPROVEN = 3 };

/* BLAKE2s with a 16-byte digest after a key's block (WireGuard's MAC): the state after
 * the key is the same for every message under it, so it is kept. */
typedef struct {
    uint32_t h[8];
} hs_keyed;

/* The keys of a verdict, keyed on first use (most reads carry no handshake message):
 * mac1's and the cookie secret's (none when there is none fresh). */
typedef struct {
    const unsigned char *mac1_key, *secret_key;
    hs_keyed mac1, secret;
    int has_secret, keyed;
} hs_macs;

HS_API void hs_key(hs_keyed *keyed, const unsigned char *key, size_t key_len);
HS_API void hs_mac(const hs_keyed *keyed, const unsigned char *data, size_t len,
                   unsigned char out[HS_MAC_SIZE]);
/* ``mac1_key`` may be NULL (cookies only), ``secret`` NULL (none fresh); both are read
 * only when first needed and must outlive ``macs``. */
HS_API void hs_macs_init(hs_macs *macs, const unsigned char *mac1_key,
                         const unsigned char *secret);
/* Whether ``msg`` is an initiation or a response by its type and size. */
HS_API int hs_is_handshake(const unsigned char *msg, size_t len);
/* The verdict on ``msg`` from ``source`` (its source key, hs_source_key). */
HS_API int hs_classify(const unsigned char *msg, size_t len, const unsigned char *source,
                       size_t source_len, hs_macs *macs, int under_load);
/* The source key cookies are made for: IP bytes || port (big-endian); 6 or 18 bytes. */
HS_API size_t hs_source_key(const struct sockaddr *address,
                            unsigned char out[HS_SOURCE_SIZE]);
/* Whether ``source`` is among the lane's records. */
HS_API int hs_in_lane(const unsigned char *source, size_t source_len,
                      const unsigned char *lane, size_t lane_len);
/* The 64-byte cookie reply to initiation ``msg`` from ``source``, with the random
 * ``nonce``, sealed with ``chacha20_poly1305`` in ``ctx``; 0 when it cannot be made (no
 * secret, no source, an OpenSSL failure). */
HS_API int hs_cookie_reply(unsigned char reply[HS_REPLY_SIZE], const unsigned char *msg,
                           size_t len, const unsigned char *source, size_t source_len,
                           const unsigned char nonce[HS_NONCE_SIZE], hs_macs *macs,
                           const unsigned char *cookie_key, const EVP_CIPHER *chacha20_poly1305,
                           EVP_CIPHER_CTX *ctx);

#endif
