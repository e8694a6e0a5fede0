"""Notifications: stored in order for pulling clients, and posted to webhooks with retries.

`send` is the entry point for the round life cycle. Importing this package registers the
delivery tasks.
"""

# isort: off
# `send` is bound before the task module is imported, because fedserve.rounds imports
# `send` from this package while the task module imports fedserve.rounds.
from fedserve.notify.outbox import DeliveryState, NotificationType, send
from fedserve.notify import tasks

# isort: on

__all__ = ["DeliveryState", "NotificationType", "send", "tasks"]
