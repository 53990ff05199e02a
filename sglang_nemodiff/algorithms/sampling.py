"""Each request's SGLang sampling parameters, applied to block logits exactly as SGLang's AR
sampler applies them to one position.

AR mode samples the next token from `softmax(adjusted_logits / temperature)` filtered by top-k,
then top-p (on the unfiltered cumulative sum), then min-p, renormalised (SGLang's PyTorch
sampler, `top_k_top_p_min_p_sampling_from_probs_torch`). `adjusted_logits` are the logits after
frequency/presence penalties and `min_new_tokens` (additive), the repetition penalty (scaling)
and `logit_bias`. LinearSpec needs that distribution at every block slot, where slot j stands for
the step that already generated block[1..j]: so the penalties count those tokens too
(`Penalties.apply`). Greedy requests (temperature 0, i.e. top_k == 1 after SGLang's
normalisation) take the argmax of the adjusted logits, as AR does.

Randomness: requests with `sampling_seed` draw from a generator seeded by (seed, position) so a
seeded request is reproducible; the others draw from the process-wide torch generator, which
SGLang seeds identically on every tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sglang_nemodiff.algorithms.grammar import active_grammar

TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary"


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V], per-row parameters [R] -> the normalised sampling distribution [R, V]."""
    probs = torch.softmax(logits.float() / temperature.view(-1, 1), dim=-1)
    V = probs.shape[-1]
    if bool((top_k >= V).all() & (top_p >= 1.0).all() & (min_p <= 0.0).all()):
        return probs
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    ranks = torch.arange(V, device=probs.device).view(1, -1)
    probs_sort[ranks >= top_k.view(-1, 1)] = 0.0
    probs_sort[(probs_sum - probs_sort) > top_p.view(-1, 1)] = 0.0
    if bool((min_p > 0).any()):
        probs_sort[probs_sort < (probs_sort[:, 0] * min_p).view(-1, 1)] = 0.0
    filtered = torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)
    return filtered / filtered.sum(-1, keepdim=True)


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from probs [R, V] with uniforms u [R]."""
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True)
    return index.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class Penalties:
    """SGLang's penalizers for one batch, with the history they depend on (the request's output
    tokens so far; SGLang's penalizers count output tokens only)."""

    frequency: torch.Tensor  # [bs, 1]
    presence: torch.Tensor  # [bs, 1]
    repetition: torch.Tensor  # [bs, 1] (1 = off)
    counts: torch.Tensor  # [bs, V] occurrences of each token in the output so far
    n_out: torch.Tensor  # [bs] output tokens so far
    min_new: torch.Tensor  # [bs]
    stop_tokens: torch.Tensor  # [bs, V] bool: blocked while n_out < min_new
    bias: Optional[torch.Tensor]  # [bs, V] logit_bias

    def apply(self, logits: torch.Tensor, block: Optional[torch.Tensor] = None,
              start: int = 0) -> torch.Tensor:
        """logits [bs, n, V] of the n consecutive steps start .. start+n-1 of a block; step j
        has also generated block[:, 1..j] (block [bs, >= start+n] or None: nothing generated
        in the block). start > 0 (an AR step inside a round, ar_steps.py) takes n = 1.
        Returns adjusted float logits."""
        logits = logits.float()
        bs, n, V = logits.shape
        counts = self.counts.unsqueeze(1).expand(bs, n, V)
        if block is not None and start > 0:
            assert n == 1, "a step after the block's start is adjusted on its own"
            earlier = block[:, 1 : start + 1]
            extra = torch.zeros_like(self.counts).scatter_add_(
                1, earlier, torch.ones(earlier.shape, dtype=counts.dtype, device=counts.device))
            counts = counts + extra.unsqueeze(1)
        elif block is not None and n > 1:
            steps = torch.nn.functional.one_hot(block[:, 1:n], V).to(counts.dtype).cumsum(1)
            counts = counts + torch.cat([torch.zeros_like(steps[:, :1]), steps], 1)
        logits = logits - self.frequency.unsqueeze(1) * counts
        logits = logits - self.presence.unsqueeze(1) * (counts > 0)
        generated = self.n_out.view(-1, 1) + start + torch.arange(n, device=logits.device)
        blocked = (generated < self.min_new.view(-1, 1)).unsqueeze(-1) & self.stop_tokens.unsqueeze(1)
        logits = logits.masked_fill(blocked, float("-inf"))
        seen = counts > 0
        rep = self.repetition.view(-1, 1, 1)
        scaled = torch.where(logits < 0, logits * rep, logits / rep)
        logits = torch.where(seen, scaled, logits)
        if self.bias is not None:
            logits = logits + self.bias.unsqueeze(1)
        return logits


def _stop_tokens(req) -> set:
    ids = set(req.sampling_params.stop_token_ids or ()) | set(req.eos_token_ids or ())
    tokenizer = getattr(req, "tokenizer", None)
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "additional_stop_token_ids", None) or ())
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def _penalties(reqs, vocab_size: int, device) -> Optional[Penalties]:
    sps = [r.sampling_params for r in reqs]
    if not any(sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0
               or sp.min_new_tokens or sp.logit_bias for sp in sps):
        return None
    bs = len(reqs)
    counts = torch.zeros(bs, vocab_size)
    stop = torch.zeros(bs, vocab_size, dtype=torch.bool)
    bias = torch.zeros(bs, vocab_size) if any(sp.logit_bias for sp in sps) else None
    for i, req in enumerate(reqs):
        if len(req.output_ids):
            counts[i].index_add_(0, torch.tensor(list(req.output_ids), dtype=torch.int64),
                                 torch.ones(len(req.output_ids)))
        if req.sampling_params.min_new_tokens:
            stop[i, [t for t in _stop_tokens(req) if 0 <= t < vocab_size]] = True
        for token, value in (req.sampling_params.logit_bias or {}).items():
            bias[i, int(token)] = float(value)

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

    return Penalties(
        frequency=column([sp.frequency_penalty for sp in sps]),
        presence=column([sp.presence_penalty for sp in sps]),
        repetition=column([sp.repetition_penalty for sp in sps]),
        counts=counts.to(device), n_out=column([len(r.output_ids) for r in reqs], torch.int64).view(-1),
        min_new=column([sp.min_new_tokens for sp in sps], torch.int64).view(-1),
        stop_tokens=stop.to(device), bias=None if bias is None else bias.to(device))


@dataclass
class BatchSampling:
    """The sampling parameters of one batch's requests, as tensors (row = request)."""

    greedy: torch.Tensor  # [bs] bool
    temperature: torch.Tensor  # [bs]
    top_k: torch.Tensor  # [bs]
    top_p: torch.Tensor  # [bs]
    min_p: torch.Tensor  # [bs]
    seeds: Sequence[Optional[int]]
    positions: Sequence[int]  # position of the next token each request generates
    penalties: Optional[Penalties]
    # Logprob requests: None for a request that wants none, else (top_logprobs_num, token ids).
    logprobs: Sequence[Optional[tuple]] = ()
    grammars: Sequence = ()  # the active grammar matcher of each request, or None

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())

    @classmethod
    def greedy_batch(cls, bs: int, device) -> "BatchSampling":
        ones = torch.ones(bs, device=device)
        return cls(greedy=torch.ones(bs, dtype=torch.bool, device=device), temperature=ones,
                   top_k=torch.ones(bs, dtype=torch.int64, device=device), top_p=ones,
                   min_p=torch.zeros(bs, device=device), seeds=[None] * bs, positions=[0] * bs,
                   penalties=None, logprobs=[None] * bs, grammars=[None] * bs)

    @classmethod
    def from_reqs(cls, reqs, vocab_size: int, device) -> "BatchSampling":
        sps = [r.sampling_params for r in reqs]

        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = tensor([min(sp.top_k, TOP_K_ALL) for sp in sps], torch.int64)
        return cls(greedy=top_k == 1, temperature=tensor([sp.temperature for sp in sps]),
                   top_k=top_k, top_p=tensor([sp.top_p for sp in sps]),
                   min_p=tensor([sp.min_p for sp in sps]),
                   seeds=[sp.sampling_seed for sp in sps],
                   positions=[len(r.origin_input_ids) + len(r.output_ids) for r in reqs],
                   penalties=_penalties(reqs, vocab_size, device),
                   logprobs=[(r.logprob.top_logprobs_num, r.logprob.token_ids_logprob)
                             if r.return_logprob else None for r in reqs],
                   grammars=[active_grammar(r) for r in reqs])

    def select(self, rows: torch.Tensor) -> "BatchSampling":
        """The parameters of a subset of rows (a tensor of row indices)."""
        index = rows.tolist()
        return BatchSampling(
            greedy=self.greedy[rows], temperature=self.temperature[rows], top_k=self.top_k[rows],
            top_p=self.top_p[rows], min_p=self.min_p[rows], seeds=[self.seeds[i] for i in index],
            positions=[self.positions[i] for i in index], penalties=None,
            logprobs=[self.logprobs[i] for i in index] if self.logprobs else (),
            grammars=[self.grammars[i] for i in index] if self.grammars else ())

    def adjust(self, logits: torch.Tensor, block: Optional[torch.Tensor] = None,
               start: int = 0) -> torch.Tensor:
        """Penalties and logit bias for logits [bs, n, V] (see Penalties.apply)."""
        return logits if self.penalties is None else self.penalties.apply(logits, block, start)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [bs, n, V] -> sampling distributions [bs, n, V] (row parameters per request)."""
        bs, n, V = logits.shape

        def per_slot(x):
            return x.repeat_interleave(n)

        return filtered_probs(logits.reshape(bs * n, V), per_slot(self.temperature),
                              per_slot(self.top_k), per_slot(self.top_p),
                              per_slot(self.min_p)).view(bs, n, V)

    def uniforms(self, n: int, stream: int, device) -> torch.Tensor:
        """[bs, n] uniforms in [0, 1): seeded rows from (seed, position, stream), others from
        torch's global generator. `stream` separates the draws of one round's decisions."""
        u = torch.rand(len(self.seeds), n, device=device)
        for row, seed in enumerate(self.seeds):
            if seed is not None:
                g = torch.Generator(device=device).manual_seed(
                    hash((seed, self.positions[row], stream)) & 0x7FFF_FFFF_FFFF_FFFF)
                u[row] = torch.rand(n, generator=g, device=device)
        return u

    @property
    def grammar_rows(self) -> list:
        return [i for i, g in enumerate(self.grammars) if g is not None]

    @property
    def wants_logprobs(self) -> bool:
        return any(entry is not None for entry in self.logprobs)

    def logprob_dist(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution SGLang reports logprobs under, for adjusted logits [bs, n, V]:
        log_softmax of the logits (greedy) or of logits / temperature (sampled), before the
        top-k/top-p/min-p filter."""
        scale = torch.where(self.greedy, torch.ones_like(self.temperature), self.temperature)
        return torch.log_softmax(logits.float() / scale.view(-1, 1, 1), dim=-1)

    def token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, counts) -> list:
        """Per request, the TokenLogprobs of its first counts[i] tokens [bs, n] under the slots
        of logits [bs, n, V] (None for requests that asked for no logprobs)."""
        from sglang_nemodiff.stats import TokenLogprobs

        out = [None] * len(self.logprobs)
        rows = [i for i, entry in enumerate(self.logprobs) if entry is not None]
        if not rows:
            return out
        index = torch.tensor(rows, device=logits.device)
        dist = self.select(index).logprob_dist(logits[index])
        chosen = dist.gather(-1, tokens[index].unsqueeze(-1)).squeeze(-1).tolist()
        for k, row in enumerate(rows):
            top_n, ids = self.logprobs[row]
            n = counts[row]
            top = None
            if top_n:
                values, top_ids = dist[k, :n].topk(top_n, dim=-1)
                top = list(zip(values.tolist(), top_ids.tolist()))
            by_id = None
            if ids:
                by_id = dist[k, :n, torch.tensor(ids, device=dist.device)].tolist()
            out[row] = TokenLogprobs(token_logprobs=chosen[k][:n], top_logprobs=top,
                                     ids_logprobs=by_id)
        return out
