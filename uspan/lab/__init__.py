"""``uspan lab``: a portable test mesh on one machine, in one command.

A lab is a set of network namespaces (a switch with K underlay networks, N node
namespaces, NAT routers), an embedded discovery service and N ``uspan run`` nodes (or
plain wireguard-go peers), all started in the background and recorded in the lab's own
directory, so that later commands (status, faults, ``down``) find exactly what it made.

Modules: ``plan`` (names and the address plan), ``record`` (the persistent record and the
lab directory), ``procs`` (detached, owned processes), ``privileges`` (what needs root),
``build`` (``up`` and ``down``), ``faults`` (cut, heal, netem, kill, start, discovery),
``wgo`` (wireguard-go nodes and the lab agent that publishes them), ``status`` (pair
states, ping, the matrix), ``cli`` (the commands).
"""
