"""The shape of a quadratic self-speculation round, one definition for the oracle
(reference/quadratic.py), the scheduler (the plan and the positions it places), the attention
paths (the pattern they draw) and the model (the rows that run the draft adapter).

A round holds a block d_0..d_{L-1} (d_0: the previous round's bonus, AR's own token, not yet in
the KV cache; d_1..: drafts) and, after each d_i, a group of `group` mask tokens. Query rows are
laid out block first, then group 0, group 1, ...:
- d_i at position +i attends causally to d_0..d_i with the base weights (its logits are AR's);
- group i's masks at +i+1 .. +i+group attend to d_0..d_i and to their own group, with the draft
  adapter (the draft of the next block if exactly d_0..d_i are accepted).
Every row also sees the request's cached prefix. Keeping the block first means that the KV of
the accepted d_0..d_{n-1} is the first n slots, as in the other block modes.

Sparse quadratic (`groups` < L): only the first `groups` block tokens get a group: a round costs
L + groups * group query tokens instead of L (1 + group). When more drafts are accepted than
groups were drafted (n - 1 >= groups), the next round has no drafts (still lossless: the block
rows verify whatever is there). The first groups are where acceptance is: a draft is accepted
only after every draft before it.

Group size: NLD checkpoints (unshifted drafts) predict each mask's own position, so a group holds
b masks (the first at the bonus's position, which the bonus replaces): b(b+1) query tokens for a
b-token block. Converted AR models (`shift_logits`) predict the position after each row, so d_i's
own causal row already predicts the bonus and a group holds b - 1 masks: b * b query tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def group_size(block_size: int, shift_logits: bool) -> int:
    return block_size - 1 if shift_logits else block_size


def first_draft_row(shift_logits: bool) -> int:
    """The group row that drafts the slot after the bonus (unshifted: row 0 stands at the bonus)."""
    return 0 if shift_logits else 1


@dataclass(frozen=True)
class QuadraticLayout:
    block_len: int  # L: block tokens (d_0 and L - 1 drafts)
    group: int  # masks after each block token that has a group
    groups: Optional[int] = None  # block tokens with a group (the first ones); None: all L
    shifted: bool = False  # the checkpoint's draft convention (shift_logits)

    @classmethod
    def for_checkpoint(cls, block_size: int, shift_logits: bool, groups: Optional[int] = None):
        return cls(block_size, group_size(block_size, shift_logits), groups, shift_logits)

    @property
    def first_draft(self) -> int:
        """The group row that drafts the slot after the bonus."""
        return first_draft_row(self.shifted)

    @property
    def n_groups(self) -> int:
        return self.block_len if self.groups is None else min(self.groups, self.block_len)

    @property
    def tokens(self) -> int:
        """Query tokens per request: L + n_groups * group (dense: L (1 + group))."""
        return self.block_len + self.n_groups * self.group

    def tensors(self, device=None):
        """(position offsets from d_0 [T], the pattern among the round's tokens [T, T] bool,
        the draft-adapter rows [T] bool) for one request."""
        L, g, k = self.block_len, self.group, self.n_groups
        owner = torch.cat([torch.arange(L, device=device),
                           torch.arange(k, device=device).repeat_interleave(g)])
        within = torch.cat([torch.zeros(L, dtype=torch.long, device=device),
                            torch.arange(1, g + 1, device=device).repeat(k)])
        offsets = owner + within
        is_mask = torch.arange(self.tokens, device=device) >= L
        col = torch.arange(self.tokens, device=device)
        # every row sees block tokens up to its owner (d rows: causal); mask rows also their group
        sees_block = (col[None, :] < L) & (col[None, :] <= owner[:, None])
        same_group = is_mask[:, None] & is_mask[None, :] & (owner[:, None] == owner[None, :])
        return offsets, sees_block | same_group, is_mask

    def extend_mask(self, prefix_len: int, device=None) -> torch.Tensor:
        """[T, prefix_len + T] bool: what each query row sees of the prefix and the round."""
        _, pattern, _ = self.tensors(device)
        return torch.cat([torch.ones(self.tokens, prefix_len, dtype=torch.bool, device=device),
                          pattern], 1)
