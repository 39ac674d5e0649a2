"""Fused attention for x86 CPUs: fused_attention.cpp, built with g++ at its first use for this
CPU's instruction set and kept in the user's cache (one file per source and compiler flags).

Three builds (LEVELS): AMX (bfloat16 on AMX's tiles, float32 as the next: Intel from Sapphire
Rapids, where Linux grants the tiles), AVX512-BF16 (bfloat16 and float32: Zen 4 and later,
Intel from Cooper Lake) and AVX-512 alone (float32: Intel's Skylake to Ice Lake servers); the
best the CPU has (/proc/cpuinfo) runs. `available(dtype)` says whether it runs here for that
dtype: x86 Linux with one of those, a C++ compiler with OpenMP, and
NANODIFFUSION_FUSED_ATTENTION not set to 0 (set to a level's name, that build runs instead,
where the CPU has it); bfloat16 not where the CPU has AMX and the build is not AMX's
(`dtypes`), unless that variable names the level. Where it does not, `layers.attention` keeps
its other paths. A build that fails warns once with the compiler's message and is not tried
again in that process, and the next level the CPU has runs (`level`).
`supports(q, k, v)` says which heads it takes, and `attention(q, k, v, causal)` is the kernel's
one call (layers.attention holds the rule of when).
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fused_attention.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
# instruction set -> (the /proc/cpuinfo flags it needs, its dtypes), best first; each flag is
# also the compiler's: avx512_bf16 -> -mavx512bf16, amx_tile -> -mamx-tile (_compiler_flags)
LEVELS = {
    "amx": ((*_AVX512, "avx512_bf16", "amx_tile", "amx_bf16"), (torch.bfloat16, torch.float32)),
    "avx512bf16": ((*_AVX512, "avx512_bf16"), (torch.bfloat16, torch.float32)),
    "avx512": (_AVX512, (torch.float32,)),
}
ENV = "NANODIFFUSION_FUSED_ATTENTION"
# Widest head taken: every query block reads its head's keys and values whole, which stay in
# the core's L2 for transformer heads (SD 1.5's 40-160 wide, SD 2's 64) but not for the VAE's
# one 512-wide head (4096 tokens float32 on a 2-core Zen 5: 1278 ms here, 887 blocked).
MAX_WIDTH = 160
FUNCTIONS = {torch.bfloat16: "nd_attention_bf16", torch.float32: "nd_attention_f32"}
_i64, _p = ctypes.c_int64, ctypes.c_void_p
ARGTYPES = [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _p, ctypes.c_float,
            ctypes.c_int, ctypes.c_int]  # FUNCTIONS' (fused_attention.cpp's nd_attention_*)

_libs = {}  # (source, level) -> its loaded library, or None where its build failed


@functools.lru_cache(maxsize=None)
def _cpuinfo():
    """The first processor's fields in /proc/cpuinfo (Linux; empty elsewhere), read once."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags():
    """The flags /proc/cpuinfo lists (Linux; empty elsewhere)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_vendor():
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"; "" where there is none)."""
    return _cpuinfo().get("vendor_id", "")


@functools.lru_cache(maxsize=None)
def amx_permitted():
    """Whether Linux lets this process use AMX's tile data: arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA), the request every AMX program makes first (oneDNN's too; kernels
    before 5.16 have no such call, and there the tiles fault)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18)) == 0
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_levels():
    """The LEVELS this CPU runs, best first (a tuple, found once): "amx" only where Linux
    grants the tiles (amx_permitted)."""
    return tuple(name for name, (need, _) in LEVELS.items() if cpu_flags().issuperset(need)
                 and (name != "amx" or amx_permitted()))


def level():
    """The level that runs in this process: NANODIFFUSION_FUSED_ATTENTION's where it names one
    the CPU has, else the CPU's best whose build succeeds (an older g++ without AMX's flags
    falls back to the vector build; each build is tried once); None where the kernel does not
    run (see the module)."""
    want = os.environ.get(ENV, "1")
    if want == "0" or not sys.platform.startswith("linux"):
        return None
    have = cpu_levels()
    if want in have:
        return want
    return next((lvl for lvl in have if library(lvl) is not None), None)


def _compiler_flags(lvl):
    if lvl is None:  # no instruction set of LEVELS (malloc.py's block pool)
        return list(FLAGS)
    return FLAGS + ["-m" + (flag.replace("_", "-") if flag.startswith("amx_") else
                            flag.replace("_", "")) for flag in LEVELS[lvl][0]]


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanodiffusion" / "kernels"


def build(lvl, source=SOURCE, extra=()):
    """The library of `source` (a C++ file, fused_attention.cpp by default; the headers beside
    it, which it may include, are part of its cache key) for level `lvl` (None: none of
    LEVELS'), with the compiler flags `extra` after the source, built if the cache lacks it
    (written under a temporary name, then renamed, so a concurrent or killed build never leaves
    a half-written library)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    flags, extra = _compiler_flags(lvl), list(extra)
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # amx_tiles.h
    key = hashlib.sha256(source.read_bytes() + headers
                         + " ".join([cxx] + flags + extra).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{lvl}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(source), *extra, "-o", tmp], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {source.name}:\n{r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(lvl, source, functions, argtypes, failed, extra=()):
    """The library of `source` for level `lvl`, built (`build`) and loaded once per process,
    each of `functions` declared with `argtypes` and an int result; None where the build or the
    load fails: one warning, `failed` and the error, and it is not tried again. The one loader
    of this module's kernel, fused_norm's and small_gemm's."""
    key = (source, lvl)
    if key not in _libs:
        _libs[key] = None
        try:
            lib = ctypes.CDLL(str(build(lvl, source, extra)))
        except (OSError, RuntimeError) as e:
            warnings.warn(f"{failed}: {e}")
            return None
        for name in functions:
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _libs[key] = lib
    return _libs[key]


def library(lvl=None):
    """The loaded kernel library of level `lvl` (one the CPU has; default: `level()`), or None
    where it does not run here (see the module's text)."""
    lvl = lvl or level()
    if lvl is None:
        return None
    return load(lvl, SOURCE, [FUNCTIONS[d] for d in LEVELS[lvl][1]], ARGTYPES,
                "fused attention not built, the slower path runs")


@functools.lru_cache(maxsize=None)
def amx():
    """Whether the CPU has AMX's bfloat16 tiles (/proc/cpuinfo's amx_tile and amx_bf16)."""
    return cpu_flags().issuperset(("amx_tile", "amx_bf16"))


def dtypes():
    """The dtypes the kernel takes in this process: its level's (none where it does not run),
    less bfloat16 where the CPU has AMX but the level is not "amx" (torch's kernel runs on the
    tiles there and beats the vector code 3x: 2 threads of an Intel Xeon with AMX, 2 x 8 heads,
    1024 tokens x 40: 5.5 against 16.7 ms; 4096 x 40: 82 against 255 ms), unless
    NANODIFFUSION_FUSED_ATTENTION names the level."""
    lvl = level()
    if lvl is None or library(lvl) is None:
        return ()
    if lvl == "amx" or os.environ.get(ENV) == lvl or not amx():
        return LEVELS[lvl][1]
    return tuple(d for d in LEVELS[lvl][1] if d != torch.bfloat16)


def available(dtype=None):
    """Whether the kernel runs here (for `dtype`, where given: in `dtypes()`)."""
    return bool(dtypes()) if dtype is None else dtype in dtypes()


def supports(q, k, v):
    """Whether `attention` takes these (B, nh, T, hs) tensors: on the CPU, in a dtype the
    kernel has here (available), each head's vectors contiguous, one batch, head count and
    width (at most MAX_WIDTH), at least one key."""
    return (q.dtype == k.dtype == v.dtype and q.device.type == "cpu"
            and all(t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] > 0
            and q.shape[3] == k.shape[3] == v.shape[3] <= MAX_WIDTH and available(q.dtype))


def _strides(t):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _output(q):
    """The (B, nh, T, hs) output for q, laid out (B, T, nh, hs): the kernel's and its fake's."""
    B, nh, T, hs = q.shape
    return q.new_empty(B, T, nh, hs).transpose(1, 2)


def attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(hs)) v of (B, nh, T, hs) queries and (B, nh, S, hs) keys and values
    (as `supports` takes them; `causal`: query t sees keys 0..t only, torch's is_causal), in
    torch.get_num_threads() threads; -> (B, nh, T, hs) in their dtype, laid out (B, T, nh, hs)
    so that the caller's transpose back to tokens is free. It runs as an op of torch's
    (torch.ops.nanodiffusion.fused_attention), so that FLOP counters and profilers see it."""
    return torch.ops.nanodiffusion.fused_attention(q, k, v, causal)


def run(lib, q, k, v, causal=False):
    """`attention` on the kernel library `lib` (one of `library(level)`'s)."""
    B, nh, T, hs = q.shape
    out = _output(q)
    getattr(lib, FUNCTIONS[q.dtype])(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, nh, T, k.shape[2], hs,
        _strides(q), _strides(k), _strides(v), _strides(out), hs ** -0.5, int(causal),
        torch.get_num_threads())
    return out


# The op, registered with torch's dispatcher directly: its CPU kernel and, for FLOP counting on
# meta tensors, its output's shape. (torch.library.custom_op imported torch._dynamo and
# torch._inductor at the op's first call: 822 modules, 1.0 s, where nothing had yet.)
_OPS = torch.library.Library("nanodiffusion", "DEF")
_OPS.define("fused_attention(Tensor q, Tensor k, Tensor v, bool causal=False) -> Tensor")
_OPS.impl("fused_attention", lambda q, k, v, causal=False: run(library(), q, k, v, causal),
          "CPU")
_OPS.impl("fused_attention", lambda q, k, v, causal=False: _output(q), "Meta")
