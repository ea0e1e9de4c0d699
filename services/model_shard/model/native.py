"""Native CPU kernels (csrc/), compiled on first use with the machine's C++ compiler through
torch's extension builder, and cached (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).

`make install` builds them once (seconds), so a shard only loads them. An image without a compiler
loads the library its build left in TORCH_EXTENSIONS_DIR (see the Dockerfile). Where they can be
neither built nor found, or are switched off (LLMMESH_NATIVE_KERNELS=0), the model runs the same
computation on stock torch ops, more slowly.

The code is built for this machine's CPU (`-march=native`); LLMMESH_NATIVE_MARCH names another
target (e.g. x86-64-v3) for a build that runs elsewhere. The AVX-512 paths are compiled in either
way and chosen at run time (csrc/avx512.h).

    python -m services.model_shard.model.native   # build now, and say whether it worked
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("bindings.cpp", "paged_attention.cpp", "rms_norm.cpp", "rope_cache.cpp",
                         "silu_and_mul.cpp", "quantized_linear.cpp", "dense_linear.cpp", "token_bitmask.cpp")]
NAME = "llmmesh_kernels"
_kernels = None  # the compiled module (csrc/bindings.cpp)
_available: bool | None = None
# A build takes a minute or two on a small machine; a lock older than this was left by a killed one.
STALE_LOCK_S = 300.0


def available(verbose: bool = False) -> bool:
    """Whether the kernels are loaded (building them on the first call of a process if needed)."""
    global _available, _kernels
    if _available is None:
        if os.environ.get("LLMMESH_NATIVE_KERNELS", "1") != "0":
            _kernels = _build(verbose)
        _available = _kernels is not None
    return _available


def _build(verbose: bool):
    from torch.utils import cpp_extension

    march = os.environ.get("LLMMESH_NATIVE_MARCH", "native")
    build_dir = Path(cpp_extension._get_build_directory(NAME, verbose=False))
    clear_stale_lock(build_dir / "lock", STALE_LOCK_S)
    try:
        # The builder keys its cache on the sources and flags: an edited kernel is rebuilt.
        return cpp_extension.load(name=NAME, sources=[str(p) for p in SOURCES], is_python_module=True,
                                  extra_cflags=["-O3", f"-march={march}", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                  verbose=verbose)
    except Exception as exc:  # no compiler, no ninja, a build error
        built = build_dir / f"{NAME}.so"
        if built.is_file():  # built ahead of time, e.g. in an image that carries no compiler
            # Also reached when a compiler is there but the sources fail to build: then warn, since the
            # library loaded is an earlier build.
            level = logging.WARNING if shutil.which(os.environ.get("CXX", "c++")) else logging.INFO
            log.log(level, "native kernels did not build (%s); loading the library built before, %s", exc, built)
            spec = importlib.util.spec_from_file_location(NAME, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        log.warning("native kernels unavailable, the model runs on stock torch ops: %s", exc)
        return None


def clear_stale_lock(lock: Path, stale_after_s: float) -> None:
    """torch's builder takes this lock file even to load a library built before, and waits for it
    without end; a build killed midway (Ctrl-C, a pod stopped while starting) leaves it behind, and
    every later start would hang. Wait while the lock is younger than stale_after_s (another process
    may be building), then take it as left behind and remove it."""
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after_s:
            log.warning("removing %s, left %.0fs ago by a kernel build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(min(1.0, stale_after_s - age))  # as torch's own wait polls the file


def vnni_supported() -> bool:
    """Whether the int4 and int8 kernels can run here: they need a CPU with AVX-512 VNNI."""
    return available() and _kernels.vnni_supported()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, H, D]; k_cache, v_cache [KVH, slots, D]; block_tables int64 [B, N]; context_lens int64 [B].
    Returns [B, H, D]: each query attends to its sequence's first context_lens keys."""
    return _kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [rows, hidden]; residual may be None."""
    return _kernels.add_rms_norm(x, residual, weight, eps)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the queries and keys of qkv [T, (H + 2 KVH) * D] (cos/signed_sin [T, D], see
    RotaryEmbedding), write keys and values into the caches at slots [T]; returns (q [T, H, D], k [T, KVH, D])."""
    return _kernels.rope_and_cache(qkv, cos, signed_sin, slots, k_cache, v_cache, heads)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of x [T, 2 * I] = [gate | up]; returns [T, I]."""
    return _kernels.silu_and_mul(x)


def int4_pack_weight(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15], d and m [N, K / 32] (w = d * q + m): the bytes int4_linear reads."""
    return _kernels.int4_pack_weight(q, d, m)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] @ the packed 4-bit weights' transpose, activations quantized to int8 per group of 32."""
    return _kernels.int4_linear(x, packed, out_features)


def int8_pack_weight(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [-127, 127] (w = scale * q per output): the bytes int8_linear reads."""
    return _kernels.int8_pack_weight(q)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] @ the packed 8-bit weights' transpose times scale [N] (float32), activations
    quantized to int8 per group of 32."""
    return _kernels.int8_linear(x, packed, scale, out_features)


def dense_supported() -> bool:
    """Whether the batch-invariant bfloat16 and float32 linear runs here (a CPU with AVX-512; AVX512-BF16 makes it faster)."""
    return available() and _kernels.dense_supported()


def dense_pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] bfloat16 (K even) or float32: the bytes dense_linear reads."""
    return _kernels.dense_pack_weight(w)


def dense_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, float_out: bool = False) -> torch.Tensor:
    """x [M, K] (the weights' dtype) @ the packed weights' transpose, each output summed in input order whatever M:
    [M, N] in x's dtype, or float32 with float_out."""
    return _kernels.dense_linear(x, packed, out_features, float_out)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """In place: logits [B, V] float32 of rows [R] (int64) to -inf where their bitmask masks [R, V / 32]
    (int32; token t is bit t % 32 of word t // 32) has a 0."""
    _kernels.apply_token_bitmask(logits, rows, masks)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ok = available(verbose="-v" in sys.argv)
    print("native kernels:", "built and loaded" if ok else "unavailable (stock torch ops will be used)")
