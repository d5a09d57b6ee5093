"""A faster receive path for bulk reads: search entries decoded straight to raw bytes.

Why: a full sync reads every entry of the directory, and ldap3's sync strategy
spends most of the follower's time on each entry after it arrives: a generic
BER decoder into nested tuples, then two dicts per entry (raw bytes and
unicode-decoded values, through a CaseInsensitiveDict and a config lookup per
attribute), while the engine only ever reads the raw bytes. With the strategy's
`raw_entries` set (see search.paged_search), `searchResEntry` messages are
parsed here in one pass into `{"type", "dn", "raw_dn", "raw_attributes"}`
(`attributes` is the same raw dict); every other message (results, references,
controls) goes through ldap3's own decoder, so results, cookies and errors are
unchanged. Range-split attributes (`member;range=0-1499`) keep their names here;
ranges.complete reads their other pages.

The receive loop also reads up to RECV_SIZE bytes per call (ldap3: 4096) and
splits messages from one buffer without re-slicing it per message.
"""

from __future__ import annotations

import socket

from ldap3.core.exceptions import LDAPSocketReceiveError, communication_exception_factory
from ldap3.strategy.sync import SyncStrategy
from ldap3.utils.asn1 import decode_message_fast
from ldap3.utils.conv import to_unicode

from ldap3.strategy.base import RESPONSE_COMPLETE, SESSION_TERMINATED_BY_SERVER

RECV_SIZE = 256 * 1024
_ENTRY_TAG = 0x64  # [APPLICATION 4] SearchResultEntry, constructed
_CONTINUE = ("searchResEntry", "searchResRef", "intermediateResponse")


def _length(buf, i: int) -> tuple[int, int]:
    """(length, offset of the value) of the BER length starting at buf[i]."""
    first = buf[i]
    if first < 0x80:
        return first, i + 1
    n = first & 0x7F
    return int.from_bytes(buf[i + 1:i + 1 + n], "big"), i + 1 + n


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return to_unicode(raw, from_server=True)


def parse_entry(msg: bytes, i: int) -> dict:
    """The SearchResultEntry whose [APPLICATION 4] tag is at msg[i], as ldap3's raw fields."""
    length, i = _length(msg, i + 1)
    # objectName LDAPDN (OCTET STRING)
    length, i = _length(msg, i + 1)
    raw_dn = msg[i:i + length]
    i += length
    # attributes PartialAttributeList (SEQUENCE OF)
    length, i = _length(msg, i + 1)
    end = i + length
    raw: dict[str, list[bytes]] = {}
    while i < end:
        length, j = _length(msg, i + 1)  # PartialAttribute SEQUENCE
        i = j + length
        length, j = _length(msg, j + 1)  # type (OCTET STRING)
        name = _text(msg[j:j + length])
        j += length
        length, j = _length(msg, j + 1)  # vals (SET OF OCTET STRING)
        stop = j + length
        values = []
        while j < stop:
            length, j = _length(msg, j + 1)
            values.append(msg[j:j + length])
            j += length
        raw[name] = values
    return {"type": "searchResEntry", "raw_dn": raw_dn, "dn": _text(raw_dn), "raw_attributes": raw,
            "attributes": raw}


class FastSyncStrategy(SyncStrategy):
    """ldap3's SyncStrategy; with `raw_entries` on, search entries take the fast path above."""

    raw_entries = False

    def _get_response(self, message_id, timeout):
        conn = self.connection
        if not self.raw_entries or conn.sasl_mechanism or not conn.fast_decoder:
            return super()._get_response(message_id, timeout)
        responses = []
        buf = b""
        while True:
            try:
                data = conn.socket.recv(RECV_SIZE)
            except (OSError, socket.error, AttributeError) as e:
                conn.last_error = "error receiving data: " + str(e)
                try:
                    self.close()
                except Exception:  # noqa: BLE001 - as ldap3: close quietly, raise the receive error
                    pass
                raise communication_exception_factory(LDAPSocketReceiveError, type(e)(str(e)))(conn.last_error)
            if not data:
                return SESSION_TERMINATED_BY_SERVER
            buf = buf + data if buf else data
            pos, size = 0, len(buf)
            while size - pos >= 2:
                first = buf[pos + 1]
                if first >= 0x80 and size - pos < 2 + (first & 0x7F):
                    break  # the length itself is not complete yet
                length, start = _length(buf, pos + 1)
                end = start + length
                if end > size:
                    break
                msg = buf[pos:end]
                pos = end
                response = self._decode(msg)
                if response is None:
                    return SESSION_TERMINATED_BY_SERVER
                msg_id, decoded = response
                if msg_id != message_id:
                    conn.last_error = "invalid messageId received"
                    raise LDAPSocketReceiveError(conn.last_error)
                responses.append(decoded)
                if decoded["type"] not in _CONTINUE:
                    responses.append(RESPONSE_COMPLETE)
                    return responses
            buf = buf[pos:]

    def _decode(self, msg: bytes):
        """(messageID, response dict) of one whole LDAPMessage; None for a notice of disconnection."""
        _, i = _length(msg, 1)  # LDAPMessage SEQUENCE
        length, j = _length(msg, i + 1)  # messageID INTEGER
        msg_id = int.from_bytes(msg[j:j + length], "big")
        i = j + length
        if msg[i] == _ENTRY_TAG:
            return msg_id, parse_entry(msg, i)
        ldap_resp = decode_message_fast(msg)
        decoded = self.decode_response_fast(ldap_resp)
        if ldap_resp["messageID"] == 0:  # unsolicited notification (RFC 4511 4.4)
            if decoded.get("responseName") == "1.3.6.1.4.1.1466.20036":
                return None
            raise LDAPSocketReceiveError("unknown unsolicited notification from server")
        return ldap_resp["messageID"], decoded


def install(conn) -> None:
    """Give a SYNC connection the fast receive path (off until a caller sets `raw_entries`)."""
    if type(conn.strategy) is SyncStrategy:
        conn.strategy.__class__ = FastSyncStrategy

