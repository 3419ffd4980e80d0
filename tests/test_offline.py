"""Quiet, honest runs as a user starts them (a real process, not offline mode): with the hub
unreachable and the model in the cache, encode asks the hub once, says in one line that it uses
the cached copy, and finishes without retry spam; ``-q`` silences every bar but no warning."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clip_heads.store import open_store
from conftest import build_tiny_clip
from test_provenance import REPO, REV_A, add_revision, colours, point_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unreachable_hub(tmp_path_factory):
    """A fake cache holding the model, and an endpoint whose port refuses connections."""
    root = tmp_path_factory.mktemp("offline")
    cache = root / "cache"
    add_revision(cache, REPO, build_tiny_clip(root / "model"), REV_A)
    point_main(cache, REPO, REV_A)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(root / "hf-home"), PYTHONPATH=str(ROOT),
               HF_ENDPOINT=f"http://127.0.0.1:{sock.getsockname()[1]}", PYTHONUNBUFFERED="1")
    yield {"root": root, "env": env}
    sock.close()


def clip_heads(env, *argv) -> subprocess.CompletedProcess:
    # Before the fix this run took 3.5 minutes of retries; the bound only keeps a regression from hanging CI.
    return subprocess.run([sys.executable, "-m", "clip_heads.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=240)


def test_unreachable_hub_uses_the_cache_after_one_question(unreachable_hub, tmp_path):
    imgs = colours(tmp_path / "imgs")
    res = clip_heads(unreachable_hub["env"], "encode", imgs, "--out", tmp_path / "s.h5", "--model", REPO, "-w", "0",
                     "-t", "bp-photo")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    hub = [line for line in lines if "127.0.0.1" in line or "Retry" in line or "huggingface_hub" in line]
    cached = [line for line in lines if f"using the cached copy of {REPO} at revision {REV_A}" in line]
    assert len(cached) == 1 and cached[0].startswith("INFO") and "unreachable" in cached[0]
    assert len(hub) <= 2 and not any("Retry" in line for line in lines), res.stderr
    assert any("prompts bp-photo" in line for line in lines)  # the prompt side has a bar too
    said = [line for line in lines if line.strip() and "%|" not in line]  # bars redraw; messages must not repeat
    assert len(said) == len(set(said)), res.stderr
    with open_store(tmp_path / "s.h5") as s:
        assert s.attrs["model_revision"] == REV_A and s.model_hash.startswith("sha256:") and len(s) == 8


def test_quiet_silences_every_bar_but_no_warning(unreachable_hub, tmp_path):
    imgs = colours(tmp_path / "imgs")
    (imgs / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = clip_heads(unreachable_hub["env"], "-q", "encode", imgs, "--out", tmp_path / "s.h5", "--model", REPO,
                     "-w", "0", "-t", "bp-photo")
    assert res.returncode == 0, res.stderr
    assert "encoded:" in res.stdout and "1 skipped" in res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["WARNING clip_heads.encode"], res.stderr
    assert "red/broken.png" in lines[0]
    assert "%|" not in res.stderr and "Loading weights" not in res.stderr and "INFO" not in res.stderr
