"""Paired comparisons of top-ups against their matching controls (``results/README.md``).

A generator's gain counts only against the control that differs from it in one thing, at
the same training seeds (the data, candidate sets and top-up counts are shared):

- a generator against oversampling at equal counts and labels: the backend its class names
  as ``CONTROL`` (``pixel``/``gan``/``sd`` → ``copy``, ``feature`` → ``feature-copy``, cRT:
  class-balanced resampling of real features for the same head fine-tuning);
- a top-up against the same run with the synthetic samples weighted 0 (the real data
  alone through the same training: the feature comparisons have one);
- a conditioning-label rule (``LABEL_RULE``/``LABEL_KEEP``) against the warm-up's
  ``'confidence'`` labels, same backend;
- a sample filter (``SYNTH_FILTER`` 'class' / 'centre') against the same top-up unfiltered;
- candidate sets for synthetic samples (``SYNTHETIC_LABELS`` 'partial', 'plausible') against
  their single labels (``'exact'``);
- dynamic re-sampling (``+drs``) against the same method without it (for ``rable``: the
  dynamic top-up against the static one), and the dynamic top-up (``rable+drs``) against
  re-sampling alone (``able+drs``, no top-up): the strongest copying controls.

Per pair: the seeds both have, mean of each, and the mean paired difference (arm − control)
with its 95 % Student-t interval over seeds (shown from 2 seeds on; a claimed gain needs 3).
"""
from __future__ import annotations

import copy as _copy
import math

from scipy import stats

from .. import config, generators
from ..rundir import runfiles


def _synthetic(m: dict) -> dict:
    return (m.get("params") or {}).get("synthetic") or {}


def budget(m: dict) -> str:
    """' (10 epochs)' for a run trained for other epochs than its profile's default (e.g. the
    main job's), else '': tables keep runs of different budgets apart."""
    p = m.get("params") or {}
    protocol = (config.PROTOCOL_SETTINGS.get(p.get("PROTOCOL")) if p.get("PROFILE") == "paper"
                else None)  # a protocol-L paper run's default is L's 800 epochs
    default = (protocol or config.TRAINING_DEFAULTS.get(p.get("PROFILE")) or {}).get("EPOCHS")
    epochs = p.get("EPOCHS")
    return f" ({epochs} epochs)" if None not in (epochs, default) and epochs != default else ""


def variant(m: dict, method: str | None = None) -> str:
    """:func:`budget` and the piece parameters the run set for ``method`` (default: its own)
    with ``METHOD_PARAMS``, e.g. ' (10 epochs) {drs.labels=soft}': a run with other settings
    of a method is another row and another arm, never pooled with the defaults' seeds."""
    pieces = (method or m["method"]).split("+")
    given = (m.get("params") or {}).get("METHOD_PARAMS") or {}
    set_ = [f"{piece}.{k}={v}" for piece in pieces if isinstance(given.get(piece), dict)
            for k, v in sorted(given[piece].items())]
    return budget(m) + (f" {{{', '.join(set_)}}}" if set_ else "")


def _warmup(syn: dict) -> tuple:
    """The warm-up behind a top-up: its cache key and the fingerprint of its labels (older
    runs: its test accuracy) — two trainings of one key (other threads) are other arms."""
    w = syn.get("warmup") or {}
    return w.get("cache"), w.get("pseudo_sha1") or w.get("test_accuracy")


def _topup(syn: dict) -> tuple:
    """A top-up's identity: its label (generator, labels, filter), its target and the
    generator's own settings (``PIXEL_GUIDANCE`` 1 and 2 are other arms); a control made by
    renaming the generator (:func:`controls`) keeps none of the other generator's settings."""
    if not syn:
        return ()
    prefix = f"{str(syn.get('generator')).upper()}_"
    return (runfiles.describe(syn), syn.get("TARGET_PER_CLASS"),
            tuple(sorted((k, repr(v)) for k, v in syn.items() if k.startswith(prefix))))


def arm(m: dict, synthetic: dict | None = None, weight=None, sets=None,
        method: str | None = None) -> tuple:
    """What a run compares as: (data setting, method, top-up, weight, synthetic label sets,
    warm-up)."""
    p = m.get("params") or {}
    syn = _synthetic(m) if synthetic is None else synthetic
    w = p.get("SYNTH_WEIGHT") if weight is None else weight
    return (runfiles.setting(m), (method or m["method"]) + variant(m, method), _topup(syn),
            1.0 if w is None else float(w), sets or p.get("SYNTHETIC_LABELS") or "exact",
            _warmup(syn))


def controls(m: dict) -> list[tuple[str, tuple]]:
    """(what the control changes, its arm) for every matching control of run ``m``."""
    syn = _synthetic(m)
    base, *mods = m["method"].split("+")
    out = []
    if "drs" in mods:   # dynamic re-sampling against the same method without it
        out.append(("drs → none", arm(m, method="+".join([base, *(x for x in mods
                                                                    if x != "drs")]))))
    if not syn or not m.get("n_synthetic"):
        return out
    if "drs" in mods and base == "rable":   # the dynamic top-up against re-sampling alone
        out.append(("top-up → none (able)", arm(m, {}, method="+".join(["able", *mods]))))
    gen = syn.get("generator")
    control = getattr(generators.GENERATORS.get(gen), "CONTROL", None)
    if control:
        out.append((f"{gen} → {control}", arm(m, {**syn, "generator": control})))
    weight = (m.get("params") or {}).get("SYNTH_WEIGHT")
    if weight != 0:  # shown where such a run exists (the feature comparisons have one)
        out.append(("weight → 0", arm(m, weight=0.0)))
    rule = (syn.get("rule") or {}).get("LABEL_RULE", "confidence")
    if syn.get("cond_labels") == "pseudo" and (rule != "confidence" or "LABEL_KEEP" in
                                                (syn.get("rule") or {})):
        base = _copy.deepcopy(syn)
        base["rule"] = {"LABEL_RULE": "confidence"}
        out.append(("labels → confidence", arm(m, base)))
    if syn.get("SYNTH_FILTER"):
        base = {k: v for k, v in syn.items() if k != "SYNTH_FILTER_BAND"}
        out.append((f"{runfiles.filter_name(syn)} filter → none",
                    arm(m, {**base, "SYNTH_FILTER": False})))
    if ((m.get("params") or {}).get("SYNTHETIC_LABELS") or "exact") != "exact":
        out.append((f"{m['params']['SYNTHETIC_LABELS']} label sets → exact",
                    arm(m, sets="exact")))
    return out


def _stats(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t interval, None below 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _same_warmups(entries: list[dict]) -> list[dict]:
    """``entries`` where a run whose top-up records its warm-up's ``pseudo_sha1`` is keyed
    like the older records of the same top-up (same cache key and conditioning labels,
    ``cond_sha1``), which predate that fingerprint: a rerun on one warm-up pairs with them."""
    old = {(w.get("cache"), s.get("cond_sha1")) for m in entries
           if (s := _synthetic(m)) and not (w := s.get("warmup") or {}).get("pseudo_sha1")}
    out = []
    for m in entries:
        syn = _synthetic(m)
        w = syn.get("warmup") or {}
        if w.get("pseudo_sha1") and (w.get("cache"), syn.get("cond_sha1")) in old:
            w = {k: v for k, v in w.items() if k != "pseudo_sha1"}
            m = {**m, "params": {**m["params"], "synthetic": {**syn, "warmup": w}}}
        out.append(m)
    return out


def paired_rows(entries: list[dict]) -> list[dict]:
    """Every run group with a matching control present, paired by training seed."""
    groups: dict[tuple, dict] = {}
    for m in _same_warmups(entries):
        groups.setdefault(arm(m), {})[(m.get("params") or {}).get("SEED")] = m
    rows = []
    for key, by_seed in groups.items():
        for change, ctrl_key in controls(next(iter(by_seed.values()))):
            ctrl = groups.get(ctrl_key)
            seeds = sorted(set(by_seed) & set(ctrl or {}), key=str)
            if not seeds:
                continue
            row = {"arm": key, "change": change, "seeds": seeds}
            for field in ("last", "few"):
                a = [by_seed[s]["accuracy"][field] for s in seeds]
                c = [ctrl[s]["accuracy"][field] for s in seeds]
                row[field] = dict(arm=_stats(a)[0], control=_stats(c)[0],
                                  diff=_stats([x - y for x, y in zip(a, c)]))
            rows.append(row)
    return sorted(rows, key=lambda r: (r["arm"][0], r["arm"][1], r["arm"][2], r["change"]))


def table(entries: list[dict]) -> str:
    """:func:`paired_rows` as a markdown table (%), or '' when no pair exists."""
    rows = paired_rows(entries)
    if not rows:
        return ""

    def diff(d):
        mean, half = d["diff"]
        return f"{100 * mean:+.2f}" + (f" ± {100 * half:.2f}" if half is not None else "")

    def label(key):
        setting, method, topup, weight, sets, _ = key
        extra = (f", weight {weight:g}" if weight != 1 else "") + (
            f", {sets} label sets" if sets != "exact" else "")
        inner = f"{topup[0] if topup else ''}{extra}".lstrip(", ")
        return f"{method} [{inner}]" if inner else method
    lines = ["| setting | arm | control changes | seeds | last: arm / control | Δ last "
             "(95 % CI) | few: arm / control | Δ few (95 % CI) |", "|---" * 8 + "|"]
    for r in rows:
        last, few = r["last"], r["few"]
        lines.append(
            f"| {r['arm'][0]} | {label(r['arm'])} | {r['change']} | "
            f"{', '.join(map(str, r['seeds']))} | {100 * last['arm']:.2f} / "
            f"{100 * last['control']:.2f} | {diff(last)} | {100 * few['arm']:.2f} / "
            f"{100 * few['control']:.2f} | {diff(few)} |")
    return ("\nPaired comparisons against the matching control (same seeds, data and counts; "
            "Δ = arm − control, mean over seeds ± the 95 % t interval's half-width from 2 "
            "seeds on; a gain is claimed only with ≥ 3 seeds and an interval above 0):\n\n"
            + "\n".join(lines) + "\n")
