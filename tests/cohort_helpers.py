"""Helpers of the cohort tests: synthetic slides, manifest rows, file trees, listening sockets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from standins import layout


def write_slides(folder: Path, names: list[str], width: int = 1280, height: int = 1024
                 ) -> list[Path]:
    """Synthetic Aperio-style pyramids (the standins layout, mpp 0.5) under ``names``: one
    written, the others copies (each a distinct file with its own name and mtime)."""
    from wsiproto.slide.synthetic import write_pyramidal_tiff

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    first = paths[0]
    first.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(first, width, height, layout(width, height), mpp=0.5, levels=2)
    for p in paths[1:]:
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, p)
    return paths


def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def manifest_rows(out: Path, key: str = "name") -> dict[str, dict]:
    """The manifest's rows (manifest.csv and its journal, as the next run reads them), by
    slide file name (``key="name"``) or full path."""
    from wsiproto.cohort import Manifest

    rows = Manifest(out).rows
    return {(Path(s).name if key == "name" else s): r for s, r in rows.items()}


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (recursively, hidden ones too): kind, size, mtime."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "dir" if p.is_dir() else "file"
            out[str(p.relative_to(root))] = (kind, 0 if kind == "dir" else st.st_size,
                                             0 if kind == "dir" else st.st_mtime_ns)
    return out


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process ``pid`` and its children."""
    import psutil

    found = set()
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return found
    for proc in procs:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found


def popen_wsiproto(*args: str, cwd: Path | None = None, env: dict | None = None
                   ) -> subprocess.Popen:
    """The installed command as a running process (stdout and stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "wsiproto", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


class MidSlideKiller:
    """While a cohort runs on ``client``'s workers into ``out``: SIGKILL the worker process
    running a slide that has finished chunks but no summary yet, once. ``killed``: (folder,
    worker address). Use as a context manager around the run."""

    def __init__(self, client, out: Path):
        import threading

        self.client, self.out = client, out
        self.pids = client.run(os.getpid)  # worker address -> pid
        self.killed: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import signal
        import time

        while not self.stop.is_set():
            for done in self.out.glob("*/.partial/done"):
                stem = done.parent.parent.name
                if not any(done.iterdir()) or (self.out / stem / "summary.json").exists():
                    continue
                for addr, keys in self.client.processing().items():
                    if addr in self.pids and any(f"segment-{stem}-" in str(k) for k in keys):
                        os.kill(self.pids[addr], signal.SIGKILL)
                        self.killed.append((stem, addr))
                        return
            time.sleep(0.02)

    def __enter__(self) -> MidSlideKiller:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
