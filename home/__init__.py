"""tether-home: the reference control plane that agents dial into.

One process, state in one directory (SQLite + key files). Modules, one concern each:

``cli``       the ``tether-home`` command line (console script ``tether.home.cli:main``)
``admin``     operator actions on the state dir: init, connectors, image credentials,
              configuration versions, revocation
``paths``     names of every file in the state directory
``pki``       home's CA; server, image and short-lived instance certificates
``store``     all SQL (connectors, certs, images, instances, clones, configs, sockets)
``server``    ``serve``: websockets over TLS 1.3 with client certificates
``tlsconf``   the TLS context; logs refused handshakes with OpenSSL's reason
``gate``      certificate → identity (image or instance), revocation check
``peer``      one agent socket: asyncio loop around :class:`tether.protocol.Session`
``hub``       connected agents, request handlers (hello/enroll/renew/status),
              heartbeats, configuration push, and the in-process API
              (:meth:`Hub.request`, :meth:`Hub.stream`) for directory work
``enroll``    enrollment, clone policy, renewal
``control``   Unix socket in the state dir so admin commands reach the running server
``status``    the ``status`` report and its text rendering
``logs``      structured log lines (key=value or JSON)
``errors``    :class:`HomeError` and friends: protocol error codes with advice
"""
