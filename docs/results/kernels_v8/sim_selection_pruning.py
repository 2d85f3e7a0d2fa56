# How much would chunk pruning (UB/LB from pass-1 per-head chunk maxima) skip in pass 2?
# python docs/results/kernels_v8/sim_selection_pruning.py T H D BN BT [q_scale]  (HQ 32, block 16, K 16)
import torch, math, sys
torch.manual_seed(0)
T, HQ, H, D, BS, K, BN, BT = int(sys.argv[1]), 32, int(sys.argv[2]), int(sys.argv[3]), 16, 16, int(sys.argv[4]), int(sys.argv[5])
peak = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
G = HQ // H
h = 0
q = torch.randn(T, G, D) * peak
k = torch.randn(T, D)
nb = T // BS
kbar = k[: nb * BS].view(nb, BS, D).mean(1)
logits = torch.einsum("tgd,nd->tgn", q, kbar) / math.sqrt(D)
pos = torch.arange(T)
vis = torch.arange(nb)[None, :] < ((pos + 1) // BS)[:, None]
cand = torch.arange(nb)[None, :] < (pos // BS)[:, None]
lg = logits.masked_fill(~vis[:, None, :], -float("inf"))
p = torch.softmax(lg, -1).nan_to_num(0)
score = p.sum(1)  # [T, nb]
nch = (nb + BN - 1) // BN
pad = nch * BN - nb
pp = torch.nn.functional.pad(p, (0, pad))
mx = pp.view(T, G, nch, BN).amax(-1)  # per head chunk max prob
UB = mx.sum(1)  # [T, nch]
LB = mx.amax(1)
cur_chunk = (pos // BS) // BN
LB[torch.arange(T), cur_chunk.clamp(max=nch - 1)] = 0
chunk_vis = (torch.arange(nch)[None, :] * BN) < (pos // BS)[:, None]
LB = LB.masked_fill(~chunk_vis, 0)
theta = LB.topk(K - 1, dim=1).values[:, -1] if nch >= K - 1 else torch.zeros(T)  # fewer chunks: no floor
need = (UB >= theta[:, None]) & chunk_vis  # chunk needed by token
# lockstep tiles of BT tokens
need_t = need[: (T // BT) * BT].view(T // BT, BT, nch).any(1)
vis_t = chunk_vis[: (T // BT) * BT].view(T // BT, BT, nch).any(1)
print(f"T{T} H{H} G{G} D{D} BN{BN} BT{BT} peak{peak}: chunks scored in pass 2: {need_t.sum().item() / vis_t.sum().item():.3f} of visible; "
      f"keys above theta per token: {((score >= theta[:, None]) & cand).sum(1).float().mean():.1f}")
