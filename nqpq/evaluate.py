"""Perplexity: the straightforward evaluator and the prefix-reusing one the sweep uses.

Definition (the spec's): over blocks b = 0 .. n_blocks − 1 of ``seq_len`` tokens,
each block is scored with labels = the block (shifted next-token loss, seq_len − 1
predictions); PPL = exp(mean over blocks of each block's mean loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, MutableMapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .devices import execution_device, input_device, weights_on_device
from .models import ModelParts, UnsupportedModelError, after_layers, as_index, model_parts

# Logits are formed this many elements at a time (fp32: 256 MiB), so the LM head
# never materialises [batch, T, vocab] at once.
MAX_LOGIT_ELEMENTS = 1 << 26


def text_tokens_per_block(seq_len: int, bos_id: int | None) -> int:
    """Text tokens one block holds: ``seq_len``, or ``seq_len - 1`` when each block starts with BOS."""
    return seq_len - (bos_id is not None)


def make_blocks(ids: Tensor, seq_len: int, n_blocks: int, *, bos_id: int | None = None,
                first_block: int = 0) -> Tensor:
    """``[n_blocks, seq_len]`` consecutive blocks of a 1-D token tensor, starting at block ``first_block``.

    Without ``bos_id`` (the spec's blocks): block b is ``ids[(first_block + b)·seq_len : ... + seq_len]``.
    With ``bos_id`` (for models trained to see BOS first: Gemma, Llama 3): every block starts with it and
    holds ``seq_len − 1`` text tokens, block b = ``[bos_id] + ids[(first_block + b)·(seq_len − 1) : ...]``;
    ``ids`` are then the text's tokens without special tokens. BOS is position 0, never a scored target
    (the loss scores positions 1..seq_len − 1).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one prediction per block), got {seq_len}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
    if first_block < 0:
        raise ValueError(f"first_block must be >= 0, got {first_block}")
    per_block = text_tokens_per_block(seq_len, bos_id)
    available = ids.numel() // per_block
    if first_block + n_blocks > available:
        what = f"{seq_len} tokens" if bos_id is None else f"BOS + {per_block} text tokens"
        raise ValueError(
            f"n_blocks={n_blocks} blocks of {what}{f' after {first_block} others' if first_block else ''} need "
            f"{(first_block + n_blocks) * per_block} tokens; "
            f"the text has {ids.numel()} tokens ({available} blocks)"
        )
    text = ids[first_block * per_block : (first_block + n_blocks) * per_block].view(n_blocks, per_block)
    if bos_id is None:
        return text
    return torch.cat([torch.full((n_blocks, 1), int(bos_id), dtype=ids.dtype), text], dim=1)


def lm_losses(
    model: nn.Module,
    hidden: Tensor,
    labels: Tensor,
    max_logits: int = MAX_LOGIT_ELEMENTS,
    parts: ModelParts | None = None,
) -> Tensor:
    """Per-block mean next-token loss ``[N]`` (float64) from final hidden states ``[N, T, C]``.

    The logits are formed in fp32 whatever the model's dtype (16-bit logits would round |logit| ~ 64 to
    steps of 0.25–0.5 before the loss): the LM head's weight is upcast once per call and the hidden states
    one chunk of ``max_logits`` logits at a time. The model's logit scale (Cohere, Granite) and final logit
    soft-cap (Gemma 2) are applied, as its own forward does.

    The loss of those fp32 logits: loss = m + log s − z_target with m = max_j z_j (exact in fp32) and
    s = Σ_j exp(z_j − m), taken in fp32 in place on the chunk (a max, a subtract, an exp and a sum: no
    temporary the size of the logits); m, log s and z_target are then combined in float64, and every mean
    over tokens is taken in float64. Error per token: ~u·(E_p[m − z] + log2 V) absolute, u = 2^-24 (the
    shift z − m rounds by u·|z − m|, exp by ~u, the sum by ~u per level), never the ~u·|m| of an fp32
    ``m + log s`` or of fp32 log-softmax values near |logit| ~ 40; summing per-token losses in float64 keeps
    that error from growing with the token count. Measured on 2040 tokens (``python -m benchmarks.logits
    --device cpu --dtypes fp32``, against the float64 cross-entropy of the same fp32 logits, 2 CPU cores shared
    with other jobs, two runs: the times are noisy, the errors deterministic):

    ======================================  =====================  ======================  ===================
    path                                    SmolLM2-135M's logits  peaked synthetic over   time vs fp32
                                            (V 49152): per token   GPT-2's V 50257: per    F.cross_entropy
                                            max / PPL rel. error   token max / PPL rel.
    ======================================  =====================  ======================  ===================
    fp32 ``F.cross_entropy``                2.0e-5 / 7.8e-6        2.2e-5 / 2.7e-6         1
    fp32 ``torch.logsumexp`` − target       2.1e-6 / 1.7e-8        1.9e-6 / 1.1e-8         1.2–1.7x
    float64 exp / sum / log (issue 17)      1.6e-14 / 5e-17        1.2e-14 / 6e-17         2.1–3.8x
    this                                    5.7e-7 / 1.9e-8        5.3e-7 / 1.7e-8         0.40–0.62x (*)
    ======================================  =====================  ======================  ===================

    The requirement is 1e-6 relative in PPL (issue 26). fp32 ``F.cross_entropy`` misses it by a systematic
    bias (its per-token errors average −7.8e-6 and −2.7e-6 here); ``torch.logsumexp`` rounds each loss at the
    logits' magnitude and allocates a shifted copy; the float64 path pays for converting copies. This writes
    nothing the size of the logits. (*) One run measured 1.57x on the peaked logits under load; with the GEMM
    (GPT-2's head on 2040 tokens) the whole ``lm_losses`` took 0.95x the fp32 head + ``F.cross_entropy``, where
    issue 17's float64 loss took 1.18x (``benchmarks/results/logits_cpu.csv``, then and now).
    """
    parts = parts or model_parts(model)
    N, T, C = hidden.shape
    flat_hidden = hidden[:, :-1].reshape(-1, C)
    flat_labels = labels[:, 1:].reshape(-1).to(hidden.device)
    head = parts.lm_head
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"the LM head is a {type(head).__name__}; nqpq expects an nn.Linear")
    weight = head.weight.float()
    bias = None if head.bias is None else head.bias.float()
    scale, cap = parts.logit_scale, parts.final_logit_softcap
    chunk = max(1, max_logits // weight.shape[0])
    nll = torch.empty(flat_labels.numel(), dtype=torch.float64, device=hidden.device)
    for s in range(0, flat_labels.numel(), chunk):
        logits = F.linear(flat_hidden[s : s + chunk].float(), weight, bias)  # a fresh chunk: ours to overwrite
        if scale is not None:
            logits.mul_(scale)
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        nll[s : s + chunk] = _fp32_logit_losses(logits, flat_labels[s : s + chunk])
    return nll.view(N, T - 1).mean(dim=1)


def _fp32_logit_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy (float64) of fp32 ``logits`` ``[rows, V]``, overwriting them (see ``lm_losses``).

    One pass each for the max, the shift, the exp and the sum, all in place: on CPU the cost of an fp32
    log-sum-exp is in memory passes and fresh allocations (``torch.logsumexp`` allocates a shifted copy,
    ``F.cross_entropy`` writes a log-softmax), not in the arithmetic. Row-blocks that fit in cache measured
    slower on 2 cores (per-call overhead and thread start-up outweigh the saved memory traffic).
    """
    target = logits.gather(1, targets[:, None])[:, 0].double()
    row_max = logits.amax(dim=1, keepdim=True)
    # z − m ≤ 0 is exact when z is within a factor of 2 of m (the terms that carry the sum); exp runs in place.
    sum_exp = logits.sub_(row_max).exp_().sum(dim=1)
    return row_max[:, 0].double() + sum_exp.double().log() - target


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int of at least 1 (numpy/torch integers accepted), or a ValueError."""
    size = as_index(batch_size, "batch_size")
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


@torch.no_grad()
def block_losses(model: nn.Module, blocks: Tensor, batch_size: int = 1) -> Tensor:
    """Per-block mean loss ``[N]`` of the model as it stands (any crystallization applies)."""
    batch_size = check_batch_size(batch_size)
    parts = model_parts(model)
    device = input_device(model)
    out = []
    for s in range(0, blocks.shape[0], batch_size):
        batch = blocks[s : s + batch_size].to(device)
        # return_dict=True: a saved config may say return_dict=False, and the body would then return a tuple.
        hidden = parts.body(input_ids=batch, use_cache=False, return_dict=True).last_hidden_state
        out.append(head_losses(model, hidden, batch, parts))
    return _cat_losses(out)


def head_losses(model: nn.Module, hidden: Tensor, labels: Tensor, parts: ModelParts) -> Tensor:
    """``lm_losses`` where the LM head computes: under a device map the final hidden state may sit on another
    device than the head (moved there), and an offloaded head's weight is loaded for the call (``lm_losses``
    reads the weight itself rather than calling the module, so accelerate's hook would not)."""
    device = execution_device(parts.lm_head)
    with weights_on_device(parts.lm_head):
        return lm_losses(model, hidden.to(device), labels.to(device), parts=parts)


def perplexity(model: nn.Module, ids: Tensor, seq_len: int, n_blocks: int, batch_size: int = 1) -> float:
    """The spec's perplexity of ``model`` on the first ``n_blocks`` blocks of ``ids``."""
    batch_size = check_batch_size(batch_size)
    return ppl_from_losses(block_losses(model, make_blocks(ids, seq_len, n_blocks), batch_size))


def _same(a: object, b: object, memo: dict | None = None) -> bool:
    """Whether two recorded layer arguments are equal (tensors by value), so one copy can serve both.

    ``memo`` remembers tensor pairs already compared: the layers of a model usually share one mask object.
    """
    if a is b:
        return True
    memo = {} if memo is None else memo
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        key = (id(a), id(b))
        if key not in memo:
            memo[key] = (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                         and bool(torch.equal(a, b)))
        return memo[key]
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y, memo) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], memo) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


class PrefixRunner:
    """Evaluates many configurations that differ only from some start layer up.

    ``capture_baseline`` runs the untouched model once per batch and records the hidden states entering
    each start layer, together with the exact arguments the model hands each layer from the lowest start
    up (masks, position embeddings, ...: Gemma 2 hands its sliding and full layers different masks; a hybrid
    hands its linear-attention or SSM layers their own). It returns the baseline losses. ``losses(start=s)``
    then replays only layers ``s..`` (every one, attention or not, from its own start, without a cache) + what
    the body applies after its last layer (``nqpq.models.after_layers``: found from the baseline pass) + LM head
    from that record, under whatever crystallization is active: the same computation as a full forward pass,
    without the unchanged lower layers.

    Memory: layer arguments equal across batches of one shape (the masks, the rotary tables) are kept
    once, not once per batch. Recorded hidden states stay on the device up to ``record_budget`` bytes
    (default: a quarter of the free CUDA memory when the capture starts; everything on CPU), the rest
    goes to host memory (pinned on CUDA) and is copied back batch by batch during the replay.

    Device maps (accelerate): each record lives on the execution device of the layer it enters (hidden
    states and that layer's arguments; ``record_budget`` then applies per device, and each CUDA device's
    default is a quarter of its own free memory), replays move the hidden state from layer to layer as the
    model's own forward does, and the losses are formed on the LM head's device (``head_losses``).

    Two replays. The direct one above (layer after layer, then ``after_layers``) is the cheaper: no embedding,
    mask or rotary work per replay, and only the hidden state entering each start layer is recorded. It needs a
    body that does nothing between its layers and one step after them. A body that does more (Dory loops its
    recurrent layers and mixes the input section's output back in; HY-V4 folds its hyper-connection streams with
    ``hc_head``; Gemma 3n unstacks its AltUp streams after the last layer) is replayed by its own forward instead,
    decided on the first baseline batch when the direct replay's checks refuse: every layer call before the start
    layer's first call is short-circuited (the layer's ``forward`` is swapped for one that returns the output that
    call gave in the baseline, and writes into a mapping argument the entries the call wrote there: Gemma 3n's
    shared key/value states), and everything from there on, including whatever the body does between and after
    its layers, runs as the model runs it. The output of every short-circuited call is recorded, not only the
    last: the body may keep an earlier one (Dory's loops restart from the input section's output), and only
    recording them all is right for any body. That costs one hidden state per lower layer call and batch, under
    ``record_budget`` like the direct replay's records, each on the device of the layer that produced it.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Tensor,
        batches: Sequence[slice | Tensor],
        start: int | Sequence[int],
        *,
        record_budget: int | None = None,
    ) -> None:
        self.model = model
        self.parts = model_parts(model)
        self.blocks = blocks
        self.batches = list(batches)
        several = isinstance(start, Iterable) and not isinstance(start, str) and getattr(start, "ndim", 1) != 0
        starts = sorted({as_index(s, "start layer") for s in (start if several else [start])})
        if not starts:
            raise ValueError("PrefixRunner needs at least one start layer")
        if starts[0] < 0 or starts[-1] >= self.parts.n_layers:
            raise ValueError(f"start layers {starts} out of range: the model has layers 0..{self.parts.n_layers - 1}")
        self.starts = tuple(starts)
        self.start = starts[0]
        self.device = input_device(model)  # where the token ids go
        # Where each layer computes (the same device for every layer without a device map).
        self._layer_device = [execution_device(layer) for layer in self.parts.layers]
        self.record_budget = record_budget
        self._hidden: list[dict[int, Tensor]] = []  # per batch: start layer → hidden state entering it
        self._args: list[list[tuple[int, bool, tuple, dict]]] = []  # per batch: (layer, positional, rest, kwargs)
        # per layer call from the lowest start on
        self._shared: dict[tuple, list[list[tuple[int, bool, tuple, dict]]]] = {}  # batch shape → distinct records
        self._after = None  # what the body applies after its last layer, found by the first baseline batch
        self._order: tuple[int, ...] | None = None  # the layers the body calls, in order, from the lowest start
        self._first: dict[int, int] = {}  # start layer → its first call in that order
        # The body-forward replay (None until the first baseline batch decides; see the class docstring).
        self._via_body: bool | None = None
        self._calls_all: tuple[int, ...] | None = None  # every layer call of the body, from its first, in order
        self._first_all: dict[int, int] = {}  # start layer → its first call in that order
        self._lower: list[list[tuple[object, list]]] = []  # per batch: (output, writes) of each call before the
        # highest start layer's first call

    def _budget(self, device: torch.device) -> int:
        if self.record_budget is not None:
            return self.record_budget
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0] // 4
        return 1 << 62  # the device is the host: nothing to move

    def _share(self, shape: tuple, layer_args: list[tuple]) -> list[tuple]:
        """One stored copy of equal per-layer arguments across batches of the same shape."""
        known = self._shared.setdefault(shape, [])
        for candidate in known:
            if _same(candidate, layer_args):
                return candidate
        known.append(layer_args)
        return layer_args

    def _keep(self, hidden: Tensor, device: torch.device, on_device: dict[torch.device, int],
              budgets: dict[torch.device, int]) -> Tensor:
        """``hidden`` kept on ``device`` (the layer it enters computes there) while that device's budget lasts,
        else in host memory."""
        size = hidden.numel() * hidden.element_size()
        if device.type != "cpu":
            budget = budgets.setdefault(device, self._budget(device))
            if on_device.get(device, 0) + size > budget:
                host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=device.type == "cuda")
                return host.copy_(hidden)
        on_device[device] = on_device.get(device, 0) + size
        return hidden.to(device)

    def _keep_all(self, obj: object, device: torch.device, on_device: dict, budgets: dict) -> object:
        """``obj`` (a layer output or written entry: tensors in tuples, lists and dicts) with each tensor kept as
        ``_keep`` keeps a hidden state."""
        if isinstance(obj, Tensor):
            return self._keep(obj, device, on_device, budgets)
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(self._keep_all(x, device, on_device, budgets) for x in obj))
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._keep_all(x, device, on_device, budgets) for x in obj)
        if isinstance(obj, dict):
            return {k: self._keep_all(v, device, on_device, budgets) for k, v in obj.items()}
        return obj

    @torch.no_grad()
    def capture_baseline(self, progress=None, context_for=None) -> Tensor:
        """Baseline losses of every batch; ``context_for(i)`` may wrap batch ``i`` (e.g. to observe residuals).

        Records the calls the body makes into its layers from the first call of the lowest start layer on, in the
        order it makes them (a layer the forward skips, as Mllama does its cross-attention layers on text, is
        not replayed; a layer it calls again is replayed again), and checks that each call takes the previous
        one's output. The first batch decides the replay: direct where that chain holds and ``after_layers``
        finds what follows the last layer, else by the body's own forward (the class docstring), for which the
        output of every call before the highest start layer's first call is recorded (the first batch then runs
        once more to record them, outside ``context_for``).
        """
        layers = self.parts.layers
        calls: list[tuple[int, bool, Tensor, tuple, dict]] = []  # (layer, positional, hidden, rest, kwargs)
        last_out: list[Tensor] = []  # the output of the latest layer call
        broken: list[str] = []
        every: list[int] = []  # every layer call of this batch, from the body's first
        lower: list[tuple[object, list]] = []  # (output, writes) of each call before the highest start's first
        pending: list[list] = []  # the mapping arguments of the current lower call, as they were before it
        top = self.starts[-1]

        def grab(index):
            def hook(module, args, kwargs):
                below_top = top not in every  # no call of the highest start layer yet
                every.append(index)
                if below_top and index != top and self._via_body:
                    pending[:] = [_mappings_before(args, kwargs)]
                kwargs = dict(kwargs)
                positional = bool(args)
                hidden = args[0] if positional else kwargs.pop("hidden_states")
                if not calls and index != self.start:
                    return None
                if calls and not broken and not self._via_body and not _continues(hidden, last_out[0]):
                    broken.append(f"layer {index} does not take layer {calls[-1][0]}'s output")
                calls.append((index, positional, hidden, tuple(args[1:]), kwargs))
                return None
            return hook

        def keep(module, args, kwargs, out):
            last_out[:] = [out[0] if isinstance(out, tuple) else out]
            if pending:  # a call before the highest start's first: its output and what it wrote, copied now
                lower.append((_clone(out), _writes(pending.pop(), args, kwargs)))

        handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles += [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
        budgets: dict[torch.device, int] = {}
        on_device: dict[torch.device, int] = {}
        losses = []
        try:
            for i, sl in enumerate(self.batches):
                batch = self.blocks[sl].to(self.device)
                with context_for(i) if context_for is not None else contextlib.nullcontext():
                    hidden = self.parts.body(input_ids=batch, use_cache=False, return_dict=True).last_hidden_state
                self._check_calls(calls, broken, tuple(every))
                if self._via_body is None:
                    self._choose_replay(broken, last_out[0], hidden)
                    if self._via_body:
                        # The first batch again, now recording the lower calls' outputs (not kept on the first
                        # run: a direct replay never needs them, and they would cost one hidden state per call).
                        for recorded in (calls, last_out, every, lower, pending, broken):
                            recorded.clear()
                        self.parts.body(input_ids=batch, use_cache=False, return_dict=True)
                        self._check_calls(calls, broken, tuple(every))
                losses.append(head_losses(self.model, hidden, batch, self.parts))
                if self._via_body:
                    order = self._calls_all
                    self._lower.append([
                        (self._keep_all(out, self._layer_device[order[k]], on_device, budgets),
                         [(where, self._keep_all(entries, self._layer_device[order[k]], on_device, budgets))
                          for where, entries in writes])
                        for k, (out, writes) in enumerate(lower)])
                else:
                    moved: dict = {}  # one copy per (tensor, device): the layers share one mask object
                    layer_args = [(j, positional, _to_device(rest, self._layer_device[j], moved),
                                   _to_device(kwargs, self._layer_device[j], moved))
                                  for j, positional, _, rest, kwargs in calls]
                    self._args.append(self._share(tuple(batch.shape), layer_args))
                    self._hidden.append({s: self._keep(calls[self._first[s]][2], self._layer_device[s], on_device,
                                                       budgets) for s in self.starts})
                    del layer_args, moved
                # Drop this batch's own copies (a mask _share found equal to the stored one) before the next
                # forward, so they never coexist with the next batch's activations.
                calls.clear()
                last_out.clear()
                every.clear()
                lower.clear()
                pending.clear()
                del hidden
                if progress is not None:
                    progress.update(batch.shape[0])
        finally:
            for handle in handles:
                handle.remove()
        return _cat_losses(losses)

    def _choose_replay(self, broken: list[str], last_output: Tensor, final_hidden: Tensor) -> None:
        """Direct replay where it is the model (a chain of layers, then ``after_layers``), else the body's own."""
        if not broken:
            try:
                self._after = after_layers(self.parts, last_output, final_hidden)
            except UnsupportedModelError:
                self._after = None
        self._via_body = self._after is None

    def _check_calls(self, calls: list, broken: list[str], every: tuple[int, ...]) -> None:
        """The recorded layer calls can be replayed: every start layer was run, in the same order each batch, and
        (direct replay) each call took the previous one's output."""
        name = type(self.parts.body).__name__
        order = tuple(c[0] for c in calls)
        missing = [s for s in self.starts if s not in order]
        if missing:
            raise UnsupportedModelError(f"{name}: its forward does not run layer {missing[0]} on text")
        if broken and self._via_body is False:
            raise UnsupportedModelError(
                f"{name} changes the hidden state between its layers for another batch ({broken[0]}); its layers "
                "cannot be replayed one after another")
        if self._order is None:
            self._order, self._calls_all = order, every
            self._first = {s: order.index(s) for s in self.starts}
            self._first_all = {s: every.index(s) for s in self.starts}
        elif order != self._order or every != self._calls_all:
            raise UnsupportedModelError(f"{name}: its layers run in a different order for another batch")

    def _check_start(self, start: int | None) -> int:
        if start is None:
            return self.start
        start = as_index(start, "start")
        if start not in self.starts:
            raise ValueError(f"start={start} was not recorded; this runner replays from {list(self.starts)}")
        return start

    @torch.no_grad()
    def upper_hidden(self, i: int, start: int | None = None) -> Tensor:
        """Final hidden states (layers ``start..`` + what the body applies after them) of batch ``i``."""
        start = self._check_start(start)
        if self._via_body is None:
            raise RuntimeError("PrefixRunner.capture_baseline must run before the replay")
        if self._via_body:
            return self._body_hidden(i, start)
        hidden = self._hidden[i][start].to(self._layer_device[start], non_blocking=True)
        for j, positional, rest, kwargs in self._args[i][self._first[start]:]:
            layer = self.parts.layers[j]
            out = layer(hidden, *rest, **kwargs) if positional else layer(hidden_states=hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self._after(hidden)

    def _body_hidden(self, i: int, start: int) -> Tensor:
        """The body's own forward on batch ``i`` with every layer call before ``start``'s first short-circuited:
        each returns (a fresh copy of) its baseline output and writes its baseline entries into its mapping
        arguments; the calls from there on run."""
        n = self._first_all[start]
        order = self._calls_all
        records = self._lower[i]
        served = [0]
        name = type(self.parts.body).__name__

        def short(j: int, real):
            def forward(*args, **kwargs):
                if served[0] >= n:
                    return real(*args, **kwargs)
                k = served[0]
                if order[k] != j:
                    raise UnsupportedModelError(f"{name}: its layers run in a different order on replay")
                served[0] += 1
                out, writes = records[k]
                device = self._layer_device[j]
                for where, entries in writes:
                    target = args[where] if isinstance(where, int) else kwargs[where]
                    for key, value in entries.items():
                        target[key] = _clone(value, device)
                return _clone(out, device)
            return forward

        swapped = []
        try:
            for j in sorted(set(order[:n])):
                layer = self.parts.layers[j]
                own = layer.__dict__.get("forward")  # accelerate's hook keeps its wrapper there
                swapped.append((layer, own))
                layer.forward = short(j, layer.forward)
            batch = self.blocks[self.batches[i]].to(self.device)
            hidden = self.parts.body(input_ids=batch, use_cache=False, return_dict=True).last_hidden_state
        finally:
            for layer, own in swapped:
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own
        if served[0] != n:
            raise UnsupportedModelError(f"{name}: its layers run in a different order on replay")
        return hidden

    @torch.no_grad()
    def losses(self, progress=None, start: int | None = None) -> Tensor:
        """Per-block losses of the model as it stands, replayed from ``start`` (default: the lowest)."""
        start = self._check_start(start)
        out = []
        for i, sl in enumerate(self.batches):
            out.append(head_losses(self.model, self.upper_hidden(i, start), self.blocks[sl], self.parts))
            if progress is not None:
                progress.update(out[-1].numel())
        return _cat_losses(out)


def _mappings_before(args: tuple, kwargs: dict) -> list[tuple[int | str, MutableMapping, dict]]:
    """The mapping arguments of a layer call (Gemma 3n's shared key/value states), with a copy of their entries."""
    found = [(k, v) for k, v in enumerate(args)] + list(kwargs.items())
    return [(where, v, dict(v)) for where, v in found if isinstance(v, MutableMapping)]


def _writes(before: list, args: tuple, kwargs: dict) -> list[tuple[int | str, dict]]:
    """What a layer call wrote into its mapping arguments (new or replaced entries), copied."""
    out = []
    for where, mapping, old in before:
        entries = {k: _clone(v) for k, v in mapping.items() if k not in old or old[k] is not v}
        if entries:
            out.append((where, entries))
    return out


def _clone(obj: object, device: torch.device | None = None) -> object:
    """``obj`` with every tensor copied (onto ``device`` if given): a record the body cannot change in place."""
    if isinstance(obj, Tensor):
        return obj.to(device if device is not None else obj.device, copy=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_clone(x, device) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _clone(v, device) for k, v in obj.items()}
    return obj


def _continues(hidden: object, previous: Tensor) -> bool:
    """Whether a layer's input is the previous layer's output (the same values; a device map may have moved it)."""
    if hidden is previous:
        return True
    if not isinstance(hidden, Tensor) or hidden.shape != previous.shape or hidden.dtype != previous.dtype:
        return False
    return bool(torch.equal(hidden.to(previous.device), previous))


def _to_device(obj: object, device: torch.device, memo: dict) -> object:
    """``obj`` (a layer argument: tensors, possibly in tuples, lists and dicts) with its tensors on ``device``;
    ``memo`` keeps one copy per (tensor, device). Tensors already there are returned as they are."""
    if isinstance(obj, Tensor):
        key = (id(obj), device)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple takes its fields as arguments
        return type(obj)(*(_to_device(x, device, memo) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(x, device, memo) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    return obj


def _cat_losses(losses: list[Tensor]) -> Tensor:
    """Concatenated per-block losses on the CPU; empty for a rank that was given no blocks (torchrun)."""
    return torch.cat(losses).cpu() if losses else torch.zeros(0, dtype=torch.float64)


def ppl_from_losses(losses: Tensor) -> float:
    """exp(mean over blocks of each block's mean loss)."""
    return math.exp(losses.double().mean().item())
