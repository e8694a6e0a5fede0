from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "fedserve.core"
    label = "core"
    verbose_name = "fedserve"
    default_auto_field = "django.db.models.BigAutoField"
