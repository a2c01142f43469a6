"""The monitor as a Lightning callback (``pip install "oneepoch[lightning]"``).

    >>> from oneepoch.integrations.lightning import OneEpochCallback          # doctest: +SKIP
    >>> cb = OneEpochCallback("runs/lit", eval_sets={"test": test_batches},    # doctest: +SKIP
    ...                       adapter=lambda b: b["x"], patience=5)
    >>> Trainer(max_epochs=3, callbacks=[cb]).fit(module, train_loader)        # doctest: +SKIP
    >>> cb.monitor.verdict().line()                                            # doctest: +SKIP

Each optimizer step of ``fit`` is one :meth:`~oneepoch.monitor.Monitor.step` (the loss taken
from ``training_step``'s output); steps per epoch come from the trainer
(``num_training_batches`` / ``accumulate_grad_batches``) and epochs from ``max_epochs``. When
early stopping fires, ``trainer.should_stop`` is set; at the end of ``fit`` the run folder is
written (metrics, summary with the verdict, report) and, with ``restore_best=True``, the best
point's weights are loaded back into the module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError:
        raise ImportError('oneepoch.integrations.lightning needs Lightning: pip install '
                          '"oneepoch[lightning]"') from None

from oneepoch.monitor import Monitor


class OneEpochCallback(Callback):
    """Runs a :class:`~oneepoch.monitor.Monitor` inside ``Trainer.fit``.

    Args:
        run_dir, eval_sets: as for :class:`~oneepoch.monitor.Monitor`.
        restore_best: load the best point's weights into the module when ``fit`` ends.
        **monitor_kw: any other setting of the monitor (``adapter``, ``predict``, ``output``,
            ``per_epoch``, ``patience``, ``select_on``, ``keep_best``, ``tracking``, ...).
    """

    def __init__(self, run_dir: str | Path, eval_sets: Mapping[str, Iterable[Any]] | Iterable[Any],
                 restore_best: bool = False, **monitor_kw: Any) -> None:
        super().__init__()
        self.run_dir, self.eval_sets, self.kw = Path(run_dir), eval_sets, monitor_kw
        self.restore_best = restore_best
        self.monitor: Monitor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        spe = max(1, int(trainer.num_training_batches) // accumulate)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        kw = {"model": pl_module, "epochs": epochs, **self.kw}
        self.monitor = Monitor(self.run_dir, spe, self.eval_sets, **kw)
        self._accumulate, self._seen = accumulate, 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is None:
            return
        self._seen += 1
        if self._seen % self._accumulate:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.monitor.step(loss):
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            return
        if self.restore_best and self.monitor.keep_best != "none":
            self.monitor.restore_best(pl_module)
        self.monitor.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()
