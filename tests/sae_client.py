"""A small ETSI GS QKD 014 client that knows only what testbed.json says: what an SAE vendor's
client would do. Used by the tests as the applications of the network."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import aiohttp


class SaeClient:
    def __init__(self, manifest: dict, sae: str):
        self.sae = sae
        entry = manifest["saes"][sae]
        self.base = manifest["nodes"][entry["node"]]["etsi014"] + "/api/v1/keys"
        ctx = ssl.create_default_context(cafile=manifest["ca"])
        ctx.load_cert_chain(entry["cert"], entry["key"])
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))

    @classmethod
    def from_file(cls, path: Path, sae: str) -> "SaeClient":
        return cls(json.loads(Path(path).read_text()), sae)

    def at(self, base: str) -> "SaeClient":
        """Point this SAE at another node's API (to test that nodes refuse foreign SAEs)."""
        self.base = base + "/api/v1/keys"
        return self

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _do(self, method: str, path: str, *, params=None, body=None, raw: bytes | None = None):
        kwargs = {"params": params}
        if raw is not None:
            kwargs.update(data=raw, headers={"Content-Type": "application/json"})
        elif body is not None:
            kwargs["json"] = body
        async with self._session.request(method, f"{self.base}/{path}", **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)

    async def status(self, slave: str):
        return await self._do("GET", f"{slave}/status")

    async def enc_keys(self, slave: str, number: int | None = None, size: int | None = None, *,
                       post: bool = False, **extra):
        if post:
            body = {k: v for k, v in (("number", number), ("size", size)) if v is not None}
            return await self._do("POST", f"{slave}/enc_keys", body={**body, **extra})
        params = {k: str(v) for k, v in (("number", number), ("size", size)) if v is not None}
        return await self._do("GET", f"{slave}/enc_keys", params={**params, **extra})

    async def dec_keys(self, master: str, key_ids: list[str], *, post: bool = True):
        if post:
            return await self._do("POST", f"{master}/dec_keys", body={"key_IDs": [{"key_ID": k} for k in key_ids]})
        assert len(key_ids) == 1
        return await self._do("GET", f"{master}/dec_keys", params={"key_ID": key_ids[0]})

    async def raw(self, method: str, path: str, data: bytes):
        return await self._do(method, path, raw=data)


def bits(answer: dict) -> dict[str, bytes]:
    """key_ID -> key bits of a key container."""
    return {k["key_ID"]: base64.b64decode(k["key"]) for k in answer["keys"]}
