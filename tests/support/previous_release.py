"""The previous release's source, for the rolling-upgrade tests (wire compatibility in
``tests/unit/test_wire_compat.py``, the image in ``tests/containers``).

The previous release is the commit this round's work started from: its code is in the
repository's own history, so nothing is fetched. ``extract`` writes its files with
``git archive``.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: the previous release (protocol version 1); never move it
PREVIOUS_RELEASE = "f8a6183009d819d37f4113bcc5f7ba49470b287d"


class PreviousReleaseMissing(RuntimeError):
    """The checkout has no history back to the previous release (a shallow clone)."""


def _archive(*paths: str) -> bytes:
    return subprocess.run(
        ["git", "archive", "--format=tar", PREVIOUS_RELEASE, *paths],
        cwd=REPO_ROOT, capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def extract(dest: Path, *paths: str) -> Path:
    """The previous release's ``paths`` (all of it if none) under ``dest``. A shallow
    clone lacks the commit: it is fetched from ``origin`` first, once."""
    try:
        try:
            tar = _archive(*paths)
        except subprocess.CalledProcessError:
            subprocess.run(["git", "fetch", "--quiet", "origin", PREVIOUS_RELEASE],
                           cwd=REPO_ROOT, capture_output=True, timeout=120)
            tar = _archive(*paths)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise PreviousReleaseMissing(
            f"git archive {PREVIOUS_RELEASE} failed ({detail.decode(errors='replace').strip()}): "
            "the rolling-upgrade tests need the repository's history (git fetch --unshallow)"
        ) from exc
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest
