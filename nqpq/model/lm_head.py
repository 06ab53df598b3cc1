"""What a causal LM does between its last decoder layer and its logits: the body's steps after the last layer
(``after_layers``), the step between the body and the LM head (``head_transform``, ``UpToHead``) and the factor on
the logits (``logit_scale``). Each is found from the model's own forward, not from a table of names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from ..errors import UnsupportedModelError
from .devices import execution_device, input_device
from .geometry import config_value, first_of


class BodyWithLayers(Protocol):
    """What ``after_layers`` reads of a model's parts (``nqpq.model.parts.ModelParts`` has both): typed here, so
    this module needs nothing of ``parts``, which imports it."""

    # Read-only members: ModelParts is a frozen dataclass.
    @property
    def body(self) -> nn.Module:
        """The decoder body (the module whose forward returns last_hidden_state)."""

    @property
    def layers(self) -> nn.ModuleList:
        """Its decoder layers."""


def _logit_scale(config) -> float | None:
    """The factor the causal LM's own forward multiplies its logits by, from the config attributes transformers
    reads for it: Cohere's ``logit_scale`` (``logits * logit_scale``), Granite's ``logits_scaling``
    (``logits / logits_scaling``), Inkling's ``logits_mup_width_multiplier`` (``lm_head(hidden / multiplier)``).
    Without it the sweep's perplexities would not be the model's."""
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if scale is not None and divisor is not None:
        raise UnsupportedModelError(f"{type(config).__name__} has both logit_scale and logits_scaling")
    # Inkling divides the final hidden state by logits_mup_width_multiplier before its (bias-free) head: the logits
    # divided by it.
    mup = getattr(config, "logits_mup_width_multiplier", None)
    mup = 1.0 if mup is None else 1.0 / float(mup)
    if divisor is not None:
        return mup / float(divisor)
    if scale is None:
        return None if mup == 1.0 else mup
    return float(scale) * mup


def logit_scale(config, text_config=None) -> float | None:
    """The factor the causal LM's forward puts on its logits, or None (``_logit_scale``): a multimodal wrapper's own
    config attributes first, else its text model's (``text_config``)."""
    own = _logit_scale(config)
    return own if own is not None or text_config is None else _logit_scale(text_config)


def after_layers(parts: BodyWithLayers, last_output: Tensor, final_hidden: Tensor) -> Callable[[Tensor], Tensor]:
    """What the body applies to its last layer's output to give ``last_hidden_state``, found from one forward:
    ``last_output`` (the last layer's output) and ``final_hidden`` (the body's ``last_hidden_state``) of the
    same call. Nothing (the identity), or the one child module of the body that maps the one to the other bit
    for bit (a final norm with or without parameters, registered before or after the layers: OPT, OLMo).
    """
    if last_output.shape == final_hidden.shape and torch.equal(last_output, final_hidden):
        return _identity
    skip = {id(parts.layers)}
    embeddings = parts.body.get_input_embeddings() if hasattr(parts.body, "get_input_embeddings") else None
    if embeddings is not None:
        skip.add(id(embeddings))
    tried = []
    for child_name, child in parts.body.named_children():
        if id(child) in skip or isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Embedding)):
            continue
        if any(m is parts.layers for m in child.modules()):
            # The module around the layers (BERT's encoder): calling it would run every layer again, under the
            # recording hooks of the replay's capture.
            continue
        tried.append(child_name)
        try:
            with torch.no_grad():
                out = child(last_output)
        except Exception:  # noqa: BLE001 - a child that does not take a hidden state is not the final step
            continue
        if isinstance(out, Tensor) and out.shape == final_hidden.shape and torch.equal(out, final_hidden):
            return child
    raise UnsupportedModelError(
        f"{type(parts.body).__name__}: cannot tell what it applies after its last layer (none of its children "
        f"{tried} maps the last layer's output to its last_hidden_state); its layers cannot be replayed"
    )


def _identity(hidden: Tensor) -> Tensor:
    return hidden


# The probe of ``head_transform``: one sequence of this many positions, a fixed seed for its hidden state.
_PROBE_TOKENS = 5
_PROBE_SEED = 0


@dataclass
class _ProbeOutput(ModelOutput):
    """The stubbed body's output in ``head_transform``'s probe: the given last_hidden_state, None for any other
    field the model's forward passes on (its cache, hidden states, attentions)."""

    last_hidden_state: Tensor | None = None

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return None


class _HeadInput(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the LM head's pre-hook inside ``UpToHead``: carries what the head was handed, so its GEMM over the
    vocabulary never runs."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


class UpToHead:
    """A prediction head holding the LM head (BERT's ``cls``, RoBERTa's ``lm_head``), run up to its call of the LM
    head: ``UpToHead(holder, lm_head)(hidden)`` is what ``holder(hidden)`` hands ``lm_head`` (BERT: its dense,
    activation and LayerNorm). The holder's own forward computes it, whatever it does before the head."""

    def __init__(self, holder: nn.Module, lm_head: nn.Module):
        self.holder, self.lm_head = holder, lm_head

    def __call__(self, hidden: Tensor) -> Tensor:
        def stop(module, args, kwargs):
            raise _HeadInput(args[0] if args else next(iter(kwargs.values())))

        # A torch pre-hook runs before accelerate's wrapper of the head's forward: an offloaded head is not loaded.
        handle = self.lm_head.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.holder(hidden)
        except _HeadInput as got:
            self._finish_hooks()
            return got.hidden
        finally:
            handle.remove()
        raise UnsupportedModelError(f"{type(self.holder).__name__} did not call its LM head")

    def _finish_hooks(self) -> None:
        """The accelerate hooks of the modules around the head, whose forward the stop left: their post-forward (an
        offloaded module's own weights, BERT's output bias, back off the device) as a completed call would run it."""
        for module in self.holder.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and module is not self.lm_head and any(m is self.lm_head for m in module.modules()):
                hook.post_forward(module, None)

    def __repr__(self) -> str:
        return f"UpToHead({type(self.holder).__name__} up to its {type(self.lm_head).__name__})"


def head_transform(model: nn.Module, body: nn.Module, lm_head: nn.Module, config=None,
                   text_config=None) -> Callable[[Tensor], Tensor] | None:
    """What ``model``'s forward applies to the body's ``last_hidden_state`` before its LM head: None where the head
    takes it as it is, else the one module (or ``UpToHead`` of the one module holding the head) that computes it.

    The usual causal LM (the head a child of the model, nothing else beside the body with parameters) is taken as
    it is, without running anything. Otherwise the candidates are the model's children with parameters beside the
    body and the head (ELECTRA's ``generator_predictions``, ModernBERT-decoder's ``lm_head``), a child holding the
    head taken up to its call of the head (BERT's ``cls``, RoBERTa's ``lm_head``, XLM's ``pred_layer``); the model's
    own forward, with the body stubbed to return a fixed hidden state h (no attention runs: an active
    crystallization sees nothing), says which: the head must be called once, its output must be the model's logits
    (where the model has no logit scale or soft-cap), and exactly one candidate (or nothing) must map h to what the
    head received, bit for bit. Anything else is refused.
    """
    name = type(model).__name__
    outside = [(child_name, child) for child_name, child in model.named_children()
               if child is not lm_head and not any(m is body for m in child.modules())
               and any(True for _ in child.parameters())]
    if any(child is lm_head for child in model.children()) and not outside:
        return None
    candidates = [(child_name, UpToHead(child, lm_head) if any(m is lm_head for m in child.modules()) else child)
                  for child_name, child in outside]
    h, received, calls, head_out, logits = _probe_head(model, body, lm_head, text_config or config, name)
    if calls != 1:
        raise UnsupportedModelError(
            f"{name}: its forward calls its LM head {calls} times on one hidden state; nqpq needs one call")
    plain = config is None or (logit_scale(config, text_config or config) is None and not (
        first_of(config, "final_logit_softcapping", text_config) or first_of(config, "logits_soft_cap", text_config)))
    if plain and not _equal(head_out, logits):
        raise UnsupportedModelError(
            f"{name}: its logits are not its LM head's output (something acts after the head); nqpq forms the loss "
            "from the LM head's logits")
    if _equal(received, h):
        return None
    matches = []
    for child_name, candidate in candidates:
        try:
            with torch.no_grad():
                out = candidate(h)
        except Exception:  # noqa: BLE001 - a child that does not take the hidden state is not the transform
            continue
        if _equal(out, received):
            matches.append((child_name, candidate))
    if len(matches) != 1:
        raise UnsupportedModelError(
            f"{name}: cannot tell what it applies between its base model and its LM head "
            f"({len(matches)} of its modules {[n for n, _ in candidates]} map the base model's output to what the "
            "head receives); nqpq needs the LM head applied to the base model's output, or to one module's output")
    return matches[0][1]


def _equal(a: object, b: object) -> bool:
    """Two tensors of the same shape and dtype with the same values (on whichever devices)."""
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and bool(torch.equal(a.to(b.device), b)))


def _probe_head(model: nn.Module, body: nn.Module, lm_head: nn.Module, text_config, name: str):
    """The model's own forward from a body output to its logits, with ``body`` stubbed to return a fixed hidden
    state h ``[1, 5, hidden_size]``: (h, what the LM head received, how often it was called, its output, the
    model's logits)."""
    width = config_value(text_config, "hidden_size")
    params = [p for p in body.parameters() if p.is_floating_point()]
    if not isinstance(width, int) or not params:
        raise UnsupportedModelError(
            f"{name}: its config gives no hidden_size of its base model's output; cannot find what it applies "
            "between its base model and its LM head")
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    h = torch.randn(1, _PROBE_TOKENS, width, generator=generator).to(execution_device(lm_head), params[0].dtype)
    vocab = config_value(text_config, "vocab_size")
    ids = (torch.arange(_PROBE_TOKENS) % (vocab if isinstance(vocab, int) and vocab > 0 else 1))[None]
    seen: list = []

    def record(module, args, kwargs, out):
        seen.append((args[0] if args else next(iter(kwargs.values())), out))

    def stub(*args, **kwargs):
        return _ProbeOutput(last_hidden_state=h)

    own = body.__dict__.get("forward")  # accelerate's hook keeps its wrapper there
    body.forward = stub
    handle = lm_head.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=ids.to(input_device(model)), use_cache=False)
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the stubbed body's output lacked something the forward reads
        raise UnsupportedModelError(
            f"{name}: cannot run its forward from a given base-model output to find what it applies between its "
            f"base model and its LM head ({type(err).__name__}: {err})") from err
    finally:
        handle.remove()
        if own is None:
            del body.forward
        else:
            body.forward = own
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    received, head_out = seen[0] if seen else (None, None)
    return h, received, len(seen), head_out, logits
