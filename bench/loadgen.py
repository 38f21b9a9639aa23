"""Load generator for bench/api.py: N concurrent ETSI 014 clients with client certificates and
keep-alive, in a process of its own so that it does not share an event loop with a node.

    python -m bench.loadgen SPEC.json      (prints "start", "end", then one JSON document on stdout)

SPEC: {"mode": "enc" | "dec", "clients": N, "seconds": S, "warmup": W, "ca": PEM,
       "enc": {"url": BASE, "cert": PEM, "key": PEM},      # GET BASE/enc_keys?number=1&size=256
       "dec": {"url": BASE, "cert": PEM, "key": PEM}}      # mode "dec" only

mode "enc": each client asks enc_keys again and again. mode "dec": each client asks enc_keys as
the master SAE, then dec_keys at the slave's node as the slave SAE with the key_ID it got, and
checks that both answers hold the same bits; the dec_keys calls are the ones measured.
Latencies are from sending a request to reading its whole answer; answers other than 200 are
counted, not timed.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import sys
import time

import aiohttp


def _session(ca: str, side: dict, clients: int) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(side["cert"], side["key"])
    # One keep-alive connection per client, opened before the clock starts.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=clients, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=60))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _summary(latencies: list[float], elapsed: float, errors: dict[str, int]) -> dict:
    latencies.sort()
    n = len(latencies)

    def q(f: float) -> float | None:
        return round(latencies[min(n - 1, int(f * n))] * 1000, 3) if n else None

    return {"requests": n, "requests_per_s": round(n / elapsed, 1), "p50_ms": q(0.50), "p99_ms": q(0.99),
            "p999_ms": q(0.999), "max_ms": round(latencies[-1] * 1000, 3) if n else None, "errors": errors,
            "seconds": round(elapsed, 3)}


async def run(spec: dict) -> dict:
    clients, mode = spec["clients"], spec["mode"]
    enc = _session(spec["ca"], spec["enc"], clients)
    dec = _session(spec["ca"], spec["dec"], clients) if mode == "dec" else None
    enc_url = spec["enc"]["url"] + "/enc_keys?number=1&size=256"
    dec_url = spec["dec"]["url"] + "/dec_keys?key_ID=" if dec else ""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    mismatches = 0
    measuring = False
    stop = False

    def failed(what: str) -> None:
        if measuring:
            errors[what] = errors.get(what, 0) + 1

    warm = asyncio.Event()   # set once every client has its connection(s) open and answered
    answered = 0

    def done_one(first: list[bool]) -> None:
        nonlocal answered
        if first[0]:
            first[0] = False
            answered += 1
            if answered == clients:
                warm.set()

    async def client() -> None:
        nonlocal mismatches
        first = [True]
        while not stop:
            t0 = time.perf_counter()
            try:
                async with enc.get(enc_url) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failed(type(exc).__name__)
                await asyncio.sleep(0.01)
                continue
            if status != 200:
                failed(f"enc_keys {status}")
                await asyncio.sleep(0.001)
                continue
            if dec is None:
                if measuring:
                    latencies.append(time.perf_counter() - t0)
                done_one(first)
                continue
            key = json.loads(body)["keys"][0]
            t1 = time.perf_counter()
            try:
                async with dec.get(dec_url + key["key_ID"]) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failed(type(exc).__name__)
                continue
            if status != 200:
                failed(f"dec_keys {status}")
                continue
            if measuring:
                latencies.append(time.perf_counter() - t1)
                if json.loads(body)["keys"][0]["key"] != key["key"]:
                    mismatches += 1
            done_one(first)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    # Warm-up: its seconds, and at least until every client's TLS connections are open (a
    # handshake with a client certificate costs milliseconds of server CPU: not what is measured).
    await asyncio.sleep(spec.get("warmup", 1.0))
    try:
        await asyncio.wait_for(warm.wait(), 60)
    except asyncio.TimeoutError:
        pass
    print("start", flush=True)  # the bench samples the servers' CPU time at these two lines
    measuring, start, cpu0 = True, time.perf_counter(), _cpu()
    await asyncio.sleep(spec["seconds"])
    measuring, elapsed, cpu = False, time.perf_counter() - start, _cpu() - cpu0
    print("end", flush=True)
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await enc.close()
    if dec is not None:
        await dec.close()
    out = _summary(latencies, elapsed, errors)
    out["cpu_s"] = round(cpu, 3)
    if dec is not None:
        out["mismatches"] = mismatches
    return out


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    if spec.get("uvloop"):
        import uvloop
        uvloop.install()
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
