"""The ETSI 014 Key container is written out by hand (qkdnode/api014.py): the same bytes as
aiohttp's json_response of the same object, for every kind of key_ID."""

import base64
import os

from aiohttp import web

from qkdnode.api014 import _key_container
from qkdnode.vault import new_key_id


def test_key_container_is_byte_for_byte_what_json_response_gives():
    cases = [
        [],
        [(new_key_id(), os.urandom(32))],
        [(new_key_id(), bytearray(os.urandom(n))) for n in (1, 2, 3, 128)],
        [('quote " and \\ backslash', b"\x00"), ("caf\u00e9 \u2603", os.urandom(5)), ("</script>\n", b"")],
    ]
    for keys in cases:
        want = web.json_response({"keys": [{"key_ID": k, "key": base64.b64encode(b).decode("ascii")}
                                           for k, b in keys]})
        got = _key_container(keys)
        assert got.body == want.body
        assert (got.status, got.content_type, got.charset) == (want.status, want.content_type, want.charset)
