"""Paper B's stage 2 inside the CTR trainer: pre-trained ID rows (frozen or fine-tuned) and
the single-stage ("merged") contrastive term.

``init.embeddings=RUN/embeddings`` copies the export's user vectors into the rows of the
``init.user_fields`` vocabularies and its item vectors into the ``init.item_fields``
vocabularies (fields sharing a vocabulary, e.g. ``his_item_ID`` with ``item_ID``, share the
rows, so they are covered too), aligned by raw ID. IDs absent from the export keep their fresh
initialisation and train normally; the counts go to ``RUN/init.json``. Then, through the
row-wise optimizer's per-row learning-rate scale, the loaded rows are either never updated
(``init.mode=frozen``: bit-identical after training) or trained at ``init.lr_scale`` x the
embedding learning rate (``finetune``; paper B's feasibility study needed 0.1x: at full lr the
one-epoch peak comes back).

``single_stage.weight=L`` adds ``L x`` paper B's contrastive loss (in-batch + uniform
negatives, learned clamped temperature) over the clicked (user_ID, item_ID) pairs of each
batch, computed on the model's own ID rows.

    >>> from oneepoch.config import load_config, TrainConfig
    >>> cfg = load_config(TrainConfig, "ctr", ["init.embeddings=runs/pt/embeddings",
    ...                                        "init.mode=frozen", "model.emb_dim=64"])
    >>> [type(h).__name__ for h in hooks_for(cfg)]
    ['PretrainedInit']
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oneepoch.config import TrainConfig
from oneepoch.embeddings import load_embeddings
from oneepoch.io import atomic_write_json
from oneepoch.pretrain.losses import contrastive_loss, logq_correction
from oneepoch.training.hooks import Hook, State

MODES = ("frozen", "finetune")
COVERAGE_WARN = 0.9  # warn when fewer downstream IDs than this share are in the export


def _embedding(s: State, setting: str) -> Any:
    emb = getattr(s.model, "embedding", None)
    if emb is None or not hasattr(emb, "rows") or s.cfg.model.type != "dnn":
        raise ValueError(f"{setting}: needs the dnn model (model.type=dnn) with ID embeddings")
    return emb


def _field_vocab(s: State, setting: str, name: str) -> str:
    if name not in s.data.fields:
        raise ValueError(f"{setting}: field {name!r} is not in the data (fields: "
                         f"{s.data.fields}); excluded by data.exclude_fields?")
    return s.data.field_vocab(name)


class PretrainedInit(Hook):
    """Load pre-trained user / item rows at the start; freeze or slow them down."""

    applies = "init.embeddings"

    def __init__(self, cfg: TrainConfig) -> None:
        ic = cfg.init
        if ic.mode not in MODES:
            raise ValueError(f"init.mode: unknown mode {ic.mode!r} (choose {MODES})")
        if ic.mode == "finetune" and ic.lr_scale < 0:
            raise ValueError(f"init.lr_scale: must be >= 0, got {ic.lr_scale}")
        self.cfg = cfg
        self.report: dict[str, dict[str, int]] = {}
        self.export = load_embeddings(ic.embeddings)  # a bad export fails before training

    def _targets(self, s: State) -> dict[str, str]:
        """Vocabulary -> "user" / "item" table, after checking that the export fits."""
        ic = self.cfg.init
        emb = _embedding(s, "init.embeddings")
        if self.export.user.dim != emb.dim:
            raise ValueError(f"init.embeddings: {ic.embeddings} has dim {self.export.user.dim} "
                             f"but model.emb_dim is {emb.dim}: set "
                             f"model.emb_dim={self.export.user.dim}")
        targets: dict[str, str] = {}
        for kind, names in (("user", ic.user_fields), ("item", ic.item_fields)):
            for name in names:
                vname = _field_vocab(s, f"init.{kind}_fields", name)
                if targets.setdefault(vname, kind) != kind:
                    raise ValueError(f"init: vocabulary {vname!r} listed as both user and item")
        for vname in targets:
            if s.data.vocabs[vname].n_ids >= 0:
                raise ValueError(f"init.embeddings: vocabulary {vname!r} is hashed "
                                 "(data.sparsity=hash): raw IDs cannot be aligned")
        return targets

    def check(self, s: State) -> None:
        self._targets(s)

    def on_train_start(self, s: State) -> None:
        ic = self.cfg.init
        exp = self.export
        emb = _embedding(s, "init.embeddings")
        targets = self._targets(s)
        scale_vec = torch.ones(emb.table_rows, dtype=torch.float32)
        lr_scale = 0.0 if ic.mode == "frozen" else ic.lr_scale
        resumed = s.step > 0  # weights already come from the run's checkpoint
        for vname, kind in targets.items():
            vocab = s.data.vocabs[vname]
            table = exp.table(kind)
            start = emb.rows(vname).start + 1  # row 0 of the vocabulary = OOV: keep fresh
            found = table.rows_of(vocab.raw) > 0
            if not resumed:
                rep = table.init(emb.weight.data, vocab.raw, offset=start, scale=ic.scale)
                self.report[vname] = {"table": kind, "matched": rep.matched,  # type: ignore
                                      "unseen": rep.unseen, "rows": len(vocab.raw)}
                if len(vocab.raw) and rep.matched < COVERAGE_WARN * len(vocab.raw):
                    warnings.warn(f"init.embeddings: only {rep.matched:,} of {len(vocab.raw):,} "
                                  f"{vname} IDs ({100 * rep.matched / len(vocab.raw):.1f}%) occur "
                                  "in the pre-training log; two-stage needs a log that covers "
                                  "the downstream IDs (see docs/tame.md)", stacklevel=2)
            scale_vec[torch.from_numpy(np.flatnonzero(found) + start)] = lr_scale
        if lr_scale != 1.0:
            ro = s.optimizer.sparse.get("embedding.weight")
            if ro is None:
                raise ValueError("init.mode: the embedding table has no row-wise optimizer")
            ro.row_lr = scale_vec if ro.row_lr is None else ro.row_lr * scale_vec
        if self.report:
            atomic_write_json(s.run_dir / "init.json", {
                "embeddings": ic.embeddings, "mode": ic.mode, "lr_scale": lr_scale,
                "vocabularies": self.report})


class SingleStageContrastive(Hook):
    """Adds ``weight x`` the contrastive loss over the batch's clicked (user, item) pairs."""

    applies = "single_stage"

    def __init__(self, cfg: TrainConfig) -> None:
        sc = cfg.single_stage
        if not 0 < sc.tau_min <= sc.temperature <= sc.tau_max:
            raise ValueError(f"single_stage.temperature: need 0 < tau_min ({sc.tau_min}) <= "
                             f"temperature ({sc.temperature}) <= tau_max ({sc.tau_max})")
        if sc.n_uniform < 0:
            raise ValueError(f"single_stage.n_uniform: must be >= 0, got {sc.n_uniform}")
        self.cfg = cfg
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(sc.temperature)))
        self.opt = torch.optim.Adam([self.log_tau], lr=cfg.optim.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)

    def check(self, s: State) -> None:
        self.on_train_start(s)  # only reads the state

    def on_train_start(self, s: State) -> None:
        sc = self.cfg.single_stage
        emb = _embedding(s, "single_stage")
        uv = _field_vocab(s, "single_stage.user_field", sc.user_field)
        iv = _field_vocab(s, "single_stage.item_field", sc.item_field)
        for name in (sc.user_field, sc.item_field):
            if name not in s.data.single_fields:
                raise ValueError(f"single_stage: field {name!r} is a sequence; name a single-ID "
                                 "field")
        self.ucol = s.data.single_fields.index(sc.user_field)
        self.icol = s.data.single_fields.index(sc.item_field)
        self.uoff, self.ioff = emb.rows(uv).start, emb.rows(iv).start
        self.n_items = emb.vocab_sizes[iv]
        tr = s.data.splits[s.cfg.data.train_split]
        clicked = np.asarray(tr.ids[:, self.icol])[np.asarray(tr.label) > 0.5]
        q = np.bincount(clicked, minlength=self.n_items).astype(np.float64)
        self.q = torch.from_numpy(q / max(q.sum(), 1.0)).float()
        self.emb = emb

    def tau(self) -> torch.Tensor:
        sc = self.cfg.single_stage
        return self.log_tau.clamp(math.log(sc.tau_min), math.log(sc.tau_max)).exp()

    def on_loss(self, s: State, batch: Any, logits: torch.Tensor, loss: torch.Tensor
                ) -> torch.Tensor:
        sc = self.cfg.single_stage
        pos = batch.label > 0.5
        if int(pos.sum()) < 2:
            return loss
        ids = batch.ids[pos]
        u_rows = ids[:, self.ucol] + self.uoff
        i_loc = ids[:, self.icol]
        neg = torch.randint(1, self.n_items, (sc.n_uniform,), generator=self.gen)
        cand_loc = torch.cat([i_loc, neg])
        w = self.emb.weight
        u = F.embedding(u_rows, w, sparse=True)
        c = F.embedding(cand_loc + self.ioff, w, sparse=True)
        if sc.normalize:
            u, c = F.normalize(u, dim=-1), F.normalize(c, dim=-1)
        logq = (logq_correction(self.q[cand_loc], len(i_loc), sc.n_uniform, self.n_items)
                if sc.logq else None)
        cl = contrastive_loss(u, c, self.tau(), i_loc, cand_loc, logq, True, 1024)
        return loss + sc.weight * cl

    def after_step(self, s: State) -> None:
        self.opt.step()
        self.opt.zero_grad()
        sc = self.cfg.single_stage
        with torch.no_grad():
            self.log_tau.clamp_(math.log(sc.tau_min), math.log(sc.tau_max))

    def on_eval(self, s: State, row: dict[str, Any]) -> None:
        row["single_stage_tau"] = float(self.tau().detach())

    def state_dict(self) -> dict[str, Any]:
        """The learned temperature, its Adam state and the negative sampler's generator."""
        return {"log_tau": self.log_tau.detach().clone(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from oneepoch.training.checkpoint import restore_optim_keys

        with torch.no_grad():
            self.log_tau.copy_(state["log_tau"])
        self.opt.load_state_dict(restore_optim_keys(state["opt"]))
        self.gen.set_state(state["gen"])


def hooks_for(cfg: TrainConfig) -> list[Hook]:
    """The paper-B hooks ``cfg`` asks for (``init.embeddings``, ``single_stage.weight``)."""
    hooks: list[Hook] = []
    if cfg.init.embeddings:
        hooks.append(PretrainedInit(cfg))
    if cfg.single_stage.weight > 0:
        hooks.append(SingleStageContrastive(cfg))
    return hooks
