"""Instruments of the SIMT emulator (the ``simt`` backend), for CPU runs of the kernels.

- ``traffic()``: memory-traffic counters per kernel launch (see ``TrafficRow`` fields).
- The race detector and the emulated architecture are environment knobs read at every
  launch: ``MOE_KERNELS_SIMT_RACECHECK=1``, ``MOE_KERNELS_SIMT_ARCH=80|90|120``,
  ``MOE_KERNELS_SIMT_ORDER=forward|reverse|shuffle`` (README, "The SIMT emulator").
"""

import contextlib

from ._backend import native_module

SECTOR_BYTES = 32


def _with_derived(row):
    """Adds the figures that follow from the counters: bytes moved in whole sectors, the
    minimum (each distinct byte read once and written once) and their ratio."""
    row = dict(row)
    row["moved_bytes"] = SECTOR_BYTES * (row["sectors_read"] + row["sectors_written"])
    row["min_bytes"] = row["unique_bytes_read"] + row["unique_bytes_written"]
    row["amplification"] = row["moved_bytes"] / row["min_bytes"] if row["min_bytes"] else 0.0
    ideal = row["shared_ideal_wavefronts"]
    row["bank_conflict_factor"] = row["shared_wavefronts"] / ideal if ideal else 0.0
    return row


@contextlib.contextmanager
def traffic():
    """Counts the memory traffic of every emulated kernel launched inside the block.

    Yields a list that is filled, on exit, with one dict per launch: ``kernel``, ``grid``,
    ``block``; global memory: ``global_instructions`` (warp-level), ``global_bytes_read``/
    ``_written`` (what the threads asked for), ``sectors_read``/``_written`` (32-byte
    sectors touched, deduplicated per warp instruction as the GPU's coalescer does),
    ``unique_bytes_read``/``_written`` (distinct bytes), ``moved_bytes``, ``min_bytes``,
    ``amplification`` (moved / min); shared memory: ``shared_instructions``,
    ``shared_wavefronts`` and ``shared_ideal_wavefronts`` (bank conflicts add wavefronts),
    ``bank_conflict_factor`` and ``max_bank_conflict_ways``.

    Counting makes the emulator several times slower; it needs a build with the memory
    observer (not the AddressSanitizer build).
    """
    module = native_module("simt")
    rows = []
    module.traffic_begin()
    try:
        yield rows
    finally:
        rows.extend(_with_derived(r) for r in module.traffic_end())
