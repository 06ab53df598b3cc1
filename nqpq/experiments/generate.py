"""``nqpq generate``: what a crystallized model writes, beside what the model writes itself.

For each prompt the unmodified model continues it (``model.generate`` with its own KV cache: greedy by default,
``--sample`` draws with ``--temperature`` / ``--top-p`` from a generator seeded by ``--seed``, the same seed for
every configuration), then each configuration (a mode, and for ``lowrank`` a rank d_r) continues it inside
``nqpq.crystallize``. Per configuration: its continuation, the first new token where it leaves the model's
(``first_divergence``: its index and both tokens; None where they agree throughout), the token agreement (the
fraction of the longer continuation's positions holding the same token), and the mean log-probability the unmodified
model assigns to the continuation's tokens (teacher-forced: one forward of prompt + continuation), the model's own
judgement of the text; the model's own continuation has it too.

The model is loaded, and the lowrank basis fitted on the sweep's calibration blocks, by the code ``nqpq eval`` uses
(``nqpq.experiments.side_by_side``: the sweep's ``calibration_sets`` / ``fit_bases``), or read from ``--basis``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import NqpqError
from ..results.report_lines import describe_heads
from .side_by_side import (
    SideBySideSettings,
    calibrates,
    check_model_before_loading,
    check_modes,
    configurations,
    crystal_choice,
    load_named_model,
    model_check_config,
    resolve_device,
    sweep_config,
)

GENERATE_FORMAT_VERSION = 1
BASELINE = "model"


@dataclass
class GenerateConfig(SideBySideSettings):
    """Every setting of an ``nqpq generate`` run (the CLI flags, one for one): the shared ones and the prompts and
    how to continue them."""

    prompts: Sequence[str] = ()
    prompt_file: str | None = None  # one more prompt: the file's whole text
    max_new_tokens: int = 32
    sample: bool = False
    temperature: float | None = None  # with --sample (default 1.0)
    top_p: float | None = None  # with --sample (default 1.0: no nucleus cut)


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts: each ``--prompt``, then ``--prompt-file``'s whole text; refused if none, or one is empty."""
    prompts = list(cfg.prompts)
    if cfg.prompt_file is not None:
        if not os.path.isfile(cfg.prompt_file):
            raise NqpqError(f"--prompt-file {cfg.prompt_file!r}: no such file")
        with open(cfg.prompt_file, encoding="utf-8") as f:
            prompts.append(f.read())
    if not prompts:
        raise NqpqError("give a prompt: --prompt TEXT or --prompt-file FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            where = "--prompt-file" if cfg.prompt_file is not None and i == len(prompts) - 1 else "--prompt"
            raise NqpqError(f"{where}: the prompt is empty")
    return prompts


def check_generate_flags(cfg: GenerateConfig) -> None:
    """Every check that needs no model (bad flags fail in seconds)."""
    from .config import check_flags

    read_prompts(cfg)
    if cfg.max_new_tokens < 1:
        raise NqpqError(f"--max-new-tokens {cfg.max_new_tokens}: must be at least 1")
    check_modes(cfg.modes, cfg.d_r, cfg.basis)
    if not cfg.sample and (cfg.temperature is not None or cfg.top_p is not None):
        raise NqpqError("--temperature and --top-p are for --sample (the default is greedy)")
    if cfg.temperature is not None and not cfg.temperature > 0:
        raise NqpqError(f"--temperature {cfg.temperature}: must be > 0")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise NqpqError(f"--top-p {cfg.top_p}: must be in (0, 1]")
    check_flags(sweep_config(cfg))  # the model, calibration and device flags, as the sweep checks them


def continue_prompt(model: torch.nn.Module, ids: torch.Tensor, cfg: GenerateConfig, pad_id: int | None) -> list[int]:
    """The model's continuation of ``ids`` [1, T] (its own KV cache): greedy, or sampled from a generator seeded by
    ``cfg.seed`` (the same draws for every configuration)."""
    kw: dict = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if cfg.sample:
        kw = dict(do_sample=True, temperature=cfg.temperature or 1.0, top_p=cfg.top_p or 1.0, top_k=0)
        torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                             pad_token_id=pad_id, **kw)
    return out[0, ids.shape[1]:].tolist()


def mean_logprob(model: torch.nn.Module, ids: torch.Tensor, tokens: Sequence[int]) -> float | None:
    """The mean log-probability the (unmodified) model gives ``tokens`` after ``ids`` [1, T], teacher-forced."""
    if not tokens:
        return None
    cont = torch.tensor([list(tokens)], device=ids.device)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, cont], dim=1), use_cache=False).logits[0, ids.shape[1] - 1:-1]
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, cont[0, :, None]).squeeze(-1)
    return float(logp.mean())


def compare(base: Sequence[int], other: Sequence[int]) -> tuple[int | None, float]:
    """The first index where two continuations differ (None: identical) and the fraction of the longer one's
    positions holding the same token."""
    n = max(len(base), len(other))
    same = [i < len(base) and i < len(other) and base[i] == other[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return first, (sum(same) / n if n else 1.0)


def run_generate(cfg: GenerateConfig, *, model: torch.nn.Module | None = None, tokenizer=None,
                 log: Callable[[str], None] | None = None) -> dict:
    """Continue every prompt with the model and with each configuration; print the report; return the results."""
    from ..model.crystallize import crystallize
    from ..model.devices import input_device
    from ..model.parts import model_parts
    from .config import check_model_fit

    say = log or print
    if (model is None) != (tokenizer is None):
        raise NqpqError("run_generate: pass model and tokenizer together (or neither, to load cfg.model)")
    check_generate_flags(cfg)
    if model is None:
        check_model_before_loading(cfg)  # as the sweep: the model's config answers, before any weight loads
    prompts = read_prompts(cfg)
    scfg = sweep_config(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(cfg.device) if model is None else input_device(model)
    torch.manual_seed(cfg.seed)
    model_name, tok_name = cfg.model, "given by the caller"
    if model is None:
        say(f"[generate] Loading {cfg.model}...")
        named = load_named_model(cfg.model, cfg.tokenizer, cfg.dtype, device, say)
        model, tokenizer, model_name, tok_name = named.model, named.tokenizer, named.name, named.tokenizer_name
    model.eval()
    parts = model_parts(model)
    layers = tuple(parts.default_layers if cfg.layers is None else cfg.layers)
    d_rs = sorted(set(cfg.d_r or ()))
    calibrating = calibrates(cfg)
    check_model_fit(model_check_config(cfg), parts, layers, d_rs)
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    choice = crystal_choice(scfg, model, parts, layers, tokenizer, tok_name, device, cfg.modes, cfg.basis, say,
                            "[generate]")
    crystal, heads, basis, basis_record = choice.crystal, choice.heads, choice.basis, choice.basis_record
    if calibrating or heads is not None:
        timings["calibration_s"] = time.perf_counter() - t

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    configs = configurations(cfg.modes, d_rs)
    records = []
    t = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        if ids.shape[1] == 0:
            raise NqpqError("a prompt tokenizes to no tokens")
        base = continue_prompt(model, ids, cfg, pad_id)
        rec = {"prompt": prompt, "prompt_tokens": ids.shape[1],
               BASELINE: {"text": tokenizer.decode(base), "tokens": base,
                          "mean_logprob": mean_logprob(model, ids, base)},
               "configurations": {}}
        for c in configs:
            with crystallize(model, crystal, mode=c.mode, basis=None if basis is None else basis.basis, d_r=c.d_r,
                             backend=cfg.backend, parts=parts):
                toks = continue_prompt(model, ids, cfg, pad_id)
            first, agreement = compare(base, toks)
            divergence = None if first is None else {
                "index": first, BASELINE: tokenizer.decode(base[first:first + 1]),
                "configuration": tokenizer.decode(toks[first:first + 1])}
            rec["configurations"][c.name] = {"text": tokenizer.decode(toks), "tokens": toks,
                                             "first_divergence": divergence, "agreement": agreement,
                                             "mean_logprob": mean_logprob(model, ids, toks)}
        records.append(rec)
    timings["generate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    config = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "out", "prompts", "heads")}
    config.update(model=model_name, tokenizer=tok_name, layers=list(layers), modes=list(cfg.modes), d_r=d_rs,
                  configurations=[c.name for c in configs], basis=basis_record, device=str(device),
                  prompt_file=None if cfg.prompt_file is None else os.path.basename(cfg.prompt_file),
                  heads=cfg.heads if cfg.heads is None or isinstance(cfg.heads, str) else {
                      str(li): list(h) for li, h in cfg.heads.items()})
    results = {"kind": "generate", "format_version": GENERATE_FORMAT_VERSION, "config": config, "prompts": records,
               "heads": None if heads is None else heads.results(), "timings": timings}
    print_generate_report(results, say)
    return results


def print_generate_report(results: dict, say: Callable[[str], None] = print) -> None:
    """Each prompt, the model's continuation, and each configuration's beside it with its numbers."""
    cfg = results["config"]
    how = "sampled (seed {seed}, temperature {t}, top-p {p})".format(
        seed=cfg["seed"], t=cfg["temperature"] or 1.0, p=cfg["top_p"] or 1.0) if cfg["sample"] else "greedy"
    say(f"{cfg['model']}: layers {' '.join(map(str, cfg['layers']))} crystallized, {cfg['max_new_tokens']} new "
        f"tokens, {how}")
    for line in describe_heads(results.get("heads")):
        say(line)
    for rec in results["prompts"]:
        say("")
        say(f"prompt: {rec['prompt']!r}")
        base = rec[BASELINE]
        say(f"  {BASELINE:<14} {base['text']!r}")
        say(f"  {'':<14} mean log p (model) {base['mean_logprob']:.3f}")
        for name, r in rec["configurations"].items():
            say(f"  {name:<14} {r['text']!r}")
            div = r["first_divergence"]
            where = "identical" if div is None else \
                f"diverges at new token {div['index']} ({div[BASELINE]!r} -> {div['configuration']!r})"
            lp = "n/a" if r["mean_logprob"] is None else f"{r['mean_logprob']:.3f}"
            say(f"  {'':<14} {where}, agreement {100 * r['agreement']:.0f} %, mean log p (model) {lp}")


def write_generate_results(out_dir: str, results: dict) -> str:
    """Write ``out_dir``/results.json whole (a staging file moved in place) or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".nqpq-")
    try:
        tmp = os.path.join(staging, "results.json")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, allow_nan=True)
        path = os.path.join(out_dir, "results.json")
        os.replace(tmp, path)
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
