"""The prefix-reusing evaluator the sweep uses: the layers below the lowest crystallized one run once per batch
(``PrefixRunner.capture_baseline``), and every configuration replays only the layers from its start layer up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .devices import execution_device, input_device
from .lm_head import after_layers
from .losses import cat_losses, head_losses
from .parts import ModelParts, as_index, model_parts
from .recorded import clone_tree, continues, mappings_before, same_value, to_device, writes_since


class PrefixRunner:
    """Evaluates many configurations that differ only from some start layer up.

    ``capture_baseline`` runs the untouched model once per batch and records the hidden states entering
    each start layer, together with the exact arguments the model hands each layer from the lowest start
    up (masks, position embeddings, ...: Gemma 2 hands its sliding and full layers different masks; a hybrid
    hands its linear-attention or SSM layers their own). It returns the baseline losses. ``losses(start=s)``
    then replays only layers ``s..`` (every one, attention or not, from its own start, without a cache) + what
    the body applies after its last layer (``nqpq.model.lm_head.after_layers``: found from the baseline pass) + LM head
    from that record, under whatever crystallization is active: the same computation as a full forward pass,
    without the unchanged lower layers.

    Memory: layer arguments equal across batches of one shape (the masks, the rotary tables) are kept
    once, not once per batch. Recorded hidden states stay on the device up to ``record_budget`` bytes
    (default: a quarter of the free CUDA memory when the capture starts; everything on CPU), the rest
    goes to host memory (pinned on CUDA) and is copied back batch by batch during the replay.

    ``parts``: the model's ``model_parts``, when the caller has found them already (a run finds them once).

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
        parts: ModelParts | None = None,
    ) -> None:
        self.model = model
        self.parts = model_parts(model) if parts is None else parts  # a run passes the parts it found
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
            if same_value(candidate, layer_args):
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
                    pending[:] = [mappings_before(args, kwargs)]
                kwargs = dict(kwargs)
                positional = bool(args)
                hidden = args[0] if positional else kwargs.pop("hidden_states")
                if not calls and index != self.start:
                    return None
                if calls and not broken and not self._via_body and not continues(hidden, last_out[0]):
                    broken.append(f"layer {index} does not take layer {calls[-1][0]}'s output")
                calls.append((index, positional, hidden, tuple(args[1:]), kwargs))
                return None
            return hook

        def keep(module, args, kwargs, out):
            last_out[:] = [out[0] if isinstance(out, tuple) else out]
            if pending:  # a call before the highest start's first: its output and what it wrote, copied now
                lower.append((clone_tree(out), writes_since(pending.pop(), args, kwargs)))

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
                    layer_args = [(j, positional, to_device(rest, self._layer_device[j], moved),
                                   to_device(kwargs, self._layer_device[j], moved))
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
        return cat_losses(losses)

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
                        target[key] = clone_tree(value, device)
                return clone_tree(out, device)
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
        return cat_losses(out)
