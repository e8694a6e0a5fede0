"""Placeholder views, replaced as the endpoints are built."""

from rest_framework.views import APIView


class TrainingListCreate(APIView):
    pass


class TrainingDetail(APIView):
    pass


class TrainingClients(APIView):
    pass


class TrainingStart(APIView):
    pass
