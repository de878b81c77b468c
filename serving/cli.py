"""``recsys serve``: the REST recommendation service, registered into the ``recsys`` command through the
``recsys.commands`` entry point (pyproject.toml), so the training side never imports the service.

    recsys serve [--bundle DIR ... | --model-uri models:/recsys-sasrec@champion ...] [--port 8000]
"""

from __future__ import annotations

import sys


def cmd_serve(args) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.settings import IndexSettings, ServiceSettings

    index = IndexSettings(exact_max_items=args.exact_max_items, approximate=args.approximate_index)
    settings = ServiceSettings(bundles=args.bundle or [], model_uris=args.model_uri or [], index=index,
                               max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                               max_queue=args.max_queue)
    print(f"serving on http://{args.host}:{args.port} (OpenAPI at /docs)", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return 0


def add_serve_command(sub) -> None:
    serve = sub.add_parser("serve", help="REST recommendation service")
    serve.add_argument("--model-uri", action="append", help="models:/recsys-<model>@<alias> or /<version>; "
                       "repeatable; default (no --bundle either): the registry's champion from the last make eval")
    serve.add_argument("--bundle", action="append", help="a bundle directory; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=64, help="most queries per inference micro-batch")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="most queries waiting for a micro-batch; past it requests get 503 with Retry-After")
    serve.add_argument("--max-wait-ms", type=float, default=0.0, help="how long a micro-batch may wait to fill")
    serve.add_argument("--exact-max-items", type=int, default=100_000,
                       help="largest catalogue searched exactly; above it an approximate index tuned to recall@10 0.95")
    serve.add_argument("--approximate-index", choices=["ivf", "hnsw"], default="ivf")
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=cmd_serve)
