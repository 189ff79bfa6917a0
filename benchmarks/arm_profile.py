"""Dynamic aarch64 instructions per kernel of an exported model (qemu TCG plugin) and llvm-mca of its hot loops.

    python benchmarks/arm_profile.py [--layers 2] [--seq 128] [--target linux-arm64] [--cpu cortex-a53]
                                     [--config bipft] [--mca-cpus neoverse-n1 cortex-a55] [--top 8]

1. Exports ``bitfx.models.bert_encoder(layers, seq=seq)`` (BERT-base shapes) with ``bitfx.export``.
2. Builds ``arm_profile_plugin.c`` (a TCG plugin counting executions of each translated block)
   against the installed qemu's ``qemu-plugin.h``: from ``BITFX_QEMU_PLUGIN_H``, ``/usr/include``, the
   bitfx cache, or else extracted from Debian's source package of the installed qemu (``apt-get
   source --download-only`` with a private ``deb-src`` list and state directory: nothing on the
   system changes; ``--no-fetch`` turns that off and the benchmark stops with what to do).
3. Runs ``bitfx_loader`` under ``qemu-aarch64 -cpu CPU`` with ``TVM_NUM_THREADS=1`` twice, calling
   ``main`` once and twice: the difference is one inference, without loading and first-call costs.
   Counts are deterministic (same build, same inputs, same numbers).
4. Maps block addresses to symbols (the loader's ``--maps`` + ``nm``) and prints instructions per
   kernel, per category (binary GEMMs, attention integer products, packing, GELU, softmax,
   LayerNorm, float matmuls, other float ops, runtime/libc) and per inference; for the binary GEMMs
   also instructions per 64-bit word of the reduction (``M * N * K / 64`` word-MACs per call).
5. Cuts the hottest blocks of the model out of its disassembly and prints llvm-mca's cycles per
   iteration on each ``--mca-cpus`` model (``llvm-mca-19`` if installed: Debian ``llvm-19``; LLVM 14
   lacks a real Neoverse-N1 model).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PLUGIN_SOURCE = HERE / "arm_profile_plugin.c"
CATEGORIES = [  # (category, regex on the kernel name), first match wins
    ("binary GEMM", r"gemm"),
    ("attention integer products", r"sign_scores|binary_pv"),
    ("packing / absmax planes", r"pack|absmax|planes"),
    ("GELU", r"gelu|^erff?$|^tanhf?$"),
    ("softmax", r"softmax"),
    ("LayerNorm", r"layer_norm"),
    ("float matmul", r"matmul|dense"),
]


# ------------------------------------------------------------------------------ the plugin
def qemu_version() -> str:
    out = subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def plugin_header(fetch: bool, cache: Path) -> Path:
    """The directory holding qemu-plugin.h for the installed qemu."""
    for d in filter(None, [os.environ.get("BITFX_QEMU_PLUGIN_H"), "/usr/include/qemu", "/usr/include"]):
        d = Path(d)
        d = d.parent if d.name == "qemu-plugin.h" else d
        if (d / "qemu-plugin.h").is_file():
            return d
    pkg = subprocess.run(["dpkg-query", "-W", "-f=${source:Package} ${source:Version}", "qemu-user"],
                         capture_output=True, text=True).stdout.split()
    if len(pkg) != 2:
        sys.exit("qemu-user is not installed as a Debian package; set BITFX_QEMU_PLUGIN_H to the "
                 "qemu-plugin.h of your qemu's source (include/qemu/qemu-plugin.h)")
    source, version = pkg
    dest = cache / f"{source}-{version.replace(':', '_')}"
    if (dest / "qemu-plugin.h").is_file():
        return dest
    if not fetch:
        sys.exit(f"qemu-plugin.h not found. It is in Debian's source package {source}={version} "
                 "(include/qemu/qemu-plugin.h): rerun without --no-fetch, or add a deb-src line, "
                 f"`apt-get source {source}={version}`, and set BITFX_QEMU_PLUGIN_H")
    print(f"fetching qemu-plugin.h from Debian's source package {source}={version} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bitfx-qemu-src-") as tmp:
        tmp = Path(tmp)
        (tmp / "lists" / "partial").mkdir(parents=True)
        suites = ("bookworm", "bookworm-updates")
        (tmp / "sources.list").write_text(
            "".join(f"deb-src http://deb.debian.org/debian {s} main\n" for s in suites)
            + "deb-src http://deb.debian.org/debian-security bookworm-security main\n")
        opts = [f"-oDir::Etc::SourceList={tmp / 'sources.list'}", "-oDir::Etc::SourceParts=/dev/null",
                f"-oDir::State::Lists={tmp / 'lists'}"]
        subprocess.run(["apt-get", *opts, "update", "-qq"], check=True)
        got = subprocess.run(["apt-get", *opts, "source", "--download-only", f"{source}={version}"],
                             cwd=tmp, capture_output=True, text=True)
        if got.returncode != 0:  # the exact version left the archive: any bookworm one has the same API
            subprocess.run(["apt-get", *opts, "source", "--download-only", source], cwd=tmp, check=True)
        orig = next(tmp.glob(f"{source}_*.orig.tar.*"))
        subprocess.run(["tar", "-xf", str(orig), "-C", str(tmp), "--wildcards", "*/include/qemu/qemu-plugin.h"],
                       check=True)
        header = next(tmp.glob("*/include/qemu/qemu-plugin.h"))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(header, dest / "qemu-plugin.h")
    return dest


def build_plugin(header_dir: Path, cache: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("clang") or sys.exit("no C compiler (gcc or clang) for the plugin")
    key = hashlib.sha256(PLUGIN_SOURCE.read_bytes() + (header_dir / "qemu-plugin.h").read_bytes())
    out = cache / f"libbitfx_tbcount-{key.hexdigest()[:12]}.so"
    if not out.exists():
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", f"-I{header_dir}", str(PLUGIN_SOURCE),
                        "-o", str(out), "-lpthread"], check=True)
    return out


# ------------------------------------------------------------------------------ running and counting
def run_counts(plugin: Path, lib: Path, inputs: list[Path], target: str, cpu: str, calls: int,
               work: Path) -> tuple[dict[int, tuple[int, int]], list[str]]:
    """{block vaddr: (n_insns, executions)} and the guest's /proc/self/maps, for ``calls`` calls of main."""
    from bitfx.targets import emulate

    counts, maps = work / f"blocks_{calls}.txt", work / f"maps_{calls}.txt"
    libs = [str(emulate.fetch_arm64_runtime())]
    if "android" in target:
        libs.append(str(emulate._bionic_shim(work / f"shim_{calls}")))
    cmd = emulate.qemu_command(target, cpu) + ["-plugin", f"{plugin},out={counts}",
                                               str(emulate.build_loader("linux-arm64")), str(lib), str(work),
                                               *map(str, inputs), "--maps", str(maps)]
    if calls > 1:
        cmd += ["--repeat", str(calls - 1), "--warmup", "0"]
    env = {**os.environ, "TVM_NUM_THREADS": "1", "LD_LIBRARY_PATH": ":".join(libs)}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    blocks: dict[int, tuple[int, int]] = {}
    for line in counts.read_text().splitlines():
        vaddr, n, execs = line.split()
        old = blocks.get(int(vaddr, 16), (int(n), 0))  # a block translated twice: add its counts
        blocks[int(vaddr, 16)] = (max(old[0], int(n)), old[1] + int(execs))
    return blocks, maps.read_text().splitlines()


class Symbolizer:
    """Guest address -> (file, function) from /proc/self/maps and each file's symbol table."""

    def __init__(self, maps: list[str]):
        self.ranges = []  # (start, end, path, load base)
        base: dict[str, int] = {}
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if int(parts[2], 16) == 0 and parts[5] not in base:
                base[parts[5]] = start
            if "x" in parts[1]:
                self.ranges.append((start, end, parts[5], base.get(parts[5], start)))
        self.symbols: dict[str, tuple[list[int], list[str]]] = {}
        self.plt: dict[str, tuple[int, int]] = {}
        self.ends: dict[tuple[str, int], int] = {}  # (file, symbol start) -> end, when nm knows the size

    def _table(self, path: str) -> tuple[list[int], list[str]]:
        if path not in self.symbols:
            nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("llvm-nm") or "nm"
            rows, sized = [], []
            for flags in (["--defined-only"], ["-D", "--defined-only"]):
                out = subprocess.run([nm, "-n", "-S", *flags, path], capture_output=True, text=True).stdout
                for ln in out.splitlines():
                    f = ln.split()
                    if len(f) in (3, 4) and f[-2] in "tTwWiI":
                        rows.append((int(f[0], 16), re.sub(r"@.*$", "", f[-1])))
                        if len(f) == 4:
                            sized.append((int(f[0], 16), int(f[0], 16) + int(f[1], 16)))
                            self.ends[(path, int(f[0], 16))] = int(f[0], 16) + int(f[1], 16)
                if rows:
                    static = flags == ["--defined-only"]
                    break
            if rows and static:
                rows += self._lambdas(path, rows, sized)
            rows.sort()
            self.symbols[path] = ([a for a, _ in rows], [n for _, n in rows])
            objdump = shutil.which("aarch64-linux-gnu-objdump") or "llvm-objdump"
            heads = subprocess.run([objdump, "-h", path], capture_output=True, text=True).stdout
            m = re.search(r"\s\.plt\s+([0-9a-f]+)\s+([0-9a-f]+)", heads)
            self.plt[path] = (int(m.group(2), 16), int(m.group(2), 16) + int(m.group(1), 16)) if m else (0, 0)
        return self.symbols[path]

    @staticmethod
    def _lambdas(path: str, rows, sized) -> list[tuple[int, str]]:
        """Unnamed functions (TVM's parallel lambdas have private linkage, so no symbol) as
        ``PARENT@lambda``: PARENT is the function whose ``adrp``+``add`` computes their address."""
        import bisect

        starts = sorted(sized)
        def inside(addr):
            i = bisect.bisect_right(starts, (addr, float("inf"))) - 1
            return i >= 0 and starts[i][0] <= addr < starts[i][1]

        objdump = shutil.which("aarch64-linux-gnu-objdump") or "llvm-objdump"
        text = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True).stdout
        found, func, page = {}, None, {}
        for ln in text.splitlines():
            if m := re.match(r"^[0-9a-f]+ <(.+)>:$", ln):
                func, page = m.group(1), {}
            elif m := re.search(r"\tadrp\s+(x\d+), ([0-9a-f]+)", ln):
                page[m.group(1)] = int(m.group(2), 16)
            elif (m := re.search(r"\tadd\s+(x\d+), (x\d+), #0x([0-9a-f]+)", ln)) and m.group(2) in page:
                target = page[m.group(2)] + int(m.group(3), 16)
                if func and not inside(target) and target not in {a for a, _ in rows}:
                    found.setdefault(target, f"{func}@lambda")
        return sorted(found.items())

    def lookup(self, addr: int) -> tuple[str, str]:
        import bisect

        for start, end, path, base in self.ranges:
            if start <= addr < end:
                addrs, names = self._table(path)
                if self.plt[path][0] <= addr - base < self.plt[path][1]:
                    return path, "<plt>"
                i = bisect.bisect_right(addrs, addr - base) - 1
                if i < 0 or addr - base >= self.ends.get((path, addrs[i]), float("inf")):
                    return path, "?"  # past the symbol's end: a local function the table lacks
                return path, names[i]
        return "?", "?"


def kernel_name(symbol: str) -> str:
    """``__tvm_ffi_reshape12`` / ``reshape12_compute_`` -> ``reshape``; bitfx kernels keep their shape."""
    name = re.sub(r"^__tvm_ffi_|_compute_$", "", re.sub(r"@lambda$", "", symbol))
    name = re.sub(r"\.(part|cold|constprop|isra)\.\d+$", "", name)
    return name if name.startswith("bitfx") else re.sub(r"(?<=[a-z_])\d+$", "", name)


RUNTIME = "runtime: Relax VM, tvm-ffi, libc, ld.so"
LIBM = "other libm calls (expf...) + PLT stubs"


def category(path: str, name: str, model: str) -> str:
    if name == "<plt>" or (Path(path).name.startswith("libm.") and not re.search(r"^erff?$|^tanhf?$", name)):
        return LIBM
    if Path(path).name != model and not re.search(r"^erff?$|^tanhf?$", name):
        return RUNTIME
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "other float ops"


# ------------------------------------------------------------------------------ llvm-mca
def find_mca() -> str | None:
    return next((t for t in ("llvm-mca-19", "llvm-mca-18", "llvm-mca-17", "llvm-mca") if shutil.which(t)), None)


def block_asm(lib: Path, vaddr: int, n: int) -> list[str]:
    """The block's instructions as assembly llvm-mca parses; a branch back to it targets label L."""
    objdump = shutil.which("aarch64-linux-gnu-objdump") or "llvm-objdump"
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--start-address={vaddr:#x}",
                          f"--stop-address={vaddr + 4 * n:#x}", str(lib)], capture_output=True, text=True).stdout
    lines = []
    for ln in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(\S.*)$", ln)
        if not m:
            continue
        ins = re.sub(r"\s*//.*$|\s*<[^>]*>", "", m.group(2)).strip()
        ins = re.sub(r"^(b\.\w+|b|cbn?z|tbn?z)(\s+(?:[^,]+,\s*){0,2})[0-9a-f]+$",
                     lambda b: b.group(1) + b.group(2) + "L", ins)
        lines.append("\t" + ins)
    return ["L:", *lines]


def mca_cycles(mca: str, asm: list[str], cpu: str, iterations: int = 200) -> float | None:
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write("\n".join(asm) + "\n")
        f.flush()
        proc = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={cpu}", f"-iterations={iterations}", f.name],
                              capture_output=True, text=True)
    m = re.search(r"Total Cycles:\s+(\d+)", proc.stdout)
    return int(m.group(1)) / iterations if m else None


# ------------------------------------------------------------------------------ hand-written kernels
def standalone_kernel(kind: str, m: int, n: int, k: int, target: str, work: Path) -> tuple[Path, list[Path]]:
    """``bitfx.targets.arm``'s hand-tiled binary GEMM (``kind="bit"``) or fp32 NEON GEMM as a Relax
    library of one ``call_tir``, with random inputs saved beside it."""
    from tvm import relax

    from bitfx.targets import arm, cross

    rng = np.random.default_rng(0)
    if kind == "bit":
        kb = arm.packed_bytes(k)
        prim, dtype, shapes = arm.binary_gemm_neon(m, n, k), "uint8", [(m, kb), (n, kb)]
        arrays = [rng.integers(0, 256, sh, dtype=np.uint8) for sh in shapes]
        out = relax.TensorType((m, n), "int32")
    else:
        prim, dtype, shapes = arm.fp32_gemm_neon(m, n, k), "float32", [(m, k), (k, n)]
        arrays = [rng.standard_normal(sh).astype(np.float32) for sh in shapes]
        out = relax.TensorType((m, n), "float32")
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(sh, dtype)) for name, sh in zip("aw", shapes)]
    with bb.function("main", params):
        gv = bb.add_func(prim, f"{kind}_gemm_neon")
        bb.emit_func_output(bb.emit(relax.call_tir(gv, params, out)))
    lib = cross.export_library(cross.build_relax(bb.get(), target), work / f"{kind}_{m}x{n}x{k}.so", target)
    paths = []
    for name, x in zip("aw", arrays):
        paths.append(work / f"{kind}_{m}x{n}x{k}_{name}.npy")
        np.save(paths[-1], x)
    return lib, paths


def kernel_instructions(plugin: Path, lib: Path, inputs: list[Path], target: str, cpu: str, work: Path) -> int:
    """Dynamic instructions inside ``lib`` (its kernels) for one call of its ``main``."""
    one, maps = run_counts(plugin, lib, inputs, target, cpu, 1, work)
    two, _ = run_counts(plugin, lib, inputs, target, cpu, 2, work)
    sym = Symbolizer(maps)
    return sum(n * (e - one.get(v, (n, 0))[1]) for v, (n, e) in two.items()
               if Path(sym.lookup(v)[0]).name == lib.name)


def compare_with_hand_tiled(plugin: Path, args, gemms: dict[str, tuple[int, int, int, int]], tokens: int,
                            work: Path) -> None:
    """Exported GEMMs vs the hand-tiled kernel (instructions per call) and vs fp32 NEON (per MAC)."""
    print(f"\nexported binary GEMMs vs bitfx.targets.arm's hand-tiled kernel and its fp32 NEON GEMM "
          f"(same M, N, K; one call each)")
    print(f"{'GEMM (M x N x K)':<22} {'exported':>10} {'hand-tiled':>10} {'ratio':>6} "
          f"{'fp32 NEON':>10} {'insns/MAC fp32 / binary':>24}")
    for name, (k, n, insns, ncalls) in sorted(gemms.items()):
        per_call = insns / ncalls
        hand = kernel_instructions(plugin, *standalone_kernel("bit", tokens, n, k, args.target, work),
                                   args.target, args.cpu, work)
        fp32 = kernel_instructions(plugin, *standalone_kernel("fp32", tokens, n, k, args.target, work),
                                   args.target, args.cpu, work)
        print(f"{f'{tokens} x {n} x {k}':<22} {per_call / 1e6:>9.2f}M {hand / 1e6:>9.2f}M "
              f"{per_call / hand:>5.2f}x {fp32 / 1e6:>9.2f}M {fp32 / per_call:>23.1f}x")


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--config", default=None, help="BinarizeConfig preset (default: bitfx's default)")
    p.add_argument("--target", default="linux-arm64")
    p.add_argument("--cpu", default="cortex-a53", help="qemu CPU model (cortex-a53: ARMv8.0-A)")
    p.add_argument("--mca-cpus", nargs="+", default=["neoverse-n1", "cortex-a55"])
    p.add_argument("--top", type=int, default=8, help="hot blocks given to llvm-mca")
    p.add_argument("--lib", type=Path, default=None, help="profile this exported library instead "
                   "(with --inputs); skips the export")
    p.add_argument("--inputs", type=Path, nargs="*", default=[])
    p.add_argument("--tokens", type=int, default=128, help="with --lib: M of the GEMMs (batch * seq)")
    p.add_argument("--no-fetch", action="store_true", help="never download qemu's source for the header")
    p.add_argument("--no-hand-tiled", action="store_true", help="skip the comparison with the hand-tiled "
                   "and fp32 NEON kernels")
    p.add_argument("--keep", type=Path, default=None, help="keep the work files here")
    args = p.parse_args()

    from bitfx.targets import emulate

    cache = emulate.cache_dir() / "qemu-plugin"
    cache.mkdir(parents=True, exist_ok=True)
    header = plugin_header(not args.no_fetch, cache)
    plugin = build_plugin(header, cache)
    api = re.search(r"#define QEMU_PLUGIN_VERSION (\d+)", (header / "qemu-plugin.h").read_text())
    print(f"{qemu_version()}; plugin API {api.group(1) if api else '?'} ({header / 'qemu-plugin.h'})")

    work = args.keep or Path(tempfile.mkdtemp(prefix="bitfx-arm-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    tokens = args.tokens
    if args.lib:
        lib, inputs = args.lib.resolve(), [x.resolve() for x in args.inputs]
    else:
        import bitfx
        from bitfx.models import bert_encoder

        model, example = bert_encoder(layers=args.layers, seq=args.seq)
        tokens = example[0].numel()
        t0 = time.perf_counter()
        lib = bitfx.export(model, example, target=args.target, path=work / "model.so",
                           config=args.config, bundle=False)
        print(f"exported bert_encoder(layers={args.layers}, seq={args.seq}) for {args.target} "
              f"in {time.perf_counter() - t0:.1f} s")
        inputs = []
        for i, x in enumerate(example):
            np.save(work / f"input_{i}.npy", x.numpy())
            inputs.append(work / f"input_{i}.npy")

    one, maps = run_counts(plugin, lib, inputs, args.target, args.cpu, 1, work)
    two, _ = run_counts(plugin, lib, inputs, args.target, args.cpu, 2, work)
    sym = Symbolizer(maps)
    per_kernel: dict[tuple[str, str], int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    hot: list[tuple[int, int, int, str]] = []  # (dynamic insns, vaddr in file, n_insns, kernel)
    model_name = Path(lib).name
    entry_addrs: dict[str, set[int]] = {}
    for vaddr, (n, execs) in two.items():
        d = execs - one.get(vaddr, (n, 0))[1]
        if d <= 0:
            continue
        path, s = sym.lookup(vaddr)
        name = kernel_name(s)
        cat = category(path, name, model_name)
        per_kernel[(cat, name if Path(path).name == model_name else f"{Path(path).name}:{name}")] += n * d
        if Path(path).name == model_name:
            base = next(b for st, e, pth, b in sym.ranges if st <= vaddr < e)
            addrs, names = sym._table(path)
            if (vaddr - base) in set(addrs) and s.endswith("_compute_"):
                calls[name] += d  # the block at the kernel's entry: one per call
            hot.append((n * d, vaddr - base, n, name))

    total = sum(per_kernel.values())
    print(f"\none inference on qemu -cpu {args.cpu}, TVM_NUM_THREADS=1: {total / 1e6:.2f} M dynamic "
          f"aarch64 instructions ({model_name}, {Path(lib).stat().st_size / 1e6:.1f} MB)")
    by_cat: dict[str, int] = defaultdict(int)
    for (cat, _), v in per_kernel.items():
        by_cat[cat] += v
    print(f"\n{'category':<42} {'M insns':>9} {'share':>6}")
    for cat, v in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"{cat:<42} {v / 1e6:>9.2f} {100 * v / total:>5.1f}%")
    print(f"\n{'kernel (top 25)':<62} {'M insns':>9} {'share':>6} {'calls':>5} {'insns/word':>10}")
    gemms = {}
    for (cat, name), v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]:
        per_word = ""
        m = re.search(r"_k(\d+)_n(\d+)", name)
        if cat == "binary GEMM" and m and tokens and calls.get(name):
            words = calls[name] * tokens * int(m.group(2)) * -(-int(m.group(1)) // 64)
            per_word = f"{v / words:.2f}"
            gemms[name] = (int(m.group(1)), int(m.group(2)), v, calls[name])
        print(f"{name[:62]:<62} {v / 1e6:>9.2f} {100 * v / total:>5.1f}% {calls.get(name, ''):>5} {per_word:>10}")

    if gemms and tokens and not args.no_hand_tiled:
        compare_with_hand_tiled(plugin, args, gemms, tokens, work)

    mca = find_mca()
    if mca is None:
        print("\nllvm-mca not found (Debian llvm-19 or llvm): no static cycle estimates")
        return
    ver = re.search(r"version ([\d.]+)", subprocess.run([mca, "--version"], capture_output=True, text=True).stdout)
    print(f"\nhottest blocks of the model, {mca} (LLVM {ver.group(1) if ver else '?'}) cycles per iteration:")
    print(f"{'kernel':<44} {'share':>6} {'insns':>5} " + " ".join(f"{c:>12}" for c in args.mca_cpus))
    for dyn, off, n, name in sorted(hot, reverse=True)[:args.top]:
        asm = block_asm(Path(lib), off, n)
        cyc = [mca_cycles(mca, asm, c) for c in args.mca_cpus]
        print(f"{name[:44]:<44} {100 * dyn / total:>5.1f}% {n:>5} " +
              " ".join(f"{c:>12.2f}" if c is not None else f"{'-':>12}" for c in cyc))
        if args.keep:
            (work / f"hot_{off:x}.s").write_text("\n".join(asm) + "\n")


if __name__ == "__main__":
    main()
