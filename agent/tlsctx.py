"""TLS for the channel: TLS 1.3 only, home's CA as the *only* trust anchor.

The system trust store is never loaded, so a certificate from any public CA (or
a corporate TLS-inspecting proxy) cannot impersonate home; the client
certificate is the image credential until enrollment, the instance one after.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Pinned, mutually authenticated TLS 1.3 client context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode=CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise FileNotFoundError(f"home's CA {ca_file} unreadable ({exc}): the image "
                                "credential is incomplete, rebuild or pass --etc") from None
    try:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise FileNotFoundError(f"client certificate {cert_file} / key {key_file} "
                                f"unusable: {exc}") from None
    return ctx
