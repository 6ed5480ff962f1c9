"""Healthy: REINFORCE with a running-mean baseline on a small slippery corridor.

The agent starts in the middle of a 13-cell corridor; a move goes the other way
with probability 0.25. Reaching the right end pays +1, the left end -1, every
move costs 0.02. Sixteen episodes run side by side per update. The policy-
gradient loss -(log pi(a|s) * advantage) is noisy and changes sign from update
to update by construction (the advantages are centred by the baseline), while
the mean episode return climbs from about -1 to about +0.7. Policy-gradient
noise is normal (Williams 1992; the PyTorch examples' reinforce.py follows the
same recipe).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(5)

N_CELLS, START, MAX_STEPS, SLIP, N_ENVS = 13, 6, 60, 0.25, 16

policy = nn.Sequential(nn.Linear(N_CELLS, 32), nn.Tanh(), nn.Linear(32, 2))
optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
gamma = 0.98
baseline = 0.0

for update in range(100):
    state = torch.full((N_ENVS,), START)
    alive = torch.ones(N_ENVS, dtype=torch.bool)
    log_probs, rewards, masks = [], [], []
    for t in range(MAX_STEPS):
        logits = policy(F.one_hot(state, N_CELLS).float())
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()
        move = action * 2 - 1
        slip = torch.rand(N_ENVS) < SLIP
        move = torch.where(slip, -move, move)
        state = torch.where(alive, (state + move).clamp(0, N_CELLS - 1), state)
        reward = torch.full((N_ENVS,), -0.02)
        reward = torch.where(state == N_CELLS - 1, torch.tensor(1.0), reward)
        reward = torch.where(state == 0, torch.tensor(-1.0), reward)
        log_probs.append(dist.log_prob(action))
        rewards.append(reward * alive)
        masks.append(alive.float())
        alive = alive & (state != 0) & (state != N_CELLS - 1)
        if not alive.any():
            break
    returns, g = [], torch.zeros(N_ENVS)
    for r, m in zip(reversed(rewards), reversed(masks)):
        g = r + gamma * g * m
        returns.append(g)
    returns.reverse()
    R = torch.stack(returns)
    M = torch.stack(masks)
    advantage = (R - baseline) * M
    baseline = 0.9 * baseline + 0.1 * ((R * M).sum() / M.sum()).item()
    loss = -(torch.stack(log_probs) * advantage).sum() / M.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if update % 5 == 0:
        episode_return = torch.stack(rewards).sum(0).mean().item()
        print(f"update {update:3d} loss {loss.item():+.4f} mean return {episode_return:+.3f} mean length {M.sum(0).mean().item():.1f}")
