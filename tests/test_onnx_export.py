"""ONNX export: the first-token last layer gives the model's logits (the export itself: tests/test_export.py)."""
import torch


def test_last_layer_on_the_first_token_gives_the_same_logits(tiny_backbone):
    """The ONNX graph runs the last layer for the first token only: same logits on a padded batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakd.onnx_export import _first_token_only
    from lorakd.onnx_int8 import split_outliers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=4).eval()
    model.set_attn_implementation("eager")
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    enc = tok(["election war peace", "goal match season coach league final", "chip"], padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        before = model(**enc).logits
        assert _first_token_only(model)
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
        split_outliers(model, tok, ratio=1.5)  # both rewrites together, as the export applies them
        assert torch.allclose(model(**enc).logits, before, atol=1e-5)
