"""Placeholder views, replaced as the endpoints are built."""

from rest_framework.views import APIView


class UserListCreate(APIView):
    pass


class Myself(APIView):
    pass


class MyGroups(APIView):
    pass


class MyTrainings(APIView):
    pass


class UserDetail(APIView):
    pass
