"""A synthetic, production-like CTR world that shows the one-epoch phenomenon.

The hidden world (see ``docs/synthetic.md``): users and items have latent tastes; items belong
to skewed categories that carry part of their latent; item popularity is Zipfian over a random
permutation of item IDs; each item has a bias learnable only through its own ID (what tail
IDs overfit); users have a behaviour history drawn by popularity x affinity. Impressions pick
a user uniformly and an item by popularity; click ~ Bernoulli(sigmoid(logit)) with

    logit = affinity * u.v / sqrt(d) + pop_coef * log(relative popularity) + item_bias
            + scene_bias + offset

The fields are those of paper A's Table 1: user_age (10), user_gender (3), his_item_ID and
his_item_cate (sequences), item_ID, item_cate, scene_ID (19); plus ``user_id`` as the GAUC key
(not a feature: a sparse, label-informative user ID causes a drop of its own).

    >>> from oneepoch.data.synthetic import SynthConfig, write_synthetic
    >>> cfg = SynthConfig(n_train=20_000, n_test=5_000)
    >>> info = write_synthetic("/tmp/synth", cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from oneepoch.config import ConfigError, choice, from_dict, num
from oneepoch.data.schema import Feature, Schema
from oneepoch.io import atomic_dir
from oneepoch.metrics import auc


@dataclass
class SynthConfig:
    """Settings of the hidden world and of the sample (ranges checked by :meth:`from_dict`)."""

    n_users: int = num(100_000, ge=1)
    n_items: int = num(500_000, ge=1)
    n_cates: int = num(200, ge=1)
    n_scenes: int = num(19, ge=1)
    dim: int = num(8, ge=1)
    cate_share: float = num(0.7, ge=0, le=1)  # item latent = c * cate latent + sqrt(1-c^2) * own
    item_zipf: float = num(0.9, ge=0)
    cate_zipf: float = num(0.7, ge=0)
    affinity: float = num(2.0)
    pop_coef: float = num(0.3)
    item_bias_std: float = num(1.0, ge=0)
    scene_bias_std: float = num(0.3, ge=0)
    offset: float = num(-0.5)
    n_segments: int = num(30, ge=1)  # user_age x user_gender cells: nearest of these centroids
    hist_min: int = num(5, ge=0)
    hist_max: int = num(20, ge=1)
    hist_candidates: int = num(100, ge=1)
    n_train: int = num(400_000, ge=1)
    n_test: int = num(50_000, ge=1)
    seed: int = num(0, ge=0)

    def validate(self, prefix: str) -> None:
        if not self.hist_min <= self.hist_max <= self.hist_candidates:
            raise ConfigError(f"synthetic data: need {prefix}hist_min ({self.hist_min}) <= "
                              f"{prefix}hist_max ({self.hist_max}) <= {prefix}hist_candidates "
                              f"({self.hist_candidates})")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: SynthConfig | None = None) -> SynthConfig:
        """Settings from ``key: value`` pairs (e.g. parsed ``--set`` items) over ``base``
        (default: the defaults above): unknown keys (with a did-you-mean), values of the wrong
        type (``n_items=1e5`` is read as 100000) and out-of-range values are a
        :class:`~oneepoch.config.ConfigError`."""
        return from_dict(cls, d, base=base)


@dataclass
class World:
    """The hidden ground truth, shared by every sample drawn from it."""

    cfg: SynthConfig
    user_lat: np.ndarray  # [U, d]
    user_age: np.ndarray  # [U]
    user_gender: np.ndarray  # [U]
    item_lat: np.ndarray  # [I, d]
    item_cate: np.ndarray  # [I]
    item_pop: np.ndarray  # [I] probability of being drawn
    item_bias: np.ndarray  # [I]
    scene_bias: np.ndarray  # [S]
    hist: np.ndarray  # [U, hist_max] item IDs, left-aligned
    hist_len: np.ndarray  # [U]

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        u, v = self.user_lat[users], self.item_lat[items]
        return self.cfg.affinity * np.einsum("nd,nd->n", u, v) / math.sqrt(self.cfg.dim)

    def logit(self, users: np.ndarray, items: np.ndarray, scenes: np.ndarray) -> np.ndarray:
        c = self.cfg
        rel_pop = self.item_pop[items] * c.n_items
        return (self.affinity(users, items) + c.pop_coef * np.log(rel_pop)
                + self.item_bias[items] + self.scene_bias[scenes] + c.offset)


def _zipf_probs(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return (w / w.sum())[rng.permutation(n)]


def make_world(cfg: SynthConfig) -> World:
    """Draw the hidden world from ``cfg.seed`` (vectorised; ~1 s at the default size)."""
    rng = np.random.default_rng(cfg.seed)
    d = cfg.dim
    cate_lat = rng.standard_normal((cfg.n_cates, d))
    cate_p = _zipf_probs(cfg.n_cates, cfg.cate_zipf, rng)
    item_cate = rng.choice(cfg.n_cates, size=cfg.n_items, p=cate_p)
    own = rng.standard_normal((cfg.n_items, d))
    item_lat = cfg.cate_share * cate_lat[item_cate] + math.sqrt(1 - cfg.cate_share**2) * own
    item_pop = _zipf_probs(cfg.n_items, cfg.item_zipf, rng)
    item_bias = rng.normal(0, cfg.item_bias_std, cfg.n_items)
    scene_bias = rng.normal(0, cfg.scene_bias_std, cfg.n_scenes)
    user_lat = rng.standard_normal((cfg.n_users, d))
    centroids = rng.standard_normal((cfg.n_segments, d))
    seg = np.argmin(((user_lat[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    user_age, user_gender = seg % 10, (seg // 10) % 3

    # behaviour histories: candidates by popularity, kept by affinity (Gumbel top-k)
    hist = np.zeros((cfg.n_users, cfg.hist_max), dtype=np.int64)
    hist_len = rng.integers(cfg.hist_min, cfg.hist_max + 1, cfg.n_users)
    cdf = np.cumsum(item_pop)
    chunk = 20_000
    for a in range(0, cfg.n_users, chunk):
        b = min(a + chunk, cfg.n_users)
        cand = np.minimum(np.searchsorted(cdf, rng.random((b - a, cfg.hist_candidates))),
                          cfg.n_items - 1)
        score = cfg.affinity * np.einsum("ud,ucd->uc", user_lat[a:b], item_lat[cand]) / math.sqrt(d)
        score += rng.gumbel(size=score.shape)
        top = np.argsort(-score, axis=1)[:, : cfg.hist_max]
        hist[a:b] = np.take_along_axis(cand, top, axis=1)
    w = World(cfg, user_lat, user_age, user_gender, item_lat, item_cate, item_pop, item_bias,
              scene_bias, hist, hist_len)
    return w


def sample_impressions(world: World, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw ``n`` impressions: user uniform, item by popularity, scene uniform, click ~ truth."""
    c = world.cfg
    users = rng.integers(0, c.n_users, n)
    items = np.minimum(np.searchsorted(np.cumsum(world.item_pop), rng.random(n)), c.n_items - 1)
    scenes = rng.integers(0, c.n_scenes, n)
    p = 1.0 / (1.0 + np.exp(-world.logit(users, items, scenes)))
    label = (rng.random(n) < p).astype(np.int64)
    return {"user": users, "item": items, "scene": scenes, "p": p, "label": label}


def _list_column(values: np.ndarray, lens: np.ndarray) -> pa.Array:
    mask = np.arange(values.shape[1])[None, :] < lens[:, None]
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[mask]))


def impressions_table(world: World, imp: dict[str, np.ndarray]) -> pa.Table:
    """The impressions as a Parquet-ready table with paper A's seven fields."""
    u, i = imp["user"], imp["item"]
    hist, lens = world.hist[u], world.hist_len[u]
    return pa.table({
        "user_id": pa.array(u),
        "user_age": pa.array(world.user_age[u]),
        "user_gender": pa.array(world.user_gender[u]),
        "his_item_ID": _list_column(hist, lens),
        "his_item_cate": _list_column(world.item_cate[hist], lens),
        "item_ID": pa.array(i),
        "item_cate": pa.array(world.item_cate[i]),
        "scene_ID": pa.array(imp["scene"]),
        "label": pa.array(imp["label"]),
    })


def synthetic_schema(max_len: int) -> Schema:
    return Schema(
        format="ctr", name="synthetic", label="label", user_key="user_id",
        features=[
            Feature("user_age"), Feature("user_gender"),
            Feature("his_item_ID", "sequence", max_len, "item_ID"),
            Feature("his_item_cate", "sequence", max_len, "item_cate"),
            Feature("item_ID"), Feature("item_cate"), Feature("scene_ID"),
        ],
        splits={"train": ["train.parquet"], "test": ["test.parquet"]},
    )


def tail_share(counts: np.ndarray) -> float:
    """Share of occurrences held by the least frequent half of the IDs that occur."""
    c = np.sort(counts[counts > 0])
    return float(c[: len(c) // 2].sum() / max(c.sum(), 1))


def write_synthetic(out: str | Path, cfg: SynthConfig | None = None) -> dict[str, Any]:
    """Write ``train.parquet``, ``test.parquet``, ``schema.yaml`` and ``synth.json`` to ``out``.

    The folder is written to a temporary sibling and renamed into place, so a killed run
    never leaves a half-written data set. Returns the facts also stored in ``synth.json``
    (ground-truth AUC on test, the tail share of item IDs, ...).
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    world = make_world(cfg)
    rng = np.random.default_rng([cfg.seed, 1])
    train = sample_impressions(world, cfg.n_train, rng)
    test = sample_impressions(world, cfg.n_test, rng)  # the "next day": fresh impressions
    item_counts = np.bincount(train["item"], minlength=cfg.n_items)
    info = {
        "config": asdict(cfg),
        "rows": {"train": cfg.n_train, "test": cfg.n_test},
        "positive_rate": {"train": float(train["label"].mean()),
                          "test": float(test["label"].mean())},
        "ground_truth_auc_test": auc(test["label"], test["p"]),
        "item_ids_in_train": int((item_counts > 0).sum()),
        "item_tail_share": tail_share(item_counts),
        "test_items_unseen_in_train": float((item_counts[test["item"]] == 0).mean()),
    }
    with atomic_dir(out) as tmp:
        pq.write_table(impressions_table(world, train), tmp / "train.parquet")
        pq.write_table(impressions_table(world, test), tmp / "test.parquet")
        synthetic_schema(cfg.hist_max).save(tmp)
        (tmp / "synth.json").write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- multi-surface
# Paper B's setting: several surfaces (e.g. homefeed, related) show items of the SAME world to
# the same users, each with its own popularity skew and noise; an engagement log aggregated over
# all surfaces (positive pairs only) is much larger than any one surface's ranking data.


@dataclass
class SurfaceSpec:
    """One surface: how skewed its item exposure is and how noisy its clicks are.

    Exposure probability is ``item_pop ** (item_zipf / world.item_zipf)`` (the world's
    popularity order, re-skewed); clicks get ``noise`` x N(0, 1) extra logit noise.
    """

    name: str
    item_zipf: float = 0.9
    noise: float = 0.3


DEFAULT_SURFACES = {"homefeed": SurfaceSpec("homefeed", 0.9, 0.3),
                    "related": SurfaceSpec("related", 0.6, 0.6),
                    "search": SurfaceSpec("search", 1.1, 0.4)}


@dataclass
class SurfacesConfig:
    """A multi-surface sample of one world: per-surface CTR data and an engagement log.

    Each surface's CTR data has ``train`` (users uniform), ``valid`` and ``test`` splits (in
    requests of ``slate`` items per user, the user being the GAUC / Hit@K group).

    ``engagement_ratio`` x ``n_train`` engagements (clicks) are written for pre-training:
    the clicks of every surface's training impressions plus fresh clicks drawn on all the
    surfaces in turn; ``n_heldout`` further fresh clicks form its held-out split.
    """

    world: SynthConfig = field(default_factory=lambda: SynthConfig(
        n_users=10_000, n_items=20_000))
    surfaces: list[str] = choice(*DEFAULT_SURFACES, default=["homefeed", "related"])
    n_train: int = num(50_000, ge=1)  # ranking rows per surface (train split)
    n_valid: int = num(10_000, ge=1)
    n_test: int = num(10_000, ge=1)
    engagement_ratio: float = num(20.0, ge=0)
    n_heldout: int = num(20_000, ge=1)
    slate: int = num(10, ge=0)  # valid / test impressions: requests of this many items per user

    def validate(self, prefix: str) -> None:
        if not self.surfaces:
            raise ConfigError(f"config key '{prefix}surfaces': name at least one surface "
                              f"({', '.join(DEFAULT_SURFACES)})")


def surface_spec(name: str) -> SurfaceSpec:
    """The built-in :class:`SurfaceSpec` called ``name``."""
    if name not in DEFAULT_SURFACES:
        raise ValueError(f"surfaces: unknown surface {name!r} (built-in: "
                         f"{', '.join(DEFAULT_SURFACES)})")
    return DEFAULT_SURFACES[name]


def _surface_cdf(world: World, spec: SurfaceSpec) -> np.ndarray:
    w = world.item_pop ** (spec.item_zipf / max(world.cfg.item_zipf, 1e-9))
    return np.cumsum(w / w.sum())


def sample_surface(world: World, spec: SurfaceSpec, n: int, rng: np.random.Generator,
                   slate: int = 0) -> dict[str, np.ndarray]:
    """``n`` impressions on one surface: user uniform, item by the surface's exposure.

    With ``slate > 0`` impressions come in requests of ``slate`` items for one user (distinct
    users while there are enough), so per-request ranking metrics (Hit@K) can be computed.
    """
    c = world.cfg
    if slate > 0:
        k = -(-n // slate)
        who = rng.choice(c.n_users, k, replace=k > c.n_users)
        users = np.repeat(who, slate)[:n]
    else:
        users = rng.integers(0, c.n_users, n)
    items = np.minimum(np.searchsorted(_surface_cdf(world, spec), rng.random(n)), c.n_items - 1)
    scenes = rng.integers(0, c.n_scenes, n)
    logit = world.logit(users, items, scenes) + spec.noise * rng.standard_normal(n)
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < p).astype(np.int64)
    return {"user": users, "item": items, "scene": scenes, "p": p, "label": label}


def sample_engagements(world: World, specs: list[SurfaceSpec], n: int,
                       rng: np.random.Generator, chunk: int = 500_000) -> dict[str, np.ndarray]:
    """``n`` clicks (positive user-item pairs), an equal share drawn on each surface."""
    users, items, surf = [], [], []
    for j, spec in enumerate(specs):
        want = n // len(specs) + (j < n % len(specs))
        got = 0
        while got < want:
            imp = sample_surface(world, spec, min(chunk, 3 * (want - got) + 100), rng)
            keep = np.flatnonzero(imp["label"] == 1)[: want - got]
            users.append(imp["user"][keep])
            items.append(imp["item"][keep])
            surf.append(np.full(len(keep), j, dtype=np.int64))
            got += len(keep)
    return {"user": np.concatenate(users), "item": np.concatenate(items),
            "surface": np.concatenate(surf)}


def surface_ctr_table(world: World, imp: dict[str, np.ndarray]) -> pa.Table:
    """Paper A's fields plus ``user_ID`` (also the GAUC key), for one surface."""
    t = impressions_table(world, imp).drop_columns(["user_id"])
    return t.add_column(0, "user_ID", pa.array(imp["user"]))


def surface_schema(max_len: int, name: str) -> Schema:
    s = synthetic_schema(max_len)
    s.name, s.user_key = name, "user_ID"
    s.features = [Feature("user_ID"), *s.features]
    s.splits = {"train": ["train.parquet"], "valid": ["valid.parquet"], "test": ["test.parquet"]}
    return s


def engagement_schema() -> Schema:
    return Schema(format="engagements", name="engagements", user="user_id", item="item_id",
                  surface="surface", splits={"train": ["train.parquet"], "test": ["test.parquet"]})


def write_multisurface(out: str | Path, cfg: SurfacesConfig | None = None) -> dict[str, Any]:
    """Write ``out/engagements/`` (engagement log) and ``out/<surface>/`` (CTR data) atomically.

        >>> info = write_multisurface("/tmp/ms", SurfacesConfig(n_train=5_000))  # doctest: +SKIP
        >>> info["coverage"]["homefeed"]["tail_items_in_log"]                    # doctest: +SKIP

    Returns the facts also stored in ``out/synth.json``: rows, positive rates, ground-truth
    AUC per surface, and the log's coverage of each surface (engagements per downstream row,
    share of the downstream test's tail items, seen <= 2 times downstream, found in the log and
    their median count there).
    """
    cfg = cfg or SurfacesConfig()
    specs = [surface_spec(s) for s in cfg.surfaces]
    if not specs:
        raise ValueError("surfaces: name at least one surface")
    out = Path(out)
    world = make_world(cfg.world)
    rng = np.random.default_rng([cfg.world.seed, 2])
    n_items = cfg.world.n_items
    ctr: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for spec in specs:
        ctr[spec.name] = {split: sample_surface(world, spec, n, rng, 0 if split == "train"
                                                else cfg.slate)
                          for split, n in (("train", cfg.n_train), ("valid", cfg.n_valid),
                                           ("test", cfg.n_test))}
    # the log: every surface's training clicks + fresh clicks up to the ratio (no test pairs)
    parts = []
    for j, spec in enumerate(specs):
        tr = ctr[spec.name]["train"]
        keep = tr["label"] == 1
        parts.append({"user": tr["user"][keep], "item": tr["item"][keep],
                      "surface": np.full(int(keep.sum()), j, dtype=np.int64)})
    n_log = int(round(cfg.engagement_ratio * cfg.n_train))
    n_fresh = max(n_log - sum(len(p["user"]) for p in parts), 0)
    if n_fresh:
        parts.append(sample_engagements(world, specs, n_fresh, rng))
    log = {k: np.concatenate([p[k] for p in parts]) for k in ("user", "item", "surface")}
    perm = rng.permutation(len(log["user"]))
    log = {k: v[perm] for k, v in log.items()}
    held = sample_engagements(world, specs, cfg.n_heldout, rng)
    names = np.array([s.name for s in specs])
    log_counts = np.bincount(log["item"], minlength=n_items)
    info: dict[str, Any] = {"config": asdict(cfg), "surfaces": {}, "coverage": {},
                            "engagements": {"train": len(log["user"]), "test": cfg.n_heldout}}
    for spec in specs:
        d = ctr[spec.name]
        down = np.bincount(d["train"]["item"], minlength=n_items)
        test_items = d["test"]["item"]
        tail = test_items[down[test_items] <= 2]
        in_log = log_counts[tail] > 0
        info["surfaces"][spec.name] = {
            "rows": {k: len(v["label"]) for k, v in d.items()},
            "positive_rate": {k: float(v["label"].mean()) for k, v in d.items()},
            "ground_truth_auc_test": auc(d["test"]["label"], d["test"]["p"]),
        }
        info["coverage"][spec.name] = {
            "engagements_per_train_row": len(log["user"]) / cfg.n_train,
            "test_tail_share": float(len(tail) / max(len(test_items), 1)),
            "tail_items_in_log": float(in_log.mean()) if len(tail) else float("nan"),
            "tail_median_log_count": float(np.median(log_counts[tail])) if len(tail) else 0.0,
        }
    with atomic_dir(out) as tmp:
        for spec in specs:
            sd = tmp / spec.name
            sd.mkdir()
            for split, imp in ctr[spec.name].items():
                pq.write_table(surface_ctr_table(world, imp), sd / f"{split}.parquet")
            surface_schema(cfg.world.hist_max, spec.name).save(sd)
        ed = tmp / "engagements"
        ed.mkdir()
        for split, e in (("train", log), ("test", held)):
            pq.write_table(pa.table({"user_id": pa.array(e["user"]), "item_id": pa.array(e["item"]),
                                     "surface": pa.array(names[e["surface"]])}),
                           ed / f"{split}.parquet")
        engagement_schema().save(ed)
        (tmp / "synth.json").write_text(json.dumps(info, indent=1))
    return info
