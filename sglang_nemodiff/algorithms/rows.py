"""Forward some rows of a block batch: FastDiffuser's first-done-first-out denoising.

A FastDiffuser block resolves after as many denoise steps as its own tokens need; without this,
every request of a batch is forwarded (and charged) until the batch's slowest block resolves.
`row_subset` builds a ForwardBatch of the rows still denoising, so a resolved request stops
costing compute while the others go on, and each request is charged its own forwards.

Why not SGLang's own FDFO loop (`--dllm-fdfo`, one denoise forward per scheduler step, resolved
blocks committed at once and new requests joining)? Its commit path assumes a block's KV is final
when it resolves; an NLD block is then re-encoded by one causal pass (the KV kept, the next seed),
which needs another attention mode than the denoise passes of the rows still running. So the
batch's rows leave the denoise loop one by one inside the round, and rejoin for the causal pass.

Only the fields a block (DLLM_EXTEND) forward reads are sliced: per-token tensors (input ids,
positions, KV locations), per-request tensors and lists, and the sums derived from them. Batches
whose token counts are coordinated across ranks (DP attention, two-batch overlap) are forwarded
whole (`can_subset`)."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardBatch

_PER_REQUEST_TENSORS = ("req_pool_indices", "seq_lens", "seq_lens_cpu", "req_pool_indices_cpu",
                        "orig_seq_lens", "extend_seq_lens", "extend_prefix_lens", "dllm_prompt_mask",
                        "rids_int", "temperature", "top_p")
_PER_TOKEN_TENSORS = ("input_ids", "positions", "out_cache_loc")
_PER_REQUEST_LISTS = ("extend_prefix_lens_cpu", "extend_seq_lens_cpu", "extend_logprob_start_lens_cpu",
                      "lora_ids", "rids", "top_logprobs_nums", "token_ids_logprobs", "mm_inputs")


def can_subset(forward_batch: ForwardBatch) -> bool:
    return (forward_batch.global_num_tokens_cpu is None and forward_batch.tbo_split_seq_index is None
            and forward_batch.input_embeds is None and not any(forward_batch.mm_inputs or ()))


def row_subset(forward_batch: ForwardBatch, rows: torch.Tensor, block: torch.Tensor) -> ForwardBatch:
    """A ForwardBatch of `rows` (row indices) of a block batch whose every request extends by one
    block of block.shape[1] tokens; its input ids are block[rows] (the blocks as filled so far)."""
    bs, B = block.shape
    sub = copy.copy(forward_batch)
    sub.forward_metadata_ready = False  # the attention backend plans the smaller batch
    n = len(rows)
    token_index = (rows[:, None] * B + torch.arange(B, device=rows.device)).reshape(-1)
    for name in _PER_TOKEN_TENSORS:
        value: Optional[torch.Tensor] = getattr(forward_batch, name)
        if value is not None:
            setattr(sub, name, value[token_index.to(value.device)])
    sub.input_ids = block[rows].reshape(-1)
    for name in _PER_REQUEST_TENSORS:
        value = getattr(forward_batch, name)
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == bs:
            setattr(sub, name, value[rows.to(value.device)])
    if forward_batch.mrope_positions is not None:  # [3, tokens]
        sub.mrope_positions = forward_batch.mrope_positions[:, token_index.to(forward_batch.mrope_positions.device)]
    index = rows.tolist()
    for name in _PER_REQUEST_LISTS:
        value = getattr(forward_batch, name)
        if value is not None:
            setattr(sub, name, [value[i] for i in index])
    sub.batch_size = n
    sub.extend_num_tokens = n * B
    if forward_batch.num_token_non_padded is not None:
        sub.num_token_non_padded = torch.full_like(forward_batch.num_token_non_padded, n * B)
    if forward_batch.extend_start_loc is not None:
        sub.extend_start_loc = torch.arange(n, device=forward_batch.extend_start_loc.device,
                                            dtype=forward_batch.extend_start_loc.dtype) * B
    seq_lens_cpu = sub.seq_lens_cpu if sub.seq_lens_cpu is not None else sub.seq_lens.cpu()
    sub.seq_lens_sum = int(seq_lens_cpu.sum())
    return sub


def decode_step(forward_batch: ForwardBatch, rows: torch.Tensor, slot: int, B: int,
                input_ids: torch.Tensor) -> ForwardBatch:
    """A DECODE ForwardBatch for slot `slot` of `rows` of a block batch (B slots per request):
    one token per request at that slot's position, writing that slot's KV and attending to the
    request's prefix plus slots 0..slot (the earlier slots' KV written by earlier steps). This
    is an AR decode step taken inside a block round (algorithms/ar_steps.py)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    sub = copy.copy(forward_batch)
    sub.forward_metadata_ready = False  # the attention backend plans a decode batch
    sub.forward_mode = ForwardMode.DECODE
    token_index = rows * B + slot
    for name in _PER_TOKEN_TENSORS:
        value: Optional[torch.Tensor] = getattr(forward_batch, name)
        if value is not None:
            setattr(sub, name, value[token_index.to(value.device)])
    sub.input_ids = input_ids
    prefix = forward_batch.extend_prefix_lens[rows.to(forward_batch.extend_prefix_lens.device)]
    for name in _PER_REQUEST_TENSORS:
        value = getattr(forward_batch, name)
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == forward_batch.batch_size:
            setattr(sub, name, value[rows.to(value.device)])
    seq_lens = prefix + slot + 1
    sub.seq_lens = seq_lens.to(forward_batch.seq_lens.device, forward_batch.seq_lens.dtype)
    sub.seq_lens_cpu = seq_lens.cpu().to(torch.int64)
    sub.orig_seq_lens = sub.seq_lens
    sub.seq_lens_sum = int(sub.seq_lens_cpu.sum())
    if forward_batch.mrope_positions is not None:
        sub.mrope_positions = forward_batch.mrope_positions[:, token_index.to(forward_batch.mrope_positions.device)]
    index = rows.tolist()
    for name in ("lora_ids", "rids", "mm_inputs"):
        value = getattr(forward_batch, name)
        if value is not None:
            setattr(sub, name, [value[i] for i in index])
    for name in ("extend_num_tokens", "extend_seq_lens", "extend_prefix_lens", "extend_start_loc",
                 "extend_prefix_lens_cpu", "extend_seq_lens_cpu", "extend_logprob_start_lens_cpu",
                 "dllm_prompt_mask", "top_logprobs_nums", "token_ids_logprobs"):
        setattr(sub, name, None)
    sub.return_logprob = False  # the algorithm computes the logprobs it reports
    sub.batch_size = len(index)
    if forward_batch.num_token_non_padded is not None:
        sub.num_token_non_padded = torch.full_like(forward_batch.num_token_non_padded, len(index))
    return sub
