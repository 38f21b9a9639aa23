"""`qkdnode spectrum`: one sweep of a node's optical spectrum analyser, drawn to a PNG with the
DWDM channels labelled and the quantum channels marked, so that an operator sees at a glance
whether classical light reaches the quantum channel's notch.

Drawing needs matplotlib (the `plot` extra: `pip install 'qkdnode[plot]'`); the daemon does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from qkdnode.interfaces import Trace, WdmChannel, itu_frequency_thz, nm_to_thz, quantum_band_power


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
