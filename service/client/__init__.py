"""Python client of the cvserve server's ``cvserve.v1`` API.

Needs grpcio, protobuf and numpy only (no torch, detectron2, OpenCV or Pillow), so it is
also shipped alone as the ``cvserve-client`` distribution::

    from cvserve.client import Client

    with Client("localhost:8001", timeout=10) as client:
        prediction = client.detect(image_bytes, model="shapes-maskrcnn")
"""

from cvserve.client.client import AsyncClient, Client
from cvserve.client.messages import ClientError, Image, model_to_dict
from cvserve.models.types import Instance, Mask, Prediction, SemanticMap, Task

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "Image",
    "Instance",
    "Mask",
    "Prediction",
    "SemanticMap",
    "Task",
    "model_to_dict",
]
