"""Paired statistics across seeds, in numpy (no scipy needed at run time; the tests compare with scipy).

For two arms run with the same seeds (same head initialisation, data order and subset), the unit of
analysis is the per-seed difference ``d = a - b``: its mean with a Student-t 95% interval, the paired
t-test, the exact Wilcoxon signed-rank test (exact over all ``2^n`` sign patterns, ties included, for any
``n``) and the exact sign test; and, for stability across seeds, the ratio of the two arms' standard
deviations with the Pitman-Morgan test of equal paired variances.
"""
from __future__ import annotations

import math

import numpy as np

from ..data.metrics import rankdata


def _betacf(a: float, b: float, x: float) -> float:
    # continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Student-t quantile (bisection on :func:`t_cdf`; exact to ~1e-12)."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired_t(d) -> tuple[float, float]:
    """``(t, two-sided p)`` of the paired t-test on differences ``d`` (nan for n < 2 or zero spread)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return (math.nan, math.nan) if d.mean() == 0 else (math.copysign(math.inf, d.mean()), 0.0)
    t = d.mean() / (sd / math.sqrt(n))
    return float(t), float(min(1.0, 2 * (1 - t_cdf(abs(t), n - 1))))


def mean_ci(d, conf: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean of ``d``."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    m = float(d.mean())
    if n < 2:
        return m, math.nan, math.nan
    half = t_ppf(0.5 + conf / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return m, m - half, m + half


def exact_differences(d, digits: int = 10) -> np.ndarray:
    """``d`` rounded to ``digits`` significant digits: what float noise separates, this joins again.
    Scores of ratios k/N with N below 10^4 or so stay distinct; ulps of error are gone."""
    d = np.asarray(d, dtype=np.float64)
    return np.array([float(f"{x:.{digits}g}") for x in d], dtype=np.float64)


def wilcoxon_exact(d) -> tuple[float, float]:
    """``(W+, two-sided p)`` of the exact Wilcoxon signed-rank test; zero differences are dropped
    (scipy's ``zero_method="wilcox"``), tied magnitudes get average ranks and the null distribution
    is exact over all ``2^n`` sign patterns of those ranks.

    The patterns are counted, not listed: average ranks are multiples of 1/2, so the doubled ranks
    are integers and the number of patterns per doubled rank sum is a subset-sum count (exact in
    Python integers), which keeps the test exact for any ``n`` -- a pooled analysis has dozens.

    Ties and zeros are decided on the differences rounded to 10 significant digits: paired
    differences of scores are differences of count ratios (k/N), equal in exact arithmetic but not
    always in floating point (0.6173 - 0.6137 and 0.5848 - 0.5812 are both 1/277, a few ulps apart);
    float equality would rank them apart (so does scipy)."""
    d = exact_differences(d)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    ranks = rankdata(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    doubled = [int(round(2 * r)) for r in ranks]
    counts = [1] + [0] * sum(doubled)  # counts[s]: sign patterns whose doubled W+ is s
    for r in doubled:
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    w2 = int(round(2 * w_plus))
    total = 2 ** n
    p_low = sum(counts[: w2 + 1]) / total
    p_high = sum(counts[w2:]) / total
    return w_plus, min(1.0, 2 * min(p_low, p_high))


def sign_test(d) -> tuple[int, int, float]:
    """``(ahead, behind, two-sided exact binomial p)``; ties (d = 0) are dropped."""
    d = np.asarray(d, dtype=np.float64)
    k, n = int((d > 0).sum()), int((d != 0).sum())
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return k, n - k, min(1.0, 2 * tail)


def pitman_morgan(a, b) -> tuple[float, float]:
    """``(sd_a / sd_b, two-sided p)``: the Pitman-Morgan test that two *paired* samples have equal
    variances.  ``var(a) = var(b)`` exactly when ``a - b`` and ``a + b`` are uncorrelated, so it is the
    t-test of their Pearson correlation, ``n - 2`` degrees of freedom (nan for n < 3 or no spread)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    sa, sb = (a.std(ddof=1), b.std(ddof=1)) if n > 1 else (math.nan, math.nan)
    ratio = float(sa / sb) if n > 1 and sb > 0 else math.nan
    d, s = a - b, a + b
    if n < 3 or d.std() == 0 or s.std() == 0:
        return ratio, math.nan
    r = float(np.corrcoef(d, s)[0, 1])
    if abs(r) >= 1:
        return ratio, 0.0
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return ratio, float(min(1.0, 2 * (1 - t_cdf(abs(t), n - 2))))


def ci_text(c: dict) -> str | None:
    """A ``compare`` result's 95% interval x100 as ``[-0.85, +1.88]``; None where there is none."""
    lo, hi = c.get("ci95", (math.nan, math.nan))
    return f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" if c.get("n") and np.isfinite(lo) else None


def p_text(p: float) -> str:
    """A p-value as ``0.123``, or ``-`` where there is no test (one seed, a constant difference)."""
    return f"{p:.3f}" if np.isfinite(p) else "-"


MIN_SEEDS_FOR_READING = 3


def reading(c: dict) -> str:
    """What a ``compare`` result supports: "cannot tell (n seeds)" below 3 paired seeds, else "ahead" /
    "behind" when the 95% interval excludes 0, else "no measurable effect".

    One seed has no interval, and two seeds' interval (t quantile 12.7) is too wide or, on a chance
    near-constant difference, falsely narrow: "no measurable effect" from them would read as evidence."""
    n = c.get("n") or 0
    if n < MIN_SEEDS_FOR_READING:
        return f"cannot tell ({n} seed{'' if n == 1 else 's'})"
    lo, hi = c.get("ci95", (math.nan, math.nan))
    if np.isfinite(lo) and (lo > 0 or hi < 0):
        return "ahead" if lo > 0 else "behind"
    return "no measurable effect"


def compare(a: dict, b: dict) -> dict:
    """Paired comparison of two arms given as ``{seed: score}``: over the seeds both have."""
    seeds = sorted(s for s in a if s in b)
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    if not len(d):
        return {"n": 0}
    mean, lo, hi = mean_ci(d)
    t, p_t = paired_t(d)
    w, p_w = wilcoxon_exact(d)
    ahead, behind, p_sign = sign_test(d)
    sd_ratio, p_var = pitman_morgan([a[s] for s in seeds], [b[s] for s in seeds])
    return {"n": len(d), "mean": mean, "ci95": [lo, hi], "t": t, "p_t": p_t, "wilcoxon_w": w, "p_wilcoxon": p_w,
            "ahead": ahead, "behind": behind, "p_sign": p_sign, "sd_ratio": sd_ratio, "p_var": p_var,
            "seeds": seeds}
