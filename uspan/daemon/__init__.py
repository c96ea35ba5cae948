"""The uspan-wg daemon: the trio shell that connects the TUN, UDP and UAPI to the core."""
