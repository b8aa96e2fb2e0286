"""Stage 00: the report's labelling-cost model (chapter 2) and a partial-label variant.

Full labelling: every item gets one verified exact label.
    initial      = cost_per_label · n_items             (spread over the labelling months)
    quality ctrl = qc_rate · initial                   (paid alongside labelling)
    maintenance  = annual_maintenance · years          (spread evenly over the horizon)
Partial labelling (assumptions, all parameters): an annotator only ticks the plausible
labels, which costs ``partial_cost_ratio`` of an exact label; QC scales with the labelling
cost; the share ``maintenance_label_share`` of maintenance that is re-labelling scales the
same way, the rest (storage, tooling) does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .. import config


@dataclass
class CostModel:
    """Parameters of the cost model; defaults reproduce the report's figures."""

    cost_per_label: float = 0.10
    n_items: int = 10_000_000
    labelling_months: int = 12
    qc_rate: float = 0.15
    annual_maintenance: float = 500_000.0
    years: int = 3
    partial_cost_ratio: float = 0.4
    maintenance_label_share: float = 0.5

    def __post_init__(self):
        bad = {k: v for k, v in asdict(self).items() if v < 0}
        if bad:
            raise ValueError(f"cost parameters must be non-negative, got {bad}")
        if self.years < 1 or self.labelling_months < 1:
            raise ValueError("years and labelling_months must be at least 1")
        if self.labelling_months > 12 * self.years:
            raise ValueError("labelling_months cannot exceed the horizon (12 · years)")


def validate(P: dict) -> None:
    """Check notebook 00's parameters: each a non-negative number (counts integers), then
    the model's own consistency checks."""
    names = {f.name.upper(): f for f in fields(CostModel)}
    config.check(P, {n: config.integer(0) if f.type == "int" else config.number(0)
                     for n, f in names.items()})
    if all(P.get(n) is not None for n in names):
        CostModel(**{f.name: P[n] for n, f in names.items()})


def breakdown(m: CostModel, partial: bool = False) -> dict[str, float]:
    """Initial labelling, QC, maintenance and total cost over the horizon."""
    ratio = m.partial_cost_ratio if partial else 1.0
    initial = m.cost_per_label * m.n_items * ratio
    maint_ratio = (1 - m.maintenance_label_share) + m.maintenance_label_share * ratio
    maintenance = m.annual_maintenance * m.years * maint_ratio
    qc = m.qc_rate * initial
    return dict(initial=initial, qc=qc, maintenance=maintenance,
                total=initial + qc + maintenance)


def cumulative(m: CostModel, partial: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(months 0..12·years, cumulative cost at the end of each month)."""
    b = breakdown(m, partial)
    months = np.arange(12 * m.years + 1)
    labelling = (b["initial"] + b["qc"]) * np.minimum(months / m.labelling_months, 1.0)
    return months, labelling + b["maintenance"] * months / months[-1]


def plot(m: CostModel, ax=None):
    """Cumulative cost of full vs partial labelling over the horizon, with the saving."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for partial, label in ((False, "full labelling"), (True, "partial labelling")):
        months, cost = cumulative(m, partial)
        ax.plot(months / 12, cost / 1e6, label=f"{label}: ${cost[-1] / 1e6:.2f}M")
    saving = breakdown(m)["total"] - breakdown(m, True)["total"]
    ax.set(xlabel="years", ylabel="cumulative cost (million $)",
           title=f"{m.years}-year labelling cost; partial labels save ${saving / 1e6:.2f}M")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax.figure


def widget(m: CostModel):
    """ipywidgets sliders over every cost parameter, redrawing :func:`plot`."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    sliders = dict(
        cost_per_label=w.FloatSlider(value=m.cost_per_label, min=0.01, max=2, step=0.01),
        n_items=w.IntSlider(value=m.n_items, min=100_000, max=50_000_000, step=100_000),
        labelling_months=w.IntSlider(value=m.labelling_months, min=1, max=36),
        qc_rate=w.FloatSlider(value=m.qc_rate, min=0, max=1, step=0.01),
        annual_maintenance=w.FloatSlider(value=m.annual_maintenance, min=0, max=2e6, step=1e4),
        years=w.IntSlider(value=m.years, min=1, max=10),
        partial_cost_ratio=w.FloatSlider(value=m.partial_cost_ratio, min=0.05, max=1, step=0.05),
        maintenance_label_share=w.FloatSlider(value=m.maintenance_label_share, min=0, max=1,
                                              step=0.05),
    )

    def redraw(**values):
        plot(CostModel(**values))
        plt.show()

    return w.interactive(redraw, **sliders)
