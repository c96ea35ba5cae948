"""The sans-IO WireGuard core: pure state machines that take bytes and a clock.

Nothing in this package opens a socket, starts a task or reads the wall clock;
``now`` (monotonic seconds) is always passed in by the caller.
"""
