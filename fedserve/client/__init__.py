"""The fedserve participant SDK: talk to a fedserve server over HTTP.

It needs requests and PyTorch, not Django. A participant follows a training with
`Client.run`, which downloads each round's model, calls the participant's `train`,
`test` and `swag` functions and uploads what they return. An actor uses the same
`Client` to upload models and to create and start trainings.
"""

from fedserve.client._client import Client
from fedserve.client._errors import (
    AuthenticationError,
    ClientError,
    ConflictError,
    FedserveError,
    NotFoundError,
    PermissionDeniedError,
    ServerError,
    TransportError,
)
from fedserve.client._notifications import Notification, NotificationType
from fedserve.client._webhook import WebhookReceiver

__all__ = [
    "AuthenticationError",
    "Client",
    "ClientError",
    "ConflictError",
    "FedserveError",
    "NotFoundError",
    "Notification",
    "NotificationType",
    "PermissionDeniedError",
    "ServerError",
    "TransportError",
    "WebhookReceiver",
]
