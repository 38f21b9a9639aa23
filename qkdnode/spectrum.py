"""`qkdnode spectrum`: one sweep of a node's optical spectrum analyser, drawn to a PNG with the
DWDM channels labelled and the quantum channels marked, so that an operator sees at a glance
whether classical light reaches the quantum channel's notch.

Drawing needs matplotlib (the `plot` extra: `pip install 'qkdnode[plot]'`); the daemon does not.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from qkdnode.config import NodeConfig
from qkdnode.errors import DriverError
from qkdnode.interfaces import Trace, WdmChannel, itu_frequency_thz, load_driver, nm_to_thz, quantum_band_power

log = logging.getLogger("qkdnode.spectrum")

SAVED_MAX_AGE = 300.0  # seconds: an older sweep saved by the daemon is not drawn (the daemon is not polling)


async def spectrum_png(cfg: NodeConfig, *, osa: str | None, out: Path, sweep: bool = False) -> int:
    """`qkdnode spectrum`: the running daemon's latest sweep (devices.py saves it), or a sweep
    through the instrument itself when there is none or `sweep` is asked (the daemon may hold the
    instrument's only remote session: then stop it first). Prints one line per quantum channel."""
    osas = [(i, d) for i, d in enumerate(cfg.devices) if d.kind == "osa"]
    chosen = [(i, d) for i, d in osas if osa in (None, d.id)]
    if len(chosen) != 1:
        names = ", ".join(d.id for _, d in osas) or "none"
        log.error("%s: %s (spectrum analysers of node %s: %s)", cfg.file,
                  f"no spectrum analyser {osa!r}" if osa else "name one with --osa", cfg.node_id, names)
        return 2
    i, dev = chosen[0]
    saved = cfg.vault.path.parent / "spectrum" / f"{dev.id}.json"
    trace = channels = None
    if not sweep and saved.exists() and time.time() - saved.stat().st_mtime < SAVED_MAX_AGE:
        doc = json.loads(saved.read_text())
        trace = Trace(tuple(doc["trace"]["wavelengths_nm"]), tuple(doc["trace"]["powers_dbm"]))
        channels = [WdmChannel(**c) for c in doc["channels"]]
        source = f"the daemon's sweep of {time.strftime('%H:%M:%S', time.localtime(saved.stat().st_mtime))}"
    else:
        driver = load_driver(dev.driver, dev.settings, file=cfg.file, key=f"devices[{i}].driver")
        try:
            await driver.connect()
            trace = await driver.sweep(*dev.sweep_nm)
            channels = await driver.channels()
        except DriverError as exc:
            log.error("spectrum analyser %s: %s", dev.id, exc)
            return 1
        finally:
            await driver.close()
        source = "a sweep just now"
    quantum = draw(trace, channels, dev.quantum_channels, out, alarm_dbm=dev.quantum_alarm_dbm,
                   title=f"node {cfg.node_id}, {dev.id}: {source}")
    print(f"{out}: {len(channels)} DWDM channel(s) from {source}")
    for ch, power in sorted(quantum.items()):
        verdict = "ALARM: classical light" if power > dev.quantum_alarm_dbm else "dark"
        print(f"quantum channel {ch}: {power:.1f} dBm in band (alarm above {dev.quantum_alarm_dbm:g} dBm): {verdict}")
    return 0


def draw(trace: Trace, channels: Iterable[WdmChannel], quantum_channels: Iterable[int], out: Path, *,
         title: str = "", alarm_dbm: float | None = None) -> dict[int, float]:
    """Write the PNG; return the power found in each quantum channel's band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing the spectrum needs matplotlib: pip install 'qkdnode[plot]'") from None
    quantum = quantum_band_power(trace, list(quantum_channels), 50.0)
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    try:
        ax.plot(trace.wavelengths_nm, trace.powers_dbm, lw=0.8, color="#1f4e79", label="trace")
        low = min(trace.powers_dbm)
        for ch in channels:
            if ch.itu_channel is None:
                continue
            ax.annotate(f"C{ch.itu_channel}", (ch.centre_nm, ch.power_dbm), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7, color="#444444")
        for ch, power in quantum.items():
            f0 = itu_frequency_thz(ch)
            lo, hi = nm_to_thz(f0 + 0.05), nm_to_thz(f0 - 0.05)
            bad = alarm_dbm is not None and power > alarm_dbm
            ax.axvspan(lo, hi, color="#d62728" if bad else "#2ca02c", alpha=0.25)
            ax.annotate(f"quantum C{ch}\n{power:.1f} dBm",
                        ((lo + hi) / 2, low), xytext=(0, 10), textcoords="offset points", ha="center",
                        fontsize=8, color="#d62728" if bad else "#2ca02c")
        if alarm_dbm is not None:
            ax.axhline(alarm_dbm, ls="--", lw=0.8, color="#d62728", label=f"quantum-band alarm {alarm_dbm:g} dBm")
        ax.set_xlabel("wavelength (nm)")
        ax.set_ylabel("power (dBm)")
        ax.set_title(title or "optical spectrum")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return quantum
