"""`diffprune serve --base MODEL --diffs DIR`: one base model, every task diff under DIR, one HTTP API.

    diffprune serve --base minilm --diffs runs/ --port 8000
    curl -s localhost:8000/v1/tasks/rte/predict -H 'content-type: application/json' \
        -d '{"inputs": [{"text": "A man is sleeping.", "text_pair": "Nobody sleeps."}]}'

The API is described in `diffprune.serve.app`. FastAPI and uvicorn are an optional extra, so the rest of
diffprune installs and imports without them.
"""
from __future__ import annotations

import argparse
import logging

from ..errors import DiffpruneError

INSTALL = "pip install 'diffprune[serve]'"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve every task diff under a folder over one base model (HTTP)")
    p.add_argument("--diffs", required=True, help="folder of task runs or diffs (one subfolder per task; the "
                                                  "folder name is the task's name in URLs)")
    p.add_argument("--base", help="base model: hub id, model folder or minilm (default: the diffs' base_model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="inputs per forward pass (default 32)")
    p.add_argument("--max-length", type=int, help="tokens per input (default: each diff's training max length)")
    p.add_argument("--max-inputs", type=int, default=256, help="inputs per request, more get 413 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise DiffpruneError(f"diffprune serve needs FastAPI and uvicorn ({exc.name} is missing): {INSTALL}") \
            from None
    if not 0 < args.port < 65536:
        raise DiffpruneError(f"--port must be in 1..65535, got {args.port}")
    import torch

    from ..serve.app import create_app
    from ..serve.service import load_service

    if args.threads is not None:
        if args.threads <= 0:
            raise DiffpruneError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = load_service(args.diffs, args.base, max_batch=args.max_batch, max_length=args.max_length,
                           max_inputs=args.max_inputs, max_body_bytes=args.max_body_bytes)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0
