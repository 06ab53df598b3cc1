"""How many blocks go in a batch, and which: memory sizing, the default batch size, and this rank's batches.

A batch is as many blocks as fit a share of the free memory (``default_batch_size``); under torchrun each rank
takes every world_size-th block (``plan_batches``) and the per-block losses are summed back (``gather_losses``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ..model.devices import compute_devices, execution_device
from ..model.losses import HEAD_ROWS_MULTIPLE
from . import distributed

BATCH_MEMORY_FRACTION = 0.25  # of the free memory measured at the start; the rest is for everything else


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's available RAM (``/proc/meminfo``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def batch_bytes_per_block(parts, hidden: int, seq_len: int, dtype: torch.dtype) -> int:
    """Peak bytes one block adds to a batch, for the model's real dtype.

    - the layer's activations: ~16 tensors of [T, hidden] (attention projections, MLP at 4x hidden); a BERT-style
      head transform (``ModelParts.head_transform``: dense, activation, LayerNorm, ~4 tensors of [T, hidden]) runs
      after the layers, on memory they no longer hold;
    - the model's own eager attention: scores and probabilities, [Hq, T, T] each, in the model dtype;
    - the reference op (CPU and the "torch" backend): two fp32 [Hq, T, T] buffers, and ε [Hq, T, D] fp32;
    - the op's statistics of an observed call: argmax (int64), top-1 probability and sink mass (fp32), [Hq, T] each.

    The op's Gram is not charged per block: the kernel sums every block's Σ εεᵀ on the device into one fp32
    [Hq, D, D] per call (and the reference from ε, counted above), whatever the batch; and the kernel takes any
    batch · Hq (it launches the (block, head) pairs in chunks of CUDA's grid-y limit, ``MAX_GRID_Y``), so the batch
    size is memory alone.
    """
    elem = torch.finfo(dtype).bits // 8
    T, H, D = seq_len, parts.largest("n_heads"), max(parts.largest("qk_dim"), parts.largest("v_dim"))
    activations = 16 * T * hidden * elem
    eager_scores = 2 * H * T * T * elem
    reference = 2 * H * T * T * 4 + 2 * H * T * D * 4
    statistics = H * T * (8 + 4 + 4)
    return activations + eager_scores + reference + statistics


def default_batch_size(device: torch.device, parts, seq_len: int, n_blocks: int, dtype: torch.dtype, *,
                       hidden: int | None = None, free: int | Mapping[torch.device, int] | None = None,
                       n_records: int = 1, devices: Sequence[torch.device] | None = None) -> int:
    """Blocks per batch: as many as fit ``BATCH_MEMORY_FRACTION`` of the free memory (CUDA memory, or the
    host's available RAM on CPU), per ``batch_bytes_per_block``, after the prefix record of every block
    (the hidden state entering each of ``n_records`` replay start layers, [n_blocks, T, hidden] each, kept
    for the whole run) and the fp32 copy of the LM head's weight that ``lm_losses`` forms the logits with (a
    16-bit model's; or an odd vocabulary's, padded: 2 GiB at Llama-3-8B's 128256 × 4096) are set aside.

    A model spread over several devices (a device map) runs each batch through every one of them: the fit is
    computed for each device the model computes on (``devices``; default: those of ``parts``' modules and
    ``device``) and the tightest decides. Each device is charged a whole block's activations and, conservatively,
    the whole record and head copy. ``free``: bytes free, one number for every device or a mapping per device
    (measured with ``free_memory`` where missing)."""
    hidden = hidden or parts.largest("n_heads") * parts.largest("v_dim")
    record = n_records * n_blocks * seq_len * hidden * (torch.finfo(dtype).bits // 8)
    vocab, width = parts.lm_head.weight.shape
    padded = -(-vocab // HEAD_ROWS_MULTIPLE) * HEAD_ROWS_MULTIPLE  # lm_losses' padded copy (an odd vocabulary)
    head_fp32 = 0 if dtype == torch.float32 and padded == vocab else padded * width * 4
    per_block = batch_bytes_per_block(parts, hidden, seq_len, dtype)
    used = list(dict.fromkeys([device, *(model_devices(parts) if devices is None else devices)]))
    fits = []
    for dev in used:
        dev_free = free.get(dev) if isinstance(free, Mapping) else free
        budget = int((free_memory(dev) if dev_free is None else dev_free) * BATCH_MEMORY_FRACTION)
        budget = max(budget - record - head_fp32, budget // 4)  # a record that does not fit is kept off the device
        fits.append(budget // per_block)
    return max(1, min(n_blocks, min(fits)))


def model_devices(parts) -> list[torch.device]:
    """The devices the decoder body and LM head of ``parts`` compute on (one, without a device map); none for a
    bare description of a geometry (no modules)."""
    body, head = getattr(parts, "body", None), getattr(parts, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return []
    return list(dict.fromkeys([*compute_devices(body), execution_device(head)]))


def plan_batches(n_blocks: int, calib_blocks: int, batch_size: int) -> tuple[list[torch.Tensor], int]:
    """This rank's block batches, calibration blocks first and in batches of their own.

    Returns (batches as index tensors, how many leading batches hold calibration blocks).
    """
    r, w = distributed.rank(), distributed.world_size()
    calib = [i for i in range(calib_blocks) if i % w == r]
    rest = [i for i in range(calib_blocks, n_blocks) if i % w == r]

    def chunks(idx):
        return [torch.tensor(idx[s : s + batch_size]) for s in range(0, len(idx), batch_size)]

    calib_batches = chunks(calib)
    return calib_batches + chunks(rest), len(calib_batches)


def gather_losses(local: torch.Tensor, batches: list[torch.Tensor], n_blocks: int) -> torch.Tensor:
    """Place this rank's per-block losses at their global positions and sum over ranks."""
    full = torch.zeros(n_blocks, dtype=torch.float64)
    if batches:
        full[torch.cat(batches)] = local
    return distributed.all_reduce_sum(full)


def rank_batches(n_blocks: int, batch_size: int) -> list[torch.Tensor]:
    """This rank's share of blocks 0..n_blocks − 1, in batches (blocks i with i mod world_size = rank)."""
    return plan_batches(n_blocks, 0, batch_size)[0]
