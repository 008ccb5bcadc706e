"""PPO losses and the update over (env, segment) minibatches (Schulman et al. 2017)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from trxl_rl.config import PPOConfig
from trxl_rl.distributed import Ranks
from trxl_rl.rollout import Rollout


def linear_schedule(start: float, end: float | None, progress: float) -> float:
    """``start`` -> ``end`` linearly as ``progress`` goes 0 -> 1 (constant if ``end`` is None)."""
    return start if end is None else start + (end - start) * min(max(progress, 0.0), 1.0)


class LearningRate:
    """The optimizer's learning rate: the schedule's value times a factor that follows the
    measured KL, in the manner of rl_games's adaptive schedule (``ppo.lr_target_kl``).

    After every minibatch step the factor is divided by :attr:`STEP` when that minibatch's
    approx_kl (the ranks' mean) was above twice the target, and multiplied by it, up to 1,
    when below half; an update undone by ``ppo.rollback_kl`` divides it too. Unlike rl_games
    the schedule is the ceiling: the rate never rises above the one a preset was tuned at, it
    only slows where the policy moves too far and recovers once it no longer does. Without a
    target the factor stays 1 (a rollback still slows it). The factor is part of the exact
    training state: checkpoints keep it (:meth:`state`).
    """

    STEP = 1.5
    SMALLEST = 1e-3  # of the schedule

    def __init__(self, target_kl: float | None, factor: float = 1.0) -> None:
        self.target_kl, self.factor = target_kl, factor
        self.scheduled = 0.0

    @property
    def value(self) -> float:
        return self.scheduled * self.factor

    def start_update(self, optimizer: torch.optim.Optimizer, scheduled: float) -> None:
        """Set the rate of an update whose schedule says ``scheduled``."""
        self.scheduled = scheduled
        self._apply(optimizer)

    def observe(self, optimizer: torch.optim.Optimizer, kl: float) -> None:
        """After a minibatch step whose approx_kl was ``kl``."""
        if self.target_kl is None:
            return
        if kl > 2 * self.target_kl:
            self.slow_down(optimizer)
        elif kl < self.target_kl / 2 and self.factor < 1.0:
            self.factor = min(1.0, self.factor * self.STEP)
            self._apply(optimizer)

    def slow_down(self, optimizer: torch.optim.Optimizer) -> None:
        self.factor = max(self.SMALLEST, self.factor / self.STEP)
        self._apply(optimizer)

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.value

    def state(self) -> dict[str, float]:
        return {"factor": self.factor}


def normalize_advantages(adv: Tensor, ranks: Ranks) -> Tensor:
    """``(adv - mean) / (std + 1e-8)`` with the mean and (unbiased) standard deviation of the
    whole minibatch: with data-parallel ranks, of all ranks' shares together, so K ranks
    normalise as one process does on the concatenated minibatch. A single process uses
    ``adv.mean()`` and ``adv.std()`` (the same numbers up to float rounding).

    :param adv: ``[C, N]`` this rank's advantages.
    """
    if not ranks.distributed:
        return (adv - adv.mean()) / (adv.std() + 1e-8)
    count, total, squares = ranks.sum(torch.stack(
        [adv.new_tensor(float(adv.numel())), adv.sum(), adv.square().sum()]))
    mean = total / count
    std = ((squares - count * mean.square()) / (count - 1)).clamp_min(0).sqrt()
    return (adv - mean) / (std + 1e-8)


def ppo_update(agent: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout,
               cfg: PPOConfig, entropy_coef: float, generator: torch.Generator | None = None,
               ranks: Ranks | None = None, rate: LearningRate | None = None
               ) -> dict[str, float]:
    """Run ``cfg.epochs`` epochs of clipped-PPO minibatch updates on ``rollout``.

    Every minibatch recomputes its segments in parallel from the stored memory; before the
    first optimizer step this must reproduce the rollout exactly, which is logged as
    ``losses/first_minibatch_approx_kl`` (~0), together with the largest absolute
    differences of its log-probs and values (``losses/first_minibatch_max_logprob_error``,
    ``losses/first_minibatch_max_value_error``; ~1e-6 in float32).

    With ``ranks`` of a data-parallel run, every minibatch's gradients (and its approx_kl, on
    which the ``target_kl`` early stop is decided) are averaged over the ranks before the
    gradient is clipped, so every rank takes the same optimizer steps, and the advantages are
    normalised over the whole minibatch, all ranks' shares together
    (:func:`normalize_advantages`). The returned scalars are this rank's, but for
    ``losses/explained_variance``, computed on all ranks' rollouts together.

    The KL guards of :class:`PPOConfig` act here: ``target_kl`` ends the update early;
    ``rate`` (the optimizer's :class:`LearningRate`, carried from update to update; None: a
    new one, from the optimizer's current rate) follows every minibatch's KL; with
    ``rollback_kl`` the weights and optimizer state are copied before the first step and
    restored when a minibatch's KL (measured before its step; that minibatch is then not
    stepped) or the last minibatch's KL after the update passes it: ``losses/rolled_back``
    is 1 and the update's losses are those of the minibatches it measured.

    :return: scalars keyed by their TensorBoard names.
    """
    ranks = ranks or Ranks()
    if rate is None:
        rate = LearningRate(cfg.lr_target_kl)
        rate.scheduled = optimizer.param_groups[0]["lr"]
    rollback = Rollback(agent, optimizer, rate, cfg.rollback_kl)
    rolled_back = False
    clip = cfg.clip_coef
    sums: dict[str, torch.Tensor] = {}  # summed on the device: one host sync per update
    part_sums: dict[str, torch.Tensor] = {}  # the gradient norm per part of the agent
    count = steps = 0  # minibatches measured, optimizer steps taken
    first: dict[str, float] = {}
    stop = False
    for _ in range(cfg.epochs):
        for mb in rollout.minibatches(cfg.segment_length, cfg.minibatches, generator):
            if cfg.reconstruction_coef > 0:  # one encoder pass for both (pixel observations)
                out, reconstruction = agent.evaluate_with_reconstruction(
                    mb.obs, mb.actions, mb.memory, mb.episode_start)
            else:
                out = agent.evaluate(mb.obs, mb.actions, mb.memory, mb.episode_start)
            log_ratio = out.log_prob - mb.log_probs
            ratio = log_ratio.exp()
            with torch.no_grad():
                approx_kl = k3_kl(log_ratio)
                clipfrac = ((ratio - 1).abs() > clip).float().mean()
            if not first:
                first = {
                    "approx_kl": approx_kl.item(),
                    "max_logprob_error": log_ratio.detach().abs().max().item(),
                    "max_value_error": (out.value.detach() - mb.values).abs().max().item(),
                }

            adv = mb.advantages
            if cfg.norm_advantages:
                adv = normalize_advantages(adv, ranks)
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()

            value_error = (out.value - mb.returns).square()
            if cfg.clip_value_loss:
                clipped = mb.values + (out.value - mb.values).clamp(-clip, clip)
                value_error = torch.max(value_error, (clipped - mb.returns).square())
            value_loss = 0.5 * value_error.mean()
            entropy = out.entropy.mean()
            loss = pg_loss + cfg.value_coef * value_loss - entropy_coef * entropy
            if cfg.reconstruction_coef > 0:
                loss = loss + cfg.reconstruction_coef * reconstruction
                sums["reconstruction_loss"] = (sums.get("reconstruction_loss", 0.0)
                                               + reconstruction.detach())

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            (mean_kl,) = ranks.average_gradients(agent.parameters(), approx_kl)
            undo = rollback.passed(mean_kl)
            for name, norm in agent.gradient_norms().items():
                part_sums[name] = part_sums.get(name, 0.0) + norm
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            if not undo:
                optimizer.step()

            for key, value in (("policy_loss", pg_loss), ("value_loss", value_loss),
                               ("entropy", entropy), ("approx_kl", approx_kl),
                               ("clipfrac", clipfrac), ("grad_norm", grad_norm)):
                sums[key] = sums.get(key, 0.0) + value.detach()
            last_kl = approx_kl
            count += 1
            steps += not undo
            if undo:  # this minibatch measured and logged, not stepped; the update undone
                rollback.undo()
                rolled_back = stop = True
                break
            if rate.target_kl is not None:
                rate.observe(optimizer, mean_kl.item())
            if cfg.target_kl is not None and mean_kl.item() > cfg.target_kl:
                stop = True
                break
        if stop:
            break
    # The last step is measured too: the KL after the update, on its last minibatch (of an
    # update undone midway: the KL that undid it).
    kl_after = last_kl
    if not rolled_back:
        kl_after = kl_of(agent, mb)
        if rollback.passed(kl_after, ranks):
            rollback.undo()
            rolled_back = True

    values = ranks.all_gather(rollout.values.flatten())
    returns = ranks.all_gather(rollout.returns.flatten())
    var = returns.var()
    explained = (1 - (returns - values).var() / var).item() if var > 0 else float("nan")
    stats = {f"losses/{key}": total.item() / count for key, total in sums.items()}
    stats.update({f"losses/first_minibatch_{key}": value for key, value in first.items()})
    stats["losses/explained_variance"] = explained
    stats["losses/minibatch_updates"] = float(steps)  # taken, whether undone or not
    stats["losses/rolled_back"] = float(rolled_back)
    stats.update(diagnostics(agent, rollout, mb, last_kl, kl_after, values, returns,
                             {f"grad_norm_{name}": total.item() / count
                              for name, total in part_sums.items()}))
    return stats


class Rollback:
    """Undoes an update whose KL passes ``bound`` (``ppo.rollback_kl``; None: never): keeps
    copies of the weights and the optimizer state from before the update (~3x the model's
    size) and restores them, slowing ``rate`` by one step."""

    def __init__(self, agent: nn.Module, optimizer: torch.optim.Optimizer, rate: LearningRate,
                 bound: float | None) -> None:
        self.agent, self.optimizer, self.rate, self.bound = agent, optimizer, rate, bound
        self.weights = self.optimizer_state = None
        if bound is not None:
            self.weights = {k: v.clone() for k, v in agent.state_dict().items()}
            self.optimizer_state = copy.deepcopy(optimizer.state_dict())

    def passed(self, kl: Tensor, ranks: Ranks | None = None) -> bool:
        """Whether ``kl`` (averaged over ``ranks`` where given) is past the bound."""
        if self.bound is None:
            return False
        if ranks is not None and ranks.distributed:
            kl = ranks.sum(kl) / ranks.world_size
        return kl.item() > self.bound

    def undo(self) -> None:
        self.agent.load_state_dict(self.weights)
        self.optimizer.load_state_dict(self.optimizer_state)
        self.agent.weights_changed()  # caches built with the undone weights are stale
        self.rate.slow_down(self.optimizer)


def k3_kl(log_ratio: Tensor) -> Tensor:
    """The k3 estimate of KL(old || new) from ``log_ratio`` = log pi_new - log pi_old of the
    old policy's samples (Schulman 2020): the mean of ``(ratio - 1) - log_ratio``."""
    return ((log_ratio.exp() - 1) - log_ratio).mean()


def kl_of(agent: nn.Module, mb) -> Tensor:
    """The k3 approx_kl of the agent's policy now against the rollout's, on minibatch ``mb``
    (a forward pass without gradients)."""
    with torch.no_grad():
        out = agent.evaluate(mb.obs, mb.actions, mb.memory, mb.episode_start)
        return k3_kl(out.log_prob - mb.log_probs)


def diagnostics(agent: nn.Module, rollout: Rollout, last, last_kl: Tensor, kl_after: Tensor,
                values: Tensor, returns: Tensor, grad_norms: dict[str, float]
                ) -> dict[str, float]:
    """What explains an update that goes wrong, cheap enough to log every update
    (``diagnostics/*``; docs/diagnostics.md says how to read them): the KL of the last
    minibatch before its step (after all but one optimizer step, where a collapse shows) and
    after the update (``kl_after``, before the undo of a rolled-back one), the scale of the
    values and returns (all ranks' rollouts, ``values``/``returns`` ``[T * B]``), the
    advantages' spread, the gradient norm per part before clipping (mean over minibatches),
    and the memory's own (:meth:`~trxl_rl.memory.MemoryBackbone.diagnostics`, on the last
    minibatch ``last`` after the update)."""
    out = {"diagnostics/last_minibatch_approx_kl": last_kl.item(),
           "diagnostics/approx_kl_after_update": kl_after.item(),
           "diagnostics/value_mean": values.mean().item(),
           "diagnostics/value_std": values.std().item(),
           "diagnostics/return_mean": returns.mean().item(),
           "diagnostics/return_std": returns.std().item(),
           "diagnostics/advantage_std": rollout.advantages.std().item(),
           **{f"diagnostics/{key}": value for key, value in grad_norms.items()}}
    memory = agent.memory_diagnostics(last.obs, last.memory, last.episode_start)
    out.update({f"diagnostics/{key}": value for key, value in memory.items()})
    return out
