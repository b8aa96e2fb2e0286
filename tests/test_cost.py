"""The chapter-2 labelling-cost model."""
import numpy as np
import pytest

from rable_nb.stages.s00_cost import CostModel, breakdown, cumulative


def test_defaults_reproduce_the_report():
    b = breakdown(CostModel())
    assert b["initial"] == pytest.approx(1_000_000)
    assert b["qc"] == pytest.approx(150_000)
    assert b["maintenance"] == pytest.approx(1_500_000)
    assert b["total"] == pytest.approx(2_650_000)


def test_partial_labelling_model():
    m = CostModel(partial_cost_ratio=0.5, maintenance_label_share=1.0)
    p = breakdown(m, partial=True)
    assert p["initial"] == pytest.approx(500_000) and p["qc"] == pytest.approx(75_000)
    assert p["maintenance"] == pytest.approx(750_000)
    assert breakdown(CostModel(partial_cost_ratio=1.0), True) == breakdown(CostModel())


def test_cumulative_curve_ends_at_the_total_and_is_monotone():
    m = CostModel()
    months, cost = cumulative(m)
    assert months[-1] == 36 and cost[0] == 0
    assert cost[-1] == pytest.approx(breakdown(m)["total"])
    assert (np.diff(cost) >= 0).all()
    assert cost[12] == pytest.approx(1_150_000 + 500_000)  # labelling done after 12 months


@pytest.mark.parametrize("kwargs", [dict(cost_per_label=-1), dict(years=0),
                                    dict(labelling_months=48)])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        CostModel(**kwargs)
