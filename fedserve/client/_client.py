"""The `Client`: one authenticated user of a fedserve server."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import requests

from fedserve.client import _serialization
from fedserve.client._http import FileField, Transport
from fedserve.client._notifications import Notification

if TYPE_CHECKING:
    import torch

    from fedserve.client._webhook import WebhookReceiver

logger = logging.getLogger("fedserve.client")

DEFAULT_TIMEOUT = 30.0


class Client:
    """A user of a fedserve server: actor calls, participant calls and the participant loop.

    Authenticate with `token`, or with `username` and `password` (HTTP Basic). Every call
    retries network failures and 5xx responses with exponential backoff (`retries` times)
    and raises a FedserveError subclass when it finally fails. `timeout` is in seconds per
    request; long polls add their wait time to it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 4,
        backoff: float = 0.5,
        session: requests.Session | None = None,
    ) -> None:
        self._transport = Transport(
            base_url,
            token=token,
            username=username,
            password=password,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            session=session,
        )
        self.token = token

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    @classmethod
    def register(
        cls,
        base_url: str,
        username: str,
        password: str,
        *,
        actor: bool = False,
        client: bool = True,
        message_endpoint: str = "",
        email: str = "",
        first_name: str = "",
        last_name: str = "",
        **options: Any,
    ) -> Client:
        """Register a new user and return a Client authenticated with its token.

        `message_endpoint` is the URL that receives the user's notifications; leave it
        empty for a participant that pulls them. `options` go to the Client constructor.
        """
        transport = Transport(base_url, timeout=options.get("timeout", DEFAULT_TIMEOUT))
        try:
            response = transport.request(
                "POST",
                "users/",
                json={
                    "username": username,
                    "password": password,
                    "actor": actor,
                    "client": client,
                    "message_endpoint": message_endpoint,
                    "email": email,
                    "first_name": first_name,
                    "last_name": last_name,
                },
                authenticate=False,
            )
        finally:
            transport.close()
        user = response.json()
        logger.info("registered user %s (%s)", user.get("id"), username)
        return cls(base_url, token=user["token"], **options)

    # Users

    def myself(self) -> dict[str, Any]:
        """Return the caller's user record, including its id and token."""
        user: dict[str, Any] = self._get_json("users/myself/")
        return user

    def get_user(self, user_id: str) -> dict[str, Any]:
        user: dict[str, Any] = self._get_json(f"users/{user_id}/")
        return user

    def my_trainings(self) -> list[dict[str, Any]]:
        """Return the trainings in which the caller is actor or participant."""
        trainings: list[dict[str, Any]] = self._get_json("users/trainings/")
        return trainings

    # Models

    def upload_model(
        self,
        model: torch.nn.Module | bytes | str | os.PathLike[str],
        *,
        name: str,
        description: str = "",
        input_shape: Sequence[int | None] | None = None,
        preprocessing: torch.nn.Module | bytes | str | os.PathLike[str] | None = None,
        kind: str = "GLOBAL",
    ) -> str:
        """Upload a global model and return its id.

        `model` is an nn.Module (scripted with torch.jit.script), the bytes of a model
        file, or a path to one. `input_shape` uses None for a free dimension such as the
        batch.
        """
        data: dict[str, Any] = {
            "name": name,
            "description": description or name,
            "type": kind,
        }
        if input_shape is not None:
            data["input_shape"] = ["None" if size is None else str(size) for size in input_shape]
        files: dict[str, FileField] = {
            "model_file": ("model.pt", _file_bytes(model), "application/octet-stream")
        }
        if preprocessing is not None:
            files["model_preprocessing_file"] = (
                "preprocessing.pt",
                _file_bytes(preprocessing),
                "application/octet-stream",
            )
        response = self._transport.request("POST", "models/", data=data, files=files)
        model_id = str(response.json()["model_id"])
        logger.info("uploaded global model %s (%s)", model_id, name)
        return model_id

    def create_mean_model(
        self, model_ids: Iterable[str], *, name: str, description: str = ""
    ) -> str:
        """Create a MEAN model, an ensemble of global models the caller owns; return its id."""
        response = self._transport.request(
            "POST",
            "models/",
            json={
                "name": name,
                "description": description or name,
                "type": "MEAN",
                "models": [str(model_id) for model_id in model_ids],
            },
        )
        return str(response.json()["model_id"])

    def download_model(self, model_id: str) -> bytes:
        """Return the bytes of a model file (a global model or a local update)."""
        return self._transport.request("GET", f"models/{model_id}/").content

    def load_model(
        self, model_id: str, *, template: torch.nn.Module | None = None
    ) -> torch.nn.Module:
        """Download a model and load it: TorchScript directly, weights into `template`."""
        return _serialization.load_model(self.download_model(model_id), template)

    def model_metadata(self, model_id: str) -> dict[str, Any]:
        metadata: dict[str, Any] = self._get_json(f"models/{model_id}/metadata/")
        return metadata

    def model_metrics(self, model_id: str) -> list[dict[str, Any]]:
        metrics: list[dict[str, Any]] = self._get_json(f"models/{model_id}/metrics/")
        return metrics

    def delete_model(self, model_id: str) -> None:
        self._transport.request("DELETE", f"models/{model_id}/")

    def upload_update(
        self,
        model_id: str,
        update: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        round: int,
        sample_size: int,
        metrics: Mapping[str, float | str] | None = None,
        file_format: str = _serialization.STATE_DICT,
    ) -> None:
        """Upload a local update of a global model for one round.

        `update` is the trained module or its state dict. It travels as a weights-only
        torch.save file by default; `file_format="torchscript"` sends a TorchScript
        archive instead, for servers that predate weights-only updates.
        """
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive integer, not {sample_size!r}.")
        data: dict[str, Any] = {"round": str(round), "sample_size": str(sample_size)}
        data.update(_metric_fields(metrics or {}))
        payload = _serialization.update_bytes(update, file_format)
        files = {"model_file": ("update.pt", payload, "application/octet-stream")}
        self._transport.request(
            "POST", f"models/{model_id}/", data=data, files=files, conflict_after_retry_ok=True
        )
        logger.info("uploaded update of model %s for round %s", model_id, round)

    def upload_metrics(self, model_id: str, metrics: Mapping[str, float | str]) -> None:
        """Report test metrics of a model; the server files them under the model's round."""
        self._transport.request("POST", f"models/{model_id}/metrics/", data=_metric_fields(metrics))

    def upload_swag(
        self,
        model_id: str,
        first_moment: torch.Tensor,
        second_moment: torch.Tensor,
        *,
        round: int,
        sample_size: int,
    ) -> None:
        """Upload SWAG moments: the mean and the mean of squares of the flattened parameters."""
        files = {
            "first_moment_file": (
                "first_moment.pt",
                _serialization.save_tensor(first_moment.flatten()),
                "application/octet-stream",
            ),
            "second_moment_file": (
                "second_moment.pt",
                _serialization.save_tensor(second_moment.flatten()),
                "application/octet-stream",
            ),
        }
        data = {"round": str(round), "sample_size": str(sample_size)}
        self._transport.request(
            "POST", f"models/{model_id}/swag/", data=data, files=files, conflict_after_retry_ok=True
        )

    # Trainings

    def create_training(
        self,
        model_id: str,
        *,
        clients: Iterable[str],
        target_num_updates: int,
        aggregation_method: str = "FedAvg",
        uncertainty_method: str = "NONE",
        metric_names: Iterable[str] = (),
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Create a training of a global model with the given participants; return its id."""
        response = self._transport.request(
            "POST",
            "trainings/",
            json={
                "model_id": str(model_id),
                "clients": [str(client) for client in clients],
                "target_num_updates": target_num_updates,
                "aggregation_method": aggregation_method,
                "uncertainty_method": uncertainty_method,
                "metric_names": list(metric_names),
                "options": dict(options or {}),
            },
        )
        training_id = str(response.json()["training_id"])
        logger.info("created training %s of model %s", training_id, model_id)
        return training_id

    def add_participants(self, training_id: str, client_ids: Iterable[str]) -> None:
        self._transport.request(
            "PUT", f"trainings/{training_id}/clients/", json={"clients": list(client_ids)}
        )

    def remove_participants(self, training_id: str, client_ids: Iterable[str]) -> None:
        self._transport.request(
            "DELETE", f"trainings/{training_id}/clients/", json={"clients": list(client_ids)}
        )

    def start_training(self, training_id: str) -> None:
        self._transport.request("POST", f"trainings/{training_id}/start/")
        logger.info("started training %s", training_id)

    def get_training(self, training_id: str) -> dict[str, Any]:
        """Return the training's fields, including `state` and the global model's id."""
        training: dict[str, Any] = self._get_json(f"trainings/{training_id}/")
        return training

    def delete_training(self, training_id: str) -> None:
        self._transport.request("DELETE", f"trainings/{training_id}/")

    # Notifications and inference

    def notifications(self, *, after: int = 0, wait: float = 0) -> list[Notification]:
        """Return the caller's stored notifications with a sequence number above `after`.

        With `wait` > 0 the server keeps the request open up to that many seconds until one
        arrives (long polling); an empty list means none arrived in time.
        """
        response = self._transport.request(
            "GET",
            "users/myself/notifications/",
            params={"after": after, "wait": wait},
            timeout=self._transport.timeout + wait,
        )
        return _parse_feed(response.json())

    def infer(
        self,
        model_id: str,
        inputs: Any,
        *,
        return_format: str = "json",
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Run inference; `inputs` is a tensor or a nested list of numbers.

        Returns the JSON response: `inference` and, for uncertainty methods, `uncertainty`.
        A `seed` makes the server's MC-dropout masks and SWAG samples repeatable.
        """
        if hasattr(inputs, "tolist"):
            inputs = inputs.tolist()
        body: dict[str, Any] = {
            "model_id": str(model_id),
            "model_input": inputs,
            "return_format": return_format,
        }
        if seed is not None:
            body["seed"] = seed
        response = self._transport.request("POST", "inference/", json=body)
        answer: dict[str, Any] = response.json()
        return answer

    # The participant loop

    def run(
        self,
        training_id: str,
        *,
        train: Callable[[torch.nn.Module, int], tuple[Any, int, Mapping[str, float | str]]],
        test: Callable[[torch.nn.Module], Mapping[str, float | str]] | None = None,
        swag: Callable[[torch.nn.Module, int], tuple[torch.Tensor, torch.Tensor, int]]
        | None = None,
        mode: str = "poll",
        receiver: WebhookReceiver | None = None,
        poll_wait: float = 25.0,
        update_format: str = _serialization.STATE_DICT,
        idle_timeout: float | None = None,
        retry_wait: float = 5.0,
    ) -> Notification:
        """Take part in a training until it finishes or this participant is removed.

        `train(model, round)` returns `(state_dict_or_module, sample_size, metrics)`,
        `test(model)` returns a dict of metrics and `swag(model, round)` returns
        `(first_moment, second_moment, sample_size)` of the flattened parameters. With
        `mode="poll"` the loop long-polls the notification feed. With `mode="webhook"` it
        reads notifications from `receiver`, or starts a receiver on 127.0.0.1 at the
        port of the user's `message_endpoint`. Returns the TRAINING_FINISHED or
        CLIENT_REMOVED notification. `idle_timeout` (seconds without a notification
        for this training) raises TimeoutError; None waits for ever. Work that fails after
        every retry because the server is unreachable or returns 5xx is tried again every
        `retry_wait` seconds.
        """
        from fedserve.client._participant import Participant

        participant = Participant(
            self,
            training_id,
            train=train,
            test=test,
            swag=swag,
            update_format=update_format,
        )
        return participant.run(
            mode=mode,
            receiver=receiver,
            poll_wait=poll_wait,
            idle_timeout=idle_timeout,
            retry_wait=retry_wait,
        )

    # Plumbing

    def _get_json(self, path: str) -> Any:
        return self._transport.request("GET", path).json()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"


def _file_bytes(source: Any) -> bytes:
    if isinstance(source, str | os.PathLike):
        return Path(source).read_bytes()
    return _serialization.module_bytes(source)


def _metric_fields(metrics: Mapping[str, float | str]) -> dict[str, list[str]]:
    names = [str(name) for name in metrics]
    values = [str(float(v)) if isinstance(v, int | float) else str(v) for v in metrics.values()]
    return {"metric_names": names, "metric_values": values}


def _parse_feed(payload: Any) -> list[Notification]:
    """Parse the pull feed's response: a list of notifications, each with its sequence number."""
    if not isinstance(payload, list):
        raise ValueError(f"The notification feed returned {payload!r}, not a list.")
    notifications = [Notification.from_json(item, int(item["seq"])) for item in payload]
    return sorted(notifications, key=lambda n: n.sequence or 0)
