import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel


def test_tiny_clip_loads_by_path(tiny_clip):
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    proc = AutoImageProcessor.from_pretrained(tiny_clip)
    ids = tok(["a photo of the cat"], padding=True, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    assert ids["input_ids"][0, -1].item() == tok.eos_token_id
    with torch.inference_mode():
        t = model.get_text_features(**ids).pooler_output
        i = model.get_image_features(pixel_values=torch.zeros(1, 3, 30, 30)).pooler_output
    assert t.shape == (1, 16) and i.shape == (1, 16)
    assert proc.crop_size["height"] == 30
