"""Placeholder views, replaced as the endpoints are built."""

from rest_framework.views import APIView


class Inference(APIView):
    pass
