"""The graphed step's capture policy, without a GPU: warm-ups per shape, a retry for a later shape, and the fall
back (or the error under train.cuda_graphs=on) when a shape never captures."""
import pytest
import torch

from lorakd.errors import UserError


class _Recorder:
    """GraphedStep's capture policy without a GPU: records how many warm-ups each try ran, and fails the
    (width, warm-ups) tries the test names."""

    def __init__(self, fail):
        self.fail, self.tries = fail, []

    def __call__(self, idx, width, warmups):
        self.tries.append((width, warmups))
        if (width, warmups) in self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return f"graph-{width}", idx


def _graphed(fail=(), warmups=0, required=False):
    from lorakd.graphed_step import GraphedStep

    said = []
    g = GraphedStep(step=None, params=[], optimizer=None, acc=None, required=required, log=said.append,
                    later_warmups=warmups)
    g._record = _Recorder(set(fail))
    return g, said


def capture(g, width):
    got = g._capture(torch.zeros(24), width)
    if got is not None:
        g.graphs[(24, width)] = got
    return got


def test_capture_warms_the_first_shape_twice_and_a_later_one_only_when_it_needs_it():
    g, said = _graphed(fail={(64, 0)})  # the 64-wide shape has lazy state of its own (DeBERTa-v2's positions)
    assert [capture(g, w)[0] for w in (32, 96, 64)] == ["graph-32", "graph-96", "graph-64"]
    assert g._record.tries == [(32, 2), (96, 0), (64, 0), (64, 1)] and not said and not g.plain


def test_capture_warmups_setting_is_used_for_later_shapes_without_a_retry():
    g, _ = _graphed(warmups=1)
    capture(g, 32), capture(g, 64)
    assert g._record.tries == [(32, 2), (64, 1)]


def test_a_shape_that_never_captures_falls_back_in_one_line_or_fails_under_on():
    g, said = _graphed(fail={(32, 2)})
    assert capture(g, 32) is None and g.plain
    assert said == ["CUDA graphs off: the step cannot be captured (operation not permitted when stream is "
                    "capturing); training with the plain step"]
    g, said = _graphed(fail={(64, 0), (64, 1)})
    capture(g, 32)
    assert capture(g, 64) is None and g.plain and g._record.tries == [(32, 2), (64, 0), (64, 1)]
    g, _ = _graphed(fail={(32, 2)}, required=True)
    with pytest.raises(UserError, match="train.cuda_graphs=on: this backbone's step cannot be captured"):
        capture(g, 32)


def test_the_step_is_graphed_on_a_gpu_unless_off_or_accumulating(tiny_config):
    """graphed(): a CPU run, train.cuda_graphs=off, or train.grad_accum > 1 (said in one line) keep the plain step."""
    from lorakd.graphed_step import GraphedStep, graphed

    step = type("Step", (), {"params": [], "optimizer": None, "acc": None})()
    cuda, said = torch.device("cuda"), []  # graphed() only reads the device type: no GPU needed
    assert graphed(step, tiny_config().train, torch.device("cpu"), said.append) is step
    assert graphed(step, tiny_config(**{"train.cuda_graphs": "off"}).train, cuda, said.append) is step
    assert graphed(step, tiny_config(**{"train.grad_accum": 2}).train, cuda, said.append) is step
    assert said == ["CUDA graphs off: train.grad_accum > 1 runs the plain step"]
    g = graphed(step, tiny_config(**{"train.cuda_graphs": "on", "train.capture_warmups": 1}).train, cuda, said.append)
    assert isinstance(g, GraphedStep) and g.required and g.later_warmups == 1 and g.step is step
