"""Native CPU kernels, compiled for the host on first use and called through the XLA FFI.

Example::

  from dalle_flax import kernels
  if kernels.kernels_available():
    y = kernels.small_batch_dot_general(x, w, (((1,), (0,)), ((), ())))

Two kernels, for the shapes of a decode step, in one library:

* ``small_matmul.cc``: a float32 ``(M, K) @ (K, N)`` for 1 <= M <= 16 rows, every Dense layer of
  a decode step. XLA:CPU runs these through Eigen's GEMM, which packs the weights first and
  reads them at about half the machine's bandwidth; the kernel streams each weight row once
  for all rows (1.5-2x faster at 2-8 rows on a 2-core x86 VM).
* ``decode_attention.cc``: one query per row against a key/value cache, reading only the
  visible (filled, unmasked) slots, with the dot, softmax and weighted sum in one pass. XLA
  runs this as two batched matrix-vector dots over every slot (3-4x slower at 2 rows).

Building: the first call compiles the sources with the system C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against ``jax.ffi.include_dir()``, ``-O3 -march=native``, into
``$DALLE_FLAX_KERNEL_CACHE`` (default ``~/.cache/dalle_flax/kernels``), keyed by a hash of the
sources, jaxlib version, compiler, flags and CPU, written to a temp file and renamed. Later
processes load the cached library. If anything fails (no compiler, no headers), a warning says
why once and :func:`small_batch_dot_general` / :func:`one_query_attention` leave the work to
XLA: results are the same up to float rounding, only slower. ``DALLE_FLAX_NATIVE_KERNELS=0`` turns the kernels off.
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
    "build_kernels",
    "decode_attention",
    "kernels_available",
    "native_kernels_enabled",
    "one_query_attention",
    "small_batch_dot_general",
    "small_matmul",
]

logger = logging.getLogger(__name__)

MATMUL_TARGET = "dalle_flax_small_matmul"
ATTENTION_TARGET = "dalle_flax_decode_attention"
# FFI target name -> handler symbol in the library
_TARGETS = {MATMUL_TARGET: "DalleFlaxSmallMatmul", ATTENTION_TARGET: "DalleFlaxDecodeAttention"}
SOURCES = (Path(__file__).with_name("small_matmul.cc"), Path(__file__).with_name("decode_attention.cc"))
HEADERS = (Path(__file__).with_name("common.h"),)  # included by the sources: part of the cache key
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


def build_kernels(cache_dir: Path | None = None, compiler: str | None = None) -> Path:
  """Compiles :data:`SOURCES` into one library (or finds it in the cache) and returns its path.

  Raises:
    RuntimeError: no compiler, or the compiler failed (its output is in the message).
  """
  compiler = compiler or _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
  include = jax.ffi.include_dir()
  import jaxlib

  source = b"\0".join(src.read_bytes() for src in SOURCES + HEADERS)
  attempts = [(*_FLAGS, "-march=native"), _FLAGS]  # -march=native is not supported everywhere
  cache_dir = Path(cache_dir) if cache_dir is not None else _cache_dir()
  cache_dir.mkdir(parents=True, exist_ok=True)
  errors = []
  for flags in attempts:
    key = hashlib.sha256(
        b"\0".join([source, jaxlib.__version__.encode(), compiler.encode(), " ".join(flags).encode(),
                    _cpu_fingerprint().encode()])).hexdigest()[:24]
    path = cache_dir / f"dalle_flax_kernels-{key}.so"
    if path.is_file():
      return path
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".tmp-", dir=cache_dir)
    os.close(fd)
    try:
      cmd = [compiler, *flags, "-I", include, *map(str, SOURCES), "-o", tmp]
      run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
      if run.returncode == 0:
        os.replace(tmp, path)  # atomic: a concurrent process sees the whole library or none
        return path
      errors.append(f"$ {' '.join(cmd)}\n{run.stderr.strip()[-2000:]}")
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  raise RuntimeError("compiling the native kernels failed:\n" + "\n".join(errors))


def kernels_available() -> bool:
  """Builds, loads and registers the kernels once per process; False (with one warning) on failure."""
  if not native_kernels_enabled():
    return False
  with _lock:
    if "available" not in _state:
      try:
        path = build_kernels()
        library = ctypes.CDLL(str(path))
        for target, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
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

  Call :func:`kernels_available` first. CPU only; no gradient.
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"small_matmul needs x (M, K) and w (K, N), got {x.shape} and {w.shape}")
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise ValueError(f"small_matmul is float32 only, got {x.dtype} and {w.dtype}")
  if not 1 <= x.shape[0] <= MAX_ROWS:
    raise ValueError(f"small_matmul takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(MATMUL_TARGET, out, vmap_method="sequential")(x, w)


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
      and kernels_available()
  )
  if not eligible:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  out = small_matmul(lhs.reshape(rows, lhs.shape[-1]), rhs)
  return out.reshape(*lhs.shape[:-1], rhs.shape[1])


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """One-query attention by the kernel: ``softmax(scale * q.k over visible slots) @ v``.

  Args:
    q: (B, H, D) float32 queries.
    k, v: (B, H, S, D) float32 keys and values (head-major, as the decoder's cache).
    mask: (B, S), nonzero/True where a slot may be attended; slots that are not are never read.
    scale: the logit scale (``1/sqrt(D)``, or ``1/tau`` for cosine attention).

  Returns:
    (B, H, D) float32; NaN for a row with no visible slot (as softmax over all ``-inf``).

  Call :func:`kernels_available` first. CPU only; no gradient.
  """
  if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[2]:
    raise ValueError(f"decode_attention needs q (B, H, D) and k, v (B, H, S, D), got {q.shape}, {k.shape}, {v.shape}")
  if mask.shape != (k.shape[0], k.shape[2]):
    raise ValueError(f"decode_attention needs mask (B, S) = {(k.shape[0], k.shape[2])}, got {mask.shape}")
  if not all(a.dtype == jnp.float32 for a in (q, k, v)):
    raise ValueError(f"decode_attention is float32 only, got {q.dtype}, {k.dtype}, {v.dtype}")
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(
      q, k, v, mask.astype(jnp.int32), scale=np.float32(scale))


def one_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        scale: float) -> jax.Array | None:
  """:func:`decode_attention` when the kernel applies (float32, kernels built), else None: the
  caller then runs its own attention (``Attention.attend``'s einsum path). Shapes as
  :func:`decode_attention`."""
  if all(a.dtype == jnp.float32 for a in (q, k, v)) and kernels_available():
    return decode_attention(q, k, v, mask, scale)
  return None
