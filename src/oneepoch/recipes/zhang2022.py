"""Paper A (Zhang et al., CIKM 2022), figure by figure: ``oneepoch reproduce zhang2022``.

Each figure is a set of *arms* (settings, each trained with several seeds), a claim quoted from
the paper, the numbers we measure, and a verdict computed from those numbers by the explicit
checks in :data:`FIGURES` (``reproduced`` when every check passes, ``not reproduced`` when
none does, ``mixed`` otherwise). Runs are shared between figures (the base setting is trained
once) and a re-run skips finished runs, so ``--figure all`` can be interrupted and resumed.

    $ oneepoch reproduce zhang2022 --figure 6              # DNN vs LR on the built-in data
    $ oneepoch reproduce zhang2022 --figure all --workers 2
    $ oneepoch reproduce zhang2022 --figure 14-15 --data my_data --seeds 3

Output (``--out``, default ``runs/reproduce``): ``data/`` (the built-in synthetic set, made
once), ``runs/<arm>/seed-<k>/`` (one training run each), ``fig<N>/`` (PNG, ``table.md``,
``result.json``) and ``report.html`` with every figure done so far (each figure's table as an
HTML table made from the same rows as ``table.md``).

    >>> sorted(FIGURES)[:3]
    ['10', '11', '12']
    >>> verdict_of([True, True]), verdict_of([True, False]), verdict_of([False])
    ('reproduced', 'mixed', 'not reproduced')
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from oneepoch.analysis import Jump, boundary_jump
from oneepoch.config import TrainConfig, load_config
from oneepoch.data.dataset import CTRData, load_ctr
from oneepoch.data.stats import field_counts
from oneepoch.data.synthetic import SynthConfig
from oneepoch.probes.updates import read_updates
from oneepoch.recipes import ReproduceOptions
from oneepoch.recipes.sweep import (
    SUMMARY_HEADER,
    PointSummary,
    RunSpec,
    markdown_table,
    mean_curve,
    run_specs,
    summarize_point,
    summary_rows,
)
from oneepoch.remedies.catalog import fine_fields
from oneepoch.runfolder import is_finished, read_metrics

# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Budget of a reproduction: the data, the shared training settings, the grid values."""

    name: str
    synth: SynthConfig
    train: tuple[str, ...]  # settings of every run (not part of an arm's identity)
    emb_dims: tuple[int, ...]
    width_mults: tuple[float, ...]
    hiddens: tuple[str, ...]  # MLP shapes other than the base one, e.g. "[200]"
    batch_sizes: tuple[int, ...]
    activations: tuple[str, ...]
    optimizers: tuple[tuple[str, float], ...]  # (name, lr) besides the base Adam 1e-3
    tiny_lr: float  # Adam lr small enough to hide the phenomenon (paper: 1e-7)
    lr_lr: float  # the LR model's lr (paper: Adam 1e-2)
    weight_decays: tuple[float, ...]
    dropouts: tuple[float, ...]
    sparsity_ms: tuple[float, ...]
    adistance: str  # probe spec of Fig. 14-15
    min_drop: float = 0.005  # an AUC drop right after the epoch-1 boundary at least this large
    a_jump: float = 0.05  # an A-distance rise across the boundary at least this large
    norm_jump: float = 1.2  # an update-norm ratio (after / before the boundary) at least this


DEFAULT = Preset(
    name="default",
    synth=SynthConfig(),  # 400k train / 50k test rows, paper A's seven fields
    train=("epochs=3", "batch_size=1024", "eval.per_epoch=20", "eval.train_rows=20000",
           "checkpoint_keep=1"),
    emb_dims=(2, 32),
    width_mults=(0.5, 2.0),
    hiddens=("[200]", "[200,80,40]"),
    batch_sizes=(256, 4096),
    activations=("relu", "prelu", "sigmoid"),
    optimizers=(("adam", 1e-2), ("rmsprop", 1e-3), ("rmsprop", 1e-2), ("sgd", 0.1),
                ("sgd", 1.0)),
    tiny_lr=1e-5,
    lr_lr=1e-2,
    weight_decays=(1e-5, 1e-3),
    dropouts=(0.1, 0.5),
    sparsity_ms=(1e-1, 1e-2, 1e-3, 1e-4),
    adistance="adistance:rows=6000,every=2",
)

QUICK = Preset(
    name="quick",
    synth=SynthConfig(n_users=2_000, n_items=5_000, n_train=6_000, n_test=2_000, seed=3),
    train=("epochs=2", "batch_size=256", "eval.per_epoch=10", "eval.train_rows=2000",
           "model.hidden=[32,16]", "checkpoint_keep=1"),
    emb_dims=(4,),
    width_mults=(0.5,),
    hiddens=("[32]",),
    batch_sizes=(128,),
    activations=("relu",),
    optimizers=(("adam", 1e-2), ("sgd", 0.1)),
    tiny_lr=1e-5,
    lr_lr=1e-2,
    weight_decays=(1e-4,),
    dropouts=(0.2,),
    sparsity_ms=(1e-1, 1e-2),
    adistance="adistance:rows=1000,every=1",
)


# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One setting of a figure: a label, the settings that define it, probes to attach, and
    (Fig. 17) the parameter group to freeze when continuing the base run after epoch 1."""

    key: str  # run folder name under runs/
    label: str
    overrides: tuple[str, ...] = ()
    probes: tuple[str, ...] = ()
    continue_freeze: str = ""  # "embedding" or "mlp": continue base from epoch 1, frozen


def _g(v: float) -> str:
    return f"{v:g}"


def build_arms(p: Preset, fine: Sequence[str]) -> dict[str, Arm]:
    """Every arm of every figure, by key."""
    fine_list = "[" + ",".join(fine) + "]"
    arms = [Arm("base", "DNN (base)", ("checkpoint_keep=0",), ("updates", p.adistance)),
            Arm("lr", "LR", ("model.type=lr", f"optim.lr={_g(p.lr_lr)}")),
            Arm(f"adam-{_g(p.tiny_lr)}", f"Adam lr {_g(p.tiny_lr)} (tiny)",
                (f"optim.lr={_g(p.tiny_lr)}",), (p.adistance,)),
            Arm("no-fine-ids", f"without {', '.join(fine)}", (f"data.exclude_fields={fine_list}",)),
            Arm("only-mlp", "only MLP trained after epoch 1", continue_freeze="embedding"),
            Arm("only-emb", "only embeddings trained after epoch 1", continue_freeze="mlp")]
    arms += [Arm(f"emb-{d}", f"emb dim {d}", (f"model.emb_dim={d}",)) for d in p.emb_dims]
    arms += [Arm(f"width-{_g(w)}", f"width x{_g(w)}", (f"model.width_mult={_g(w)}",))
             for w in p.width_mults]
    arms += [Arm(f"hidden-{h.strip('[]').replace(',', '-')}", f"MLP {h}", (f"model.hidden={h}",))
             for h in p.hiddens]
    arms += [Arm(f"batch-{b}", f"batch {b}", (f"batch_size={b}",)) for b in p.batch_sizes]
    arms += [Arm(f"act-{a}", f"activation {a}", (f"model.activation={a}",))
             for a in p.activations]
    arms += [Arm(f"{o}-{_g(lr)}", f"{o} lr {_g(lr)}", (f"optim.name={o}", f"optim.lr={_g(lr)}"))
             for o, lr in p.optimizers]
    arms += [Arm(f"wd-{_g(w)}", f"weight decay {_g(w)}", (f"optim.weight_decay={_g(w)}",))
             for w in p.weight_decays]
    arms += [Arm(f"dropout-{_g(d)}", f"dropout {_g(d)}", (f"model.dropout={_g(d)}",))
             for d in p.dropouts]
    for mode in ("filter", "hash"):
        for m in p.sparsity_ms:
            probes = (p.adistance,) if mode == "filter" and m == min(p.sparsity_ms) else ()
            arms.append(Arm(f"{mode}-{_g(m)}", f"{mode} m={_g(m)}",
                            (f"data.sparsity={mode}", f"data.sparsity_m={_g(m)}",
                             f"data.sparsity_fields={fine_list}"), probes))
    return {a.key: a for a in arms}


def figure_arms(fig: str, p: Preset) -> list[str]:
    """Arm keys of a figure (the base first)."""
    sp = lambda mode: [f"{mode}-{_g(m)}" for m in p.sparsity_ms]  # noqa: E731
    return {
        "3": ["base"],
        "5": ["base", *(f"emb-{d}" for d in p.emb_dims), *(f"width-{_g(w)}" for w in p.width_mults),
              *(f"hidden-{h.strip('[]').replace(',', '-')}" for h in p.hiddens)],
        "6": ["base", "lr"],
        "7": ["base", *(f"batch-{b}" for b in p.batch_sizes),
              *(f"act-{a}" for a in p.activations)],
        "8": ["base", f"adam-{_g(p.tiny_lr)}", *(f"{o}-{_g(lr)}" for o, lr in p.optimizers)],
        "9": ["base", *(f"wd-{_g(w)}" for w in p.weight_decays),
              *(f"dropout-{_g(d)}" for d in p.dropouts)],
        "10": [],
        "11": ["base", *sp("filter"), *sp("hash")],
        "12": ["base", "no-fine-ids"],
        "14-15": ["base", f"adam-{_g(p.tiny_lr)}", f"filter-{_g(min(p.sparsity_ms))}"],
        "16": ["base"],
        "17": ["base", "only-mlp", "only-emb"],
    }[fig]


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a figure's analysis sees."""

    preset: Preset
    out: Path
    data: CTRData
    arms: dict[str, Arm]
    runs: dict[str, list[Path]]  # arm key -> run folders (one per seed)
    fine: list[str]
    _summaries: dict[str, PointSummary] = field(default_factory=dict)

    def summary(self, key: str) -> PointSummary:
        if key not in self._summaries:
            self._summaries[key] = summarize_point(self.arms[key].label, self.runs[key],
                                                   self.preset.min_drop)
        return self._summaries[key]

    def forget(self) -> None:
        """Drop cached summaries (after more runs finished)."""
        self._summaries.clear()

    def rows(self, key: str) -> list[list[dict[str, Any]]]:
        return [r for r in (read_metrics(d) for d in self.runs[key]) if r]

    def drop(self, key: str) -> float:
        return self.summary(key).mean("drop_epoch2")

    def best(self, key: str) -> float:
        return self.summary(key).mean("best_auc")


@dataclass
class Check:
    """One explicit condition of a verdict, with the numbers it was decided on."""

    text: str
    passed: bool
    numbers: str

    def line(self) -> str:
        return f"[{'pass' if self.passed else 'FAIL'}] {self.text}: {self.numbers}"


def verdict_of(passed: Sequence[bool]) -> str:
    """``reproduced`` if every check passes, ``not reproduced`` if none does, else ``mixed``."""
    if passed and all(passed):
        return "reproduced"
    if not any(passed):
        return "not reproduced"
    return "mixed"


def _drop_text(c: Context, key: str) -> str:
    m, s = c.summary(key).stats["drop_epoch2"]
    return f"drop {m:.4f} ± {s:.4f} (n={c.summary(key).seeds})"


def _has_drop(c: Context, key: str) -> Check:
    return Check(f"{c.arms[key].label} drops at epoch 2 (>= {c.preset.min_drop})",
                 bool(c.drop(key) >= c.preset.min_drop), _drop_text(c, key))


def _no_drop(c: Context, key: str) -> Check:
    return Check(f"{c.arms[key].label} does not drop at epoch 2 (< {c.preset.min_drop})",
                 bool(c.drop(key) < c.preset.min_drop), _drop_text(c, key))


def _lower_auc(c: Context, key: str, ref: str = "base") -> Check:
    a, b = c.best(key), c.best(ref)
    return Check(f"{c.arms[key].label} has a lower best test AUC than {c.arms[ref].label}",
                 bool(a < b), f"{a:.4f} vs {b:.4f}")


# ----------------------------------------------------------------------------- figures


@dataclass
class Table:
    """A figure's table: column names and rows of cells, written as Markdown (``table.md``) and
    as an HTML table (``report.html``) from the same cells."""

    header: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        return markdown_table(self.header, self.rows)


@dataclass
class FigureResult:
    verdict: str
    checks: list[Check]
    images: list[Path]
    table: Table
    numbers: dict[str, Any] = field(default_factory=dict)


def _curve_png(c: Context, keys: Sequence[str], path: Path, title: str,
               metric: str = "test_auc", ylabel: str = "test AUC") -> Path:
    from oneepoch.report.figures import plot_mean_std

    series = {}
    for k in keys:
        x, m, s = mean_curve(c.rows(k), metric)
        if len(x):
            series[c.arms[k].label] = (x, m, s)
    return plot_mean_std(series, path, ylabel, title)


def _auc_table(c: Context, keys: Sequence[str]) -> Table:
    return Table(list(SUMMARY_HEADER), summary_rows([c.summary(k) for k in keys]))


def _all_drop(c: Context, keys: Sequence[str], fig: str, title: str) -> FigureResult:
    """Figures whose claim is "the phenomenon persists in every arm"."""
    checks = [_has_drop(c, k) for k in keys]
    png = _curve_png(c, keys, c.out / f"fig{fig}" / f"fig{fig}.png", title)
    return FigureResult(verdict_of([ch.passed for ch in checks]), checks, [png],
                        _auc_table(c, keys))


def fig3(c: Context, keys: list[str]) -> FigureResult:
    from oneepoch.report.figures import plot_mean_std

    runs = c.rows("base")
    series = {f"{split} AUC": mean_curve(runs, f"{split}_auc") for split in ("test", "train")}
    png = plot_mean_std(series, c.out / "fig3" / "fig3.png", "AUC",
                        "Fig. 3: train and test AUC of the base DNN")
    tj = boundary_jump(runs, "train_auc")
    checks = [_has_drop(c, "base"),
              Check(f"train AUC jumps up at epoch 2 (>= {c.preset.min_drop} and >= 2x the "
                    "trend before)", tj.is_jump(c.preset.min_drop), tj.text())]
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png],
                        _auc_table(c, keys), {"train_auc_jump": vars(tj)})


def fig5(c: Context, keys: list[str]) -> FigureResult:
    return _all_drop(c, keys, "5", "Fig. 5: embedding dim, MLP width and depth")


def fig6(c: Context, keys: list[str]) -> FigureResult:
    checks = [_has_drop(c, "base"), _no_drop(c, "lr")]
    png = _curve_png(c, keys, c.out / "fig6" / "fig6.png", "Fig. 6: DNN vs LR")
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png], _auc_table(c, keys))


def fig7(c: Context, keys: list[str]) -> FigureResult:
    return _all_drop(c, keys, "7", "Fig. 7: batch size and activation")


def fig8(c: Context, keys: list[str]) -> FigureResult:
    p = c.preset
    tiny = f"adam-{_g(p.tiny_lr)}"
    fast = ["base", *(f"{o}-{_g(lr)}" for o, lr in p.optimizers
                      if o in ("adam", "rmsprop") and lr >= 1e-3)]
    sgd = [f"{o}-{_g(lr)}" for o, lr in p.optimizers if o == "sgd"]
    checks = [_has_drop(c, k) for k in fast] + [_no_drop(c, k) for k in sgd]
    checks += [_no_drop(c, tiny), _lower_auc(c, tiny)]
    png = _curve_png(c, keys, c.out / "fig8" / "fig8.png", "Fig. 8: optimizer and learning rate")
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png], _auc_table(c, keys))


def fig9(c: Context, keys: list[str]) -> FigureResult:
    return _all_drop(c, keys, "9", "Fig. 9: weight decay and dropout")


def fig10(c: Context, keys: list[str]) -> FigureResult:
    from oneepoch.data.synthetic import tail_share
    from oneepoch.report.figures import plot_cumulative_frequency

    counts = {f: v[1:] for f, v in field_counts(c.data).items()}  # without the OOV row
    png = plot_cumulative_frequency(counts, c.out / "fig10" / "fig10.png")
    rows, shares, means = [], {}, {}
    for f, v in counts.items():
        seen = v[v > 0]
        shares[f] = tail_share(v)
        means[f] = float(seen.mean()) if len(seen) else math.nan
        rows.append([f, len(seen), int(seen.sum()), f"{means[f]:.1f}", f"{100 * shares[f]:.1f}%"])
    table = Table(["field", "IDs", "occurrences", "mean occurrences / ID",
                   "share of occurrences in the least frequent 50% of IDs"], rows)
    coarse = [f for f in counts if f not in c.fine]
    checks = [Check(f"{f}: least frequent half of IDs hold <= 10% of occurrences (paper: 2.5%)",
                    bool(shares[f] <= 0.10), f"{100 * shares[f]:.1f}%") for f in c.fine]
    checks += [Check(f"{f} IDs are rarer than those of every coarse field",
                     bool(all(means[f] < means[g] for g in coarse)),
                     f"{means[f]:.1f} vs min coarse {min(means[g] for g in coarse):.1f}")
               for f in c.fine if coarse]
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png], table,
                        {"tail_share": shares, "mean_occurrences": means})


def fig11(c: Context, keys: list[str]) -> FigureResult:
    p = c.preset
    low = _g(min(p.sparsity_ms))
    checks = []
    for mode in ("filter", "hash"):
        checks += [_no_drop(c, f"{mode}-{low}"), _lower_auc(c, f"{mode}-{low}")]
    imgs = [_curve_png(c, ["base", *(f"{mode}-{_g(m)}" for m in p.sparsity_ms)],
                       c.out / "fig11" / f"fig11_{mode}.png", f"Fig. 11: {mode} (m = ratio kept)")
            for mode in ("filter", "hash")]
    return FigureResult(verdict_of([x.passed for x in checks]), checks, imgs, _auc_table(c, keys))


def fig12(c: Context, keys: list[str]) -> FigureResult:
    checks = [_no_drop(c, "no-fine-ids"), _lower_auc(c, "no-fine-ids")]
    png = _curve_png(c, keys, c.out / "fig12" / "fig12.png",
                     "Fig. 12: without the fine-grained ID fields")
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png], _auc_table(c, keys))


def fig14_15(c: Context, keys: list[str]) -> FigureResult:
    from oneepoch.report.figures import plot_mean_std

    thr = c.preset.a_jump
    out = c.out / "fig14-15"
    series = {}
    for k in keys:
        for split in ("train", "test"):
            x, m, s = mean_curve(c.rows(k), f"adist_{split}")
            series[f"{c.arms[k].label}, {split}"] = (x, m, s)
    imgs = [plot_mean_std(series, out / "fig14.png", "A-distance (all fields)",
                          "Fig. 14: A-distance of EMB(x), clicked vs unclicked")]
    base = c.rows("base")
    jumps: dict[str, dict[str, Jump]] = {"train": {}, "test": {}}
    for split in ("train", "test"):
        fs = {f: mean_curve(base, f"adist_{split}_{f}") for f in c.data.fields}
        imgs.append(plot_mean_std(fs, out / f"fig15_{split}.png", "A-distance",
                                  f"Fig. 15: A-distance per field, base DNN, {split} sample"))
        jumps[split] = {f: boundary_jump(base, f"adist_{split}_{f}") for f in c.data.fields}
        jumps[split]["all fields"] = boundary_jump(base, f"adist_{split}")
    tr, te = jumps["train"]["all fields"], jumps["test"]["all fields"]
    field_jumps = {f: jumps["train"][f].jump for f in c.data.fields}
    top = sorted(field_jumps, key=lambda f: -field_jumps[f])[:len(c.fine)]
    checks = [Check(f"base, train sample: A-distance jumps at epoch 2 (>= {thr} and >= 2x the "
                    "trend before)", tr.is_jump(thr), tr.text()),
              Check(f"base, test sample: A-distance stays flat (|change| < {thr})",
                    bool(abs(te.jump) < thr), te.text()),
              Check(f"the train jump is largest on {', '.join(c.fine)}",
                    bool(set(top) == set(c.fine)),
                    ", ".join(f"{f} {v:+.3f}" for f, v in sorted(field_jumps.items(),
                                                                 key=lambda t: -t[1])))]
    for k in keys[1:]:
        j = boundary_jump(c.rows(k), "adist_train")
        checks.append(Check(f"{c.arms[k].label}: train A-distance does not jump (same rule, "
                            f"threshold {thr})", not j.is_jump(thr), j.text()))
    rows = [[f, jumps["train"][f].text(), jumps["test"][f].text()]
            for f in ["all fields", *c.data.fields]]
    table = Table(["base DNN: A-distance change at epoch 2", "train sample",
                   "test sample"], rows)
    return FigureResult(verdict_of([x.passed for x in checks]), checks, imgs, table,
                        {"jumps": {sp: {f: vars(j) for f, j in d.items()}
                                   for sp, d in jumps.items()}})


def update_ratios(run_dir: Path, window: float = 0.05) -> dict[str, float]:
    """Per layer group: mean update l-inf norm in the first ``window`` epoch after the end of
    epoch 1 divided by the mean in the last ``window`` epoch before it."""
    u = read_updates(run_dir)
    if not u:
        return {}
    ep = u["epoch"].astype(float)
    before = (ep > 1 - window) & (ep <= 1 + 1e-6)
    after = (ep > 1 + 1e-6) & (ep <= 1 + window)
    return {g: float(u[g][after].mean() / max(u[g][before].mean(), 1e-30))
            for g in u if g not in ("step", "epoch") and before.any() and after.any()}


def _plot_updates(c: Context, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from oneepoch.report.figures import COLORS, _save

    logs = [read_updates(d) for d in c.runs["base"]]
    logs = [u for u in logs if u]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = [g for g in logs[0] if g not in ("step", "epoch")] if logs else []
    for i, g in enumerate(groups):
        n = min(len(u[g]) for u in logs)
        y = np.mean([u[g][:n] for u in logs], 0)
        k = max(1, n // 300)  # smooth to ~300 points
        y = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(logs[0]["epoch"][:n][k - 1:], y, color=COLORS[i % len(COLORS)], lw=1.2, label=g)
    for e in range(1, int(np.ceil(max((u["epoch"].max() for u in logs), default=1)))):
        ax.axvline(e, color="0.6", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("l-inf norm of the update per step")
    ax.set_title("Fig. 16: parameter change per step, base DNN (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig16(c: Context, keys: list[str]) -> FigureResult:
    thr = c.preset.norm_jump
    per = [update_ratios(d) for d in c.runs["base"]]
    per = [r for r in per if r]
    groups = list(per[0]) if per else []
    ratio = {g: float(np.mean([r[g] for r in per])) for g in groups}
    fcs = [g for g in groups if g.startswith("fc")]
    emb = ratio.get("embedding", math.nan)
    fc_max = max((ratio[g] for g in fcs), default=math.nan)
    checks = [Check(f"an MLP layer's update norm jumps at epoch 2 (after/before >= {thr})",
                    bool(fc_max >= thr), ", ".join(f"{g} x{ratio[g]:.2f}" for g in fcs)),
              Check(f"the embedding's update norm does not (< {thr})", bool(emb < thr),
                    f"embedding x{emb:.2f}")]
    png = _plot_updates(c, c.out / "fig16" / "fig16.png")
    table = Table(["layer", "update norm after / before the epoch-1 boundary "
                   "(0.05 epoch each side)"], [[g, f"{ratio[g]:.3f}"] for g in groups])
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png], table,
                        {"ratios": ratio})


def fig17(c: Context, keys: list[str]) -> FigureResult:
    checks = [_has_drop(c, "base"), _has_drop(c, "only-mlp"), _no_drop(c, "only-emb")]
    png = _curve_png(c, keys, c.out / "fig17" / "fig17.png",
                     "Fig. 17: continuing from the same epoch-1 checkpoint")
    return FigureResult(verdict_of([x.passed for x in checks]), checks, [png], _auc_table(c, keys))


@dataclass(frozen=True)
class Figure:
    title: str
    claim: str
    analyse: Callable[[Context, list[str]], FigureResult]


FIGURES: dict[str, Figure] = {
    "3": Figure("Train vs test AUC", "Test AUC falls sharply at the start of the second epoch "
                "while train AUC jumps up.", fig3),
    "5": Figure("Model size", "Embedding dimension, MLP width and number of layers do not "
                "remove the phenomenon.", fig5),
    "6": Figure("DNN vs LR", "The DNN shows the phenomenon; logistic regression on the same "
                "IDs does not.", fig6),
    "7": Figure("Batch size and activation", "Neither batch size nor the activation "
                "function removes the phenomenon.", fig7),
    "8": Figure("Optimizer and learning rate", "Fast-converging optimizers (Adam, RMSprop) "
                "with a large learning rate show it, SGD much less; a tiny learning rate hides "
                "it at a cost in AUC.", fig8),
    "9": Figure("Weight decay and dropout", "Weight decay and dropout do not help: the "
                "phenomenon persists.", fig9),
    "10": Figure("ID frequency", "Fine-grained ID fields are long-tailed: the least frequent "
                 "50% of IDs hold a few percent (2.5%) of occurrences.", fig10),
    "11": Figure("Feature sparsity", "Filtering or hashing the IDs to a smaller space (small "
                 "m) weakens the phenomenon and lowers the AUC.", fig11),
    "12": Figure("Without fine-grained fields", "Without item_ID and his_item_ID there is no "
                 "phenomenon, at a lower AUC.", fig12),
    "14-15": Figure("A-distance", "The A-distance of EMB(x) between clicked and unclicked "
                    "samples jumps at epoch 2 on the train set, stays flat on the test set, "
                    "the jump comes from item_ID / his_item_ID, and there is no jump with a "
                    "tiny learning rate or strong filtering.", fig14_15),
    "16": Figure("Parameter change", "The MLP's per-step update norm jumps at the start of "
                 "epoch 2; the embedding's stays steady.", fig16),
    "17": Figure("Partial fine-tuning", "Continuing from the epoch-1 checkpoint, training only "
                 "the MLP still drops; training only the embeddings (MLP frozen) does not.",
                 fig17),
}
ORDER = ["3", "5", "6", "7", "8", "9", "10", "11", "12", "14-15", "16", "17"]


# ----------------------------------------------------------------------------- running


def parse_figures(spec: str | None) -> list[str]:
    """``"all"``, one figure or a comma list (``"6,14-15"``); ``14`` and ``15`` mean 14-15."""
    if not spec:
        raise ValueError(f"--figure: give a figure ({', '.join(ORDER)}) or 'all'")
    if spec == "all":
        return list(ORDER)
    out = []
    for f in (x.strip() for x in spec.split(",")):
        f = "14-15" if f in ("14", "15") else f
        if f not in FIGURES:
            raise ValueError(f"--figure: unknown figure {f!r} (choose {', '.join(ORDER)}, all)")
        if f not in out:
            out.append(f)
    return out


def _specs(c: Context, keys: Sequence[str], base: Sequence[str], seeds: int) -> list[RunSpec]:
    specs = []
    for k in keys:
        arm = c.arms[k]
        for s in range(seeds):
            ov = [*base, *arm.overrides, f"seed={s}"]
            src = ""
            if arm.continue_freeze:
                src = str(c.runs["base"][s])
                ov = [*base, *c.arms["base"].overrides, f"seed={s}",
                      f"freeze=[{arm.continue_freeze}]", "checkpoint_keep=1"]
            specs.append(RunSpec(str(c.runs[k][s]), ov, None, list(arm.probes), src))
    return specs


def _write_figure(c: Context, fig: str, res: FigureResult, seconds: float) -> None:
    d = c.out / f"fig{fig}"
    d.mkdir(parents=True, exist_ok=True)
    f = FIGURES[fig]
    (d / "table.md").write_text(f"# Fig. {fig}: {f.title}\n\nClaim: {f.claim}\n\n"
                                f"Verdict: **{res.verdict}**\n\n"
                                + "".join(f"- {ch.line()}\n" for ch in res.checks)
                                + "\n" + res.table.markdown())
    (d / "result.json").write_text(json.dumps({
        "figure": fig, "title": f.title, "claim": f.claim, "verdict": res.verdict,
        "checks": [vars(ch) for ch in res.checks], "images": [str(p) for p in res.images],
        "table": {"header": res.table.header, "rows": res.table.rows},
        "table_md": res.table.markdown(), "numbers": res.numbers, "seconds": seconds,
        "preset": c.preset.name, "runs": {k: [str(p) for p in c.runs[k]]
                                          for k in figure_arms(fig, c.preset)}},
        indent=1, default=float))


def write_report(out: Path) -> Path:
    """``out/report.html`` from every ``fig*/result.json`` present."""
    from oneepoch.report.html import badge, esc, img, table, write_page

    results = []
    for fig in ORDER:
        p = out / f"fig{fig}" / "result.json"
        if p.exists():
            results.append(json.loads(p.read_text()))
    cls = {"reproduced": "no", "not reproduced": "yes", "mixed": ""}
    overview = "<table><tr><th>figure</th><th>claim</th><th>verdict</th></tr>" + "".join(
        f"<tr><td>Fig. {esc(r['figure'])}: {esc(r['title'])}</td><td>{esc(r['claim'])}</td>"
        f"<td>{esc(r['verdict'])}</td></tr>" for r in results) + "</table>"
    sections = [("Overview", overview + "<p>Verdicts are computed from the measured numbers by "
                 "the checks listed under each figure: <i>reproduced</i> when all pass, <i>not "
                 "reproduced</i> when none does, <i>mixed</i> otherwise.</p>")]
    for r in results:
        checks = "<ul>" + "".join(
            f"<li>{badge(ch['passed'])} {esc(ch['text'])}: <b>{esc(ch['numbers'])}</b>"
            "</li>" for ch in r["checks"]) + "</ul>"
        imgs = "".join(img(p, r["title"]) for p in r["images"] if Path(p).exists())
        t = r.get("table")
        tab = (table(t["header"], t["rows"]) if t  # a result.json of an older version: text
               else f"<pre>{esc(r.get('table_md', ''))}</pre>")
        body = (f"<p><b>Paper's claim:</b> {esc(r['claim'])}</p>"
                f"<div class='verdict {cls.get(r['verdict'], '')}'>verdict: {esc(r['verdict'])}"
                f"</div>{checks}{imgs}{tab}"
                f"<p>preset {esc(r['preset'])}; analysis written after {r['seconds']:.0f} s of "
                "training for this figure.</p>")
        sections.append((f"Fig. {r['figure']}: {r['title']}", body))
    return write_page(out / "report.html", "Paper A (Zhang et al., CIKM 2022): reproduction",
                      sections)


def prepare_data(args: ReproduceOptions, preset: Preset, out: Path) -> Path:
    """The data folder: ``--data`` or the built-in synthetic set under ``out/data``."""
    from oneepoch.recipes.demo import ensure_synthetic

    if args.data:
        return Path(args.data)
    path = out / "data"
    info = ensure_synthetic(path, preset.synth)
    print(f"data: {path} ({info['rows']['train']:,} train / {info['rows']['test']:,} test rows)",
          flush=True)
    return path


def setup(args: ReproduceOptions) -> tuple[Context, list[str]]:
    """The context of a reproduction (data made if needed) and the settings of every run."""
    if args.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {args.seeds}")
    preset = QUICK if args.quick else DEFAULT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args, preset, out)
    data = load_ctr(data_dir, ["train", "test"])
    base = [*preset.train, *args.overrides, f"data.path={data_dir}"]
    cfg = load_config(TrainConfig, None, base)  # fail early on a bad setting
    preset = replace(preset, min_drop=cfg.min_drop)
    fine = fine_fields(data)
    arms = build_arms(preset, fine)
    runs = {k: [out / "runs" / k / f"seed-{s}" for s in range(args.seeds)] for k in arms}
    return Context(preset, out, data, arms, runs, fine), base


def train_arms(args: ReproduceOptions, keys: Sequence[str]) -> None:
    """Train (or skip, when finished) the runs of some arms, e.g. ``["hash-0.0001"]``."""
    c, base = setup(args)
    unknown = [k for k in keys if k not in c.arms]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown} (known: {', '.join(c.arms)})")
    run_specs(_specs(c, list(keys), base, args.seeds), args.workers)


def reproduce(args: ReproduceOptions, train: bool = True) -> int:
    """Entry point of ``oneepoch reproduce zhang2022`` (see module doc).

    With ``train=False`` nothing is trained: each figure is analysed from the runs finished so
    far (an arm without any finished run makes its checks fail; ``n=`` in the numbers says how
    many seeds each arm had).
    """
    if args.table:
        raise ValueError("reproduce zhang2022: paper A's results are figures; use --figure")
    figs = parse_figures(args.figure)
    c, base = setup(args)
    t_all = time.time()
    for fig in figs:
        t0 = time.time()
        keys = figure_arms(fig, c.preset)
        if train:  # continuations (Fig. 17) run after the others, once base checkpoints exist
            run_specs(_specs(c, keys, base, args.seeds), args.workers)
        c.runs = {k: [d for d in v if is_finished(d)] if not train else v
                  for k, v in c.runs.items()}
        c.forget()
        res = FIGURES[fig].analyse(c, keys)
        _write_figure(c, fig, res, time.time() - t0)
        report = write_report(c.out)
        print(f"Fig. {fig} ({FIGURES[fig].title}): {res.verdict}  [{time.time() - t0:.0f} s]",
              flush=True)
        for ch in res.checks:
            print("   " + ch.line(), flush=True)
    print(f"report: {report}  [total {time.time() - t_all:.0f} s]")
    return 0
