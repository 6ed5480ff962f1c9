"""Healthy: REINFORCE with a tanh-squashed Gaussian policy on a 1-D point mass (bang-bang control).

A 1-D point mass starts at rest 1-2 units left or right of the goal x = 0; the
action is a force in [-1, 1] (dt 0.1, 30 steps) and the reward each step is -|x|,
so the optimal control is bang-bang: full force toward the goal, then full brake.
The policy is an MLP ending in tanh that gives the mean of a Gaussian (std 0.3);
sampled actions are clamped to the actuator's [-1, 1]. REINFORCE with reward-to-go,
a per-time-step batch-mean baseline and normalised advantages, 64 episodes per
update, Adam lr 3e-3, 160 updates. The tanh mean sits near its bounds more and more
as the policy learns the bang-bang solution: the fraction of steps with |mean| > 0.9
rises from 0 to 0.36-0.45 and the mean |tanh| from 0.09 to about 0.73 (a saturated
tanh has a near-zero derivative there, by design), the policy-gradient loss is small
and changes sign every few updates, and the mean episode return improves from -45
to about -19 (greedy return -40 -> about -18). Saturated actions are the optimum
here, not a fault (Williams 1992, REINFORCE; tanh-squashed Gaussian policies as in
Haarnoja et al., "Soft Actor-Critic", https://arxiv.org/abs/1801.01290;
torch.distributions.Normal).
"""
import torch
import torch.nn as nn

torch.manual_seed(33)

N_ENVS = 64
HORIZON = 30
DT = 0.1
STD = 0.3  # exploration noise of the Gaussian policy, around its tanh mean


def rollout(policy, greedy=False):
    """Runs N_ENVS episodes side by side: state (position, velocity), force in [-1, 1], goal x = 0."""
    x = (torch.rand(N_ENVS) + 1.0) * torch.where(torch.rand(N_ENVS) < 0.5, -1.0, 1.0)
    v = torch.zeros(N_ENVS)
    logps, rewards, means = [], [], []
    for _ in range(HORIZON):
        mean = policy(torch.stack([x, v], 1)).squeeze(1)
        if greedy:
            a = mean.detach()
        else:
            dist = torch.distributions.Normal(mean, STD)
            raw = dist.sample()
            logps.append(dist.log_prob(raw))
            a = raw.clamp(-1.0, 1.0)  # the actuator saturates at +-1
        v = v + DT * a
        x = x + DT * v
        rewards.append(-x.abs() - 0.1 * v.abs() * (x.abs() < 0.1))
        means.append(mean.detach())
    return logps, torch.stack(rewards, 1), torch.stack(means, 1)


policy = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1), nn.Tanh())
opt = torch.optim.Adam(policy.parameters(), lr=3e-3)

for update in range(1, 161):
    logps, rewards, means = rollout(policy)
    returns = rewards.flip(1).cumsum(1).flip(1)  # reward-to-go (undiscounted, finite horizon)
    adv = returns - returns.mean(0, keepdim=True)  # per-time-step baseline over the batch
    adv = adv / (adv.std() + 1e-8)
    loss = -(torch.stack(logps, 1) * adv).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if update % 10 == 0 or update == 1:
        with torch.no_grad():
            _, g_rew, g_means = rollout(policy, greedy=True)
        sat = (means.abs() > 0.9).float().mean().item()
        print(f"update {update:3d} loss {loss.item():+.4f} mean return {rewards.sum(1).mean().item():7.2f} "
              f"greedy return {g_rew.sum(1).mean().item():7.2f} |tanh mean| {means.abs().mean().item():.3f} "
              f"frac |mean|>0.9 {sat:.3f}")
