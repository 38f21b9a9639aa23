"""A small reference SDN controller for qkdnode's SDN agents (docs/sdn.md).

It uses nothing but the agents' interface: HTTPS with its own client certificate (the
manifest's "controller" identity), the ETSI GS QKD 015 node model at
SDN_URL/restconf/data/etsi-qkd-sdn-node:qkd_node, RESTCONF POST and DELETE of qkd_link entries,
and the notification stream (server-sent events). It never sees a key.

    async with Controller.from_manifest("demo-work/testbed.json") as ctl:
        topo = await ctl.topology()                      # every node's model, by node name
        link = await ctl.create_link("A", "C")           # a direct CV link through the switches
        await ctl.wait_link_status("A", link["qkdl_id"], "ACTIVE")
        await ctl.delete_link("A", link["qkdl_id"])

From a shell, against a running `qkdnode demo`:

    python -m hil.controller --manifest demo-work/testbed.json nodes
    python -m hil.controller --manifest demo-work/testbed.json link A C [--wait]
    python -m hil.controller --manifest demo-work/testbed.json unlink A QKDL_ID
    python -m hil.controller --manifest demo-work/testbed.json events A
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

MODULE = "etsi-qkd-sdn-node"
T = "etsi-qkdn-types:"
NODE_PATH = f"/restconf/data/{MODULE}:qkd_node"
STREAM_PATH = f"/restconf/streams/{MODULE}/json"


class SdnError(Exception):
    """An agent refused or failed a request; `status`, `tag` and the message are its RESTCONF error."""

    def __init__(self, status: int, tag: str, message: str):
        super().__init__(f"HTTP {status} {tag}: {message}")
        self.status, self.tag, self.message = status, tag, message


class Controller:
    def __init__(self, nodes: dict[str, str], ca: Path, cert: Path, key: Path):
        self.nodes = dict(nodes)                    # node name -> SDN base URL
        self._ssl = ssl.create_default_context(cafile=str(ca))
        self._ssl.load_cert_chain(str(cert), str(key))
        self._session: aiohttp.ClientSession | None = None
        self.qkdn_ids: dict[str, str] = {}          # node name -> its qkdn_id, learned from its model

    @classmethod
    def from_manifest(cls, manifest: dict | str | Path) -> "Controller":
        m = manifest if isinstance(manifest, dict) else json.loads(Path(manifest).read_text())
        nodes = {name: n["sdn"] for name, n in m["nodes"].items() if n.get("sdn")}
        return cls(nodes, Path(m["ca"]), Path(m["controller"]["cert"]), Path(m["controller"]["key"]))

    async def __aenter__(self) -> "Controller":
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- reading

    async def model(self, node: str) -> dict:
        """The node's qkd_node container."""
        body = await self._call("GET", node, NODE_PATH)
        qkd_node = body[f"{MODULE}:qkd_node"]
        self.qkdn_ids[node] = qkd_node["qkdn_id"]
        return qkd_node

    async def topology(self) -> dict[str, dict]:
        names = list(self.nodes)
        models = await asyncio.gather(*(self.model(n) for n in names))
        return dict(zip(names, models))

    async def link(self, node: str, qkdl_id: str) -> dict:
        body = await self._call("GET", node, f"{NODE_PATH}/qkd_links/qkd_link={qkdl_id}")
        return body[f"{MODULE}:qkd_link"][0]

    def node_of(self, qkdn_id: str) -> str | None:
        return next((n for n, q in self.qkdn_ids.items() if q == qkdn_id), None)

    async def spare_pairs(self) -> list[tuple[str, str]]:
        """Pairs of nodes with a spare CV-QKD module each and no link between them yet: where
        a switched link could be made (the agents decide whether it can)."""
        topo = await self.topology()
        spare = {n: [i for i in m["qkd_interfaces"]["qkd_interface"] if "qkdi_att_point" in i
                     and "qkdnode:link" not in i] for n, m in topo.items()}
        joined = {(n, self.node_of(link["qkdl_remote"]["qkdn_id"])) for n, m in topo.items()
                  for link in m["qkd_links"]["qkd_link"] if link["qkdl_type"] == T + "PHYS"}
        out = []
        for a in topo:
            for b in topo:
                if a < b and spare[a] and spare[b] and (a, b) not in joined:
                    roles = {i["qkdi_capabilities"]["role_support"] for i in spare[a] + spare[b]}
                    if {T + "TRANSMITTER", T + "RECEIVER"} <= roles:
                        out.append((a, b))
        return out

    # -- changing

    async def create_link(self, local: str, remote: str, *, qkdl_id: str | None = None,
                          local_qkdi_id: int | None = None, remote_qkdi_id: int | None = None,
                          wavelength: int | None = None) -> dict:
        """Ask node `local` to make a direct (switched) link to node `remote`; returns the new
        qkd_link entry (status PENDING until its pool fills). SdnError if refused."""
        for n in (local, remote):
            if n not in self.qkdn_ids:
                await self.model(n)
        entry: dict[str, Any] = {
            "qkdl_id": qkdl_id or str(uuid.uuid4()), "qkdl_type": T + "PHYS",
            "qkdl_local": {"qkdn_id": self.qkdn_ids[local]}, "qkdl_remote": {"qkdn_id": self.qkdn_ids[remote]}}
        if local_qkdi_id is not None:
            entry["qkdl_local"]["qkdi_id"] = local_qkdi_id
        if remote_qkdi_id is not None:
            entry["qkdl_remote"]["qkdi_id"] = remote_qkdi_id
        if wavelength is not None:
            entry["phys_wavelength"] = str(wavelength)
        body = await self._call("POST", local, f"{NODE_PATH}/qkd_links", {f"{MODULE}:qkd_link": [entry]})
        return body[f"{MODULE}:qkd_link"][0]

    async def delete_link(self, node: str, qkdl_id: str) -> None:
        await self._call("DELETE", node, f"{NODE_PATH}/qkd_links/qkd_link={qkdl_id}")

    # -- notifications

    async def events(self, node: str, last_id: int | None = None,
                     opened: asyncio.Event | None = None) -> AsyncIterator[tuple[str, dict]]:
        """(name, body) of each notification the node sends, as they come (server-sent events).
        `opened` is set once the node has accepted the stream: what happens after, we see."""
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        async with self._session.get(self.nodes[node] + STREAM_PATH, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
            if resp.status != 200:
                raise SdnError(resp.status, "stream", await resp.text())
            if opened is not None:
                opened.set()
            name, data = "message", []
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    continue
                if not line:
                    if data:
                        note = json.loads("\n".join(data))["ietf-restconf:notification"]
                        yield name, note.get(f"{MODULE}:{name}", {})
                    name, data = "message", []
                    continue
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "event":
                    name = value
                elif key == "data":
                    data.append(value)

    async def wait_link_status(self, node: str, qkdl_id: str, status: str, timeout: float = 60.0) -> dict:
        """Until node `node` says link `qkdl_id` has `status` (ACTIVE, PENDING, PASSIVE): from its
        notifications, after one look at the model for a status reached before we listened."""
        want = status if status.startswith(T) else T + status
        queue: asyncio.Queue = asyncio.Queue()
        opened = asyncio.Event()

        async def pump() -> None:
            async for item in self.events(node, opened=opened):
                await queue.put(item)

        async def watch() -> dict:
            await opened.wait()
            current = await self.link(node, qkdl_id)
            if current["qkdl_status"] == want:
                return current
            while True:
                _, body = await queue.get()
                if body.get("qkdl_id") == qkdl_id and body.get("qkdl_status") == want:
                    return body.get("qkd_link") or body

        task = asyncio.create_task(pump())
        try:
            waiting = asyncio.ensure_future(asyncio.wait_for(watch(), timeout))
            await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():       # the stream ended or failed first
                waiting.cancel()
                task.result()
                raise SdnError(0, "stream", f"node {node} ended its notification stream")
            return waiting.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- plumbing

    async def _call(self, method: str, node: str, path: str, body: dict | None = None) -> dict:
        async with self._session.request(method, self.nodes[node] + path, json=body,
                                         timeout=aiohttp.ClientTimeout(total=90)) as resp:
            text = await resp.text()
            answer = json.loads(text) if text else {}
            if resp.status >= 400:
                errors = answer.get("ietf-restconf:errors", {}) if isinstance(answer, dict) else {}
                err = (errors.get("error") or [{}])[0]
                raise SdnError(resp.status, err.get("error-tag", "?"), err.get("error-message", text[:300]))
            return answer


async def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil.controller", description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="demo-work/testbed.json")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("nodes", help="each node's interfaces and links")
    p = sub.add_parser("link", help="make a direct switched link between two nodes")
    p.add_argument("local")
    p.add_argument("remote")
    p.add_argument("--wait", action="store_true", help="until the link is ACTIVE (its pool filled)")
    p = sub.add_parser("unlink", help="delete a switched link")
    p.add_argument("node")
    p.add_argument("qkdl_id")
    p = sub.add_parser("events", help="print a node's notifications until Ctrl-C")
    p.add_argument("node")
    args = ap.parse_args(argv)
    async with Controller.from_manifest(args.manifest) as ctl:
        try:
            if args.cmd == "nodes":
                for name, m in (await ctl.topology()).items():
                    print(f"node {name} ({m['qkdn_id']})")
                    for i in m["qkd_interfaces"]["qkd_interface"]:
                        at = i.get("qkdi_att_point")
                        where = f" at {at['device']} port {at['port']}" if at else ""
                        print(f"  interface {i['qkdi_id']}: {i['qkdi_type'].removeprefix(T)} {i['qkdi_model']} "
                              f"{i['qkdi_status'].removeprefix(T)}{where}")
                    for link in m["qkd_links"]["qkd_link"]:
                        print(f"  link {link.get('qkdnode:link_id', link['qkdl_id'])} to "
                              f"{ctl.node_of(link['qkdl_remote']['qkdn_id'])}: {link['qkdl_type'].removeprefix(T)} "
                              f"{link['qkdl_status'].removeprefix(T)}")
            elif args.cmd == "link":
                link = await ctl.create_link(args.local, args.remote)
                print(json.dumps(link, indent=1))
                if args.wait:
                    await ctl.wait_link_status(args.local, link["qkdl_id"], "ACTIVE", timeout=600)
                    print(f"link {link['qkdl_id']} is ACTIVE")
            elif args.cmd == "unlink":
                await ctl.delete_link(args.node, args.qkdl_id)
                print(f"link {args.qkdl_id} deleted")
            else:
                async for name, body in ctl.events(args.node):
                    print(name, json.dumps(body), flush=True)
        except SdnError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(_main(sys.argv[1:])))
    except KeyboardInterrupt:
        sys.exit(130)
