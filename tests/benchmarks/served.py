"""The service in its own process for the serving benchmarks (serving.py, serving_load.py), and the request
histories they send."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``recsys serve`` in its own session (so the whole group stops), ready when /readyz says so."""

    def __init__(self, bundle: Path, *extra: str, roots: list[Path], cache: Path, timeout: float = 1800,
                 python_args: list[str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RECSYS_BUNDLE_ROOTS": os.pathsep.join(map(str, roots)),
               "RECSYS_SERVING_CACHE": str(cache)}
        self.log = open(cache / f"server-{self.port}.log", "w")
        command = [sys.executable, *(python_args or ["-m", "recsys.cli"]), "serve", "--bundle", str(bundle)]
        self.proc = subprocess.Popen([*command, "--port", str(self.port), *extra], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def histories(item_ids: np.ndarray, popularity: np.ndarray, n: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    p = popularity / popularity.sum()
    return [list(item_ids[rng.choice(len(item_ids), rng.integers(1, 51), p=p)]) for _ in range(n)]


def beauty_bundle(path: Path | None) -> Path:
    """``path``, or SASRec on Amazon Beauty (seed 42, as ``make eval`` names it), trained the first time."""
    if path is not None:
        return path
    default = REPO / "runs" / "amazon-beauty" / "sasrec" / "seed-42"
    if not (default / "config.json").is_file():
        from recsys.run import train_run

        print(f"training SASRec on Amazon Beauty into {default} (one time)", file=sys.stderr)
        train_run("sasrec", "amazon-beauty", raw_dir=REPO.parent / "shared" / "data" / "amazon-beauty",
                  out_dir=default, track=False)
    return default
