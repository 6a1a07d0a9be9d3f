"""deploy/: the kustomize overlays render, every manifest validates against pinned Kubernetes
schemas, the gateway's ConfigMap loads with the gateway's own loader and agrees with the
manifests around it, and the compose file parses and its config loads.

Rendering uses kustomize itself, as kubectl embeds it (`kubectl kustomize`; kubectl 1.32 carries
kustomize v5.5 on the project's machines). Schemas: the `kubernetes-validate` wheel (pinned in
pyproject.toml), which ships every Kubernetes release's JSON schemas and validates offline; the
manifests are held to KUBERNETES_VERSION's strict schemas (unknown fields are errors). Compose:
the `compose-spec` wheel (pinned), the Rust compose_spec crate's validating parser (no Docker
engine or `docker compose` runs here).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from gateway.config import GatewayConfig, config_from_mapping, load_config
from gateway.upstream.config import parse_address

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu-only", "gpu", "dev")
KUBERNETES_VERSION = "1.32.0"
KUBECTL = shutil.which("kubectl")
NAMESPACE = "models"


def render(directory: Path) -> list[dict]:
    assert KUBECTL, "kubectl (with its built-in kustomize) is needed: `make test-tools` says how to install it"
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize failed on {directory.relative_to(ROOT)}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def find(resources: list[dict], kind: str, name: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def find_prefixed(resources: list[dict], kind: str, prefix: str) -> dict:
    """A generated resource: kustomize appends a content hash to its name."""
    matches = [r for r in resources if r["kind"] == kind and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", r["metadata"]["name"])]
    assert len(matches) == 1, f"expected one generated {kind} {prefix}-<hash>, found {len(matches)}"
    return matches[0]


def container(deployment: dict, name: str) -> dict:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def gateway_config(resources: list[dict]) -> GatewayConfig:
    config_map = find_prefixed(resources, "ConfigMap", "tensorgate-config")
    return config_from_mapping(yaml.safe_load(config_map["data"]["gateway.yaml"]))


# ---- schemas ------------------------------------------------------------------------------------


def validate_all(resources: list[dict]) -> None:
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{resource['kind']} {resource['metadata']['name']}: {error.message} "
                                 f"at {'.'.join(map(str, error.path))}") from None


def test_every_rendered_manifest_validates(overlay):
    name, resources = overlay
    validate_all(resources)
    assert all(r["metadata"].get("namespace") == NAMESPACE for r in resources if r["kind"] != "Namespace"), name


def test_base_renders_and_validates():
    validate_all(render(K8S / "base"))


def test_the_schemas_are_strict():
    """A misspelled field is an error, so the check above means something."""
    deployment = copy.deepcopy(find(render(K8S / "overlays" / "cpu-only"), "Deployment", "tensorgate"))
    container(deployment, "gateway")["readinesProbe"] = container(deployment, "gateway").pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(find(render(K8S / "overlays" / "cpu-only"), "Deployment", "tensorgate"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# ---- the gateway: config, probes, grace, scaling ---------------------------------------------------


def test_configmap_loads_with_the_gateways_loader(overlay, tmp_path):
    _, resources = overlay
    config_map = find_prefixed(resources, "ConfigMap", "tensorgate-config")
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"])
    config = load_config(path)  # the loader `tensorgate serve --config` uses
    assert config.pools and all(pool.dns for pool in config.pools.values())

    gateway = find(resources, "Deployment", "tensorgate")
    pod = gateway["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    (mount,) = [m for m in container(gateway, "gateway")["volumeMounts"] if m["name"] == volume["name"]]
    args = container(gateway, "gateway")["args"]
    assert args[args.index("--config") + 1] == f"{mount['mountPath']}/gateway.yaml"


def test_every_pool_names_a_headless_service_of_tritons(overlay):
    """Each pool's `dns:` is a headless Service of this namespace that selects Triton pods and
    serves the pool's gRPC port, and the HTTP port the gateway derives from it (gRPC - 1)."""
    _, resources = overlay
    config = gateway_config(resources)
    for pool_name, pool in config.pools.items():
        host, grpc_port = parse_address(pool.dns, pool_name)
        service_name, namespace, *_ = host.split(".")
        assert namespace == NAMESPACE and host == f"{service_name}.{NAMESPACE}.svc.cluster.local"
        service = find(resources, "Service", service_name)
        assert service["spec"]["clusterIP"] == "None", f"{service_name} must be headless: one A record per pod"
        ports = {port["port"] for port in service["spec"]["ports"]}
        http_port = grpc_port + config.upstream.http_port_offset
        assert {grpc_port, http_port} <= ports
        selected = [
            r for r in resources if r["kind"] in ("Deployment", "StatefulSet")
            and service["spec"]["selector"].items() <= r["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1 and selected[0]["metadata"]["name"].startswith("triton")
        triton_ports = {p["containerPort"] for p in container(selected[0], "triton")["ports"]}
        assert {grpc_port, http_port} <= triton_ports


def test_gateway_probes_ports_and_grace_agree_with_its_config(overlay):
    _, resources = overlay
    config = gateway_config(resources)
    deployment = find(resources, "Deployment", "tensorgate")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(deployment, "gateway")
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    listen_port = int(config.listen.rpartition(":")[2])
    assert ports["grpc"] == listen_port and ports["metrics"] == config.telemetry.prometheus_port
    assert gateway["readinessProbe"]["grpc"]["port"] == listen_port  # grpc.health.v1 Check
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    # preStop sleep, then SIGTERM: in-flight calls get server.grace_s; the kubelet must not kill first.
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert int(pre_stop[1]) + config.server.grace_s < pod["terminationGracePeriodSeconds"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert gateway["securityContext"]["allowPrivilegeEscalation"] is False
    assert gateway["resources"]["requests"]["cpu"] and gateway["resources"]["requests"]["memory"]

    service = find(resources, "Service", "tensorgate")
    assert {p["port"] for p in service["spec"]["ports"]} == {listen_port, config.telemetry.prometheus_port}
    hpa = find(resources, "HorizontalPodAutoscaler", "tensorgate")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tensorgate"}
    pdb = find(resources, "PodDisruptionBudget", "tensorgate")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_gpu_tritons_ask_for_gpus_on_gpu_nodes():
    resources = render(K8S / "overlays" / "gpu")
    triton = find(resources, "Deployment", "triton-gpu")
    pod = triton["spec"]["template"]["spec"]
    limits = container(triton, "triton")["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert list(gateway_config(resources).pools) == ["gpu", "cpu"], "GPU pool first, CPU as spill-over"
    cpu = find(resources, "Deployment", "triton-cpu")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(container(find(resources, "Deployment", "triton-cpu"), "triton")["resources"])
    assert "nodeSelector" not in cpu


def test_triton_preStop_lets_the_gateways_drain_it(overlay):
    """A Triton pod leaving keeps serving until the gateways' next resolution has drained it."""
    _, resources = overlay
    config = gateway_config(resources)
    for deployment in (r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"].startswith("triton")):
        sleep = int(container(deployment, "triton")["lifecycle"]["preStop"]["exec"]["command"][1])
        assert sleep > config.upstream.discovery.interval_s
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > sleep


# ---- observability configs are deploy/observability's own files ----------------------------------


def test_collector_and_prometheus_configs_are_the_observability_files(overlay):
    _, resources = overlay
    collector = find_prefixed(resources, "ConfigMap", "otel-collector-config")
    prometheus = find_prefixed(resources, "ConfigMap", "prometheus-config")
    assert collector["data"]["otel-collector.yaml"] == (DEPLOY / "observability" / "otel-collector.yaml").read_text()
    assert prometheus["data"]["prometheus.yml"] == (DEPLOY / "observability" / "prometheus.yml").read_text()
    # The names Prometheus and the gateway use are Services here.
    for name in ("tensorgate", "triton", "collector"):
        find(resources, "Service", name)
    assert gateway_config(resources).telemetry.otlp_endpoint == "collector:4317"


# ---- compose -----------------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose" / "compose.yaml"


def test_compose_file_parses_and_its_gateway_config_loads():
    # The Compose specification's own rules (compose_spec, pinned): ValueError names what is wrong.
    compose = PyCompose.from_yaml(COMPOSE.read_text()).to_dict()
    services = compose["services"]
    assert {"gateway", "triton-1", "triton-2", "collector", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert set(service.get("depends_on") or ()) <= set(services), f"{name} depends on a service not defined"

    # Every bind-mounted file exists.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"

    # The gateway's config loads, and its pool is the alias both Tritons answer to.
    gateway = services["gateway"]
    (config_mount,) = [v for v in gateway["volumes"] if v.split(":")[1] == "/etc/tensorgate/gateway.yaml"]
    config = load_config(COMPOSE.parent / config_mount.split(":")[0])
    (pool,) = config.pools.values()
    host, grpc_port = parse_address(pool.dns, "dns")
    for triton in ("triton-1", "triton-2"):
        assert host in services[triton]["networks"]["default"]["aliases"]
        command = services[triton]["command"]
        assert command[command.index("--grpc-port") + 1] == str(grpc_port)
        assert command[command.index("--http-port") + 1] == str(grpc_port + config.upstream.http_port_offset)
    assert config.telemetry.otlp_endpoint.split(":")[0] in services
    assert "tensorgate" in gateway["networks"]["default"]["aliases"]  # Prometheus's DNS target

    # Images build from this repository's Dockerfile, with targets it defines.
    dockerfile = (COMPOSE.parent / gateway["build"]["context"] / gateway["build"]["dockerfile"]).read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in targets


# ---- the dev Triton's command line, as the dev overlay and compose run it -------------------------


def test_compose_spec_refuses_what_compose_would():
    """The parser above is strict, so passing it means something."""
    text = COMPOSE.read_text()
    for broken in (text.replace("stop_grace_period: 30s", "stop_grace_perod: 30s"),
                   text.replace('"8101:8101"', '"81x01:8101"'),
                   text.replace("shm_size: 512m", "shm_size: lots")):
        assert broken != text
        with pytest.raises(ValueError):
            PyCompose.from_yaml(broken)


def test_dev_triton_command_serves_on_the_ports_it_names(tmp_path):
    """The dev overlay's `tensorgate local-triton …` arguments, run here with free ports on another
    loopback address (0.0.0.0 in the pod): Triton answers gRPC, HTTP and metrics where the
    Service and the gateway's derived HTTP port expect them, and SIGTERM stops it cleanly."""
    import signal
    import urllib.request

    import tritonclient.grpc as triton_grpc

    from gateway.local.triton import find_free_port, find_free_ports

    triton = find(render(K8S / "overlays" / "dev"), "Deployment", "triton-cpu")
    spec = container(triton, "triton")
    args = list(spec["args"])
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert {name: int(args[args.index(f"--{name}-port") + 1]) for name in ("http", "grpc", "metrics")} == ports
    http_port, grpc_port = find_free_ports(2)
    local = {"--host": "127.0.0.6", "--http-port": str(http_port), "--grpc-port": str(grpc_port),
             "--metrics-port": str(find_free_port()), "--log-dir": str(tmp_path),
             "--model-repository": str(ROOT / "examples" / "models")}
    for flag, value in local.items():
        args[args.index(flag) + 1] = value
    executable = Path(shutil.which("tensorgate", path=str(Path(__import__("sys").executable).parent)))
    assert spec["command"] == [executable.name]
    process = subprocess.Popen([str(executable), *args], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"on 127.0.0.6:{grpc_port} (gRPC)" in line, line
        client = triton_grpc.InferenceServerClient(f"127.0.0.6:{grpc_port}")
        try:
            assert client.is_server_ready()
        finally:
            client.close()
        with urllib.request.urlopen(f"http://127.0.0.6:{http_port}/v2/health/ready", timeout=10) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(f"http://127.0.0.6:{local['--metrics-port']}/metrics", timeout=10) as answer:
            assert b"nv_inference_request_success" in answer.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
