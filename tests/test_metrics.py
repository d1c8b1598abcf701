"""Retrieval metrics against rankings worked out by hand, including ties and degenerate features."""
import math

import pytest
import torch

from clamp3_lora.metrics import METRIC_NAMES, better, chance_metrics, gain_line, positive_ranks, retrieval_metrics

# Hand-made cosine scores: entry (i, j) is the score of text i against music j.
SCORES = [
    [0.9, 0.1, 0.9, 0.2],   # text 0: music 2 ties the positive          -> t2m rank 2
    [0.5, 0.4, 0.6, 0.4],   # text 1: 0.5, 0.6 above, 0.4 ties           -> t2m rank 4
    [0.0, 0.0, 0.0, 0.0],   # text 2: all tied                           -> t2m rank 4
    [0.3, 0.8, 0.1, 0.7],   # text 3: 0.8 above                          -> t2m rank 2
]
# Columns (music -> text): music 0: 0.9 best -> 1; music 1: 0.8 above -> 2;
# music 2: 0.9, 0.6, 0.1 above -> 4; music 3: 0.7 best -> 1.
T2M_RANKS = [2, 4, 4, 2]
M2T_RANKS = [1, 2, 4, 1]


def features_with_scores(scores):
    """Text and music features whose cosine matrix is exactly `scores` (columns of norm <= 1):
    text i is the basis vector e_i, music j is column j plus one extra coordinate making it unit."""
    scores = torch.tensor(scores, dtype=torch.float64)
    n = scores.shape[0]
    text = torch.eye(n, n + 1, dtype=torch.float64)
    rest = (1.0 - (scores ** 2).sum(dim=0)).clamp(min=0).sqrt()
    music = torch.cat([scores.T, rest.unsqueeze(1)], dim=1)
    return text, music


def brute_force_rank(scores, i):
    """Rank of scores[i][i] in row i, counting every other entry >= it (pessimistic ties)."""
    return 1 + sum(1 for j, value in enumerate(scores[i]) if j != i and value >= scores[i][i])


def test_positive_ranks_by_hand():
    scores = torch.tensor(SCORES, dtype=torch.float64)
    assert positive_ranks(scores).tolist() == T2M_RANKS
    assert positive_ranks(scores.T).tolist() == M2T_RANKS


def test_metrics_by_hand_with_ties():
    text, music = features_with_scores([[0.5 * v for v in row] for row in SCORES])
    m = retrieval_metrics(text, music)
    assert list(m) == list(METRIC_NAMES)
    assert m["t2m_mrr"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4 + 1 / 2) / 4)
    assert m["t2m_hit@1"] == 0.0
    assert m["t2m_hit@5"] == 1.0
    assert m["t2m_hit@10"] == 1.0
    assert m["t2m_mean_rank"] == pytest.approx(3.0)
    assert m["t2m_median_rank"] == pytest.approx(3.0)
    assert m["m2t_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1) / 4)
    assert m["m2t_hit@1"] == pytest.approx(0.5)
    assert m["m2t_hit@5"] == 1.0
    assert m["m2t_mean_rank"] == pytest.approx(2.0)
    assert m["m2t_median_rank"] == pytest.approx(1.5)


def test_perfect_retrieval():
    features = torch.randn(7, 16)
    m = retrieval_metrics(features, 3.0 * features)   # cosine ignores the scale
    for direction in ("t2m", "m2t"):
        assert m[f"{direction}_mrr"] == pytest.approx(1.0)
        assert m[f"{direction}_hit@1"] == 1.0
        assert m[f"{direction}_mean_rank"] == 1.0


def test_positive_always_last_gives_worst_rank_and_zero_hits():
    n = 12
    off_diagonal = [[0.0 if i == j else 1 / math.sqrt(n - 1) for j in range(n)] for i in range(n)]
    text, music = features_with_scores(off_diagonal)
    m = retrieval_metrics(text, music)
    for direction in ("t2m", "m2t"):
        assert m[f"{direction}_mrr"] == pytest.approx(1 / n)
        assert m[f"{direction}_hit@1"] == 0.0
        assert m[f"{direction}_hit@5"] == 0.0
        assert m[f"{direction}_hit@10"] == 0.0
        assert m[f"{direction}_mean_rank"] == n
        assert m[f"{direction}_median_rank"] == n


@pytest.mark.parametrize("value", [0.0, 1.0, -2.5])
def test_constant_features_tie_everything_at_the_worst_rank(value):
    n = 6
    constant = torch.full((n, 8), value)
    m = retrieval_metrics(constant, constant.clone())
    for direction in ("t2m", "m2t"):
        assert m[f"{direction}_mean_rank"] == n
        assert m[f"{direction}_median_rank"] == n
        assert m[f"{direction}_mrr"] == pytest.approx(1 / n)
        assert m[f"{direction}_hit@1"] == 0.0
        assert m[f"{direction}_hit@5"] == 0.0   # rank 6 > 5
        assert m[f"{direction}_hit@10"] == 1.0  # N < 10


def test_small_sets():
    one = retrieval_metrics(torch.randn(1, 4), torch.randn(1, 4))
    assert one["t2m_mrr"] == 1.0 and one["m2t_hit@1"] == 1.0
    three = retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4))
    assert three["t2m_hit@10"] == 1.0 and three["m2t_hit@5"] == 1.0


def test_matches_brute_force_on_random_features():
    torch.manual_seed(0)
    text, music = torch.randn(25, 8), torch.randn(25, 8)
    scores = torch.nn.functional.normalize(text.double(), dim=1) @ torch.nn.functional.normalize(
        music.double(), dim=1).T
    rows, cols = scores.tolist(), scores.T.tolist()
    t2m = [brute_force_rank(rows, i) for i in range(25)]
    m2t = [brute_force_rank(cols, i) for i in range(25)]
    m = retrieval_metrics(text, music)
    assert m["t2m_mrr"] == pytest.approx(sum(1 / r for r in t2m) / 25)
    assert m["m2t_mrr"] == pytest.approx(sum(1 / r for r in m2t) / 25)
    assert m["t2m_hit@5"] == pytest.approx(sum(r <= 5 for r in t2m) / 25)
    assert m["m2t_hit@10"] == pytest.approx(sum(r <= 10 for r in m2t) / 25)
    assert m["t2m_median_rank"] == pytest.approx(sorted(t2m)[12])
    assert t2m != m2t   # the two directions really differ here


def test_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(0, 4), torch.randn(0, 4))


def test_better():
    assert better("eval_loss", 1.0, None)
    assert better("eval_loss", 0.5, 0.6)
    assert not better("eval_loss", 0.6, 0.5)
    assert not better("eval_loss", 0.5, 0.5)
    assert better("t2m_mrr", 0.6, 0.5)
    assert not better("t2m_mrr", 0.5, 0.6)
    assert better("m2t_hit@10", 0.9, 0.8)
    assert better("t2m_mean_rank", 2.0, 3.0)
    assert not better("m2t_median_rank", 3.0, 2.0)
    assert not better("eval_loss", float("nan"), 1.0)
    assert better("eval_loss", 5.0, float("nan"))


def test_chance_metrics_are_those_of_a_random_ranking():
    assert chance_metrics(1)["t2m_mrr"] == 1.0
    two = chance_metrics(2)
    assert two["t2m_mrr"] == pytest.approx(0.75) and two["m2t_hit@1"] == 0.5 and two["t2m_hit@5"] == 1.0
    assert two["t2m_mean_rank"] == 1.5
    # the average over every ranking of 6 pairs, counted by hand
    ranks = range(1, 7)
    six = chance_metrics(6)
    assert six["t2m_mrr"] == pytest.approx(sum(1 / r for r in ranks) / 6)
    assert six["m2t_hit@5"] == pytest.approx(5 / 6)
    assert list(six) == list(METRIC_NAMES)
    # and what random features score on average over many sets of 30
    torch.manual_seed(0)
    mrrs = [retrieval_metrics(torch.randn(30, 8), torch.randn(30, 8))["t2m_mrr"] for _ in range(300)]
    assert sum(mrrs) / len(mrrs) == pytest.approx(chance_metrics(30)["t2m_mrr"], abs=0.01)
    with pytest.raises(ValueError):
        chance_metrics(0)


def test_gain_line():
    line = gain_line("ABC adapter", {"t2m_mrr": 0.4123}, {"t2m_mrr": 0.2201}, chance_metrics(30), 30)
    assert line == "ABC adapter: text→music MRR 0.41 (base 0.22, chance 0.13) on 30 held-out pairs"
