"""The graphed step: a training step replayed as one CUDA graph per batch shape, and when to use it."""
from __future__ import annotations

import time

import torch

from .errors import UserError, first_line


class GraphedStep:
    """Replays `step` as one CUDA graph per (batch, width) shape. Capturing the first shape first runs the
    step eagerly on a side stream (lazy state, cuBLAS workspaces); weights, optimizer state and loss sums are
    then restored, so warm-up leaves no trace in training. In a multi-process run the key is the global
    batch's shape, the same on every process: all capture (and run their warm-up all-reduces) together.

    A backbone whose forward cannot be captured (a host sync or CPU copy inside, say) falls back to the
    plain step with one log line under cuda_graphs=auto, and is a one-line error under cuda_graphs=on."""

    def __init__(self, step, params, optimizer, acc, required=False, log=print, later_warmups=0):
        self.step, self.params, self.optimizer, self.acc = step, params, optimizer, acc
        self.required, self.log, self.later_warmups = required, log, later_warmups
        self.graphs, self.pool, self.plain = {}, None, False
        self.capture_s = 0.0  # time spent capturing, reported apart from steady-state replay

    def __call__(self, idx, width, key=None):
        if self.plain:
            return self.step(idx, width)
        key = key or (idx.shape[0], width)
        if key not in self.graphs:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            captured = self._capture(idx, width)
            torch.cuda.synchronize()
            self.capture_s += time.perf_counter() - t0
            if captured is None:
                return self.step(idx, width)
            self.graphs[key] = captured
        graph, static_idx = self.graphs[key]
        static_idx.copy_(idx, non_blocking=True)
        graph.replay()

    def _capture(self, idx, width):
        # The first shape runs two eager warm-ups (the process's lazy state: optimizer state, cuBLAS handles and
        # workspaces). A later shape runs train.capture_warmups (default 0: every capture uses the same capture
        # stream, whose workspaces exist, and allocates from the graphs' pool). A later shape that fails to
        # capture without one (lazy state of its own: DeBERTa-v2's relative positions for a new length) is
        # captured again after one eager run before the step is declared uncapturable.
        tries = [2] if not self.graphs else [self.later_warmups] + ([1] if self.later_warmups == 0 else [])
        for n, warmups in enumerate(tries):
            try:
                return self._record(idx, width, warmups)
            except Exception as e:  # noqa: BLE001  any failure inside capture means: this shape did not capture
                if n + 1 < len(tries):
                    continue
                why = first_line(e, 200)
                if self.required:
                    raise UserError(f"train.cuda_graphs=on: this backbone's step cannot be captured as a CUDA "
                                    f"graph ({why}); use train.cuda_graphs=auto or off") from None
                self.log(f"CUDA graphs off: the step cannot be captured ({why}); training with the plain step")
                self.plain = True
                return None

    def _record(self, idx, width, warmups):
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                       for p, s in self.optimizer.state.items()}
        saved_acc, saved_rng = self.acc.clone(), torch.cuda.get_rng_state()
        static_idx = idx.clone()
        try:
            if warmups:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(warmups):
                        self.step(static_idx, width)
                torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # graphs replay one at a time: they share a pool
                self.step(static_idx, width)
            self.pool = graph.pool()
            return graph, static_idx
        finally:  # warm-up (and a failed capture) leave no trace: weights, optimizer state, loss sums restored,
            # and the random state too, so dropout draws the same masks as in the plain step
            with torch.no_grad():
                for p, v in zip(self.params, saved_params):
                    p.copy_(v)
                for p, s in self.optimizer.state.items():
                    for k, v in s.items():
                        if torch.is_tensor(v):  # state born during warm-up is zeroed: as fresh as before
                            v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
                self.acc.copy_(saved_acc)
            torch.cuda.set_rng_state(saved_rng)


def graphed(step, tc, device, log):
    """`step` replayed as CUDA graphs where train.cuda_graphs allows (on a GPU; auto or on), else itself."""
    if device.type != "cuda" or tc.cuda_graphs == "off":
        return step
    if tc.grad_accum > 1:  # simplest correct: an update over several micro-batches runs eagerly, not as a graph
        log("CUDA graphs off: train.grad_accum > 1 runs the plain step")
        return step
    return GraphedStep(step, step.params, step.optimizer, step.acc, required=tc.cuda_graphs == "on", log=log,
                       later_warmups=tc.capture_warmups)
