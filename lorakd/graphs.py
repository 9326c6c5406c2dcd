"""The graphed step's model side: the device and its warm start, precision (inference's too: LoRA merged, frozen
weights in the amp dtype), attention masks, and the patches that make a transformers model capturable as a CUDA
graph."""
from __future__ import annotations

import contextlib
import json
import threading
import warnings
from pathlib import Path

import torch

from .backbones import EMBEDDED, KNOWN_BACKBONES, resolve_backbone
from .errors import UserError

def pick_device(spec: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch device; `key` is what an error names (the option the user gave)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key} {spec}: no CUDA GPU is visible")
        return torch.device(spec if ":" in spec else f"cuda:{local_rank}")
    if spec != "cpu":
        raise UserError(f"{key} {spec!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def start_device(device: torch.device, warm=None):
    """Create the CUDA context in a background thread, so that it overlaps the imports and the model build on
    the CPU (the driver call releases the GIL); returns the thread to join before the first use, or None.
    warm ((hidden, heads, intermediate), batch, widths, bf16): then also run one small encoder-shaped step there
    per padded width (_warm_step), until `thread.stop` is set. A failure is left for the main thread's first CUDA
    call to raise where it is reported properly."""
    if device.type != "cuda":
        return None
    stop = threading.Event()

    def create():
        try:
            torch.empty(1, device=device)
            if warm:
                dims, batch, widths, bf16 = warm
                for width in widths:
                    if stop.is_set():
                        break
                    _warm_step(device, *dims, batch=batch, length=width, bf16=bf16)
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=create, name="lorakd-cuda-context", daemon=True)
    thread.stop = stop
    thread.start()
    return thread


def _warm_step(device, hidden, heads, inter, batch=24, length=64, bf16=True):
    """One training step of a one-layer encoder-shaped function in the run's precision (a LoRA pair, layer norm, attention
    with a padding mask, GELU, a head, CE and KL, fused AdamW) at the run's batch shape, while the CPU imports
    transformers and peft.

    A fresh process pays for its GPU's lazy state at the first step of each shape: cuBLAS and cuBLASLt handles
    and workspaces (pooled: the main thread takes them over once this thread ends), their choice of kernel for
    each product shape, each kernel's first load, the autograd engine's device thread. Paid here, on an idle
    GPU, CUDA-graph capture waits less (README: where the wall time goes). No random numbers: the run's seeded
    generators stay untouched."""
    import torch.nn.functional as F

    def param(*shape):
        return torch.full(shape, 0.02, device=device, requires_grad=True)

    params = [param(hidden, hidden), param(6, hidden), param(hidden, 6), param(hidden), param(hidden),
              param(inter, hidden), param(hidden, inter), param(4, hidden)]
    w, a, b, gain, bias, up, down, head = params
    x = torch.ones(batch, length, hidden, device=device)
    mask = torch.zeros(batch, 1, 1, length, device=device)
    mask[:, :, :, length // 2:] = torch.finfo(torch.float32).min
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        y = F.layer_norm(x, (hidden,), gain, bias)
        q = (F.linear(y, w) + F.linear(F.linear(y, a), b)).view(batch, length, heads, -1).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, q, q, attn_mask=mask.to(q.dtype)).transpose(1, 2).reshape(x.shape)
        z = F.linear(F.gelu(F.linear(z + y, up)), down) + z
        logits = F.linear(torch.tanh(z[:, 0]), head).float()
    soft = torch.full_like(logits, 1 / logits.shape[-1])
    loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device)) + F.kl_div(
        F.log_softmax(logits / 2, -1), soft, reduction="batchmean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # as the training step clips
    cuda = device.type == "cuda"  # as make_optimizer's on a GPU (the CPU runs it in tests)
    torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=device), fused=cuda, capturable=cuda).step()
    if cuda:
        torch.cuda.synchronize(device)


def warm_dims(backbone: str):
    """(hidden, heads, intermediate) of a backbone without importing transformers: the built-in table or a
    folder's config.json (embedded:minilm's too); None when neither says (a hub id, say)."""
    facts = KNOWN_BACKBONES.get(backbone)
    if facts is None:
        folder = Path(backbone).expanduser()
        if backbone == EMBEDDED:
            try:
                folder = Path(resolve_backbone(backbone))
            except UserError:
                return None
        try:
            facts = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
    try:
        dims = (int(facts["hidden_size"]), int(facts["num_attention_heads"]), int(facts["intermediate_size"]))
    except (KeyError, TypeError, ValueError):
        return None
    return dims if dims[0] % dims[1] == 0 else None


def amp_dtype(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def for_inference(model, device, precision, merge=True):
    """(model, its amp dtype): the one precision rule for inference. LoRA folded into the weights (the same
    function, fewer products) unless merge=False; nothing trains, so every weight is frozen and stored in the amp
    dtype (bf16 on a GPU: half the traffic, and autocast computes in it anyway). On a CPU under precision auto
    amp is None: fp32, as trained."""
    model = (merged(model.float()) if merge else model.float()).to(device).eval().requires_grad_(False)
    amp = amp_dtype(precision, device)
    if amp is not None:
        freeze_to(model, amp)
    return model, amp


def merged(model):
    """Fold LoRA into the frozen weights for inference: the same function with plain Linear layers."""
    if hasattr(model, "merge_and_unload"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.merge_and_unload()
    return model


def autocast(device, dtype):
    """bf16 autocast on a GPU; a no-op context in fp32. cache_enabled=False so CUDA graphs can capture it."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def _position_bias_on_device(self, x, position_ids=None, num_buckets=32):
    """MPNetEncoder.compute_position_bias with every tensor made on x's device.

    transformers 5.17 builds the relative positions with torch.arange on the CPU and then copies the
    buckets to the GPU (`rp_bucket.to(x.device)`): a CPU->GPU copy, which CUDA graph capture refuses, so
    MPNet fell back to the plain step. Newer releases build them on x.device; this is that same maths
    (the module's own bucketing and bias table), whatever the installed release does."""
    bsz, qlen = x.size(0), x.size(1)
    if position_ids is not None:
        context, memory = position_ids[:, :, None], position_ids[:, None, :]
    else:
        positions = torch.arange(qlen, dtype=torch.long, device=x.device)
        context, memory = positions[:, None], positions[None, :]
    buckets = self.relative_position_bucket(memory - context, num_buckets=num_buckets)
    values = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
    return values.expand((bsz, -1, qlen, qlen)).contiguous()


def _tracing() -> bool:
    """An ONNX export or torch.compile records the forward: a kept tensor would be recorded as a constant of
    one length, so they get the computation itself."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _relative_positions_kept(self, hidden_states, query_states=None, relative_pos=None):
    """DebertaV2Encoder.get_rel_pos computed once per (query length, key length, device) and kept.

    The relative positions depend on the lengths alone, but transformers builds them on every forward, and
    5.17's TorchScript bucketing makes a CPU tensor and copies it to the GPU (`torch.tensor(mid - 1).type_as`):
    CUDA graph capture refuses that copy, so DeBERTa-v2 fell back to the plain step. Kept, they are made in
    the warm-up step before capture, and the captured graph reads the kept tensor. transformers' own
    get_rel_pos computes them, so the values are its own."""
    compute = type(self).get_rel_pos
    if relative_pos is not None or not getattr(self, "relative_attention", False) or _tracing():
        return compute(self, hidden_states, query_states, relative_pos)
    query = hidden_states if query_states is None else query_states
    # kept apart under inference mode: a tensor made there can never be saved for a training step's backward
    key = (query.shape[-2], hidden_states.shape[-2], hidden_states.device, torch.is_inference_mode_enabled())
    kept = self.__dict__.setdefault("_kept_relative_positions", {})
    if key not in kept:
        kept[key] = compute(self, hidden_states, query_states, None)
    return kept[key]


def graph_safe(model):
    """Make a built model's forward capturable as a CUDA graph where a transformers release is not (each
    bound on the instance, so nothing global changes): MPNet encoders get the position bias above, DeBERTa-v2
    encoders keep their relative positions."""
    import types

    for module in model.modules():
        if type(module).__name__ == "MPNetEncoder" and hasattr(module, "relative_attention_bias"):
            module.compute_position_bias = types.MethodType(_position_bias_on_device, module)
        if type(module).__name__ == "DebertaV2Encoder" and hasattr(module, "get_rel_pos"):
            module.get_rel_pos = types.MethodType(_relative_positions_kept, module)
    return model


def attention(mcfg) -> dict:
    """from_pretrained's attn_implementation for model.attention: a speed lever; auto leaves transformers'
    choice (sdpa where the architecture has it, else eager)."""
    return {} if mcfg.attention == "auto" else {"attn_implementation": mcfg.attention}


def needs_ready_mask(model) -> bool:
    """True where the step should pass a ready 4D additive mask instead of the 2D padding mask.

    Models built on transformers' masking utilities (transformers 5) pass a 4D mask through as it is, but
    build eager attention's float mask themselves (MPNet, say), in some 5.x versions with a CPU scalar that
    a CUDA graph cannot capture. SDPA models keep the 2D mask (their path captures), and so do models with
    a mask code of their own (DeBERTa-v2 reads a 4D mask as 1 = attend)."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eager = getattr(base.config, "_attn_implementation", None) == "eager"
    return eager and hasattr(sys.modules.get(type(base).__module__), "create_bidirectional_mask")


def additive_mask(mask):
    """[B, L] 1/0 padding mask -> [B, 1, 1, L] float: 0 where attended, the float minimum where padded."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def freeze_to(model, dtype):
    """Store frozen weights in `dtype` (bf16 on a GPU halves their traffic); trainable ones stay fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model
