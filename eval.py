"""Perplexity over non-overlapping windows, as Wanda and SparseGPT report it."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids, seqlen, batch_size=4, device="cpu", logit_bytes=2**28):
    """exp(mean NLL) over every predicted token of the non-overlapping `seqlen` windows of `ids` (1-D).

    The remainder after the last full window is dropped. NLL is summed in float64 so that hundreds of
    windows do not lose precision. Logits are formed a slice of tokens at a time (at most `logit_bytes` of
    float32): with a 128k vocabulary the whole batch's logits would take 4 GiB at B=4, T=2048.
    """
    n = len(ids) // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)  # (n, T)
    chunk = max(1, logit_bytes // (4 * model.lm_head.weight.shape[0]))  # tokens per slice of logits
    nll, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(device)  # (B, T)
        h = model.embed(x)
        for block in model.blocks:
            h = block(h)
        h = h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), C): every position that predicts a token
        targets = x[:, 1:].reshape(-1)  # (B*(T-1),)
        for j in range(0, len(targets), chunk):
            logits = model.head(h[j:j + chunk]).float()  # (chunk, V)
            nll += F.cross_entropy(logits, targets[j:j + chunk], reduction="sum").double().cpu()
        count += len(targets)
    return math.exp(nll.item() / count)
