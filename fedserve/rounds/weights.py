"""The heavy part of a round switch: aggregate updates and SWAG moments into new files.

These functions run outside any database transaction, because aggregating a large model
takes seconds and SQLite would block every writer meanwhile. Each writes to a path named
after the round and the claim (`attempt`), so a re-run never overwrites a file that a
committed switch refers to. The caller switches the row to the new paths.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator

import torch
from django.conf import settings

from fedserve import aggregation, modelfiles, modelstore
from fedserve.core.models import FileFormat, Model, Training
from fedserve.rounds.progress import local_updates, swag_statistics

logger = logging.getLogger(__name__)


# Formats whose file contains the module's code as well as its weights.
_MODULE_FORMATS = (FileFormat.TORCHSCRIPT, FileFormat.PICKLED_MODULE)


class NothingToAggregate(RuntimeError):
    """Raised when a claimed round has no update or statistic left to aggregate."""


@dataclasses.dataclass(frozen=True)
class AggregatedWeights:
    """The stored result of aggregating one round's updates."""

    path: str
    size: int
    update_ids: tuple[object, ...]


@dataclasses.dataclass(frozen=True)
class AveragedMoments:
    """The stored SWAG moments averaged over one round's statistics."""

    first_moment_path: str
    second_moment_path: str
    statistic_ids: tuple[object, ...]


def aggregate_updates(training: Training, round_number: int, attempt: str) -> AggregatedWeights:
    """Aggregate the participants' updates for `round_number` and store the new global model.

    Updates are weighted by their sample size and read one at a time.
    """
    model: Model = training.model
    updates = list(local_updates(training, round_number))
    if not updates:
        raise NothingToAggregate(
            f"training {training.pk} has no local model for round {round_number}"
        )

    module, global_state = _load_global(model)

    def weighted_updates() -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        for update in updates:
            state = _load_update(update)
            yield state, float(update.sample_size or 0)
            # Dropped before the next load, so that one update at a time is in memory.
            del state

    new_state = aggregation.aggregate(training.aggregation_method, global_state, weighted_updates())
    del global_state

    path = modelstore.model_file_path(model.pk, f"weights-round-{round_number + 1}-{attempt}.pt")
    stored = _store_global(model, module, new_state, path)
    logger.info(
        "training %s round %s: aggregated %d updates with %s into %s",
        training.pk,
        round_number,
        len(updates),
        training.aggregation_method,
        stored,
    )
    return AggregatedWeights(
        path=stored, size=modelstore.size(stored), update_ids=tuple(u.pk for u in updates)
    )


def _load_global(model: Model) -> tuple[torch.nn.Module | None, dict[str, torch.Tensor]]:
    """Load the global model's module (None for a weights-only format) and its state dict.

    The state dict shares memory with the module, so `_store_global` can write the module
    without loading the file a second time.
    """
    with modelstore.open_file(model.weights_path) as handle:
        if model.weights_format in _MODULE_FORMATS:
            module = modelfiles.load_module(handle, model.weights_format)
            return module, dict(module.state_dict())
        return None, modelfiles.load_state_dict(handle, model.weights_format)


def _load_update(update: Model) -> dict[str, torch.Tensor]:
    """Load a local update's state dict, memory-mapped when it is a local torch.save zip file.

    Mapping saves a copy of every update (see `modelfiles.map_state_dict`). The mapped data
    cannot change under the aggregation, because `modelstore.save` replaces a stored file
    by deleting it and creating a new one. Any other file, and one that cannot be mapped,
    goes through `modelfiles.load_state_dict`, which raises its usual errors.
    """
    path = modelstore.local_path(update.weights_path)
    if path is not None and update.weights_format == FileFormat.STATE_DICT:
        mapped = modelfiles.map_state_dict(path)
        if mapped is not None:
            return mapped
    with modelstore.open_file(update.weights_path) as handle:
        return modelfiles.load_state_dict(handle, update.weights_format or None)


def _store_global(
    model: Model,
    module: torch.nn.Module | None,
    state: dict[str, torch.Tensor],
    path: str,
) -> str:
    """Write the new global model in the format of the current one and store it at `path`.

    The file is spooled to a named temporary file, which a local store moves into place. A
    module is saved to the spool's path (see `modelfiles.save_module`).
    """
    spool = tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, suffix=".pt")  # noqa: SIM115
    # Closing it deletes the spool, unless a local store has moved it into place.
    with modelstore.SpooledFile(spool) as spooled:
        if module is not None:
            module.load_state_dict(state, strict=True)
            modelfiles.save_module(module, model.weights_format, spool.name)
        else:
            with modelstore.open_file(model.weights_path) as source:
                modelfiles.write_module_with_weights(source, model.weights_format, state, spool)
            spool.flush()
        spool.seek(0)
        return modelstore.save(path, spooled)


def average_moments(training: Training, round_number: int, attempt: str) -> AveragedMoments:
    """Average the participants' SWAG moments for `round_number`, weighted by sample size."""
    statistics = list(swag_statistics(training, round_number))
    if not statistics:
        raise NothingToAggregate(
            f"training {training.pk} has no SWAG statistic for round {round_number}"
        )

    def weighted_moments() -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        for statistic in statistics:
            with modelstore.open_file(statistic.first_moment_path) as handle:
                first = modelfiles.load_tensor(handle)
            with modelstore.open_file(statistic.second_moment_path) as handle:
                second = modelfiles.load_tensor(handle)
            yield first, second, float(statistic.sample_size)
            del first, second

    first, second = aggregation.average_swag_moments(weighted_moments())
    paths = []
    for name, tensor in (("first", first), ("second", second)):
        path = modelstore.model_file_path(
            training.model_id, f"swag-{name}-moment-round-{round_number}-{attempt}.pt"
        )
        with tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR) as spool:
            modelfiles.save_tensor(tensor, spool)
            spool.seek(0)
            paths.append(modelstore.save(path, spool))
    logger.info(
        "training %s round %s: averaged SWAG moments of %d participants",
        training.pk,
        round_number,
        len(statistics),
    )
    return AveragedMoments(
        first_moment_path=paths[0],
        second_moment_path=paths[1],
        statistic_ids=tuple(s.pk for s in statistics),
    )
