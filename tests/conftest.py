import asyncio
import urllib.request

import pytest

from hil.testbed import Testbed
from tests.sae_client import SaeClient


@pytest.fixture
async def network(tmp_path):
    """Start an emulated network (KME pair + nodes A and B as processes); yields a factory so a
    test can choose the link's key rate and the initial key in the KMEs."""
    started: list[Testbed] = []

    async def start(**kw) -> Testbed:
        tb = Testbed(tmp_path / f"net{len(started)}", **kw)
        started.append(tb)
        await tb.start()
        return tb

    yield start
    for tb in started:
        await tb.stop()


def scrape(url: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (no key material is ever in there)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def ready_keys(client: SaeClient, slave: str, count: int):
    """Wait until the node reports at least `count` keys of the default size ready toward `slave`."""
    async def check():
        status, body = await client.status(slave)
        return status == 200 and body["stored_key_count"] >= count and body
    return await wait_for(check)
