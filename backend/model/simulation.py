"""The model side of an active-learning simulation: fine-tune, score a pool, evaluate on a test set.

:class:`PoolLearner` follows :class:`backend.active_learning.simulate.Learner` (structurally: this
package does not import that one). It trains with the engine's one entry point,
:func:`backend.model.train.train` (a round after the first fine-tunes from the previous round's
checkpoint, with a fresh schedule, exactly as a worker's retrain fine-tunes from the serving
model), scores with :func:`backend.model.scores.score_images` and evaluates with the Predictor and
:func:`backend.model.metrics.evaluate_masks` (foreground mDice, the gate's metric).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.errors import InvalidInput
from backend.model.data import Pair, TrainData
from backend.model.train_config import TrainConfig

if TYPE_CHECKING:
    from backend.model.predict import Predictor
    from backend.model.scores import ImageScores

log = logging.getLogger(__name__)


class PoolLearner:
    """Pool and test pairs in memory, checkpoints under ``workdir``.

    ``config`` is the base training config (its ``seed`` and ``max_minutes`` are set per fit);
    ``initial`` an optional checkpoint every from-scratch fit starts from (its spec, class map
    included, is then the network; otherwise the config's preset and the planner choose).
    Picklable (the loaded predictor is a cache, dropped when pickled).
    """

    def __init__(
        self,
        pool: Sequence[Pair],
        test: Sequence[Pair],
        classes: Sequence[str],
        config: TrainConfig,
        workdir: Path,
        *,
        initial: Path | None = None,
        device: str = "cpu",
        batch_size: int = 4,
        keep_checkpoints: bool = False,
    ) -> None:
        if not pool or not test:
            raise InvalidInput("a simulation needs pool and test images")
        self.pool = list(pool)
        self.test = list(test)
        self.classes = tuple(classes)
        self.config = config
        self.workdir = Path(workdir)
        self.initial = initial
        self.device = device
        self.batch_size = batch_size
        self.keep_checkpoints = keep_checkpoints
        self._cached: tuple[Path, Predictor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cached"] = None
        return state

    @property
    def pool_size(self) -> int:
        return len(self.pool)

    def fit(self, labelled: Sequence[int], init: Path | None, *, seed: int, minutes: float, tag: str) -> Path:
        from backend.model.train import train

        data = TrainData(pairs=[self.pool[i] for i in labelled], classes=self.classes)
        config = self.config.replace(seed=seed, max_minutes=minutes)
        result = train(config, data, init_checkpoint=init or self.initial)
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{tag}.safetensors"
        result.save(path)
        log.info(
            "%s: %d labels, %d epochs in %.0f s (%s)",
            tag,
            len(labelled),
            result.epochs,
            result.elapsed_s,
            result.stop_reason,
        )
        return path

    def score(self, model: Path, images: Sequence[int]) -> list[ImageScores]:
        from backend.model.scores import score_images

        return score_images(self._predictor(model), [self.pool[i][0] for i in images])

    def evaluate(self, model: Path) -> float:
        from backend.model.metrics import evaluate_masks

        predictor = self._predictor(model)
        preds = [r.mask for r in predictor.predict([image for image, _ in self.test])]
        report = evaluate_masks(preds, [mask for _, mask in self.test], predictor.spec.class_names)
        return float(report.mDice)

    def release(self, model: Path) -> None:
        if self._cached is not None and self._cached[0] == model:
            self._cached = None
        if not self.keep_checkpoints:
            model.unlink(missing_ok=True)

    def _predictor(self, model: Path) -> Predictor:
        from backend.model.predict import PredictOptions, Predictor

        if self._cached is None or self._cached[0] != model:
            if self.config.num_threads:
                import torch

                torch.set_num_threads(self.config.num_threads)
            options = PredictOptions(batch_size=self.batch_size, mixed_precision=self.config.amp)
            self._cached = (model, Predictor.from_file(model, device=self.device, options=options))
        return self._cached[1]
