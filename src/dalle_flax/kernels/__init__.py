"""Native CPU kernels, compiled for the host on first use and called through the XLA FFI.

Example::

  from dalle_flax import kernels
  if kernels.small_matmul_available():
    y = kernels.small_batch_dot_general(x, w, (((1,), (0,)), ((), ())))

One kernel so far: ``small_matmul.cc``, a float32 ``(M, K) @ (K, N)`` for 1 <= M <= 16 rows, the
shape of every Dense layer in a decode step. XLA:CPU runs these through Eigen's GEMM, which
packs the weights first and reads them at about half the machine's bandwidth; the kernel
streams each weight row once for all rows (1.5-2x faster at 2-8 rows on a 2-core x86 VM).

Building: the first call compiles the source with the system C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against ``jax.ffi.include_dir()``, ``-O3 -march=native``, into
``$DALLE_FLAX_KERNEL_CACHE`` (default ``~/.cache/dalle_flax/kernels``), keyed by a hash of the
source, jaxlib version, compiler, flags and CPU, written to a temp file and renamed. Later
processes load the cached library. If anything fails (no compiler, no headers), a warning says
why once and :func:`small_batch_dot_general` is plain ``lax.dot_general``: results are the same
up to float rounding, only slower. ``DALLE_FLAX_NATIVE_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_ROWS",
    "build_small_matmul",
    "native_kernels_enabled",
    "small_batch_dot_general",
    "small_matmul",
    "small_matmul_available",
]

logger = logging.getLogger(__name__)

TARGET = "dalle_flax_small_matmul"
SYMBOL = "DalleFlaxSmallMatmul"
SOURCE = Path(__file__).with_name("small_matmul.cc")
# Rows up to which the kernel beats XLA's GEMM (measured: 2-16 rows faster, 32 rows even).
MAX_ROWS = 16
ENV_SWITCH = "DALLE_FLAX_NATIVE_KERNELS"
ENV_CACHE = "DALLE_FLAX_KERNEL_CACHE"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "available": bool, "reason": str, "path": Path


def native_kernels_enabled() -> bool:
  """False when ``DALLE_FLAX_NATIVE_KERNELS`` is 0/false/no/off."""
  return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
  if os.environ.get(ENV_CACHE):
    return Path(os.environ[ENV_CACHE]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "dalle_flax" / "kernels"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_fingerprint() -> str:
  """Machine, and on Linux the CPU flags: ``-march=native`` code must not run on another CPU."""
  text = platform.machine() + platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith(("flags", "Features", "model name")):
          text += line
        if line.strip() == "":
          break  # the first processor is enough
  except OSError:
    pass
  return text


def build_small_matmul(cache_dir: Path | None = None, compiler: str | None = None) -> Path:
  """Compiles ``small_matmul.cc`` (or finds it in the cache) and returns the library path.

  Raises:
    RuntimeError: no compiler, or the compiler failed (its output is in the message).
  """
  compiler = compiler or _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
  include = jax.ffi.include_dir()
  import jaxlib

  source = SOURCE.read_bytes()
  attempts = [(*_FLAGS, "-march=native"), _FLAGS]  # -march=native is not supported everywhere
  cache_dir = Path(cache_dir) if cache_dir is not None else _cache_dir()
  cache_dir.mkdir(parents=True, exist_ok=True)
  errors = []
  for flags in attempts:
    key = hashlib.sha256(
        b"\0".join([source, jaxlib.__version__.encode(), compiler.encode(), " ".join(flags).encode(),
                    _cpu_fingerprint().encode()])).hexdigest()[:24]
    path = cache_dir / f"small_matmul-{key}.so"
    if path.is_file():
      return path
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".tmp-", dir=cache_dir)
    os.close(fd)
    try:
      cmd = [compiler, *flags, "-I", include, str(SOURCE), "-o", tmp]
      run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
      if run.returncode == 0:
        os.replace(tmp, path)  # atomic: a concurrent process sees the whole library or none
        return path
      errors.append(f"$ {' '.join(cmd)}\n{run.stderr.strip()[-2000:]}")
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  raise RuntimeError("compiling the small-matmul kernel failed:\n" + "\n".join(errors))


def small_matmul_available() -> bool:
  """Builds, loads and registers the kernel once per process; False (with one warning) on failure."""
  if not native_kernels_enabled():
    return False
  with _lock:
    if "available" not in _state:
      try:
        path = build_small_matmul()
        library = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)), platform="cpu")
        _state.update(available=True, path=path, library=library)
      except Exception as e:  # noqa: BLE001 - any failure means: use XLA's dot instead
        _state.update(available=False, reason=f"{type(e).__name__}: {e}")
        logger.warning(
            "dalle_flax: native CPU kernels unavailable, decoding uses XLA's dot (slower on CPU at "
            "small batch). Reason: %s. Install a C++ compiler to enable them, or set %s=0 to "
            "silence this.", _state["reason"], ENV_SWITCH)
    return bool(_state["available"])


def small_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` for float32 ``x`` (M, K) with ``M <= MAX_ROWS`` and ``w`` (K, N), by the kernel.

  Call :func:`small_matmul_available` first. CPU only; no gradient.
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"small_matmul needs x (M, K) and w (K, N), got {x.shape} and {w.shape}")
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise ValueError(f"small_matmul is float32 only, got {x.dtype} and {w.dtype}")
  if not 1 <= x.shape[0] <= MAX_ROWS:
    raise ValueError(f"small_matmul takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


def small_batch_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                            precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """``lax.dot_general`` that sends Dense-shaped float32 products with few rows to the kernel.

  A drop-in ``dot_general`` for ``flax.linen.Dense``: contracting the last axis of ``lhs``
  (any leading shape, at most :data:`MAX_ROWS` rows in all) with axis 0 of a 2-D ``rhs`` and no
  batch axes. Everything else, and every call when the kernel is unavailable, is
  ``lax.dot_general``.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  rows = int(np.prod(lhs.shape[:-1])) if lhs.ndim else 0
  eligible = (
      rhs.ndim == 2 and lhs.ndim >= 1 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch and 1 <= rows <= MAX_ROWS
      and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
      and preferred_element_type in (None, jnp.float32)
      and small_matmul_available()
  )
  if not eligible:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  out = small_matmul(lhs.reshape(rows, lhs.shape[-1]), rhs)
  return out.reshape(*lhs.shape[:-1], rhs.shape[1])
