"""The appliance agent: self-check, identity, dial home, serve directory operations.

Module map (one concern each; plain logic separate from the thin asyncio layer;
no part holds the agent, each gets what it needs):

* ``cli`` — ``tether-agent run`` / ``selfcheck``. ``runner`` — :class:`Agent`, the
  composition root of the running agent: makes the parts below, wires them, runs them.
* Parts of the running agent: ``sockets`` (the pool of live links home, read by
  the drain, renewal, the updater and status), ``slots`` (one socket each: dial,
  heartbeats, TTL rotation; a :class:`SlotContext` with what they need),
  ``homedialer`` (open a socket with the instance or image credential, learn from
  hello), ``enrollment`` (instance id and certificate: enroll, renew),
  ``configapply`` (home's configuration applied: push, ack, channel settings),
  ``directories`` (the directory engine, loaded once a directory is configured),
  ``health`` (the self-check as the sockets update it), ``reports`` (hello,
  heartbeat and status bodies), ``updater`` (whole-image updates).
* Plain, unit-tested: ``selfcheck`` (figures → verdict), ``machine`` (DMI platform,
  machine fingerprint), ``backoff`` (full jitter, 60 s cap), ``channel`` (URL
  failover, socket TTL and drain), ``settings`` (agent.json + first-boot
  overrides), ``instancekeys`` (instance keys, CSR, certificate, renewal time),
  ``config`` (signed configuration, last good on disk; files replaced whole through
  ``tether.atomicfile``),
  ``bootslot`` (A/B slot decisions).
* I/O: ``dialer`` (websockets client: pinned TLS 1.3, proxy, hello), ``link``
  (one socket driven by ``tether.protocol.Session``), ``probes`` (DNS,
  reachability, clock skew), ``listening`` (own listening sockets via psutil),
  ``tlsctx``, ``sdnotify`` (:class:`SystemdNotifier`: sd_notify datagrams),
  ``journal`` (journald native protocol or stderr).
* ``tether-agent.service`` — the hardened systemd unit (package data).
* Owned elsewhere: ``directory/`` (LDAP/AD operations), ``firstboot`` (OVF/EC2
  first-boot settings).
"""
