"""The graphed step's model side: the patches that make MPNet and DeBERTa-v2 capturable, the device's start."""
import warnings

import pytest
import torch

from lorakd import config as config_lib
from lorakd import graphs


def _patched(model_class, cfg, length, method):
    """A seeded random-weight classifier in eval mode, token ids of `length` (the second row padded from 5/8 of
    it), and hidden states of that shape (3 rows, width 32) for the encoder's own methods; then graph_safe on it.
    Returns those, the encoder, its `method` on the hidden states and the logits, both from before graph_safe."""
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (3, length))
    mask = torch.ones_like(ids)
    mask[1, length * 5 // 8:] = 0
    model, x = model_class(cfg).eval(), torch.randn(3, length, 32)
    encoder = model.base_model.encoder
    before = getattr(encoder, method)(x)
    with torch.no_grad():
        logits_before = model(input_ids=ids, attention_mask=mask).logits
    graphs.graph_safe(model)
    assert getattr(encoder, method).__func__ is not getattr(type(encoder), method)  # patched on the instance
    return model, ids, mask, x, encoder, before, logits_before


def test_mpnet_position_bias_on_the_device_matches_transformers(tmp_path):
    """graph_safe's MPNet position bias (built where the model runs, so a CUDA graph can capture it) is the
    installed transformers' own, bit for bit (the encoder passes no position ids); logits do not change; and
    build() puts it on the encoder of the model it returns."""
    import torch
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from lorakd.model import build

    cfg = MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=80, relative_attention_num_buckets=32, num_labels=4,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, ids, mask, x, encoder, before, logits_before = _patched(  # 70: past max_exact too
        MPNetForSequenceClassification, cfg, 70, "compute_position_bias")
    assert torch.equal(encoder.compute_position_bias(x), before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)

    model.mpnet.save_pretrained(tmp_path / "mpnet")
    mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tmp_path / "mpnet"),
                                                       "model.targets": ["q", "k", "v"]}).model
    built = build(mcfg, 4)
    enc = built.get_base_model().mpnet.encoder
    assert enc.compute_position_bias.__func__ is not type(enc).compute_position_bias


def test_deberta_relative_positions_kept_match_transformers(tmp_path):
    """graph_safe's DeBERTa-v2 encoder computes its relative positions once per length (in the warm-up step
    before a CUDA graph captures; transformers' bucketing copies a CPU tensor to the GPU, which capture
    refuses): the same positions and logits as transformers' own, the kept tensor reused, and a training step
    after an evaluation (inference mode) of the same length still backpropagates."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from lorakd.model import build

    cfg = DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=16, num_labels=4, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    model, ids, mask, x, encoder, before, logits_before = _patched(  # 40: past the buckets
        DebertaV2ForSequenceClassification, cfg, 40, "get_rel_pos")
    kept = encoder.get_rel_pos(x)
    assert torch.equal(kept, before) and encoder.get_rel_pos(torch.randn(5, 40, 32)) is kept  # lengths alone
    assert torch.equal(encoder.get_rel_pos(torch.randn(1, 20, 32)), type(encoder).get_rel_pos(encoder, x[:1, :20]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)
    with warnings.catch_warnings():  # the tracer's notes on shapes read as numbers
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda h: encoder.get_rel_pos(h), x, check_trace=False)  # as lorakd export traces
    assert torch.equal(traced(torch.randn(1, 20, 32)), type(encoder).get_rel_pos(encoder, x[:1, :20]))  # any length
    model.train()  # after an inference-mode forward of the same length, a training step still backpropagates
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert model.classifier.weight.grad is not None

    model.deberta.save_pretrained(tmp_path / "deberta")
    mcfg = config_lib.override(config_lib.Config(), **{"model.backbone": str(tmp_path / "deberta"),
                                                       "model.targets": ["query_proj", "key_proj", "value_proj"]}).model
    enc = build(mcfg, 4).get_base_model().deberta.encoder
    assert enc.get_rel_pos.__func__ is not type(enc).get_rel_pos


def test_start_device_overlaps_only_cuda_and_leaves_errors_to_the_main_thread():
    """The background CUDA context: nothing to start on a CPU; where CUDA cannot start (here, no GPU) the thread
    ends quietly and the main thread's first CUDA call is where the error is raised and reported."""
    assert graphs.start_device(torch.device("cpu")) is None
    thread = graphs.start_device(torch.device("cuda:0"))
    thread.join(timeout=30)
    assert not thread.is_alive()
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.empty(1, device="cuda:0")
