"""Per-minibatch KL statistics of a training run: python probe.py OUT.json -- <train args>.

Records, for every k3 estimate the update makes (each minibatch before its step, and the KL
after the update), the mean, quantiles and max of the per-sample k3 and the mean over the
samples whose old probability of the taken action was above 0.5 ("confident decisions")."""
import json
import sys

import torch

import trxl_rl.ppo as ppo
import trxl_rl.train as train
from trxl_rl.rollout import Rollout

out_path, argv = sys.argv[1], sys.argv[3:]
records, state = [], {"update": -1, "mb": None}
orig_mb, orig_update = Rollout.minibatches, train.ppo_update

def minibatches(self, *a, **k):
    for mb in orig_mb(self, *a, **k):
        state["mb"] = mb
        yield mb
Rollout.minibatches = minibatches

def ppo_update(*a, **k):
    state["update"] += 1
    return orig_update(*a, **k)
train.ppo_update = ppo_update

orig_k3 = ppo.k3_kl
def k3_kl(log_ratio):
    with torch.no_grad():
        lr = log_ratio.detach().flatten()
        per = (lr.exp() - 1) - lr
        old = state["mb"].log_probs.flatten()
        adv = state["mb"].advantages.flatten().abs()
        conf = old > torch.log(torch.tensor(0.5))
        q = torch.quantile(per, torch.tensor([0.5, 0.9, 0.99]))
        records.append({"update": state["update"], "mean": per.mean().item(),
                        "q50": q[0].item(), "q90": q[1].item(), "q99": q[2].item(),
                        "max": per.max().item(),
                        "confident_share": conf.float().mean().item(),
                        "adv_weighted": ((per * adv).sum() / adv.sum().clamp_min(1e-12)).item(),
                        "confident_mean": per[conf].mean().item() if conf.any() else 0.0})
    return orig_k3(log_ratio)
ppo.k3_kl = k3_kl
try:
    rc = train.main(argv)
finally:
    json.dump(records, open(out_path, "w"))
sys.exit(rc)
