"""``loraplex bench serve``: a serving benchmark client (gRPC or the OpenAI gateway), no torch.

    loraplex bench serve --endpoint grpc://localhost:50051 --num-prompts 100 --request-rate 4
    python -m loraplex.clients.bench serve --endpoint http://localhost:8000/v1 ...

From Python: ``asyncio.run(bench_serve(build_parser().parse_args(["serve", ...])))`` returns the
result dict that ``--save-result`` writes. Imports grpc and the generated stubs; httpx only for
http:// endpoints and matplotlib only for ``--plot`` (both in the ``loraplex[bench]`` extra).
"""

from loraplex.clients.bench.cli import bench_serve, build_parser, main
from loraplex.clients.bench.errors import BenchError

__all__ = ["BenchError", "bench_serve", "build_parser", "main"]
