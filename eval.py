"""Perplexity over non-overlapping windows, as Wanda and SparseGPT report it."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids, seqlen, batch_size=4, device="cpu"):
    """exp(mean NLL) over every predicted token of the non-overlapping `seqlen` windows of `ids` (1-D).

    The remainder after the last full window is dropped. NLL is summed in float64 so that hundreds of
    windows do not lose precision.
    """
    n = len(ids) // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)  # (n, T)
    nll, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(device)  # (B, T)
        logits = model(x)[:, :-1].float()  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.double().cpu()
        count += x[:, 1:].numel()
    return math.exp(nll.item() / count)
