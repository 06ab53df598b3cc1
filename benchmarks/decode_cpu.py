"""What a decode step costs on CPU under crystallize, against the model's own step (issue 34).

SmolLM2-135M (the converted copy ``nqpq fetch smollm2-135m --converted`` makes), float32, one thread: a prompt of
``--prompt-tokens`` tokens of WikiText validation, then ``--new`` greedy tokens with the model's own DynamicCache.
A decode step's cost is (t(new tokens) − t(1 token)) / (new − 1): the prefill and the first token cancel. Best of
``--repeats`` (the configurations interleaved in each repeat). Configurations: the model itself, then layers 23–29
crystallized in top1, full and lowrank d_r 8 (a random orthonormal basis: the cost does not depend on which basis).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_cpu
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch


def _time(model, ids: torch.Tensor, new: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nqpq.model.crystallize import crystallize
    from nqpq.sources.fetch import converted_model
    from nqpq.sources.text import text_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = converted_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows, _ = text_rows(None, "wikitext-103-valid", False)
    ids = torch.tensor([tok(" ".join(itertools.islice(rows, 400)))["input_ids"][: args.prompt_tokens]])
    layers = list(range(23, 30))
    g = torch.Generator().manual_seed(0)
    basis = {li: torch.linalg.qr(torch.randn(9, 64, 64, generator=g))[0] for li in layers}
    configs = {"model": None, "top1": dict(mode="top1"), "full": dict(mode="full"),
               "lowrank d_r=8": dict(mode="lowrank", basis=basis, d_r=8)}
    print(f"SmolLM2-135M fp32, 1 thread, prompt {ids.shape[1]} tokens, {args.new} new tokens, best of {args.repeats}")
    print(f"{'configuration':<16} {'ms / decode step':>17} {'vs model':>9}")
    # The configurations interleaved within each repeat: a shared machine's load falls on all of them alike.
    best = dict.fromkeys(configs, float("inf"))
    for _ in range(args.repeats):
        for name, kw in configs.items():
            if kw is None:
                t_new, t_one = _time(model, ids, args.new), _time(model, ids, 1)
            else:
                with crystallize(model, layers, **kw):
                    t_new, t_one = _time(model, ids, args.new), _time(model, ids, 1)
            best[name] = min(best[name], (t_new - t_one) / (args.new - 1))
    for name, t in best.items():
        print(f"{name:<16} {1e3 * t:>17.2f} {t / best['model']:>8.2f}x")

if __name__ == "__main__":
    main()
