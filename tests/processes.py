"""Fresh Python processes for warm-start tests: a script that prints one JSON line, run as a user's second
process would run it."""
from __future__ import annotations

import json
import subprocess
import sys


def json_runs(script: str, env: dict, times: int = 2, args: tuple = ()) -> list[dict]:
    """Run ``script`` (``python -c``) ``times`` times one after another with ``env``; each run's last stdout
    line, parsed as JSON (a failed run fails the test with the end of its stderr)."""
    runs = []
    for _ in range(times):
        out = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs
