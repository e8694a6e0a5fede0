from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "fedserve.core"
    label = "core"
    verbose_name = "fedserve"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Task modules register their tasks and periodic schedules on import. Servers and
        # Celery workers both need the full registry before any task is sent or received.
        from fedserve import tasks

        tasks.import_task_modules()
