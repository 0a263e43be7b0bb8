"""Named TPU slices and topologies for compiling without a TPU (`memagent-jax compile`).

A slice name `vXX-N` counts as Google Cloud does: for v4 and v5p, N is TensorCores (2 per chip:
v5p-32 = 16 chips); for v5e and v6e, N is chips (1 TensorCore each). tpu7x (Ironwood) is given as
a topology string of chips (`tpu7x:2x2x1` = 4 chips), or `tpu7x-N` with N chips. A topology
string names chips per dimension (`v5p:2x2x4`). The devices JAX sees are what libtpu's topology
says: one per chip on v5p (megacore), v5e and v6e; one per TensorCore on v4 and tpu7x.

Per-device HBM, peak bf16 FLOP/s and HBM bandwidth are the public per-chip figures divided by
the devices per chip (they feed the fit verdict and the step-time estimate).
"""

from __future__ import annotations

import dataclasses
import os
import re

from memagent_jax.errors import InputError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuKind:
    """One TPU generation: libtpu's name and per-chip figures."""

    name: str  # libtpu's topology prefix
    dims: int  # torus dimensions of a topology string
    cores_in_name: bool  # slice names count TensorCores (2 per chip), not chips
    hbm_gib_per_chip: float
    bf16_tflops_per_chip: float
    hbm_tbps_per_chip: float


KINDS: dict[str, TpuKind] = {
    "v4": TpuKind("v4", 3, True, 32.0, 275.0, 1.2),
    "v5p": TpuKind("v5p", 3, True, 95.74, 459.0, 2.765),
    "v5e": TpuKind("v5e", 2, False, 16.0, 197.0, 0.819),
    "v6e": TpuKind("v6e", 2, False, 32.0, 918.0, 1.64),
    "tpu7x": TpuKind("tpu7x", 3, False, 192.0, 4614.0, 7.37),
}

# chips -> the standard slice shape (chips per torus dimension)
_SHAPES_3D = {1: (1, 1, 1), 2: (1, 1, 2), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
              64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved compile target: the topology string, its chips and what each device has."""

    kind: TpuKind
    topology: str  # e.g. "v5p:2x2x4"
    chips: int
    devices: int  # as libtpu's topology lists them
    hbm_bytes: int  # per device
    peak_flops: float  # bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device


def known_names() -> str:
    """A one-line list of the accepted forms, for error messages."""
    return ("slice names v4-N, v5p-N (N TensorCores, 2 per chip), v5e-N, v6e-N, tpu7x-N (N chips), "
            "or topology strings KIND:AxBxC with KIND in " + ", ".join(KINDS))


def parse_topology(text: str) -> tuple[TpuKind, tuple[int, ...]]:
    """(kind, chips per dimension) of a slice name or topology string; InputError if unknown."""
    text = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    if m:
        kind = KINDS.get(m.group(1))
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if kind is None or len(shape) != kind.dims or min(shape) < 1:
            raise InputError(f"--topology {text!r} is not a known TPU topology", None,
                             f"use {known_names()} (e.g. v5p:2x2x4)")
        return kind, shape
    m = re.fullmatch(r"(v4|v5p|v5e|v6e|tpu7x)-(\d+)", text.replace("v5litepod", "v5e"))
    if not m:
        raise InputError(f"--topology {text!r} is not a known TPU slice or topology", None,
                         f"use {known_names()} (e.g. v5p-32)")
    kind, n = KINDS[m.group(1)], int(m.group(2))
    chips = n // 2 if kind.cores_in_name else n
    table = _SHAPES_3D if kind.dims == 3 else _SHAPES_2D
    if (kind.cores_in_name and n % 2) or chips not in table:
        sizes = sorted(c * (2 if kind.cores_in_name else 1) for c in table)
        raise InputError(f"--topology {text!r}: no standard {kind.name} slice of that size", None,
                         f"use one of {kind.name}-{sizes} or a topology string such as "
                         f"{kind.name}:{'x'.join(map(str, table[4 if 4 in table else 1]))}")
    return kind, table[chips]


def quiet_libtpu_env() -> None:
    """On a host without TPU chips, tells libtpu which (absent) slice it is on, so that loading
    it to fall back to CPU or to compile for a topology prints no warnings about the host; keeps
    any value already set. Must run before jax initialises its backends."""
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return  # a TPU VM: libtpu reads the real values
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # no chips to guard here: several processes (tests, compiles) may load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def load_target(text: str) -> tuple[Target, object]:
    """(Target, libtpu TopologyDescription) for a slice name or topology string. InputError when
    libtpu is missing (naming the package) or the topology is unknown."""
    kind, shape = parse_topology(text)
    topology = f"{kind.name}:{'x'.join(map(str, shape))}"
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise InputError("libtpu is not installed: compiling for a TPU needs it", None,
                         "pip install 'libtpu==0.0.42.*' (the version jax[tpu]==0.10.2 pins; "
                         "also in memagent-jax's [test] extra)") from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # libtpu's own words, e.g. an unsupported shape
        raise InputError(f"libtpu refused topology {topology!r}: {str(e).splitlines()[0][:200]}",
                         None, f"use {known_names()}") from None
    chips = 1
    for s in shape:
        chips *= s
    devices = len(desc.devices)
    per_chip = max(1, devices // chips)
    return Target(kind, topology, chips, devices,
                  int(kind.hbm_gib_per_chip * GIB / per_chip),
                  kind.bf16_tflops_per_chip * 1e12 / per_chip,
                  kind.hbm_tbps_per_chip * 1e12 / per_chip), desc
