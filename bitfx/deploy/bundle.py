"""Write a device bundle: the exported model plus everything needed to run and measure it there."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitfx.deploy import android_glibc, symbol_versions
from bitfx.targets import cross, emulate

log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
LOADER_SOURCE = emulate.LOADER_SOURCE
README_TEMPLATE = _HERE / "bundle_readme.md"
_ANDROID_ABI = {"aarch64-linux-android": ("arm64-v8a", "aarch64-linux-android"),
                "armv7a-linux-androideabi": ("armeabi-v7a", "arm-linux-androideabi")}


def write_bundle(model_path: str | Path, target: str, out_dir: str | Path | None = None, *,
                 include_runtime: bool = True, build_loader: bool = True,
                 inputs: Sequence[Any] | None = None) -> Path:
    """Gather what a device needs to run ``model_path`` into ``out_dir`` (default: its directory).

    Writes the model (copied if ``out_dir`` is elsewhere), ``loader.cc`` + ``glibc_start.c``,
    ``input_<i>.npy`` for ``inputs``, ``README.md`` (what to push, the exact command that runs it and
    prints its latency, how to build the loader, how to measure with TVM's RPC tracker) and
    ``manifest.json``. For aarch64 targets, ``include_runtime`` copies the aarch64
    ``libtvm_runtime.so``/``libtvm_ffi.so`` (``emulate.fetch_arm64_runtime``) and ``build_loader``
    adds a prebuilt ``bitfx_loader`` (glibc 2.17+, checked against ``symbol_versions.OLDEST_LINUX``).
    Android bundles also carry a glibc userland started by its static dynamic linker
    (``android_glibc``), so they run with ``adb shell`` without an NDK.

    Returns:
        The bundle directory.

    Example: ``examples/export_arm64_bundle.py``.
    """
    dt = cross.get_target(target)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"no exported model at {model_path}")
    out = Path(out_dir) if out_dir is not None else model_path.parent
    out.mkdir(parents=True, exist_ok=True)
    if model_path.resolve() != (out / model_path.name).resolve():
        shutil.copy2(model_path, out / model_path.name)
    shutil.copy2(LOADER_SOURCE, out / "loader.cc")
    shutil.copy2(emulate.GLIBC_START_SOURCE, out / "glibc_start.c")
    input_names = []
    for i, x in enumerate(inputs or ()):
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        np.save(out / f"input_{i}.npy", np.ascontiguousarray(x))
        input_names.append(f"input_{i}.npy")

    status, shipped = _add_device_binaries(dt, out, include_runtime, build_loader, model_path.name)
    requires = symbol_versions.newest([out / n for n in (model_path.name, "bitfx_loader",
                                                          *emulate.RUNTIME_LIBS) if (out / n).is_file()])
    inputs_arg = " ".join(input_names) or "input_0.npy"
    versions = emulate.runtime_versions()
    abi, sysroot_triple = _ANDROID_ABI.get(dt.triple, ("", ""))
    fields = {
        "model": model_path.name, "target": dt.name, "triple": dt.triple,
        "description": dt.description, "tvm_version": versions["apache-tvm"],
        "tvm_version_base": re.sub(r"\.post\d+$", "", versions["apache-tvm"]),
        "ffi_version": versions["apache-tvm-ffi"], "android_api": str(cross.ANDROID_API),
        "android_abi": abi, "sysroot_triple": sysroot_triple, "runtime_status": status,
        "rpc_key": dt.name, "inputs": inputs_arg,
        "inputs_note": ("" if input_names else " (write your inputs with `numpy.save`, one file per "
                        "argument of the model, in order)"),
        "linux_requires": ", ".join(requires.values()) or "(no prebuilt files to read)",
        "ship_files": " ".join([model_path.name, *shipped, *input_names]),
        "android_dir": android_glibc.DEVICE_DIR,
        "android_run": " ".join(android_glibc.run_command(model_path.name, inputs_arg.split())),
    }
    (out / "README.md").write_text(render_readme(fields, android=dt.is_android))
    manifest = {
        "target": dt.name, "triple": dt.triple, "tvm_target": dt.target, "versions": versions,
        "files": {p.name: {"bytes": p.stat().st_size,
                           "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                  for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def render_readme(fields: dict[str, str], *, android: bool) -> str:
    """Fill ``bundle_readme.md``: ``{{name}}`` fields, and the blocks for the other OS removed."""
    text = README_TEMPLATE.read_text()
    drop = "linux" if android else "android"
    text = re.sub(rf"<!-- only: {drop} -->.*?<!-- end -->\n", "", text, flags=re.S)
    text = re.sub(r"<!-- (only: \w+|end) -->\n", "", text)
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    if leftover := sorted(set(re.findall(r"\{\{(\w+)\}\}", text))):
        raise KeyError(f"README template fields without a value: {leftover}")
    return text


def _add_device_binaries(dt: cross.DeviceTarget, out: Path, include_runtime: bool,
                         build_loader: bool, model: str) -> tuple[str, list[str]]:
    """Copy runtime libraries and a prebuilt loader where possible.

    Returns the README's sentence on what happened and the names of the files added.
    """
    if not dt.triple.startswith("aarch64"):
        return (f"No runtime libraries or loader are bundled for {dt.name}: build them with the "
                "Android NDK as described below."), []
    if dt.is_android:
        if not (include_runtime and build_loader):
            return ("The glibc userland, runtime and `bitfx_loader` are **not** included (bundle "
                    "written without them): build them with the Android NDK as described below."), []
        try:
            names = android_glibc.add_glibc_userland(out, out / model)
        except (cross.ToolchainNotFoundError, RuntimeError) as err:
            log.warning("android bundle without its glibc userland: %s", err)
            return (f"The glibc userland is **not** included ({err}); build the runtime with the "
                    "Android NDK as described below."), []
        return ("This bundle runs on the phone as it is, no NDK needed: it brings glibc's dynamic "
                "linker (a static executable), the glibc and C++ runtime libraries, the TVM runtime "
                "and `bitfx_loader` (see 'Run with adb').", names)
    notes, names = [], []
    if include_runtime:
        runtime = emulate.fetch_arm64_runtime()
        for lib in emulate.RUNTIME_LIBS:
            shutil.copy2(runtime / lib, out / lib)
            names.append(lib)
        notes.append("`libtvm_runtime.so` and `libtvm_ffi.so` are included (from the aarch64 wheels).")
    else:
        notes.append("The runtime libraries are not included; fetch them as described below.")
    if build_loader:
        try:
            shutil.copy2(emulate.build_loader("linux-arm64"), out / "bitfx_loader")
            names.append("bitfx_loader")
            notes.append("`bitfx_loader` is prebuilt for aarch64 Linux (glibc 2.17+).")
            if newer := symbol_versions.too_new(out / "bitfx_loader"):
                log.warning("bitfx_loader needs %s, newer than %s", newer, symbol_versions.OLDEST_LINUX_NAME)
        except (cross.ToolchainNotFoundError, RuntimeError) as err:
            log.warning("bundle without a prebuilt loader: %s", err)
            notes.append("`bitfx_loader` is not prebuilt (no cross compiler where the bundle was "
                         "written); build it as described below.")
    return " ".join(notes), names
