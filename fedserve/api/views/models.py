"""Placeholder views, replaced as the endpoints are built."""

from rest_framework.views import APIView


class ModelListCreate(APIView):
    pass


class ModelDetail(APIView):
    pass


class ModelMetadata(APIView):
    pass


class ModelMetrics(APIView):
    pass


class ModelPreprocessing(APIView):
    pass


class ModelSwag(APIView):
    pass


class TrainingModels(APIView):
    pass


class TrainingModelsLatest(APIView):
    pass
