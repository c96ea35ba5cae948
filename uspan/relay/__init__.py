"""The relay: forwards already-encrypted WireGuard datagrams between members of one
cluster when no direct path works (docs/relay-protocol.md)."""
