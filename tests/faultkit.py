"""Helpers for the fault tests: a small Emotion6-shaped source, store contents, forked runs."""
from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from clip_heads.cli import main
from clip_heads.store import open_store

EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")


def make_emotion6(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """``images/<emotion>/<n>.jpg`` + ``ground_truth.txt`` with valence, arousal and a 7-way
    distribution per image, plus one unreadable image (a recorded skip): 6 x per_class + 1
    items, so extras and skips are columns a fault could shift."""
    rng = np.random.default_rng(seed)
    lines = ["[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[prob. {e}]" for e in EMOTIONS + ("neutral",))]
    for c, emo in enumerate(EMOTIONS):
        d = root / "images" / emo
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (36 + i, 40, 3), dtype=np.uint8)
            arr[..., c % 3] = 255
            Image.fromarray(arr).save(d / f"{i + 1}.jpg", quality=90)
            dist = rng.dirichlet(np.ones(7))
            lines.append("\t".join([f"{emo}/{i + 1}.jpg", f"{rng.uniform(1, 9):.3f}", f"{rng.uniform(1, 9):.3f}",
                                    *(f"{p:.6f}" for p in dist)]))
    (root / "images" / "joy" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    lines.append("joy/broken.jpg\t5\t5\t" + "\t".join(["0"] * 6 + ["1"]))
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    return root


def store_content(path) -> dict:
    """Every dataset a store holds, as plain values (no timestamps)."""
    with open_store(path) as s:
        out = {"keys": s.keys, "labels": s.labels, "embeds": s.embeddings(), "skipped": s.skipped(),
               "classes": s.classes, "progress": s.progress, "default": s.attrs.get("default_prompts")}
        for name in s.extra_names():
            out[f"extra/{name}"] = s.extra(name)
        for name in s.prompt_sets():
            ps = s.prompt_set(name)
            out[f"prompts/{name}"] = (ps.texts, ps.classes, ps.templates, ps.embeds, ps.template_id, ps.class_id)
    return out


def assert_same_store(a, b) -> None:
    ca, cb = store_content(a), store_content(b)
    assert ca.keys() == cb.keys()
    for k in ca:
        va, vb = ca[k], cb[k]
        if isinstance(va, tuple):
            assert len(va) == len(vb) and all(np.array_equal(x, y) for x, y in zip(va, vb, strict=True)), k
        elif isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and np.array_equal(va, vb), k
        else:
            assert va == vb, k


def invoke(args) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def one_line_error(output: str, needle: str) -> None:
    """The CLI said one thing, containing ``needle``, and printed no traceback."""
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and needle in lines[0], output


def run_forked(fn, timeout: float = 120.0) -> tuple[str, int, dict | None]:
    """Run ``fn()`` in a forked child (its return value must be json-able) and wait.

    Returns ``(how, code, result)``: ("exit", status, result), ("signal", signum, None) or
    ("timeout", 0, None). The child runs torch on one thread (its results can differ in the
    last bit from a multi-threaded run: compare with a reference made the same way) and never
    returns into pytest."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            import torch

            torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's pool does not survive a fork
            payload = json.dumps({"ok": True, "value": fn()})
        except BaseException:  # report anything: the parent asserts
            code, payload = 3, json.dumps({"ok": False, "error": traceback.format_exc()})
        try:
            os.write(w, payload.encode())
        finally:
            os._exit(code)
    os.close(w)
    import select

    chunks = []
    ready, _, _ = select.select([r], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        return "timeout", 0, None
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks)) if chunks else None
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status), result
    return "exit", os.WEXITSTATUS(status), result
