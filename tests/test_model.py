"""Model: the built model (adapters, attention implementation) and the parameters it really has."""
import pytest

from lorakd import config as config_lib
from lorakd.budget import count_params
from lorakd.errors import UserError


def test_counts_match_a_real_model(tiny_backbone):
    """The meta-device count equals the parameters of the model actually built with weights."""
    from lorakd.budget import summarize_params
    from lorakd.model import build

    cfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tiny_backbone), "model.r": 3,
                                                      "model.targets": ["query", "dense"], "model.layers": [1]})
    assert count_params(cfg.model, 4) == summarize_params(build(cfg.model, 4))


def test_attention_lever_switches_the_implementation_not_the_result(tiny_backbone, tmp_path):
    """model.attention picks transformers' attention code (a speed lever): eager and sdpa give the same
    logits on the tiny BERT; an architecture without sdpa (MPNet) is a one-line error naming the key."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    from lorakd.model import build

    logits = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tiny_backbone), "model.r": 2,
                                                           "model.attention": impl}).model
        model = build(mcfg, 4).eval()
        assert model.config._attn_implementation == impl
        ids = torch.randint(5, 30, (2, 12))
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits["eager"], logits["sdpa"], atol=1e-5)

    MPNetModel(MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)).save_pretrained(tmp_path / "mpnet")
    mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tmp_path / "mpnet"),
                                                       "model.targets": ["q"], "model.attention": "sdpa"}).model
    with pytest.raises(UserError, match="model.attention sdpa"):
        build(mcfg, 4)
