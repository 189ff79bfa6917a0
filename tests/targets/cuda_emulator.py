"""Run the CUDA C++ that TVM generates for a bitfx kernel on the CPU, one std::thread per CUDA thread.

What it checks that nothing else here can: the generated code itself (index arithmetic, guards, the fused
epilogue, the uint64-as-uint32 views) with warp collectives emulated in lockstep. ``__shfl_sync``,
``__shfl_xor_sync`` and ``__ballot_sync`` exchange values through per-warp slots between two barriers, and
the inline ``mma.sync ... m16n8k256 ... and.popc`` is rewritten into a call of ``mma_b1``, which gathers the
warp's registers and computes D = C + popc(A & B) through the PTX ISA's fragment layout, written here in C++
as the inverse maps (which lane, register and bit hold A[row, k] and B[k, col]). A collective that not
every lane of a warp reaches (a divergent shuffle) times out and fails the run instead of hanging.

Usage: ``run_kernel(source, grid=(gx, gy, gz), block=threads, buffers={name: array}, scalars={"M": 5})``
returns the buffers after the run (the generators name each kernel parameter after its buffer).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = r"""
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned short ushort;
struct Dim3 { unsigned x, y, z; };
static thread_local Dim3 threadIdx, blockIdx;
#define __global__
#define __launch_bounds__(x)
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
template <class A, class B> static inline typename std::common_type<A, B>::type max(A a, B b) { return a > b ? a : b; }
template <class A, class B> static inline typename std::common_type<A, B>::type min(A a, B b) { return a < b ? a : b; }

struct Barrier {  // 32 lanes; a lane missing for 20 s is a divergent collective
  std::mutex m; std::condition_variable cv; int count = 0; long gen = 0;
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    long g = gen;
    if (++count == 32) { count = 0; ++gen; cv.notify_all(); return; }
    if (!cv.wait_for(lk, std::chrono::seconds(20), [&] { return gen != g; })) {
      std::fprintf(stderr, "DIVERGENT COLLECTIVE: a warp collective was not reached by all 32 lanes\n");
      std::_Exit(3);
    }
  }
};
struct Warp { Barrier bar; uint64_t slot[32]; unsigned a[32][4], b[32][2]; int c[32][4]; };
static thread_local Warp* W;
static thread_local int LANE;

template <class T> static T __shfl_sync(unsigned, T v, int src, int) {
  uint64_t bits = 0; std::memcpy(&bits, &v, sizeof(T)); W->slot[LANE] = bits; W->bar.wait();
  T r; uint64_t got = W->slot[src & 31]; std::memcpy(&r, &got, sizeof(T)); W->bar.wait(); return r;
}
template <class T> static T __shfl_xor_sync(unsigned m, T v, int x, int w) { return __shfl_sync(m, v, LANE ^ x, w); }
static unsigned __ballot_sync(unsigned, int pred) {
  W->slot[LANE] = pred ? 1 : 0; W->bar.wait();
  unsigned r = 0; for (int i = 0; i < 32; ++i) r |= (W->slot[i] ? 1u : 0u) << i;
  W->bar.wait(); return r;
}
// PTX ISA, m16n8k256 .b1: A[row][k] sits in lane 4*(row%8) + (k%128)/32, register (k>=128)*2 + (row>=8), bit k%32;
// B[k][col] in lane 4*col + (k%128)/32, register k>=128, bit k%32; D[row][col] in lane 4*(row%8) + col/2,
// register (row>=8)*2 + col%2.
static void mma_b1(int& d0, int& d1, int& d2, int& d3, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                   unsigned b0, unsigned b1, int c0, int c1, int c2, int c3) {
  unsigned av[4] = {a0, a1, a2, a3}; int cv[4] = {c0, c1, c2, c3};
  for (int i = 0; i < 4; ++i) { W->a[LANE][i] = av[i]; W->c[LANE][i] = cv[i]; }
  W->b[LANE][0] = b0; W->b[LANE][1] = b1;
  W->bar.wait();
  int out[4];
  for (int r = 0; r < 4; ++r) {
    int row = LANE / 4 + 8 * (r / 2), col = 2 * (LANE % 4) + r % 2;
    int acc = 0;
    for (int k = 0; k < 256; ++k) {
      int t = (k % 128) / 32, bit = k % 32, hi = k >= 128;
      unsigned abit = (W->a[4 * (row % 8) + t][hi * 2 + (row >= 8)] >> bit) & 1u;
      unsigned bbit = (W->b[4 * col + t][hi] >> bit) & 1u;
      acc += abit & bbit;
    }
    out[r] = W->c[4 * (row % 8) + col / 2][(row >= 8) * 2 + col % 2] + acc;
  }
  W->bar.wait();
  d0 = out[0]; d1 = out[1]; d2 = out[2]; d3 = out[3];
}
"""

_MMA = re.compile(r'\{\s*__asm__ __volatile__\(\s*"mma\.sync\.aligned\.m16n8k256[^"]*"\s*"[^"]*"\s*:(.*?)\);\s*\}',
                  re.S)


def _operands(text: str) -> list[str]:
    """The expressions of ``"=r"(expr), "r"(expr)`` constraint lists (balanced parentheses)."""
    out, i = [], 0
    while True:
        j = text.find('"(', i)
        if j < 0:
            return out
        depth, k = 0, j + 1
        while True:
            depth += {"(": 1, ")": -1}.get(text[k], 0)
            if depth == 0:
                break
            k += 1
        out.append(text[j + 2:k])
        i = k + 1


def _rewrite_mma(match: re.Match) -> str:
    ops = _operands(match.group(1))
    if len(ops) != 14:
        raise ValueError(f"unexpected mma operand list ({len(ops)} operands): {match.group(0)[:300]}")
    return "mma_b1(" + ", ".join(ops) + ");"


def _params(source: str) -> list[tuple[str, str]]:
    decl = re.search(r'extern "C" __global__ void __launch_bounds__\(\d+\) main_kernel\((.*?)\);', source, re.S)
    params = []
    for p in decl.group(1).split(","):
        p = p.replace("__restrict__", "").strip()
        typ, name = p.rsplit(" ", 1) if "*" not in p else (p[:p.rindex("*") + 1], p[p.rindex("*") + 1:])
        params.append((typ.strip(), name.strip()))
    return params


def emulator_source(source: str) -> tuple[str, list[tuple[str, str]]]:
    """The kernel (preamble dropped, mma rewritten) + shim + a main() that loads, runs and saves buffers."""
    body = source[source.index('extern "C" __global__'):]
    body = _MMA.sub(_rewrite_mma, body)
    if "mma.sync" in body or "asm" in body:
        raise ValueError("inline assembly left in the kernel that the emulator cannot run")
    params = _params(source)
    ptrs = [(t, n) for t, n in params if t.endswith("*")]
    scalars = [(t, n) for t, n in params if not t.endswith("*")]
    args, pi, si = [], 0, 0
    for typ, _ in params:
        if typ.endswith("*"):
            args.append(f"({typ})bufs[{pi}].data()")
            pi += 1
        else:
            args.append(f"({typ})scalars[{si}]")
            si += 1
    main = f"""
int main(int argc, char** argv) {{
  int gx = std::atoi(argv[1]), gy = std::atoi(argv[2]), gz = std::atoi(argv[3]), bd = std::atoi(argv[4]);
  std::vector<std::vector<char>> bufs({len(ptrs)});
  for (int i = 0; i < {len(ptrs)}; ++i) {{
    std::ifstream f(argv[5 + i], std::ios::binary); bufs[i].assign(std::istreambuf_iterator<char>(f), {{}});
  }}
  std::vector<long long> scalars;
  for (int i = 0; i < {len(scalars)}; ++i) scalars.push_back(std::atoll(argv[5 + {len(ptrs)} + i]));
  for (int z = 0; z < gz; ++z) for (int y = 0; y < gy; ++y) for (int x = 0; x < gx; ++x) {{
    std::vector<Warp> warps((bd + 31) / 32);
    std::vector<std::thread> ts;
    for (int t = 0; t < bd; ++t) ts.emplace_back([&, t] {{
      threadIdx = {{(unsigned)t, 0, 0}}; blockIdx = {{(unsigned)x, (unsigned)y, (unsigned)z}};
      W = &warps[t / 32]; LANE = t % 32;
      main_kernel({", ".join(args)});
    }});
    for (auto& th : ts) th.join();
  }}
  for (int i = 0; i < {len(ptrs)}; ++i) {{
    std::ofstream f(std::string(argv[5 + i]) + ".out", std::ios::binary); f.write(bufs[i].data(), bufs[i].size());
  }}
  return 0;
}}
"""
    return SHIM + body + main, params


def run_kernel(source: str, *, grid: tuple[int, int, int], block: int, buffers: dict[str, np.ndarray],
               scalars: dict[str, int], exe_dir: str | Path, timeout: float = 240) -> dict:
    """Compile the emulated kernel (g++ -O1, cached by source hash in ``exe_dir``) and run it.

    ``buffers`` and ``scalars`` are keyed by the kernel's parameter names (``x`` for ``x_ptr``, ``M``);
    returns every buffer after the run, by name.
    """
    code, params = emulator_source(source)
    ptr_names = [n[:-len("_ptr")] if n.endswith("_ptr") else n for t, n in params if t.endswith("*")]
    names = [n for t, n in params if not t.endswith("*")]
    if set(ptr_names) != set(buffers) or set(names) != set(scalars):
        raise ValueError(f"kernel takes {params}; got buffers {sorted(buffers)} and scalars {sorted(scalars)}")
    exe_dir = Path(exe_dir)
    exe_dir.mkdir(parents=True, exist_ok=True)
    exe = exe_dir / f"emu-{hashlib.sha256(code.encode()).hexdigest()[:16]}"
    if not exe.exists():
        with tempfile.TemporaryDirectory(prefix="bitfx-emu-") as tmp:
            src, out = Path(tmp) / "kernel.cc", Path(tmp) / "kernel"
            src.write_text(code)
            res = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", "-o", str(out), str(src)],
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"the emulated kernel does not compile:\n{res.stderr[-3000:]}")
            os.replace(out, exe)
    root = Path(tempfile.mkdtemp(prefix="bitfx-emu-run-"))
    files = {}
    for name in ptr_names:
        files[name] = root / f"{name}.bin"
        np.ascontiguousarray(buffers[name]).tofile(files[name])
    cmd = [str(exe), *map(str, grid), str(block), *(str(files[n]) for n in ptr_names),
           *(str(int(scalars[n])) for n in names)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"emulated kernel failed ({res.returncode}): {res.stderr[-2000:]}")
    out = {n: np.fromfile(f"{files[n]}.out", dtype=buffers[n].dtype).reshape(buffers[n].shape) for n in ptr_names}
    shutil.rmtree(root, ignore_errors=True)
    return out
