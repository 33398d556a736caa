"""`diffprune serve`: many tasks over one resident base model behind an HTTP API.

- `service`: loading the base and the task diffs, input checks, the per-task batching worker (no web
  framework needed, so the core imports without FastAPI).
- `app`: the FastAPI routes (`pip install 'diffprune[serve]'`).
"""
from .service import Batcher, RequestError, Service, Task, load_service

__all__ = ["Batcher", "RequestError", "Service", "Task", "load_service"]
