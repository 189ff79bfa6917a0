"""The bitfx kernels on CUDA tensors: build, load and call the ``"cuda"`` kernel sets of ``bitfx.targets.cuda``.

    packed = pack_weight(w_int.cuda(), ternary=False)     # packed on the device, kept there
    y = bit_linear(x.cuda(), packed, act="sign", col_scale=s.cuda(), bias=b.cuda())

The same five calls as ``bitfx.codegen.runtime`` (which hands CUDA tensors here): ``pack_weight``,
``bit_linear``, ``bit_linear_int``, ``sign_scores``, ``binary_pv``. Tensors go to the kernels through
DLPack (zero copy), on torch's current stream of the tensor's device; outputs are allocated by torch on that
device; nothing is copied to the host. float16/bfloat16 activations are read by the sign-and-pack kernel
as they are, and the GEMM's float epilogue writes its result in their dtype (computed in float32, rounded once).

Which GEMM: the binary tensor-core kernel (set ``"cuda"``, ``mma ... m16n8k256 ... and.popc``) when the
device is sm_80 or newer and the GEMM has at least ``MMA_MIN_ROWS`` rows; the CUDA-core ``popc`` kernel
(set ``"cuda-popc"``) otherwise (M = 1 decode, older GPUs).

Building: ``bitfx.codegen.build.kernel`` (in-process memo + disk cache) with target
``{"kind": "cuda", "arch": "sm_XY"}``. TVM keeps the CUDA *source* in the module and compiles it when the
module is loaded, through the global ``tvm_callback_cuda_compile``; ``install_compiler`` points that
callback at ``compile_cubin`` (nvcc, IEEE float math, no ``--use_fast_math``: the absmax scale and
sign(-denormal) must match the reference) with its cubins cached on disk, so a process compiles a kernel
once per machine, not once per start.

Without a GPU, ``artifacts`` builds a kernel to CUDA source, PTX and cubin for sm_80/sm_90 with nvcc and
reads ``ptxas -v`` (registers, spills, stack): what CI checks here.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["pack_weight", "bit_linear", "bit_linear_int", "sign_scores", "binary_pv", "cuda_target",
           "device_arch", "artifacts", "Artifacts", "compile_cubin", "install_compiler", "NvccNotFoundError",
           "MMA_MIN_ROWS", "LinearPlan"]

WORD = 64
#: GEMMs with fewer rows run on CUDA cores: a 16-row mma tile would be mostly padding.
MMA_MIN_ROWS = 16
_TVM_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class NvccNotFoundError(RuntimeError):
    """nvcc is needed to build CUDA kernels and is not on PATH (nor in $CUDA_HOME/bin)."""


# ------------------------------------------------------------------------------------------ targets
@functools.cache
def cuda_target(arch: str):
    """The TVM target of one GPU architecture, e.g. ``cuda_target("sm_90")``."""
    import tvm

    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise ValueError(f"arch must look like 'sm_80' or 'sm_90'; got {arch!r}")
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def device_arch(device: torch.device | int | None = None) -> str:
    """``"sm_XY"`` of a CUDA device (the current one by default)."""
    if isinstance(device, int):
        return _arch(device)
    if device is None or device.index is None:
        return _arch(torch.cuda.current_device())
    return _arch(device.index)


@functools.cache
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def nvcc_path() -> str:
    found = shutil.which("nvcc") or next(
        (p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),) if os.path.exists(p)),
        None)
    if not found:
        raise NvccNotFoundError("nvcc not found on PATH or in $CUDA_HOME/bin; install the CUDA toolkit "
                                "(bitfx compiles its CUDA kernels with nvcc)")
    return found


# --------------------------------------------------------------------------------- nvcc and caching
def _cuda_cache() -> Path:
    from bitfx.codegen.build import cache_dir

    return cache_dir() / "cuda"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _nvcc(source: str, arch: str, fmt: str, *, verbose: bool = False) -> tuple[bytes, str]:
    """Compile CUDA source to ``fmt`` ("ptx" or "cubin") for ``arch``; returns (bytes, nvcc's stderr)."""
    with tempfile.TemporaryDirectory(prefix="bitfx-nvcc-") as tmp:
        src, out = Path(tmp) / "kernel.cu", Path(tmp) / f"kernel.{fmt}"
        src.write_text(source)
        cmd = [nvcc_path(), f"-{fmt}", f"-arch={arch}", "-O3", "-w", "-o", str(out), str(src)]
        if verbose:
            cmd[2:2] = ["-Xptxas", "-v"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"nvcc failed for {arch} ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        return out.read_bytes(), res.stderr


def _ptxas(ptx: bytes, arch: str) -> tuple[bytes, str]:
    """PTX -> cubin with ``ptxas -v`` (its resource report is the second value)."""
    ptxas = os.path.join(os.path.dirname(nvcc_path()), "ptxas")
    with tempfile.TemporaryDirectory(prefix="bitfx-ptxas-") as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_bytes(ptx)
        cmd = [ptxas, f"-arch={arch}", "-O3", "-v", "-o", str(out), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"ptxas failed for {arch} ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        return out.read_bytes(), res.stderr


def compile_cubin(source: str, arch: str) -> bytes:
    """CUDA source -> cubin for ``arch`` with IEEE float math, cached on disk by the source's sha256."""
    key = hashlib.sha256(f"{arch}\n{source}".encode()).hexdigest()[:32]
    path = _cuda_cache() / "cubin" / f"{key}.cubin"
    if path.exists():
        return path.read_bytes()
    data, _ = _nvcc(source, arch, "cubin")
    try:
        _atomic_write(path, data)
    except OSError as err:  # read-only cache: compile again next time
        log.warning("bitfx could not cache a cubin (%s)", err)
    return data


@functools.cache
def install_compiler() -> None:
    """Route TVM's CUDA source compilation (on module load) to ``compile_cubin`` for this device's arch."""
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *rest):  # TVM passes the source (and, in some versions, the target)
        return bytearray(compile_cubin(code, device_arch()))


@dataclass(frozen=True)
class Artifacts:
    """One kernel built for one arch: the files, and what ``ptxas -v`` says about its entry function."""

    source: Path
    ptx: Path
    cubin: Path
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    ptxas_log: str


def _ptxas_numbers(log_text: str) -> dict:
    def num(pattern: str) -> int:
        m = re.search(pattern, log_text)
        if not m:
            raise RuntimeError(f"ptxas -v output has no {pattern!r}:\n{log_text}")
        return int(m.group(1))

    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack_frame=num(r"(\d+) bytes stack frame"))


def kernel_source(op: str, *, impl: str = "cuda", arch: str = "sm_90", **params) -> str:
    """The CUDA C++ source TVM generates for kernel ``op`` of set ``impl`` (no GPU, no nvcc needed)."""
    import tvm

    from bitfx.codegen.build import _generator

    import bitfx.targets.cuda  # noqa: F401  (registers the sets)

    func = _generator(op, impl)(**params).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=cuda_target(arch))
    return lib.mod.imports[0].inspect_source()


def artifacts(op: str, *, impl: str = "cuda", arch: str = "sm_90", **params) -> Artifacts:
    """Build kernel ``op`` to ``.cu``, ``.ptx`` and ``.cubin`` for ``arch``, cached under the bitfx cache dir.

    The entry is keyed like ``bitfx.codegen.build`` keys kernels (op, params, set, target, generator source,
    TVM version), so an edited generator is rebuilt. Raises ``NvccNotFoundError`` without nvcc.
    """
    from bitfx.codegen.build import cache_key

    import bitfx.targets.cuda  # noqa: F401

    key = cache_key(op, impl, cuda_target(arch), params)
    root = _cuda_cache() / key
    meta = root / "ptxas.json"
    files = {"source": root / "kernel.cu", "ptx": root / "kernel.ptx", "cubin": root / "kernel.cubin"}
    if meta.exists() and all(p.exists() for p in files.values()):
        try:
            info = json.loads(meta.read_text())
            return Artifacts(**files, **_ptxas_numbers(info["log"]), ptxas_log=info["log"])
        except (ValueError, KeyError, RuntimeError) as err:
            log.warning("bitfx CUDA artifact %s is damaged (%s); rebuilding it", root, err)
    source = kernel_source(op, impl=impl, arch=arch, **params)
    ptx, _ = _nvcc(source, arch, "ptx")
    cubin, ptxas_log = _ptxas(ptx, arch)
    _atomic_write(files["source"], source.encode())
    _atomic_write(files["ptx"], ptx)
    _atomic_write(files["cubin"], cubin)
    _atomic_write(meta, json.dumps({"log": ptxas_log, "op": op, "impl": impl, "arch": arch,
                                    "params": {k: repr(v) for k, v in params.items()}}).encode())
    return Artifacts(**files, **_ptxas_numbers(ptxas_log), ptxas_log=ptxas_log)


# ---------------------------------------------------------------------------------------- dispatch
_KERNELS: dict = {}


def _kernel(op: str, device: torch.device, impl: str = "cuda", **params):
    """The compiled kernel for ``device``'s arch; memoised on a cheap key (this is the per-call path)."""
    arch = device_arch(device)
    key = (op, impl, arch, tuple(sorted(params.items())))
    fn = _KERNELS.get(key)
    if fn is None:
        from bitfx.codegen.build import kernel

        import bitfx.targets.cuda  # noqa: F401

        install_compiler()
        fn = _KERNELS[key] = kernel(op, impl=impl, target=cuda_target(arch), **params)
    return fn


def _run(fn, device: torch.device, *args) -> None:
    """Call a kernel on torch's current stream of ``device``."""
    import tvm_ffi

    stream = torch.cuda.current_stream(device)
    with tvm_ffi.use_raw_stream(tvm_ffi.device(f"cuda:{device.index or 0}"), stream.cuda_stream):
        fn(*args)


def _gemm_set(rows: int, device: torch.device) -> str:
    major = int(device_arch(device)[3:-1])
    return "cuda" if major >= 8 and rows >= MMA_MIN_ROWS else "cuda-popc"


def _words(k: int) -> int:
    return (k + WORD - 1) // WORD


def _rows(x: torch.Tensor, K: int, name: str):
    """x[..., K] on a CUDA device -> (contiguous [M, K] in its own float dtype, leading shape, dtype)."""
    from bitfx.codegen.runtime import check_features

    check_features(x, K, name)
    if not x.is_cuda:
        raise ValueError(f"{name} is on {x.device}; the CUDA kernels run on CUDA tensors")
    return x.reshape(-1, K).contiguous(), x.shape[:-1], x.dtype


def _vector(t: torch.Tensor, n: int, name: str, device) -> torch.Tensor:
    t = t.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    if t.numel() not in (1, n):
        raise ValueError(f"{name} must have 1 or {n} elements, got {t.numel()}")
    return t


# ------------------------------------------------------------------------------------------- calls
def pack_weight(w_int: torch.Tensor, ternary: bool):
    """``bitfx.codegen.runtime.pack_weight`` on the device: codes ``[N, K]`` -> K-major ``[P, KW, N]`` words."""
    from bitfx.codegen.runtime import PackedWeight

    if w_int.dim() != 2:
        raise ValueError(f"w_int must be [N, K], got shape {tuple(w_int.shape)}")
    dev = w_int.device
    codes = w_int.detach().to(torch.int8).contiguous()
    allowed = (-1, 0, 1) if ternary else (-1, 1)
    ok = torch.isin(codes, torch.tensor(allowed, dtype=torch.int8, device=dev))
    exact = torch.equal(codes.to(w_int.dtype), w_int.detach())
    if not bool(ok.all()) or not exact:
        bad = torch.unique(codes[~ok]).tolist() if not bool(ok.all()) else "non-integer values"
        raise ValueError(f"{'ternary' if ternary else 'binary'} weight codes must be in {allowed}; got {bad}")
    N, K = codes.shape
    planes = []
    for mode in (("pos", "neg") if ternary else ("pos",)):
        out = torch.empty(N, _words(K), dtype=torch.uint64, device=dev)
        if N:
            _run(_kernel("pack_rows", dev, mode=mode, K=K, dtype="int8"), dev, codes, out)
        planes.append(out.t().contiguous())
    nnz = (codes != 0).sum(1, dtype=torch.int32) if ternary else None
    return PackedWeight(torch.stack(planes).contiguous(), N, K, ternary, nnz)


def _pack_sign(x2: torch.Tensor, K: int, move, *, mean: bool):
    dev, M = x2.device, x2.shape[0]
    out = torch.empty(M, _words(K), dtype=torch.uint64, device=dev)
    rs = torch.empty(M, dtype=torch.float32, device=dev) if mean else None
    args = [x2] + ([_vector(move, K, "move", dev)] if move is not None else []) + [out] + ([rs] if mean else [])
    if M:
        fn = _kernel("pack_rows", dev, mode="sign", K=K, dtype=_TVM_DTYPE[x2.dtype], move=move is not None,
                     mean=mean)
        _run(fn, dev, *args)
    return (out, rs) if mean else out


def _pack_unsigned(x2: torch.Tensor, K: int, move, alpha):
    """BiT's {0, 1} codes ``(x + move) > α/2`` in one plane (``pack_rows(mode="pos")`` with the threshold
    ``-α/2`` as its move vector; see ``bitfx.codegen.runtime.unsigned_threshold``) and the row scale α."""
    from bitfx.codegen.runtime import unsigned_threshold

    dev, M = x2.device, x2.shape[0]
    a, threshold = unsigned_threshold(alpha, K, dev)
    u = x2.float() if move is None else x2.float() + _vector(move, K, "move", dev)
    out = torch.empty(M, _words(K), dtype=torch.uint64, device=dev)
    if M:
        _run(_kernel("pack_rows", dev, mode="pos", K=K, dtype="float32", move=True), dev, u.contiguous(),
             threshold, out)
    return out, a.expand(M).contiguous()


def _quantize(x2: torch.Tensor, K: int, act: str, bits: int, move, alpha=None):
    from bitfx.codegen.runtime import _act_pack, _check_bits

    _check_bits(act, bits)
    if _act_pack(act) == "unsigned":
        return _pack_unsigned(x2, K, move, alpha)
    if act == "sign":
        return _pack_sign(x2, K, move, mean=True)
    dev, M = x2.device, x2.shape[0]
    planes = torch.empty(M, bits, _words(K), dtype=torch.uint64, device=dev)
    rs = torch.empty(M, dtype=torch.float32, device=dev)
    if M:
        _run(_kernel("absmax_planes", dev, K=K, bits=bits), dev, x2.float().contiguous(), planes, rs)
    return planes, rs


def _gemm(packed, act: str, bits: int, M: int, device, *, epilogue: str, bias: bool, out=torch.float32):
    mode = ("xnor" if act == "sign" else "and") + ("_ternary" if packed.ternary else "")
    extra = {} if out == torch.float32 else {"out_dtype": _TVM_DTYPE[out]}  # half out: written once, in half
    return _kernel("gemm", device, impl=_gemm_set(M, device), mode=mode, K=packed.K, N=packed.N, planes=bits,
                   epilogue=epilogue, bias=bias, **extra)


def _weights(packed, act: str, device) -> list:
    if packed.planes.device != device:
        raise ValueError(f"the packed weight is on {packed.planes.device}, the activations on {device}; "
                         "pack the weight on the activations' device")
    return [packed.w, *([packed.nnz] if packed.ternary and act == "sign" else [])]


def bit_linear(x: torch.Tensor, packed, *, act: str = "sign", bits: int = 1, move=None, alpha=None,
               col_scale: torch.Tensor, bias=None, threads: int | None = None) -> torch.Tensor:
    """``bitfx.codegen.runtime.bit_linear`` on CUDA tensors (``threads`` is a host option, ignored)."""
    del threads
    x2, lead, dtype = _rows(x, packed.K, "x")
    dev, M, N = x2.device, x2.shape[0], packed.N
    if act == "sign" and alpha is not None:
        from bitfx.codegen.runtime import _check_bits

        _check_bits(act, bits)
        a = _pack_sign(x2, packed.K, move, mean=False)
        row_scale = _vector(alpha, 1, "alpha", dev).expand(M).contiguous()
    else:
        a, row_scale = _quantize(x2, packed.K, act, bits, move, alpha)
    cs = _vector(col_scale, N, "col_scale", dev)
    if cs.numel() == 1:
        cs = cs.expand(N).contiguous()
    args = [a, *_weights(packed, act, dev), row_scale, cs]
    if bias is not None:
        args.append(_vector(bias, N, "bias", dev))
    y = torch.empty(M, N, dtype=dtype, device=dev)  # the epilogue rounds into x's dtype once
    if M and N:
        _run(_gemm(packed, act, bits, M, dev, epilogue="float", bias=bias is not None, out=dtype), dev, *args, y)
    return y.view(*lead, N)


def bit_linear_int(x: torch.Tensor, packed, *, act: str = "sign", bits: int = 1, move=None, alpha=None):
    """The integer contract on CUDA tensors: ``(acc int32 [M, N], row_scale float32 [M])``."""
    x2, _, _ = _rows(x, packed.K, "x")
    dev, M = x2.device, x2.shape[0]
    a, row_scale = _quantize(x2, packed.K, act, bits, move, alpha)
    acc = torch.empty(M, packed.N, dtype=torch.int32, device=dev)
    if M and packed.N:
        _run(_gemm(packed, act, bits, M, dev, epilogue="int", bias=False), dev, a, *_weights(packed, act, dev), acc)
    return acc, row_scale


def sign_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``S[..., i, j] = sum_d sign(q[..., i, d]) * sign(k[..., j, d])`` as int32, on the device."""
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"sign_scores needs q [..., Lq, D] and k [..., Lk, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    lead, (Lq, D), Lk = q.shape[:-2], q.shape[-2:], k.shape[-2]
    q2, _, _ = _rows(q, D, "q")
    k2, _, _ = _rows(k, D, "k")
    dev = q2.device
    G = q2.shape[0] // Lq if Lq else 0
    out = torch.empty(G, Lq, Lk, dtype=torch.int32, device=dev)
    if G and Lq and Lk:
        qp = _pack_sign(q2, D, None, mean=False).view(G, Lq, -1)
        kp = _pack_sign(k2, D, None, mean=False).view(G, Lk, -1).transpose(1, 2).contiguous()
        fn = _kernel("gemm", dev, impl=_gemm_set(Lq, dev), mode="xnor", K=D, N=None, batched=True)
        _run(fn, dev, qp, kp, out)
    return out.view(*lead, Lq, Lk)


def binary_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``O[..., i, d] = sum_j p[..., i, j] * sign(v[..., j, d])`` as int32 for p in {0, 1}, on the device."""
    if p.shape[:-2] != v.shape[:-2] or p.shape[-1] != v.shape[-2]:
        raise ValueError(f"binary_pv needs p [..., Lq, Lk] and v [..., Lk, Dv]; got {tuple(p.shape)}, {tuple(v.shape)}")
    lead, (Lq, Lk), Dv = p.shape[:-2], p.shape[-2:], v.shape[-1]
    if p.dtype == torch.bool:
        p = p.view(torch.uint8)
    dt = {torch.uint8: "uint8", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(p.dtype, "float32")
    p2 = p.reshape(-1, Lk)
    p2 = (p2 if dt != "float32" else p2.float()).contiguous()
    v3, _, _ = _rows(v, Dv, "v")
    dev = v3.device
    G = v3.shape[0] // Lk if Lk else p2.shape[0] // max(Lq, 1)
    out = torch.empty(G, Lq, Dv, dtype=torch.int32, device=dev)
    if not (G and Lq and Dv):
        return out.view(*lead, Lq, Dv)
    if Lk == 0:
        return out.zero_().view(*lead, Lq, Dv)
    pp = torch.empty(p2.shape[0], _words(Lk), dtype=torch.uint64, device=dev)
    _run(_kernel("pack_rows", dev, mode="nonzero", K=None, dtype=dt), dev, p2, pp)
    vp = torch.empty(G, _words(Lk), Dv, dtype=torch.uint64, device=dev)
    _run(_kernel("pack_cols", dev, K=None, N=Dv), dev, v3.float().contiguous().view(G, Lk, Dv), vp)
    fn = _kernel("gemm", dev, impl=_gemm_set(Lq, dev), mode="and", K=None, N=Dv, signed=False, batched=True)
    _run(fn, dev, pp.view(G, Lq, -1), vp, out)
    return out.view(*lead, Lq, Dv)


class LinearPlan:
    """``bitfx.codegen.runtime.LinearPlan`` for a weight packed on a CUDA device (it returns this one then).

    The vectors are resolved on the device once; each call quantizes and packs x, then runs the GEMM that
    fits its row count (tensor cores from ``MMA_MIN_ROWS`` rows, CUDA cores below).
    """

    def __init__(self, packed, *, act: str = "sign", bits: int = 1, move=None, alpha=None,
                 col_scale: torch.Tensor, bias=None, threads: int | None = None, activation: str = "none"):
        from bitfx.codegen.runtime import _check_bits, check_activation

        del threads
        _check_bits(act, bits)
        check_activation(activation)
        self.activation = activation  # applied after the GEMM here (the CUDA epilogue does not fuse it)
        dev = packed.planes.device
        self.packed, self.act, self.bits = packed, act, bits
        takes = act in ("sign", "unsigned")  # the methods with a move and an α
        self.move = None if (not takes or move is None) else _vector(move, packed.K, "move", dev)
        self.alpha = None if (not takes or alpha is None) else _vector(alpha, 1, "alpha", dev)
        cs = _vector(col_scale, packed.N, "col_scale", dev)
        self.col = cs.expand(packed.N).contiguous() if cs.numel() == 1 else cs
        self.bias = None if bias is None else _vector(bias, packed.N, "bias", dev)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = bit_linear(x, self.packed, act=self.act, bits=self.bits, move=self.move, alpha=self.alpha,
                       col_scale=self.col, bias=self.bias)
        return torch.nn.functional.gelu(y) if self.activation == "gelu" else y
