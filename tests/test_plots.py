"""Plots: the Pareto front they draw (the plots themselves are drawn by test_report and test_bad_inputs)."""
from lorakd.plots import pareto_front


def test_pareto_front():
    pts = [(100, 0.80), (200, 0.85), (150, 0.70), (300, 0.85), (50, 0.60), (200, 0.90), (50, 0.60)]
    # (150, .70) loses to (100, .80); (200, .85) to (200, .90); (300, .85) to (200, .90); equal points both stay
    assert pareto_front(pts) == [4, 6, 0, 5]
    assert pareto_front([]) == []
    assert pareto_front([(10, 0.5)]) == [0]
