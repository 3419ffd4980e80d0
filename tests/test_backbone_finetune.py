"""Fine-tune and WiSE-FT through the backbone layer (issue 10): each family trains with its own
loss (CLIP's InfoNCE, SigLIP's pairwise sigmoid at its own scale and bias), measured against
transformers' own ``return_loss``; WiSE-FT reproduces both SigLIP endpoints and refuses to
blend two families."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clip_heads.backbones.families import family_of_folder
from clip_heads.backbones.model import load_backbone
from clip_heads.finetune import finetune
from clip_heads.prompts import class_phrase
from clip_heads.wise_ft import interpolate
from test_backbones import colours

KINDS = ("clip", "siglip", "siglip2")  # siglip2: NaFlex batches (patches, mask, grid) through the training loop


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tuned(tiny_families, tmp_path_factory):
    """One optimizer step per family on three images of three classes, all in one batch."""
    root = tmp_path_factory.mktemp("ft")
    imgs = colours(root / "imgs", n=1)
    runs = {kind: finetune(imgs, root / kind, model=tiny_families[kind], epochs=1, batch_size=3, lr=1e-4,
                           weight_decay=0.0, warmup=0, workers=0, templates="bp-photo", device="cpu", progress=False)
            for kind in KINDS}
    return {"imgs": Path(imgs), "runs": runs}


def reference_loss(model_dir, imgs: Path) -> float:
    """transformers' own contrastive loss (``return_loss=True``) of the model on the fixed batch:
    each image with its class caption, the classes distinct (so every loss has one positive per row)."""
    bb = load_backbone(model_dir)
    names = ["blue", "green", "red"]
    images = [Image.open(imgs / n / "0.jpg").convert("RGB") for n in names]
    tokens = bb.tokenize([f"a photo of a {class_phrase(n)}" for n in names])
    pixels = bb.image_batch(images)
    inputs = pixels if isinstance(pixels, dict) else {"pixel_values": pixels}
    with torch.inference_mode():
        return float(bb.model(**inputs, **tokens, return_loss=True).loss)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_finetune_trains_with_the_familys_own_loss_and_decreases_it(kind, tuned, tiny_families):
    res = tuned["runs"][kind]
    log = res.log
    assert res.steps == 1 and log["recipe"]["family"] == ("clip" if kind == "clip" else kind)
    assert log["recipe"]["loss"] == ("infonce" if kind == "clip" else "sigmoid")
    before = reference_loss(tiny_families[kind], tuned["imgs"])
    # The loss the step trained on is the family's, as transformers computes it for this model.
    assert log["steps"][0]["loss"] == pytest.approx(before, rel=1e-4)
    after = reference_loss(res.out_dir, tuned["imgs"])
    assert after < before
    assert family_of_folder(res.out_dir).name == family_of_folder(tiny_families[kind]).name
    if kind != "clip":  # SigLIP's scale and bias are the model's own parameters, and they train
        base, ft = load_backbone(tiny_families[kind]).model, load_backbone(res.out_dir).model
        assert "logit_bias" in log["steps"][0]
        assert float(ft.logit_bias) != float(base.logit_bias) and float(ft.logit_scale) != float(base.logit_scale)


def test_wise_ft_alpha_0_and_1_reproduce_both_siglip_endpoints(tuned, tiny_families, tmp_path):
    zs, ft = tiny_families["siglip"], str(tuned["runs"]["siglip"].out_dir)
    ends = {a: load_backbone(interpolate(zs, ft, a, tmp_path / f"a{a}")).model.state_dict() for a in (0.0, 0.5, 1.0)}
    want = {0.0: load_backbone(zs).model.state_dict(), 1.0: load_backbone(ft).model.state_dict()}
    for a in (0.0, 1.0):
        assert set(ends[a]) == set(want[a])
        assert all(torch.equal(ends[a][k], want[a][k]) for k in want[a]), a
    mid = (want[0.0]["logit_bias"] + want[1.0]["logit_bias"]) / 2
    assert torch.allclose(ends[0.5]["logit_bias"], mid) and not torch.equal(want[0.0]["logit_bias"], want[1.0]["logit_bias"])
    assert family_of_folder(tmp_path / "a0.5").name == "siglip"


def test_wise_ft_across_families_is_refused_by_name(tuned, tiny_families, tmp_path):
    with pytest.raises(ValueError) as e:
        interpolate(tiny_families["clip"], str(tuned["runs"]["siglip"].out_dir), 0.5, tmp_path / "blend")
    msg = str(e.value)
    assert "(CLIP)" in msg and "(SigLIP)" in msg and "same family" in msg and "\n" not in msg
    assert not (tmp_path / "blend").exists()
