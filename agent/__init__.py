"""The appliance agent: self-check, identity, dial home, serve directory operations.

Module map (one concern each; plain logic separate from the thin asyncio layer):

* ``cli`` — ``tether-agent run`` / ``selfcheck``; ``service`` — the running agent
  (enrollment, socket slots with TTL rotation, heartbeats, renewal, watchdog).
* Plain, unit-tested: ``selfcheck`` (figures → verdict), ``machine`` (DMI platform,
  machine fingerprint), ``backoff`` (full jitter, 60 s cap), ``channel`` (URL
  failover, socket TTL and drain), ``settings`` (agent.json + first-boot
  overrides), ``identity`` (instance keys, CSR, certificate, renewal time),
  ``config`` (signed configuration, last good on disk), ``atomicfile``.
* I/O: ``dialer`` (websockets client: pinned TLS 1.3, proxy, hello), ``link``
  (one socket driven by ``tether.protocol.Session``), ``probes`` (DNS,
  reachability, clock skew), ``listening`` (own listening sockets via psutil),
  ``tlsctx``, ``sdnotify`` (sd_notify datagrams), ``journal`` (journald native
  protocol or stderr).
* ``tether-agent.service`` — the hardened systemd unit (package data).
* Owned elsewhere: ``directory/`` (LDAP/AD operations), ``firstboot`` (OVF/EC2
  first-boot settings).
"""
