"""The chart's Kubernetes-stack parts, rendered with a real helm: the Grafana dashboard ConfigMap,
the model-server sidecar and InferencePool-ready labels, the examples beside the chart (their
selectors must match the pods the chart renders) and the image the Dockerfile builds."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.helm.test_chart import CHART, RELEASE, arg_value, cli_flags, find, flags_in, one, render, run_helm

ROOT = CHART.parents[1]
EXAMPLES = ROOT / "helm" / "examples"
MODEL_SERVER_VALUES = ("-f", str(EXAMPLES / "values-model-server.yaml"))


def backend_pod(docs) -> dict:
    return one(docs, "Deployment", "backend")["spec"]["template"]


def examples(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def test_dashboard_configmap_for_grafanas_sidecar() -> None:
    cm = one(render(), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["loraplex.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "loraplex.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Tokens per second", "Time to first token", "Inter-token latency", "Requests running and waiting",
                   "KV-cache usage", "Preemptions per second", "Adapter residency",
                   "Adapter loads and evictions per second", "Generation requests per backend"):
        assert wanted in titles, wanted
    off = render("--set", "grafanaDashboard.enabled=false", "--set", "grafanaDashboard.labels.x=y")
    assert not find(off, "ConfigMap")


def test_dashboard_queries_name_only_exported_families() -> None:
    exported = set(re.findall(r'"(loraplex_[a-z0-9_]+)"', (ROOT / "backend" / "metrics.py").read_text()))
    exported |= {f"loraplex_{n}" for n in re.findall(r'\("([a-z0-9_]+)", "', (ROOT / "backend" / "metrics.py").read_text())}
    exported |= set(re.findall(r'"(loraplex_gateway_[a-z0-9_]+)"', (ROOT / "gateway" / "metrics.py").read_text()))
    dashboard = json.loads((CHART / "dashboards" / "loraplex.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(loraplex_[a-z0-9_]+)", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert base in exported, (panel["title"], name)


def test_default_image_is_the_dockerfiles() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = one(render(), "Deployment", "backend")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"loraplex:{chart['appVersion']}"
    assert f"-t {image} ." in dockerfile  # the build command the Dockerfile documents
    assert re.search(r"^ARG CUDA_IMAGE=\S*nvidia/cuda:\S+-runtime-", dockerfile, re.M)
    assert re.search(r"^USER 10001", dockerfile, re.M)  # non-root
    assert 'ENTRYPOINT ["loraplex"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert "[server,gateway,gpu]" in dockerfile
    assert "tests" in (ROOT / ".dockerignore").read_text().split()


def test_model_server_sidecar_and_inferencepool_labels() -> None:
    assert "llm-d.ai/inferenceServing" not in backend_pod(render())["metadata"]["labels"]  # off by default
    docs = render(*MODEL_SERVER_VALUES)
    pod = backend_pod(docs)
    backend, sidecar = pod["spec"]["containers"]
    assert sidecar["name"] == "openai"
    args = sidecar["args"]
    assert args[0] == "gateway" and arg_value(args, "--backend") == ["127.0.0.1:50051"]
    assert arg_value(args, "--port") == ["8000"] and sidecar["ports"][0]["containerPort"] == 8000
    assert set(flags_in(args)) <= cli_flags("gateway")
    assert "--vllm-metrics" in backend["args"]
    assert set(flags_in(backend["args"])) <= cli_flags("serve")
    labels = pod["metadata"]["labels"]
    pool = next(d for d in examples("inferencepool.yaml") if d["kind"] == "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [sidecar["ports"][0]["containerPort"]]
    adapter = next(d for d in examples("aibrix-modeladapter.yaml") if d["kind"] == "ModelAdapter")
    assert adapter["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_inference_objective_points_at_the_pool() -> None:
    docs = examples("inferencepool.yaml")
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    objective = next(d for d in docs if d["kind"] == "InferenceObjective")
    assert objective["spec"]["poolRef"] == {"group": pool["apiVersion"].split("/")[0], "name": pool["metadata"]["name"]}
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_sidecar_refuses_the_flags_it_sets() -> None:
    r = run_helm("template", RELEASE, str(CHART), *MODEL_SERVER_VALUES, "--set",
                 "backend.modelServer.args.backend=x:1", check=False)
    assert r.returncode != 0 and "--backend is set by the chart" in r.stderr


@pytest.mark.parametrize("values", [(), MODEL_SERVER_VALUES])
def test_lint(values: tuple[str, ...]) -> None:
    run_helm("lint", "--strict", str(CHART), *values)
