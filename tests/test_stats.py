"""The study's paired statistics (lnsr.finetune.stats) against scipy and hand-computed values."""
import math

import numpy as np
import pytest

from lnsr.finetune import stats


def test_against_scipy():
    ss = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 5, 10, 12):
        d = rng.normal(0.4, 1.0, n)
        t, p = stats.paired_t(d)
        ref = ss.ttest_1samp(d, 0.0)
        assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9)
        m, lo, hi = stats.mean_ci(d)
        rlo, rhi = ss.t.interval(0.95, n - 1, loc=d.mean(), scale=ss.sem(d))
        assert (lo, hi) == pytest.approx((rlo, rhi), rel=1e-9)
        w, pw = stats.wilcoxon_exact(d)
        assert pw == pytest.approx(ss.wilcoxon(d, method="exact").pvalue, rel=1e-12)
        assert w == pytest.approx(sum(r for r, x in zip(ss.rankdata(np.abs(d)), d) if x > 0))
        k = int((d > 0).sum())
        assert stats.sign_test(d)[2] == pytest.approx(ss.binomtest(k, n).pvalue, rel=1e-12)
    for df in (1, 2, 4, 9, 30):
        for q in (0.6, 0.9, 0.975, 0.995):
            assert stats.t_ppf(q, df) == pytest.approx(ss.t.ppf(q, df), rel=1e-9)


def test_hand_values():
    # all 5 differences positive: W+ = 15, the most extreme of 2^5 sign patterns on each side
    assert stats.wilcoxon_exact([0.1, 0.2, 0.3, 0.4, 0.5]) == (15.0, 2 / 32)
    assert stats.sign_test([1, 1, 1, 1, -1]) == (4, 1, 12 / 32)
    # zeros are dropped; ties get average ranks: |d| = 1, 1, 2 -> ranks 1.5, 1.5, 3; W+ = 1.5 + 3
    w, p = stats.wilcoxon_exact([1.0, -1.0, 0.0, 2.0])
    assert w == 4.5 and p == pytest.approx(2 * 3 / 8)  # P(W+ >= 4.5) = 3/8: {4.5, 4.5, 6}
    t, p = stats.paired_t([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3)
    assert t == pytest.approx(2 * math.sqrt(3))
    assert math.isnan(stats.paired_t([1.0])[0])
    c = stats.compare({1: 0.8, 2: 0.7, 3: 0.9, 4: 0.5}, {1: 0.7, 2: 0.7, 3: 0.6, 5: 0.1})
    assert c["n"] == 3 and c["seeds"] == [1, 2, 3] and (c["ahead"], c["behind"]) == (2, 0)
    assert c["mean"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)


def test_wilcoxon_counts_equal_enumeration_with_ties_and_scipy_at_large_n():
    import itertools

    rng = np.random.default_rng(2)
    for n in (1, 4, 9, 12):
        # differences on a grid of 1/277 (a dev set of 277), so magnitudes tie and some are zero
        d = rng.integers(-6, 7, n) / 277
        nz = d[d != 0]
        w, p = stats.wilcoxon_exact(d)
        if not len(nz):
            assert (w, p) == (0.0, 1.0)
            continue
        ranks = stats.rankdata(np.abs(nz))
        sums = np.array([sum(r for r, s in zip(ranks, signs) if s)
                         for signs in itertools.product((0, 1), repeat=len(nz))])
        ref = min(1.0, 2 * min(np.mean(sums <= w + 1e-9), np.mean(sums >= w - 1e-9)))
        assert w == pytest.approx(ranks[nz > 0].sum()) and p == pytest.approx(ref, rel=1e-12)
    ss = pytest.importorskip("scipy.stats")
    d = rng.normal(0.3, 1.0, 30)  # 30 pairs: three regimes of 10 seeds pooled; 2^30 patterns counted
    assert stats.wilcoxon_exact(d)[1] == pytest.approx(ss.wilcoxon(d, method="exact").pvalue, rel=1e-9)


def test_pitman_morgan_equal_paired_variances():
    ss = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for n in (4, 10, 25):
        shared = rng.normal(0, 1, n)
        a = shared + rng.normal(0, 0.5, n)
        b = 0.3 * shared + rng.normal(0, 0.2, n)
        ratio, p = stats.pitman_morgan(a, b)
        assert ratio == pytest.approx(a.std(ddof=1) / b.std(ddof=1))
        # the same test: the correlation of a - b with a + b (scipy's pearsonr is a t-test on n - 2 df)
        assert p == pytest.approx(ss.pearsonr(a - b, a + b).pvalue, rel=1e-7)
    # b = a shifted: equal variances, a - b constant -> no test; b = 2a: var ratio 1/4, perfectly correlated
    assert math.isnan(stats.pitman_morgan([1.0, 2.0, 4.0], [2.0, 3.0, 5.0])[1])
    assert stats.pitman_morgan([1.0, 2.0, 4.0], [2.0, 4.0, 8.0]) == (pytest.approx(0.5), 0.0)
    c = stats.compare({1: 0.70, 2: 0.74, 3: 0.72, 4: 0.71}, {1: 0.60, 2: 0.80, 3: 0.72, 4: 0.66})
    assert c["sd_ratio"] < 1 and 0 <= c["p_var"] <= 1


def test_reading_follows_the_interval():
    assert stats.reading(stats.compare({1: 0.8, 2: 0.81, 3: 0.82}, {1: 0.7, 2: 0.7, 3: 0.71})) == "ahead"
    assert stats.reading(stats.compare({1: 0.7, 2: 0.7, 3: 0.71}, {1: 0.8, 2: 0.81, 3: 0.82})) == "behind"
    assert stats.reading(stats.compare({1: 0.75, 2: 0.69, 3: 0.72}, {1: 0.7, 2: 0.7, 3: 0.7})) == "no measurable effect"
    # below 3 paired seeds nothing is read: one seed has no interval, two give no usable one
    assert stats.reading(stats.compare({1: 0.9}, {1: 0.7})) == "cannot tell (1 seed)"
    assert stats.reading(stats.compare({1: 0.9}, {2: 0.7})) == "cannot tell (0 seeds)"  # no common seed
    # two seeds a constant +0.1 apart: a zero-width interval above 0, still no reading
    two = stats.compare({1: 0.8, 2: 0.9}, {1: 0.7, 2: 0.8})
    assert two["ci95"][0] > 0 and stats.reading(two) == "cannot tell (2 seeds)"


def test_paired_table_pairs_with_vanilla_and_each_arm_with_its_own_control():
    from lnsr.finetune.report import controls_of, paired_table, summarize

    base = {"sigma": 0.05, "inject_at": 0, "dropout": "paired"}

    def run(label, method, seed, acc, **opts):
        return {"config": {"label": label, "seed": seed, "method": method,
                           "method_options": {**base, **opts} if method == "lnsr" else {}},
                "final": {"accuracy": acc}, "epochs": [{}], "wall_time_s": 1.0}

    arms = {("vanilla", "vanilla", ()): [0.70, 0.72, 0.71],
            ("lnsr_lam0", "lnsr", (("lam", 0.0),)): [0.71, 0.73, 0.74],
            ("lnsr_lam0.01", "lnsr", (("lam", 0.01),)): [0.75, 0.76, 0.78],
            ("lnsr_lam0.01_k3", "lnsr", (("lam", 0.01), ("inject_at", 3))): [0.70, 0.72, 0.70],  # no control at k=3
            ("r3f", "r3f", ()): [0.69, 0.73, 0.71]}
    results = [run(label, m, seed, acc, **dict(o)) for (label, m, o), accs in arms.items()
               for seed, acc in zip((1, 2, 3), accs)]
    assert controls_of(results) == {"lnsr_lam0.01": "lnsr_lam0"}
    text = paired_table(summarize(results), results, "accuracy")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in text.splitlines() if ln.startswith("| ") and " - " in ln.split("|")[1]}
    assert list(rows) == ["lnsr_lam0 - vanilla", "lnsr_lam0.01 - vanilla", "lnsr_lam0.01_k3 - vanilla",
                          "r3f - vanilla", "lnsr_lam0.01 - lnsr_lam0"]
    c = stats.compare({1: 0.75, 2: 0.76, 3: 0.78}, {1: 0.71, 2: 0.73, 3: 0.74})
    lo, hi = c["ci95"]
    assert rows["lnsr_lam0.01 - lnsr_lam0"] == ["3", f"{100 * c['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]",
                                                f"{c['p_t']:.3f}", "3/0", stats.reading(c)]
    assert rows["lnsr_lam0.01_k3 - vanilla"][3] == "0/1"  # seeds 1 and 2 tie
    only = [r for r in results if r["config"]["label"] == "r3f"]
    assert paired_table(summarize(only), only, "accuracy") is None  # nothing to pair


def test_plot_labels_wrap_at_underscores_and_keep_every_character():
    from lnsr.finetune.report import _wrap

    label = "lnsr_lam0.01_inject_at0_noiserelative_noisy_fraction0.25"
    wrapped = _wrap(label, width=22)
    assert wrapped.replace("\n", "") == label and wrapped.count("\n") == 2
    assert all(len(line) <= 22 for line in wrapped.splitlines())
    assert _wrap("vanilla") == "vanilla" and _wrap("a_" + "b" * 30, width=10) == "a_\n" + "b" * 30


def test_wilcoxon_ties_are_decided_on_exact_differences_not_float_equality():
    """Paired differences of accuracies on 277 examples: equal as rationals (k/277), a few ulps apart
    as floats. Ranked by float equality (as scipy does) they are not tied and the p-value changes."""
    import itertools
    from fractions import Fraction

    pairs = [(171, 170), (162, 161), (165, 166), (150, 149), (158, 156), (149, 150), (170, 167)]  # correct of 277
    d = [a / 277 - b / 277 for a, b in pairs]
    exact = [Fraction(a - b, 277) for a, b in pairs]
    mags = [abs(x) for x in d]
    assert len(set(mags)) > len({abs(x) for x in exact})   # the floats really do break the ties
    # reference: average ranks of the exact magnitudes, enumerated over all sign patterns
    order = sorted({abs(x) for x in exact})
    rank_of = {}
    pos = 1
    for m in order:
        k = sum(abs(x) == m for x in exact)
        rank_of[m] = Fraction(2 * pos + k - 1, 2)
        pos += k
    ranks = [rank_of[abs(x)] for x in exact]
    w_ref = sum(r for r, x in zip(ranks, exact) if x > 0)
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(ranks))]
    p_ref = min(1.0, 2 * min(sum(s <= w_ref for s in sums), sum(s >= w_ref for s in sums)) / len(sums))
    w, p = stats.wilcoxon_exact(d)
    assert w == float(w_ref) and p == pytest.approx(p_ref, rel=1e-12)
    # ranking the raw floats gives another W+ (the old behaviour), so this test can fail
    raw = stats.rankdata(np.abs(np.array(d)))
    assert float(raw[np.array(d) > 0].sum()) != float(w_ref)
