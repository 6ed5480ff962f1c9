"""Healthy: PPO with the clipped surrogate objective on a vectorised CartPole written in torch.

Sixteen CartPole environments (the classic Barto-Sutton-Anderson dynamics as in
Gym's CartPole-v1, episodes capped at 200 steps) run side by side; every update
collects 128 steps from each, computes GAE advantages (gamma 0.99, lambda 0.95),
normalises them per minibatch, and takes 4 epochs of 4 minibatches of Adam steps
on -min(r A, clip(r, 0.8, 1.2) A) + 0.5 * value MSE - 0.01 * entropy. With
normalised advantages the policy (surrogate) loss is about 0 on the first
minibatch of an update and becomes negative as the policy moves toward
higher-advantage actions, so the logged policy loss is small, negative and noisy
(update means between about -0.015 and -0.0001, single minibatches from -0.03 to
+0.007) with no trend to speak of, while the mean episode return climbs from
about 28 to the 200 cap. The value loss is large (returns of up to ~100 are
regressed unnormalised) and does not fall: it grows while episodes lengthen (the
targets grow) and wanders between 73 and 124 after that, so the combined loss that
backward() sees (policy + 0.5 value - 0.01 entropy, printed as total) sits at
35-62 without falling. This is how PPO losses look (Schulman et al., "Proximal
Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347; the CleanRL
ppo.py recipe).
"""
import math

import torch
import torch.nn as nn

torch.manual_seed(12)

N_ENVS, N_STEPS, MAX_LEN, GAMMA, LAM, CLIP = 16, 128, 200, 0.99, 0.95, 0.2
EPOCHS, MINIBATCHES, UPDATES = 4, 4, 40


class CartPoles:
    """Vectorised CartPole: state (x, x_dot, theta, theta_dot), action 0 = push left, 1 = push right."""

    def __init__(self, n):
        self.n = n
        self.state = torch.empty(n, 4).uniform_(-0.05, 0.05)
        self.t = torch.zeros(n, dtype=torch.long)

    def step(self, action):
        x, x_dot, th, th_dot = self.state.unbind(1)
        force = torch.where(action == 1, 10.0, -10.0)
        cos, sin = torch.cos(th), torch.sin(th)
        temp = (force + 0.05 * th_dot ** 2 * sin) / 1.1
        th_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos ** 2 / 1.1))
        x_acc = temp - 0.05 * th_acc * cos / 1.1
        self.state = torch.stack([x + 0.02 * x_dot, x_dot + 0.02 * x_acc, th + 0.02 * th_dot, th_dot + 0.02 * th_acc], 1)
        self.t += 1
        fell = (self.state[:, 0].abs() > 2.4) | (self.state[:, 2].abs() > 12 * 2 * math.pi / 360)
        done = fell | (self.t >= MAX_LEN)
        lengths = self.t[done].clone()
        self.state[done] = torch.empty(int(done.sum()), 4).uniform_(-0.05, 0.05)
        self.t[done] = 0
        return torch.ones(self.n), done, lengths


def mlp(out):
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out))


actor, critic = mlp(2), mlp(1)
opt = torch.optim.Adam(list(actor.parameters()) + list(critic.parameters()), lr=1e-3, eps=1e-5)
envs = CartPoles(N_ENVS)
finished = []

for update in range(UPDATES):
    obs_buf, act_buf, logp_buf, rew_buf, done_buf, val_buf = [], [], [], [], [], []
    with torch.no_grad():
        for _ in range(N_STEPS):
            obs = envs.state.clone()
            dist = torch.distributions.Categorical(logits=actor(obs))
            action = dist.sample()
            reward, done, lengths = envs.step(action)
            finished.extend(lengths.tolist())
            obs_buf.append(obs)
            act_buf.append(action)
            logp_buf.append(dist.log_prob(action))
            rew_buf.append(reward)
            done_buf.append(done.float())
            val_buf.append(critic(obs).squeeze(1))
        next_value = critic(envs.state).squeeze(1)
        adv = torch.zeros(N_STEPS, N_ENVS)
        gae = torch.zeros(N_ENVS)
        for t in reversed(range(N_STEPS)):
            nv = next_value if t == N_STEPS - 1 else val_buf[t + 1]
            nonterminal = 1.0 - done_buf[t]
            delta = rew_buf[t] + GAMMA * nv * nonterminal - val_buf[t]
            gae = delta + GAMMA * LAM * nonterminal * gae
            adv[t] = gae
        returns = adv + torch.stack(val_buf)

    b_obs = torch.stack(obs_buf).reshape(-1, 4)
    b_act, b_logp = torch.stack(act_buf).reshape(-1), torch.stack(logp_buf).reshape(-1)
    b_adv, b_ret = adv.reshape(-1), returns.reshape(-1)
    mb_size = b_obs.shape[0] // MINIBATCHES
    pol_losses, val_losses, entropies, clipfracs, totals = [], [], [], [], []
    for _ in range(EPOCHS):
        perm = torch.randperm(b_obs.shape[0])
        for k in range(MINIBATCHES):
            idx = perm[k * mb_size:(k + 1) * mb_size]
            dist = torch.distributions.Categorical(logits=actor(b_obs[idx]))
            ratio = (dist.log_prob(b_act[idx]) - b_logp[idx]).exp()
            a = b_adv[idx]
            a = (a - a.mean()) / (a.std() + 1e-8)
            policy_loss = -torch.min(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a).mean()
            value_loss = ((critic(b_obs[idx]).squeeze(1) - b_ret[idx]) ** 2).mean()
            entropy = dist.entropy().mean()
            loss = policy_loss + 0.5 * value_loss - 0.01 * entropy
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(list(actor.parameters()) + list(critic.parameters()), 0.5)
            opt.step()
            totals.append(loss.item())
            pol_losses.append(policy_loss.item())
            val_losses.append(value_loss.item())
            entropies.append(entropy.item())
            clipfracs.append(((ratio - 1).abs() > CLIP).float().mean().item())
    recent = finished[-20:]
    mean_return = sum(recent) / len(recent) if recent else float("nan")
    print(f"update {update:2d} total {sum(totals) / len(totals):7.3f} policy loss {sum(pol_losses) / len(pol_losses):+.4f} "
          f"(min {min(pol_losses):+.4f} max {max(pol_losses):+.4f}) value loss {sum(val_losses) / len(val_losses):8.3f} "
          f"entropy {sum(entropies) / len(entropies):.3f} clipfrac {sum(clipfracs) / len(clipfracs):.3f} "
          f"mean return (last 20 episodes) {mean_return:6.1f}")
