"""URL map of the REST API, mounted below /api/."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from fedserve.api.views import (
    groups,
    inference,
    model_metadata,
    model_preprocessing,
    model_swag,
    models,
    notifications,
    trainings,
    users,
)

urlpatterns = [
    # Users and groups
    path("users/", users.UserListCreate.as_view(), name="users"),
    path("users/myself/", users.Myself.as_view(), name="users-myself"),
    path(
        "users/myself/notifications/",
        notifications.MyNotifications.as_view(),
        name="users-myself-notifications",
    ),
    path("users/groups/", users.MyGroups.as_view(), name="users-groups"),
    path("users/trainings/", users.MyTrainings.as_view(), name="users-trainings"),
    path("users/<uuid:id>/", users.UserDetail.as_view(), name="user-detail"),
    path("groups/", groups.GroupListCreate.as_view(), name="groups"),
    path("groups/<int:id>/", groups.GroupDetail.as_view(), name="group-detail"),
    # Models
    path("models/", models.ModelListCreate.as_view(), name="models"),
    path("models/<uuid:id>/", models.ModelDetail.as_view(), name="model-detail"),
    path(
        "models/<uuid:id>/metadata/", model_metadata.ModelMetadata.as_view(), name="model-metadata"
    ),
    path("models/<uuid:id>/metrics/", model_metadata.ModelMetrics.as_view(), name="model-metrics"),
    path(
        "models/<uuid:id>/preprocessing/",
        model_preprocessing.ModelPreprocessing.as_view(),
        name="model-preprocessing",
    ),
    path("models/<uuid:id>/swag/", model_swag.ModelSwag.as_view(), name="model-swag"),
    # Trainings
    path("trainings/", trainings.TrainingListCreate.as_view(), name="trainings"),
    path("trainings/<uuid:id>/", trainings.TrainingDetail.as_view(), name="training-detail"),
    path(
        "trainings/<uuid:id>/clients/",
        trainings.TrainingClients.as_view(),
        name="training-clients",
    ),
    path("trainings/<uuid:id>/start/", trainings.TrainingStart.as_view(), name="training-start"),
    path("trainings/<uuid:id>/models/", models.TrainingModels.as_view(), name="training-models"),
    path(
        "trainings/<uuid:id>/models/latest/",
        models.TrainingModelsLatest.as_view(),
        name="training-models-latest",
    ),
    # Inference
    path("inference/", inference.Inference.as_view(), name="inference"),
    # Schema pages: assets come from drf-spectacular-sidecar, so no internet access is needed.
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path(
        "schema/swagger-ui/",
        SpectacularSwaggerView.as_view(url_name="schema"),
        name="schema-swagger-ui",
    ),
    path(
        "schema/redoc/",
        SpectacularRedocView.as_view(url_name="schema", template_name="fedserve/redoc.html"),
        name="schema-redoc",
    ),
]
