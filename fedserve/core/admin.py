from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from fedserve.core import models


@admin.register(models.User)
class FedserveUserAdmin(UserAdmin):
    fieldsets = (
        *(UserAdmin.fieldsets or ()),
        ("fedserve", {"fields": ("actor", "client", "message_endpoint")}),
    )
    list_display = ("username", "email", "actor", "client", "is_staff")


@admin.register(models.Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "name", "owner", "round", "created_at")
    list_filter = ("kind",)


@admin.register(models.Training)
class TrainingAdmin(admin.ModelAdmin):
    list_display = ("id", "actor", "state", "phase", "phase_round", "aggregation_method")
    list_filter = ("state",)


admin.site.register(models.Metric)
admin.site.register(models.Notification)
