"""Preference losses (DPO, IPO, ORPO) from per-sequence log-probabilities of the trained tokens.

A batch holds B pairs as 2B rows: the B chosen answers, then the B rejected ones, each with its
prompt masked (labels -100), so one forward pass scores both sides. A row's log-probability is
the sum of log p(token | tokens before it) over its trained tokens.

DPO's reference is the same model with its adapter switched off (peft's `disable_adapter()`),
run without gradients: no second copy of the weights. The losses follow the papers and TRL's
`DPOTrainer` / `ORPOTrainer` (tests/training/test_preference.py compares them):
- sigmoid (DPO): -log sigmoid(beta x ((c - c_ref) - (r - r_ref)));
- ipo: ((c - c_ref) / n_c - (r - r_ref) / n_r - 1 / (2 beta))^2, per-token log-ratios;
- orpo: the chosen answers' cross-entropy - beta x log sigmoid(log odds(c) - log odds(r)), with
  per-token mean log-probabilities and odds(p) = p / (1 - p).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.collator import trained_positions
from ..kernels.loss import linear_log_probs


@dataclass
class SideLogProbs:
    """Per-row sums of the trained tokens' log-probabilities, and how many tokens each has."""
    sums: torch.Tensor    # [2B], float32
    tokens: torch.Tensor  # [2B], float32

    def halves(self):
        """(chosen, rejected) sums, and (chosen, rejected) token counts."""
        return self.sums.chunk(2), self.tokens.chunk(2)

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.tokens.clamp(min=1)


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float, variant: str = "sigmoid",
               chosen_tokens=None, rejected_tokens=None) -> torch.Tensor:
    """Each pair's DPO loss from summed log-probs (policy and reference); `ipo` needs the
    token counts, as it compares per-token log-ratios."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if variant == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    if variant != "sigmoid":
        raise ValueError(f"unknown DPO loss {variant!r}")
    return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_term(chosen_mean, rejected_mean, beta: float) -> torch.Tensor:
    """Each pair's odds-ratio term, -beta x log sigmoid(log odds ratio), from per-token mean log-probs."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -beta * F.logsigmoid(log_odds)


def chosen_nll(token_logps: torch.Tensor, rows: torch.Tensor, pairs: int) -> torch.Tensor:
    """The chosen answers' cross-entropy: mean over all their trained tokens (ORPO's SFT term)."""
    chosen = rows < pairs
    return -token_logps[chosen].sum() / chosen.sum().clamp(min=1)


def token_log_probs(model, batch: dict, fused=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trained token's log-probability [n] and the row it belongs to [n].

    Only the positions that predict a trained token are projected (`logits_to_keep`). With
    `fused` (kernels.loss.FusedCausalLMLoss, the CPU kernels), the model hands out those
    positions' hidden states and kernels.loss.linear_log_probs projects them a chunk at a
    time, so the logits are never all kept."""
    labels = batch["labels"]
    keep, targets = trained_positions(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "logits_to_keep": keep, "use_cache": False}
    if fused is not None:
        hidden = fused.hidden_states(model, inputs, keep)
        return linear_log_probs(hidden, fused.weight, targets), rows
    logits = model(**inputs).logits  # [n, V]: a boolean logits_to_keep flattens the kept positions
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=-1), rows


def side_log_probs(token_logps: torch.Tensor, rows: torch.Tensor, n_rows: int) -> SideLogProbs:
    sums = torch.zeros(n_rows, dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)
    tokens = torch.zeros(n_rows, dtype=torch.float32, device=token_logps.device).index_add(
        0, rows, torch.ones_like(token_logps))
    return SideLogProbs(sums, tokens)


def reference_log_probs(model, batch: dict, fused=None) -> SideLogProbs:
    """The base model's log-probs: the same weights with the adapter switched off, no gradients."""
    with torch.no_grad(), model.disable_adapter():
        token_logps, rows = token_log_probs(model, batch, fused)
    return side_log_probs(token_logps, rows, batch["labels"].shape[0])


@dataclass
class PreferenceLoss:
    """One method's loss over a batch of pairs, with the numbers worth logging."""
    method: str = "dpo"
    beta: float = 0.1
    variant: str = "sigmoid"

    def __call__(self, model, batch: dict, fused=None, unwrapped=None) -> tuple[torch.Tensor, dict]:
        """`unwrapped`: the peft model inside a wrapper (DDP) that `model` may be, for the
        reference pass, which needs no gradient synchronisation."""
        token_logps, rows = token_log_probs(model, batch, fused)
        policy = side_log_probs(token_logps, rows, batch["labels"].shape[0])
        (chosen, rejected), (n_chosen, n_rejected) = policy.halves()
        if self.method == "orpo":
            mean_c, mean_r = policy.means.chunk(2)
            loss = chosen_nll(token_logps, rows, chosen.shape[0]) + orpo_odds_term(mean_c, mean_r, self.beta).mean()
            reward_c, reward_r = self.beta * mean_c.detach(), self.beta * mean_r.detach()
        else:
            (ref_c, ref_r), _ = reference_log_probs(unwrapped or model, batch, fused).halves()
            loss = dpo_losses(chosen, rejected, ref_c, ref_r, self.beta, self.variant, n_chosen, n_rejected).mean()
            reward_c, reward_r = self.beta * (chosen - ref_c).detach(), self.beta * (rejected - ref_r).detach()
        return loss, pair_metrics(reward_c, reward_r, chosen.detach(), rejected.detach())


def pair_metrics(reward_c, reward_r, logp_c, logp_r) -> dict:
    """Means over the batch's pairs, as floats, under the history's column names."""
    return {"reward_chosen": reward_c.mean().item(), "reward_rejected": reward_r.mean().item(),
            "reward_margin": (reward_c - reward_r).mean().item(),
            "reward_accuracy": (reward_c > reward_r).float().mean().item(),
            "logp_chosen": logp_c.mean().item(), "logp_rejected": logp_r.mean().item()}
