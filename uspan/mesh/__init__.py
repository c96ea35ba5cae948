"""The sans-IO KubeSpan mesh: configuration, identity, addresses, peers, status, resources.

Everything here is pure: functions and small objects that take facts and ``now`` (the
monotonic clock) and return what to do. Only ``identity`` touches the filesystem.

How the node shell uses it:

Start
    ``config.parse_config`` the file; ``identity.load_or_create(state_dir)``;
    ``address.cluster_subnet`` and ``address.node_address`` (MAC from
    ``address.first_physical_mac``); a ``resources.Store`` with ``wall_offset`` = wall
    minus monotonic, read once; put the ``KUBESPAN_IDENTITY`` resource; a
    ``controller.PeerController``. Publish ``affiliate.encode_affiliate`` of
    ``affiliate.local_affiliate(...)`` through discovery, and again when addresses or the
    config change.

Loop (one task; each event gives an ``Output``)
    - discovery snapshot or update: ``decode_affiliate(data, affiliate_id)`` each
      (count and skip ``AffiliateDecodeError``), ``decode_endpoint`` the endpoint blobs
      per affiliate ID, then ``set_affiliates(all affiliates, observed, now)``;
    - the core's peer events (``Daemon.wait_peer_events``): ``set_facts`` with each
      peer's ``uspan.wg.facts.PeerFacts`` as ``status.LinkFacts`` (the core keeps the
      counts: attempts on the endpoint, last received, unanswered data);
    - ``Output.deadline`` reached: ``tick(now)``;
    - apply-config / SIGHUP: carry out ``config.diff_configs(old, new).actions``, then
      ``set_config(new, now)``.

    With each ``Output``: apply ``device_change`` to the core when it has peers; log
    ``warnings`` and ``transitions``; make the mesh routing table hold ``routes``;
    report ``observed`` to discovery (``encode_endpoint``, under ``affiliate_id``);
    sleep until ``deadline`` or the next event.

``uspan get``
    ``resources.resolve_type(name)``, ``Store.list``/``get``, ``format_resources``; for
    ``--watch``, ``Store.watch`` and ``format_events`` of each ``drain``. Refresh the
    peer facts (``set_facts``) before serving a read so counters are current.
"""
