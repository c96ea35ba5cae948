"""The sans-IO KubeSpan mesh: configuration, identity, addresses, peers, status, resources.

Everything here is pure: functions and small objects that take facts and ``now`` (the
monotonic clock) and return what to do. Only ``identity`` touches the filesystem.
"""
