"""deploy/: the Kubernetes overlays render offline and validate against the Kubernetes schemas,
their probes and grace period agree with the server's own timeouts, and the compose profile and
the prometheus-adapter rule name what the server really has."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from server.api.routes import health
from server.config import Settings
from server.metrics import Metrics
from tests.deploy.proxy import REPO_ROOT, check_config, write_config

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
# The oldest and the newest Kubernetes schemas that kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.25.0", "latest"]
UVICORN_BACKSTOP_S = 5  # server/__main__.py: timeout_graceful_shutdown = shutdown_timeout + 5


def render(kubectl: str, overlay: str) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def config_env(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap")["data"]


def container(objects: list[dict]) -> dict:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, kubectl) -> tuple[str, list[dict]]:
    return request.param, render(kubectl, request.param)


def test_every_object_validates(overlay):
    import kubernetes_validate.utils as kv

    name, objects = overlay
    assert {o["kind"] for o in objects} == {
        "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for version in KUBERNETES_VERSIONS:
        version = kv.latest_version() if version == "latest" else version
        for obj in objects:
            kv.validate(obj, version, strict=True)  # raises on any unknown or mistyped field


def test_settings_are_real_flags(overlay, monkeypatch):
    """Every FASB_* key is a Settings field with a valid value (a typo would be silently ignored)."""
    _, objects = overlay
    env = config_env(objects)
    fasb = {k: v for k, v in env.items() if k.startswith("FASB_")}
    unknown = {k for k in fasb if k.removeprefix("FASB_").lower() not in Settings.model_fields}
    assert not unknown, f"not server settings: {unknown}"
    for key, value in fasb.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.port == container(objects)["ports"][0]["containerPort"]


def test_probes_and_grace_period_fit_the_servers_timeouts(overlay):
    _, objects = overlay
    c = container(objects)
    settings = Settings(**{k.removeprefix("FASB_").lower(): v for k, v in config_env(objects).items()
                           if k.startswith("FASB_")})
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGKILL must not come before the drain and the server's own backstop are over.
    assert grace > int(pre_stop[1]) + settings.shutdown_timeout + UVICORN_BACKSTOP_S
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the first start converts weights
    assert {"/health", "/health/live", "/metrics"} <= {route.path for route in health.router.routes}


def test_selectors_and_targets_line_up(overlay):
    _, objects = overlay
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], one(objects, "Service")["spec"]["selector"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    configmap = one(objects, "ConfigMap")["metadata"]["name"]
    assert container(objects)["envFrom"] == [{"configMapRef": {"name": configmap}}]  # the hashed name


def test_overlays_pick_their_device(kubectl):
    cpu, gpu = render(kubectl, "cpu"), render(kubectl, "gpu")
    assert config_env(cpu)["FASB_DEVICE"] == "cpu" and container(cpu)["image"] == "fasb-server:cpu"
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert config_env(gpu)["FASB_DEVICE"] == "cuda" and container(gpu)["image"] == "fasb-server:cuda"
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_autoscaler_reads_a_metric_the_server_exports(overlay):
    _, objects = overlay
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    pods = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert [m["resource"]["name"] for m in hpa["metrics"] if m["type"] == "Resource"] == ["cpu"]  # the fallback
    exported = Metrics().render()[0].decode()
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    for name in pods:
        assert f"\n{name} " in exported, f"the server exports no {name}"
        assert any(rule["name"]["as"] == name and name in rule["seriesQuery"] for rule in adapter)


def test_nginx_config_passes_nginx_t(nginx, tmp_path):
    result = check_config(nginx, write_config(tmp_path, [18001, 18002, 18003], 18000))
    assert result.returncode == 0, result.stderr


def test_compose_scale_profile_points_nginx_at_the_replicas():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "profiles" not in services["fasb"] and services["fasb"]["ports"] == ["8000:8000"]  # default unchanged
    replica, lb = services["fasb-replica"], services["lb"]
    assert replica["profiles"] == lb["profiles"] == ["scale"] and "ports" not in replica
    conf_mount = next(v for v in lb["volumes"] if v.endswith(":/etc/nginx/conf.d/default.conf:ro"))
    conf = (REPO_ROOT / conf_mount.split(":")[0]).read_text()
    assert "server fasb-replica:8000 " in conf  # the upstream is the replica service's name and port
    assert lb["depends_on"]["fasb-replica"]["condition"] == "service_healthy"
    assert Path(REPO_ROOT / replica["build"]["dockerfile"]).exists()
