"""Protocol constants from the WireGuard whitepaper, section 5 and 6."""

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Message types and exact sizes.
MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
AEAD_TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE  # a keepalive
KEY_SIZE = 32
ZERO_KEY = bytes(KEY_SIZE)  # "no key": an unset preshared key, a removed private key
TAI64N_SIZE = 12
MAC_SIZE = 16

# Timers and limits (seconds / messages).
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020  # minimum spacing of accepted initiations per peer
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
# Initiator rekeys on receive when its current key is older than this.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
# All keys of a peer are zeroed when no new session came for this long.
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3  # 540 s

# Bounded queue of packets waiting for a session (the kernel keeps 128 per peer).
MAX_STAGED_PACKETS = 128

# Handshake rate limiting per source IP (wireguard-go/kernel: 20/s, burst 5).
HANDSHAKES_PER_SECOND = 20
HANDSHAKE_BURST = 5
# Handshake messages per second above which the device is "under load": it then answers
# initiations and responses without a valid mac2 with a cookie reply, and rate-limits
# each source IP. Counted over time, not per batch, so other traffic mixed into the
# batches cannot hide a flood. 1000/s of full handshakes is ~16% of a core here.
UNDER_LOAD_RATE = 1000
UNDER_LOAD_AFTER = 1.0  # stay under load this long after the last overload
# Under load, a message without a valid mac2 gets work only if its source (address and
# port) sent none in the last SOURCE_INTERVAL (a real initiator retries every
# REKEY_TIMEOUT), and then within global budgets: a full handshake (about 0.2 ms here)
# while UNPROVEN_PER_SECOND allows, else a cookie reply while COOKIES_PER_SECOND allows.
# A cookie costs the shell ~35 us of Python here (read, check, seal, send): 16,000/s is
# about half a core, and each one is a spoofed flood's new peer's chance (16,000/rate).
# The cookie budget yields to the tunnels (uspan.wg.admission): COOKIES_PER_SECOND while
# they are idle, falling in proportion to their transport messages (accepted and sent) to
# MIN_COOKIES_PER_SECOND at TUNNEL_YIELD_RATE a second (~230 Mbit/s of full packets, an
# eighth of the loop at ~6.5 us a message).
SOURCE_INTERVAL = REKEY_TIMEOUT
UNPROVEN_PER_SECOND = 50
COOKIES_PER_SECOND = 16000
# Answered in C where the shell reads there (uspan.daemon.gate): ~8 us a cookie with its
# read and send, so this many cost at most about 0.6 of a core (wireguard-go spends a
# whole one on a flood).
BULK_COOKIES_PER_SECOND = 80000
MIN_COOKIES_PER_SECOND = 1000
TUNNEL_YIELD_RATE = 20000

# Replay window (RFC 6479): 8192-bit bitmap, 8128 usable.
REPLAY_BITMAP_BITS = 8192
REPLAY_WINDOW = REPLAY_BITMAP_BITS - 64

DEFAULT_MTU = 1420
