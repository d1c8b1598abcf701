"""Retrieval metrics for text <-> music: MRR, Hit@k and ranks, computed over an evaluation set.

Pair i (text i, music i) is the positive of both text i and music i; every other item of the set is a
negative. Scores are cosine similarities (features L2-normalised), as CLaMP 3 retrieval does. Ties
are counted pessimistically: the rank of a positive is 1 + the number of OTHER candidates scoring at
least as high, so a model that gives every candidate the same score gets the worst rank, never the best.
"""
import math

import torch
import torch.nn.functional as F

HIT_KS = (1, 5, 10)
METRIC_NAMES = tuple(
    [f"{direction}_mrr" for direction in ("t2m", "m2t")]
    + [f"{direction}_hit@{k}" for direction in ("t2m", "m2t") for k in HIT_KS]
    + [f"{direction}_{kind}_rank" for direction in ("t2m", "m2t") for kind in ("mean", "median")]
)
"""Every key retrieval_metrics returns, in a stable order (for logs and plots)."""

# Scores are compared in float64; two scores closer than this are one tie (rounding noise of the
# matrix product must not turn identical candidates into a better-than-worst rank).
TIE_TOLERANCE = 1e-9


def cosine_scores(text_features, music_features):
    """[N, N] float64 matrix: entry (i, j) is the cosine similarity of text i and music j."""
    text = F.normalize(text_features.detach().to(torch.float64), dim=-1)
    music = F.normalize(music_features.detach().to(torch.float64), dim=-1)
    return text @ music.T


def positive_ranks(scores):
    """Rank (1-based, ties pessimistic) of each row's diagonal entry among that row's entries."""
    positives = scores.diagonal().unsqueeze(1)
    at_least_as_high = scores >= positives - TIE_TOLERANCE
    # the positive itself always counts once on the diagonal; rank = 1 + the others counted
    return at_least_as_high.sum(dim=1)


def rank_summary(prefix, ranks):
    """MRR, Hit@1/5/10, mean and median rank of one direction, as plain floats keyed with prefix."""
    ranks = ranks.to(torch.float64)
    summary = {f"{prefix}_mrr": (1.0 / ranks).mean().item()}
    for k in HIT_KS:
        summary[f"{prefix}_hit@{k}"] = (ranks <= k).to(torch.float64).mean().item()
    summary[f"{prefix}_mean_rank"] = ranks.mean().item()
    summary[f"{prefix}_median_rank"] = torch.quantile(ranks, 0.5).item()
    return summary


def retrieval_metrics(text_features, music_features):
    """Text->music and music->text retrieval metrics of paired features ([N, D] each, N >= 1).

    t2m ranks all music for each text; m2t ranks all texts for each music. Returns a dict with the
    keys of METRIC_NAMES (MRR and Hit@k in [0, 1], ranks in [1, N]). With N < 10, Hit@10 is 1.
    """
    if text_features.ndim != 2 or text_features.shape != music_features.shape:
        raise ValueError(f"retrieval_metrics needs two [N, D] tensors of one shape, got "
                         f"{tuple(text_features.shape)} and {tuple(music_features.shape)}")
    if text_features.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    scores = cosine_scores(text_features, music_features)
    metrics = {}
    metrics.update(rank_summary("t2m", positive_ranks(scores)))
    metrics.update(rank_summary("m2t", positive_ranks(scores.T)))
    return {name: metrics[name] for name in METRIC_NAMES}


def chance_metrics(n):
    """The expected value of every METRIC_NAMES metric for a random ranking of n pairs (n >= 1):
    the positive's rank is uniform on 1..n, so MRR = (1 + 1/2 + ... + 1/n) / n, Hit@k = min(k, n) / n,
    mean rank (n + 1) / 2 and median rank (n + 1) / 2. What a model that learned nothing scores."""
    if n < 1:
        raise ValueError("chance_metrics needs at least one pair")
    single = {"mrr": sum(1.0 / rank for rank in range(1, n + 1)) / n,
              "mean_rank": (n + 1) / 2, "median_rank": (n + 1) / 2}
    single.update({f"hit@{k}": min(k, n) / n for k in HIT_KS})
    return {name: single[name.split("_", 1)[1]] for name in METRIC_NAMES}


def gain_line(label, metrics, base, chance, pairs, metric="t2m_mrr"):
    """One line that says what training gained, e.g. 'ABC adapter: text→music MRR 0.41 (base 0.22,
    chance 0.13) on 30 held-out pairs'."""
    words = {"t2m": "text→music", "m2t": "music→text"}
    direction, _, kind = metric.partition("_")
    name = f"{words.get(direction, direction)} {kind.upper() if kind == 'mrr' else kind.capitalize()}"
    return (f"{label}: {name} {metrics[metric]:.2f} (base {base[metric]:.2f}, chance {chance[metric]:.2f}) "
            f"on {pairs} held-out pairs")


def lower_is_better(metric):
    """True for losses and ranks (eval_loss, t2m_mean_rank, ...), False for MRR and Hit@k."""
    return metric.endswith("loss") or metric.endswith("_rank")


def better(metric, new, old):
    """Whether value `new` of `metric` beats the best so far `old`.

    `old` None (nothing yet) -> True. Otherwise a NaN `new` never wins and anything beats a NaN `old`.
    """
    if old is None:
        return True
    if math.isnan(new):
        return False
    if math.isnan(old):
        return True
    return new < old if lower_is_better(metric) else new > old
