"""The participant loop: follow one training's notifications and respond to each with an upload."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fedserve.client import _serialization
from fedserve.client._errors import ClientError, ConflictError, ServerError, TransportError
from fedserve.client._notifications import Notification, NotificationType
from fedserve.client._webhook import WebhookReceiver

if TYPE_CHECKING:
    import torch

    from fedserve.client._client import Client

logger = logging.getLogger("fedserve.client")

_ACTIONS = {
    NotificationType.UPDATE_ROUND_START,
    NotificationType.MODEL_TEST_ROUND,
    NotificationType.SWAG_ROUND_START,
}
_ENDINGS = {NotificationType.TRAINING_FINISHED, NotificationType.CLIENT_REMOVED}
MODES = ("poll", "webhook")
# Failures that remain after the transport's own retries but that a later attempt may not
# meet, because the server was unreachable or kept returning 5xx.
_TRANSIENT_ERRORS = (TransportError, ServerError)

TrainCallback = Callable[
    ["torch.nn.Module", int], tuple[Any, int, Mapping[str, float | str] | None]
]
TestCallback = Callable[["torch.nn.Module"], Mapping[str, float | str]]
SwagCallback = Callable[["torch.nn.Module", int], tuple["torch.Tensor", "torch.Tensor", int]]


class Participant:
    """One participant's side of one training.

    Delivery is at least once, so the loop drops a notification it has already handled
    and treats 409 (this update or these metrics are already stored) as done. When
    several notifications wait, only the newest one that requests work is acted on: a
    later round can only have started once the earlier one was over. Work that fails
    because the server is unreachable or returns 5xx is logged and tried again every
    `retry_wait` seconds, so the participant does not drop out of the round.
    """

    def __init__(
        self,
        client: Client,
        training_id: str,
        *,
        train: TrainCallback,
        test: TestCallback | None = None,
        swag: SwagCallback | None = None,
        update_format: str = _serialization.STATE_DICT,
    ) -> None:
        if update_format not in _serialization.UPDATE_FORMATS:
            raise ValueError(
                f"update_format must be 'state_dict' or 'torchscript', not {update_format!r}."
            )
        self.client = client
        self.training_id = str(training_id)
        self.train = train
        self.test = test
        self.swag = swag
        self.update_format = update_format
        self.rounds_trained: list[int] = []
        self._handled: set[tuple[str, str | None, int | None, str | None]] = set()
        # The newest TorchScript global model, the architecture for weights-only downloads.
        self._architecture: bytes | None = None
        self._global_model_id = ""
        self._retry_wait = 5.0
        # Work that failed with a transient error, to be tried again.
        self._unfinished: Notification | None = None
        # (notification key, update, sample size, metrics) of an update that `train` returned
        # but that is not uploaded yet, so that a retry sends it without training again.
        self._trained: tuple[Any, Any, int, Mapping[str, float | str] | None] | None = None

    def run(
        self,
        *,
        mode: str = "poll",
        receiver: WebhookReceiver | None = None,
        poll_wait: float = 25.0,
        idle_timeout: float | None = None,
        retry_wait: float = 5.0,
    ) -> Notification:
        """Handle notifications until the training finishes or this participant is removed."""
        if mode not in MODES:
            raise ValueError(f"mode must be 'poll' or 'webhook', not {mode!r}.")
        if not retry_wait > 0:
            raise ValueError(
                f"retry_wait must be a positive number of seconds, not {retry_wait!r}."
            )
        self._retry_wait = retry_wait
        training = self.client.get_training(self.training_id)
        self._check_callbacks(training)
        self._global_model_id = model_id_of(training)

        own_receiver: WebhookReceiver | None = None
        if mode == "webhook" and receiver is None:
            own_receiver = receiver = self._start_receiver()
        try:
            if mode == "webhook":
                assert receiver is not None
                batches = self._webhook_batches(receiver, idle_timeout)
            else:
                batches = self._poll_batches(poll_wait, idle_timeout)
            for batch in batches:
                ending = self._handle_batch(batch)
                if ending is not None:
                    return ending
        finally:
            if own_receiver is not None:
                own_receiver.stop()
        raise AssertionError("notification sources never end")  # pragma: no cover

    def _check_callbacks(self, training: Mapping[str, Any]) -> None:
        options = training.get("options") or {}
        if self.test is None and not options.get("skip_model_tests", False):
            raise ValueError(
                f"Training {self.training_id} runs test rounds, so pass test=, a function "
                "that returns a dict of metrics for a model."
            )
        if self.swag is None and training.get("uncertainty_method") == "SWAG":
            raise ValueError(
                f"Training {self.training_id} uses SWAG, so pass swag=, a function that "
                "returns (first_moment, second_moment, sample_size) for a model."
            )

    def _start_receiver(self) -> WebhookReceiver:
        endpoint = str(self.client.myself().get("message_endpoint") or "")
        if not endpoint:
            raise ValueError(
                "mode='webhook' needs the user's message_endpoint; register with "
                "message_endpoint=receiver.url and pass receiver=, or use mode='poll'."
            )
        port = urlsplit(endpoint).port or (443 if endpoint.startswith("https:") else 80)
        return WebhookReceiver("127.0.0.1", port).start()

    # Sources

    def _poll_batches(
        self, poll_wait: float, idle_timeout: float | None
    ) -> Iterator[list[Notification]]:
        after = 0
        backlog: list[Notification] = []
        # Read the whole stored backlog first, so that old rounds collapse into the newest.
        while True:
            page = self._fetch(after, 0)
            if not page:
                break
            backlog.extend(page)
            after = max(after, *(n.sequence or 0 for n in page))
        yield backlog

        last_seen = time.monotonic()
        while True:
            wait = poll_wait
            if self._unfinished is not None:
                wait = min(wait, self._retry_wait)
            if idle_timeout is not None:
                remaining = idle_timeout - (time.monotonic() - last_seen)
                if remaining <= 0:
                    raise TimeoutError(self._idle_message(idle_timeout))
                wait = min(wait, remaining)
            batch = self._fetch(after, wait)
            if batch:
                after = max(after, *(n.sequence or 0 for n in batch))
                if any(n.training_id == self.training_id for n in batch):
                    last_seen = time.monotonic()
            # An empty batch still goes out, so that unfinished work is tried again.
            yield batch

    def _fetch(self, after: int, wait: float) -> list[Notification]:
        """Read the feed after `after`; return no notifications, after a pause, if it fails."""
        try:
            return self.client.notifications(after=after, wait=wait)
        except _TRANSIENT_ERRORS as exc:
            logger.warning(
                "training %s: reading notifications failed (%s); trying again in %g s",
                self.training_id,
                exc,
                self._retry_wait,
            )
            time.sleep(self._retry_wait)
            return []

    def _webhook_batches(
        self, receiver: WebhookReceiver, idle_timeout: float | None
    ) -> Iterator[list[Notification]]:
        last_seen = time.monotonic()
        while True:
            timeout = None
            if idle_timeout is not None:
                timeout = max(idle_timeout - (time.monotonic() - last_seen), 0.0)
            if self._unfinished is not None:
                timeout = self._retry_wait if timeout is None else min(timeout, self._retry_wait)
            try:
                first = receiver.queue.get(timeout=timeout)
            except queue.Empty:
                if idle_timeout is not None and time.monotonic() - last_seen >= idle_timeout:
                    raise TimeoutError(self._idle_message(idle_timeout)) from None
                yield []
                continue
            last_seen = time.monotonic()
            batch = [first]
            while True:
                try:
                    batch.append(receiver.queue.get_nowait())
                except queue.Empty:
                    break
            yield batch

    def _idle_message(self, idle_timeout: float | None) -> str:
        return (
            f"No notification for training {self.training_id} arrived in {idle_timeout} s; "
            "check that the training was started and that this user takes part in it."
        )

    # Handling

    def _handle_batch(self, batch: list[Notification]) -> Notification | None:
        ours = [n for n in batch if n.training_id == self.training_id]
        if len(ours) < len(batch):
            logger.debug("ignored %d notifications of other trainings", len(batch) - len(ours))
        for notification in ours:
            if notification.type in _ENDINGS:
                logger.info("training %s: %s", self.training_id, str(notification.type).lower())
                return notification

        pending = [n for n in ours if n.type in _ACTIONS and n.key not in self._handled]
        if self._unfinished is not None and self._unfinished.key not in self._handled:
            pending.insert(0, self._unfinished)
        for notification in ours:
            if notification.type == NotificationType.TRAINING_START:
                logger.info("training %s started", self.training_id)
            elif notification.type not in _ACTIONS:
                logger.warning(
                    "training %s: ignored unknown notification %s",
                    self.training_id,
                    notification.type,
                )
        if not pending:
            return None
        newest = pending[-1]
        for notification in pending[:-1]:
            logger.info(
                "training %s: skipped %s for round %s, a newer notification is waiting",
                self.training_id,
                notification.type,
                notification.round,
            )
        self._unfinished = None
        try:
            self._handle(newest)
        except _TRANSIENT_ERRORS as exc:
            logger.error(
                "training %s: %s for round %s failed (%s); trying again in %g s",
                self.training_id,
                newest.type,
                newest.round,
                exc,
                self._retry_wait,
            )
            self._unfinished = newest
            self._handled.update(n.key for n in pending[:-1])
            return None
        self._handled.update(n.key for n in pending)
        return None

    def _handle(self, notification: Notification) -> None:
        try:
            if notification.type == NotificationType.UPDATE_ROUND_START:
                self._train_round(notification)
            elif notification.type == NotificationType.MODEL_TEST_ROUND:
                self._test_round(notification)
            elif notification.type == NotificationType.SWAG_ROUND_START:
                self._swag_round(notification)
        except ConflictError as exc:
            logger.info(
                "training %s: %s for round %s was already done (%s)",
                self.training_id,
                notification.type,
                notification.round,
                exc.message,
            )
        except ClientError as exc:
            if not self._is_stale(notification):
                raise
            logger.warning(
                "training %s: %s for round %s is out of date (%s); waiting for the next one",
                self.training_id,
                notification.type,
                notification.round,
                exc.message,
            )

    def _is_stale(self, notification: Notification) -> bool:
        """Tell whether the training has moved past the round a notification asked for."""
        training = self.client.get_training(self.training_id)
        if training.get("state") not in ("O", "S"):
            return True
        if notification.round is None:
            return False
        current = training.get("round")
        if current is None:
            # Servers without the `round` field in training details have it in the metadata.
            current = self.client.model_metadata(model_id_of(training)).get("round", 0)
        return int(current) > notification.round

    def _train_round(self, notification: Notification) -> None:
        model_id, round_number = self._require(notification)
        if self._trained is not None and self._trained[0] == notification.key:
            _, update, sample_size, metrics = self._trained
            logger.info(
                "training %s: uploading the update of round %s again",
                self.training_id,
                round_number,
            )
        else:
            model = self._load(model_id)
            logger.info("training %s: training round %s", self.training_id, round_number)
            update, sample_size, metrics = self.train(model, round_number)
            self._trained = (notification.key, update, sample_size, metrics)
        # In a FedDC daisy-chain round the notification names a peer's local model, but
        # every update belongs to the training's global model.
        self.client.upload_update(
            self._global_model_id,
            update,
            round=round_number,
            sample_size=sample_size,
            metrics=metrics or {},
            file_format=self.update_format,
        )
        self._trained = None
        self.rounds_trained.append(round_number)

    def _test_round(self, notification: Notification) -> None:
        model_id, round_number = self._require(notification)
        assert self.test is not None
        model = self._load(model_id)
        metrics = self.test(model)
        self.client.upload_metrics(model_id, metrics)
        logger.info(
            "training %s: reported test metrics for round %s", self.training_id, round_number
        )

    def _swag_round(self, notification: Notification) -> None:
        model_id, round_number = self._require(notification)
        assert self.swag is not None
        model = self._load(model_id)
        first_moment, second_moment, sample_size = self.swag(model, round_number)
        self.client.upload_swag(
            model_id, first_moment, second_moment, round=round_number, sample_size=sample_size
        )
        logger.info(
            "training %s: uploaded SWAG moments for round %s", self.training_id, round_number
        )

    def _require(self, notification: Notification) -> tuple[str, int]:
        if notification.model_id is None or notification.round is None:
            raise ValueError(
                f"The {notification.type} notification of training {self.training_id} lacks "
                f"round or global_model_uuid: {dict(notification.body)!r}."
            )
        return notification.model_id, notification.round

    def _load(self, model_id: str) -> torch.nn.Module:
        """Download a model; load weights-only files (FedDC) into the global architecture."""
        data = self.client.download_model(model_id)
        if _serialization.detect_format(data) == _serialization.TORCHSCRIPT:
            self._architecture = data
            return _serialization.load_module(data)
        if self._architecture is None:
            training = self.client.get_training(self.training_id)
            self._architecture = self.client.download_model(model_id_of(training))
        template = _serialization.load_module(self._architecture)
        return _serialization.load_model(data, template)


def model_id_of(training: Mapping[str, Any]) -> str:
    """Return the id of a training's global model, given as an id or as a nested object."""
    model = training["model"]
    return str(model["id"] if isinstance(model, Mapping) else model)
