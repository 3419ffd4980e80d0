"""The CLI's exit codes, chosen in one place (clip_heads.errors, applied by cli.friendly): 2 for a
bad value, 1 for failed work; each error is one line, no traceback, and nothing is written."""
from __future__ import annotations

import numpy as np
import pytest

from clip_heads.fsutil import exclusive_lock
from clip_heads.store import PromptSet
from clip_heads.writer import write_store
from faultkit import invoke, one_line_error


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    ps = PromptSet("mine", ["a", "b"], ["{}"], ["a", "b"], rng.normal(size=(2, 8)).astype(np.float32), np.zeros(2, int),
                   np.arange(2))
    return write_store(tmp_path / "s.h5", rng.normal(size=(40, 8)), np.arange(40) % 2, ["a", "b"], model_id="m",
                       model_hash="sha256:0", prompt_sets=[ps])


def test_bad_values_exit_2_failed_work_exits_1_in_one_line(store, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "config.json").write_text("{}")  # a head folder missing its weights file
    cases = [
        (["train-head", "mlp", store, "--out", out, "--param", "epochs=0"], 2,
         "'epochs' parameter of MLPHead must be an int in the range [1, inf). Got 0 instead."),
        (["zero-shot", store, "--prompts", "nope", "--out", out], 2, "has no prompt set 'nope'; it has ['mine']"),
        (["evaluate", tmp_path / "head", store, "--out", out], 1, "model.safetensors is missing"),
        (["zero-shot", tmp_path / "junk.h5", "--out", out], 1, "not a readable HDF5 feature store"),
    ]
    for argv, code, needle in cases:
        got, output = invoke([str(a) for a in argv])
        assert got == code, (argv, output)
        one_line_error(output, needle)
        assert not out.exists(), argv
    with exclusive_lock(tmp_path / "merged.h5", "a test holding it"):  # another writer of the store
        got, output = invoke(["merge", str(tmp_path / "merged.h5"), str(store)])
    assert got == 1
    one_line_error(output, "a test holding it")
    assert not (tmp_path / "merged.h5").exists()
