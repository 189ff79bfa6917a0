"""TVM kernels for the bitfx ops.

- `compute`: what each kernel computes, in `te.compute` (the definition and the portable fallback);
- `build`: compile + disk cache;
- `runtime`: the torch-facing functions (`pack_weight`, `bit_linear`, `sign_scores`, `binary_pv`, ...).

How a kernel runs on a given machine lives in `bitfx/targets/` (for this CPU: `bitfx.targets.host`).
"""
