/* WireGuard transport messages in C: the one definition of their layout, padding and
 * sealing that uspan/wg/_aead.c (the core's batch AEAD) and uspan/csrc/plane.h (the
 * data plane thread) both include, so the two seal byte for byte alike.
 *
 * Transport message: type 4 (u32 LE), receiver index (u32 LE), counter (u64 LE), then the
 * ciphertext of the plaintext zero-padded to a multiple of 16 (never beyond the MTU), and
 * a 16-byte tag. The nonce is 4 zero bytes and the counter (LE). No Python in here.
 */
#ifndef USPAN_TRANSPORT_H
#define USPAN_TRANSPORT_H

#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>

#define HEADER_SIZE 16
#define TAG_SIZE 16
#define KEY_SIZE 32
#define NONCE_SIZE 12
#define MSG_TRANSPORT 4

static inline void
put_le32(unsigned char *out, uint32_t value)
{
    for (int i = 0; i < 4; i++)
        out[i] = (unsigned char)(value >> (8 * i));
}

static inline void
put_le64(unsigned char *out, uint64_t value)
{
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(value >> (8 * i));
}

static inline uint64_t
get_le64(const unsigned char *in)
{
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--)
        value = (value << 8) | in[i];
    return value;
}

/* The same rule as uspan.wg.messages.padded_length. */
static inline size_t
padded_length(size_t length, size_t mtu)
{
    size_t padded = (length + 15) & ~(size_t)15;
    if (padded > mtu)
        padded = length > mtu ? length : mtu;
    return padded;
}

/* Encrypt ``body`` (``length`` bytes) in place and write the tag after it. */
static inline int
seal_one(EVP_CIPHER_CTX *ctx, const unsigned char *nonce, unsigned char *body, int length)
{
    int written;
    return EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, 1, NULL)
           && (length == 0 || EVP_EncryptUpdate(ctx, body, &written, body, length))
           && EVP_EncryptFinal_ex(ctx, body + length, &written)
           && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, body + length);
}

/* Decrypt one transport message (header, ``length`` bytes of ciphertext, tag) into
 * ``plain`` (which may be message + HEADER_SIZE); 0: bad tag. */
static inline int
open_one(EVP_CIPHER_CTX *ctx, const unsigned char *message, int length, unsigned char *plain)
{
    unsigned char nonce[NONCE_SIZE] = {0}, tag[TAG_SIZE];
    int written;
    memcpy(nonce + 4, message + 8, 8);
    memcpy(tag, message + HEADER_SIZE + length, TAG_SIZE);
    return EVP_CipherInit_ex2(ctx, NULL, NULL, nonce, 0, NULL)
           && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, tag)
           && (length == 0
               || EVP_DecryptUpdate(ctx, plain, &written, message + HEADER_SIZE, length))
           && EVP_DecryptFinal_ex(ctx, plain + length, &written) > 0;
}

/* An inner packet's routing address (destination, or source with `source`): its size
 * (4 or 16) and *address, or 0 if the packet is not a whole enough IP header to route
 * (the rule of Device.send and of the plane's route and source checks alike). */
static inline int
inner_address(const unsigned char *packet, size_t size, int source,
              const unsigned char **address)
{
    int version = size ? packet[0] >> 4 : 0;
    if (version == 4 && size >= 20) {
        *address = packet + (source ? 12 : 16);
        return 4;
    }
    if (version == 6 && size >= 40) {
        *address = packet + (source ? 8 : 24);
        return 16;
    }
    return 0;
}

#endif
