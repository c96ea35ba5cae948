"""The discovery service and its client: a registry of sealed affiliate records per cluster.

Sans-IO parts: ``protocol`` (framing and messages), ``seal`` (what only members can read),
``proof`` (what only members can sign), ``store`` (state, limits, expiry), ``persist``
(log and snapshot). Trio parts: ``server``, ``client``, ``etcd`` (a shared backend).
The wire format is specified in docs/discovery-protocol.md.
"""
