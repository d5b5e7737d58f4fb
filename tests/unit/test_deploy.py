"""deploy/ against the code and itself: every manifest parses, and its names, commands and ports are real.

Nothing here builds an image or talks to a cluster: the Dockerfile, compose file and Kubernetes
manifests are parsed and cross-checked against worker.settings, the `sms-worker` parser, the web
app's routes, worker.store and the Procfiles.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from worker.cli import build_parser
from worker.settings import ENV_FILE_VARIABLE, Settings, settings_from_env
from worker.store import DISPATCH_GROUP, Store
from worker.web import create_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROCFILES = (ROOT / "Procfile", ROOT / "Procfile.dev")

SETTINGS = {name.upper() for name in Settings.model_fields}
SECRETS = {"ICOMM_API_KEY", "SMS_WEBHOOK_SECRET"}
# Variables the deploy files may name although worker/settings.py does not read them.
NOT_SETTINGS = {
    "PORT",  # Procfile: the web process's port (honcho and PaaS set it)
    "WORKER_PROCESSES",  # Procfile: `sms-worker worker --processes`
    "PYTHONUNBUFFERED",  # Dockerfile: read by Python itself
    "PYTHONDONTWRITEBYTECODE",  # Dockerfile: read by Python itself
    "PATH",  # Dockerfile: puts the venv's sms-worker first
    "SMS_WORKER_IMAGE",  # compose.yaml: interpolated by docker compose to pick the image
    "TMPDIR",  # Procfile.dev: where the development Redis may write (it saves nothing)
}
PROCESSES = {"worker", "clock", "web"}  # the production processes of the Procfile
# Procfile.dev's own infrastructure (not sms-worker): process name -> the program it must exec.
DEV_INFRA = {"redis": "redis-server"}


# --- readers -------------------------------------------------------------------------------------
@functools.cache  # parsed once per session; no test changes what it reads
def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _k8s_files() -> list[Path]:
    """Every Kubernetes manifest (kustomization.yaml configures kustomize, it is no object)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _k8s() -> list[dict[str, Any]]:
    return [doc for path in _k8s_files() for doc in _yaml_docs(path)]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _k8s() if doc.get("kind") == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _kind("Deployment")}


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, deployment in _deployments().items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield name, container


def _by_component(component: str) -> dict[str, Any]:
    found = [d for d in _deployments().values() if _pod_labels(d).get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one Deployment for {component}, found {len(found)}"
    return found[0]


def _container(component: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _by_component(component)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _configmap() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap", "sms-worker-config")["data"]
    return data


def _secret_template() -> dict[str, Any]:
    return _one("Secret", "sms-worker-secrets")


def _compose() -> dict[str, Any]:
    docs = _yaml_docs(DEPLOY / "compose.yaml")
    assert len(docs) == 1
    return docs[0]


def _compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _app_services() -> dict[str, dict[str, Any]]:
    """The compose services that run our image (everything but Redis)."""
    return {name: svc for name, svc in _compose_services().items() if name != "redis"}


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def _compose_env() -> dict[str, str]:
    return _env_file(DEPLOY / "compose.env")


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def _procfile(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def _shell_defaults(command: str) -> str:
    """`${VAR:-default}` becomes its default and `${VAR}` a placeholder, as a shell with VAR unset would see it."""
    command = re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", command)
    # `${URL##*:}` (a port cut out of a URL, as in Procfile.dev) stands for a number.
    command = re.sub(r"\$\{[A-Z_][A-Z0-9_]*(?:##|%%|#|%)[^}]*\}", "1", command)
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*\}", "placeholder", command)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            choices: dict[str, argparse.ArgumentParser] = action.choices
            return choices
    raise AssertionError("sms-worker has no subcommands")


def _parse(argv: list[str], where: str) -> argparse.Namespace:
    """Parse an `sms-worker` argv (without the program name) with the real parser; fail naming `where`."""
    assert argv and argv[0] in _subparsers(), f"{where}: {argv!r} is not an sms-worker subcommand"
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{where}: sms-worker rejects the arguments {argv!r}") from None


def _procfile_argv(command: str) -> list[str]:
    argv = shlex.split(_shell_defaults(command))
    # `exec` makes the shell honcho starts become the process, so signals reach sms-worker itself.
    assert argv[0] == "exec", f"Procfile command is not exec'd (signals would stop at the shell): {command!r}"
    argv = argv[1:]
    assert argv[0] == "sms-worker", f"Procfile command does not run sms-worker: {command!r}"
    return argv[1:]


def _container_argv(where: str, container: dict[str, Any]) -> list[str]:
    # The image's ENTRYPOINT is sms-worker; a container that replaced it would bypass the CLI.
    assert container.get("command") in (None, ["sms-worker"]), f"{where}: command overrides the ENTRYPOINT"
    args: list[str] = container.get("args", [])
    return args


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in ports, f"port name {port!r} is not declared by container {container['name']}"
        return int(ports[port])
    assert port in ports.values(), f"port {port} is not declared by container {container['name']}"
    return port


def _settings_in(env: dict[str, str]) -> Settings:
    # The session's empty env file (tests/conftest.py), so a developer's .env plays no part.
    return settings_from_env({ENV_FILE_VARIABLE: os.environ[ENV_FILE_VARIABLE], **env})


def _env_names_referenced() -> dict[str, set[str]]:
    """Every environment variable name each deploy file sets or reads, by file."""
    names: dict[str, set[str]] = {}
    for path in _k8s_files():
        found: set[str] = set()
        for doc in _yaml_docs(path):
            if doc.get("kind") in ("ConfigMap", "Secret"):
                found |= set(doc.get("data") or {}) | set(doc.get("stringData") or {})
            spec = doc.get("spec", {})
            for container in spec.get("template", {}).get("spec", {}).get("containers", []):
                found |= {e["name"] for e in container.get("env", [])}
                for ref in container.get("env", []):
                    key = ref.get("valueFrom", {}).get("secretKeyRef", {}).get("key")
                    if key:
                        found.add(key)
            for trigger in spec.get("triggers", []):
                found |= {v for k, v in trigger.get("metadata", {}).items() if k.endswith("FromEnv")}
        names[str(path.relative_to(ROOT))] = found
    names["deploy/compose.env"] = set(_compose_env())
    compose_text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    found = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text))
    for service in _compose_services().values():
        environment = service.get("environment") or {}
        found |= set(environment) if isinstance(environment, dict) else {e.split("=")[0] for e in environment}
    names["deploy/compose.yaml"] = found
    docker: set[str] = set()
    for stage in _dockerfile_stages():
        for instruction, args in stage:
            if instruction in ("ENV", "ARG"):
                docker |= set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args))
    docker.discard("PYTHON_IMAGE")  # a build argument (the base image), not the environment
    names["deploy/Dockerfile"] = docker
    for path in PROCFILES:
        names[path.name] = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", path.read_text(encoding="utf-8")))
    return names


# --- parsing -------------------------------------------------------------------------------------
def test_every_manifest_parses_and_names_no_namespace() -> None:
    """Each YAML file under deploy/ parses, and every Kubernetes object has a kind and a name but no namespace."""
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert DEPLOY / "compose.yaml" in files and len(files) >= 8
    for path in files:
        assert _yaml_docs(path), f"{path} is empty"
    for doc in _k8s():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        assert "namespace" not in doc["metadata"], f"{doc['kind']} {doc['metadata']['name']} pins a namespace"


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    """kustomization.yaml applies every top-level manifest but the Secret template (it would overwrite real values)."""
    kustomization = _yaml_docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    assert all((K8S / name).is_file() for name in listed)


# --- environment ---------------------------------------------------------------------------------
def test_every_env_name_is_a_setting_or_a_known_non_setting() -> None:
    """A variable the deploy files set or read is one worker/settings.py reads, or on the short explicit allow-list."""
    assert not NOT_SETTINGS & SETTINGS, "the allow-list must not shadow real settings"
    referenced = _env_names_referenced()
    unknown = {where: sorted(names - SETTINGS - NOT_SETTINGS) for where, names in referenced.items()}
    assert {where: names for where, names in unknown.items() if names} == {}
    assert referenced["deploy/k8s/configmap.yaml"] >= {"REDIS_URL", "SMS_SHUTDOWN_TIMEOUT_S", "SMS_METRICS_PORT"}


def test_configmap_and_compose_env_hold_valid_settings() -> None:
    """The ConfigMap's and compose.env's values pass the same validation every process runs at start-up."""
    from_configmap = _settings_in(_configmap())
    from_compose = _settings_in(_compose_env())
    assert from_configmap.sms_metrics_port == 9191 and from_compose.sms_metrics_port == 9191
    assert from_configmap.log_format == "json" and from_compose.log_format == "json"
    assert from_compose.require_api_key()


def test_secrets_come_only_from_the_secret() -> None:
    """ICOMM_API_KEY and SMS_WEBHOOK_SECRET are never in a ConfigMap, a literal container value or the image."""
    for configmap in _kind("ConfigMap"):
        assert not SECRETS & set(configmap.get("data", {})), configmap["metadata"]["name"]
    secret = _secret_template()
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert secret_keys == SECRETS
    used: dict[str, set[str]] = {}
    for deployment, container in _containers():
        for ref in container.get("envFrom", []):
            assert "secretRef" not in ref or ref["secretRef"]["name"] == secret["metadata"]["name"]
        for entry in container.get("env", []):
            if entry["name"] in SECRETS:
                assert "value" not in entry, f"{deployment}: {entry['name']} is a literal"
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys
                used.setdefault(deployment, set()).add(entry["name"])
    worker = _by_component("worker")["metadata"]["name"]
    clock = _by_component("clock")["metadata"]["name"]
    web = _by_component("web")["metadata"]["name"]
    assert "ICOMM_API_KEY" in used[worker] and "ICOMM_API_KEY" in used[clock]
    assert "SMS_WEBHOOK_SECRET" in used[web]
    assert "ICOMM_API_KEY" not in used[web], "the web process never calls the provider"
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert not any(name in dockerfile for name in SECRETS)


# --- commands ------------------------------------------------------------------------------------
def test_procfile_commands_are_real_subcommands() -> None:
    """Each Procfile line runs `sms-worker <subcommand>` with arguments the real parser accepts."""
    production = _procfile(ROOT / "Procfile")
    assert set(production) == PROCESSES
    for path in PROCFILES:
        for name, command in _procfile(path).items():
            if path.name == "Procfile.dev" and name in DEV_INFRA:
                argv = shlex.split(command)
                assert argv[:2] == ["exec", DEV_INFRA[name]], f"Procfile.dev:{name}: {command!r}"
                continue
            argv = _procfile_argv(command)
            assert _parse(argv, f"{path.name}:{name}").command == name


def test_kubernetes_containers_run_the_procfile_processes() -> None:
    """Every Deployment runs a Procfile process through the image's sms-worker ENTRYPOINT, one each."""
    run = {}
    for deployment, container in _containers():
        args = _container_argv(deployment, container)
        run[_parse(args, f"Deployment {deployment}").command] = deployment
    assert set(run) == {_procfile_argv(c)[0] for c in _procfile(ROOT / "Procfile").values()}
    for component, deployment in run.items():
        assert _pod_labels(_deployments()[deployment])["app.kubernetes.io/component"] == component


def test_compose_services_run_the_procfile_dev_processes() -> None:
    """compose.yaml runs the same sms-worker subcommands as Procfile.dev, with the real parser's blessing."""
    run = set()
    for name, service in _app_services().items():
        assert "entrypoint" not in service, f"compose {name}: overrides the sms-worker ENTRYPOINT"
        args = _parse(service["command"], f"compose {name}")
        assert args.command == name
        run.add(args.command)
    assert run == {_procfile_argv(c)[0] for n, c in _procfile(ROOT / "Procfile.dev").items() if n not in DEV_INFRA}


def test_web_listens_on_all_interfaces_on_its_declared_port() -> None:
    """In containers the web process binds 0.0.0.0 on the port its container, Service and compose mapping name."""
    container = _container("web")
    args = _parse(_container_argv("web", container), "Deployment web")
    assert args.host == "0.0.0.0"
    assert _resolve_port(container, args.port) == args.port == 8080
    compose_args = _parse(_compose_services()["web"]["command"], "compose web")
    assert compose_args.host == "0.0.0.0"
    published = {str(p).split(":")[-1] for p in _compose_services()["web"]["ports"]}
    assert published == {str(compose_args.port)}


# --- probes, ports, Service ----------------------------------------------------------------------
def _web_routes() -> dict[str, set[str]]:
    app = create_app(Settings(sms_webhook_secret="unit-test-secret"), store=object())  # type: ignore[arg-type]
    return {route.path: set(route.methods or ()) for route in app.routes}  # type: ignore[attr-defined]


def test_probes_hit_declared_ports_and_real_endpoints() -> None:
    """Every probe targets a declared container port and a GET endpoint the process actually serves."""
    web_routes = _web_routes()
    metrics_port = int(_configmap()["SMS_METRICS_PORT"])
    probed = 0
    for deployment, container in _containers():
        component = _pod_labels(_deployments()[deployment])["app.kubernetes.io/component"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            probed += 1
            port = _resolve_port(container, probe["httpGet"]["port"])
            path = probe["httpGet"]["path"]
            if component == "web":
                assert "GET" in web_routes.get(path, set()), f"web has no GET {path}"
                assert port == 8080
            else:
                assert component == "worker", f"{deployment}: unexpected probe"
                # worker/metrics.py serves /metrics and /healthz on SMS_METRICS_PORT.
                assert path == "/healthz" and port == metrics_port
    assert probed >= 5
    worker = _container("worker")
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _container("web")["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_web_readiness_does_not_follow_the_auth_pause() -> None:
    """The web pods stay in the Service during a 401/403 pause: the webhook is then the only way reports arrive."""
    readiness = _container("web")["readinessProbe"]["httpGet"]["path"]
    assert readiness != "/readyz"
    assert "/readyz" in _web_routes(), "/readyz still exists for alerting"


def test_service_targets_the_web_container_port() -> None:
    """The web Service selects exactly the web pods and forwards port 80 to the web container's port."""
    service = _one("Service", "sms-worker-web")
    selector = service["spec"]["selector"]
    selected = [n for n, d in _deployments().items() if selector.items() <= _pod_labels(d).items()]
    assert selected == [_by_component("web")["metadata"]["name"]]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert _resolve_port(_container("web"), port["targetPort"]) == 8080


def test_dockerfile_exposes_the_ports_the_manifests_use() -> None:
    """The image EXPOSEs the web port and the worker metrics port that the Deployments declare."""
    exposed = {int(p) for instr, args in _dockerfile_stages()[-1] if instr == "EXPOSE" for p in args.split()}
    declared = {p["containerPort"] for _, c in _containers() for p in c.get("ports", [])}
    assert declared == exposed == {8080, 9191}


def test_scrape_annotations_name_declared_ports() -> None:
    """Prometheus scrape annotations point at a port the pod's container declares."""
    annotated = 0
    for deployment in _deployments().values():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            annotated += 1
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            _resolve_port(container, int(annotations["prometheus.io/port"]))
    assert annotated == 2


# --- images, labels, selectors -------------------------------------------------------------------
def _repository(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def test_one_image_everywhere() -> None:
    """Every Deployment and compose app service runs the same image; kustomize rewrites it by that name."""
    k8s_images = {c["image"] for _, c in _containers()}
    assert len(k8s_images) == 1
    (image,) = k8s_images
    kustomization = _yaml_docs(K8S / "kustomization.yaml")[0]
    assert [i["name"] for i in kustomization["images"]] == [_repository(image)]
    compose_images = {svc["image"] for svc in _app_services().values()}
    assert len(compose_images) == 1
    default = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", compose_images.pop())
    assert default and _repository(default.group(1)) == _repository(image)


def test_selectors_match_deployment_labels() -> None:
    """Each Deployment selects its own pods, and each PDB selects exactly one Deployment's pods."""
    for name, deployment in _deployments().items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= _pod_labels(deployment).items(), name
        others = [n for n, d in _deployments().items() if n != name and selector.items() <= _pod_labels(d).items()]
        assert others == [], f"{name}'s selector also matches {others}"
    covered = set()
    for pdb in _kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [n for n, d in _deployments().items() if selector.items() <= _pod_labels(d).items()]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} matches {matched}"
        covered.add(_pod_labels(_deployments()[matched[0]])["app.kubernetes.io/component"])
        replicas = _deployments()[matched[0]]["spec"]["replicas"]
        assert pdb["spec"].get("minAvailable", 0) < replicas, "a PDB must leave room to evict one pod"
    assert covered == {"worker", "web"}


def test_autoscalers_target_the_worker_deployment() -> None:
    """The KEDA ScaledObject and the HPA alternative scale the worker Deployment between 2 and 20 pods."""
    worker = _by_component("worker")
    scaled = _one("ScaledObject", "sms-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"].get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 20)
    assert worker["spec"]["replicas"] == scaled["spec"]["minReplicaCount"]
    hpa = _one("HorizontalPodAutoscaler", "sms-worker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": worker["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 20)


def test_keda_watches_every_lane_outbox_on_the_configured_redis() -> None:
    """KEDA reads each lane's outbox stream, named as worker.store names it, on REDIS_URL's host, port and db."""
    settings = _settings_in(_configmap())
    store = Store(client=None, prefix=settings.sms_key_prefix)  # type: ignore[arg-type]  # key names only
    redis_url = urlsplit(settings.redis_url)
    triggers = _one("ScaledObject", "sms-worker")["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    streams = {t["metadata"]["stream"] for t in triggers}
    assert streams == {store.outbox(lane) for lane in settings.sms_lanes}
    assert store.outbox("bulk") == "sms:outbox:bulk"
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["address"] == f"{redis_url.hostname}:{redis_url.port or 6379}"
        assert meta.get("databaseIndex", "0") == (redis_url.path.strip("/") or "0")
        # streamLength (XLEN) is the backlog because settled entries are deleted; with a
        # consumerGroup KEDA would switch to XPENDING or the group's `lag`, which Redis reports as
        # NULL once an undelivered entry (a repeated producer id) is deleted.
        assert "consumerGroup" not in meta and int(meta["streamLength"]) > 0
    assert DISPATCH_GROUP == "dispatch"  # the group the README's lagCount variant names
    hpa = _one("HorizontalPodAutoscaler", "sms-worker")
    lanes = {m["external"]["metric"]["selector"]["matchLabels"]["lane"] for m in hpa["spec"]["metrics"]}
    assert {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == {"sms_outbox_depth"}
    assert lanes == set(settings.sms_lanes)


# --- shutdown, replicas, resources ---------------------------------------------------------------
def test_grace_periods_exceed_the_shutdown_timeout() -> None:
    """Orchestrators wait longer than SMS_SHUTDOWN_TIMEOUT_S before SIGKILL, in Kubernetes and in compose."""
    k8s_timeout = _settings_in(_configmap()).sms_shutdown_timeout_s
    for name, deployment in _deployments().items():
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > k8s_timeout, f"{name}: {grace} s <= SMS_SHUTDOWN_TIMEOUT_S {k8s_timeout:g} s"
    compose_timeout = _settings_in(_compose_env()).sms_shutdown_timeout_s
    for name, service in _compose_services().items():
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace and int(grace.group(1)) > compose_timeout, f"compose {name}"


def test_clock_runs_exactly_once() -> None:
    """The clock has one replica, is replaced with Recreate, and no autoscaler or PDB touches it."""
    clock = _by_component("clock")
    assert clock["spec"]["replicas"] == 1
    assert clock["spec"]["strategy"]["type"] == "Recreate"
    name = clock["metadata"]["name"]
    targets = {d["spec"]["scaleTargetRef"]["name"] for d in _kind("ScaledObject") + _kind("HorizontalPodAutoscaler")}
    assert name not in targets
    for pdb in _kind("PodDisruptionBudget"):
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(clock).items()
    assert "deploy" not in _compose_services()["clock"]


def test_containers_are_non_root_with_resources() -> None:
    """Every pod runs as uid 10001 without privilege escalation, with CPU and memory requests and limits."""
    for name, deployment in _deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, f"{name} {bound}"


# --- compose -------------------------------------------------------------------------------------
def test_compose_stack_shape() -> None:
    """Redis keeps an AOF on a volume, two workers run, the sandbox is reachable only inside the compose network."""
    services = _compose_services()
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert services["worker"]["deploy"]["replicas"] == 2
    sandbox = _parse(services["sandbox"]["command"], "compose sandbox")
    assert sandbox.host == "0.0.0.0" and "ports" not in services["sandbox"]
    assert [name for name, svc in services.items() if "ports" in svc] == ["web"]


def test_compose_env_points_at_the_compose_services() -> None:
    """compose.env reaches the sandbox and Redis by service name, with the key the sandbox is started with."""
    env = _compose_env()
    services = _compose_services()
    sandbox = _parse(services["sandbox"]["command"], "compose sandbox")
    base = urlsplit(env["ICOMM_BASE_URL"])
    assert (base.hostname, base.port) == ("sandbox", sandbox.port)
    assert env["ICOMM_API_KEY"] == sandbox.api_key
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    for name in ("worker", "clock", "web"):
        assert services[name]["env_file"] == ["compose.env"]
        assert (DEPLOY / services[name]["env_file"][0]).is_file()
    healthcheck = " ".join(services["worker"]["healthcheck"]["test"])
    assert f":{env['SMS_METRICS_PORT']}/healthz" in healthcheck


# --- Dockerfile ----------------------------------------------------------------------------------
def test_dockerfile_is_slim_multistage_and_non_root() -> None:
    """Both stages start from python:3.11-slim; the final one installs wheels only, runs as uid 10001 via sms-worker."""
    stages = [s for s in _dockerfile_stages() if s and s[0][0] == "FROM"]
    assert len(stages) >= 2
    args = dict(a.split("=", 1) for i, a in _dockerfile_stages()[0] if i == "ARG" and "=" in a)
    for stage in stages:
        base = stage[0][1].split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        assert base == "python:3.11-slim"
    final = stages[-1]
    instructions = [i for i, _ in final]
    user = [a for i, a in final if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root") and user[-1].split(":")[0] == "10001"
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    entrypoint = [a for i, a in final if i == "ENTRYPOINT"]
    assert entrypoint == ['["sms-worker"]']
    cmd = [a for i, a in final if i == "CMD"]
    assert cmd == ['["worker"]']
    assert _parse(["worker"], "Dockerfile CMD").command == "worker"
    final_text = " ".join(a for _, a in final)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install)\b", final_text)
    assert "COPY" not in instructions, "the runtime stage takes nothing but the built wheels"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "sms-worker" in pyproject["project"]["scripts"]
    assert pyproject["project"]["name"] in final_text



def test_metric_names_in_the_runbook_and_autoscaling_exist() -> None:
    """Every sms_* metric the runbook, the k8s notes and the HPA name is one worker/metrics.py exports."""
    defined = set(re.findall(r'"(sms_[a-z_]+)"', (ROOT / "worker" / "metrics.py").read_text(encoding="utf-8")))
    sources = [ROOT / "docs" / "operations.md", K8S / "README.md", *sorted((K8S / "alternatives").glob("*.yaml"))]
    text = "\n".join(path.read_text(encoding="utf-8") for path in sources)
    referenced = set(re.findall(r"\bsms_[a-z_]*[a-z]", text))
    assert {"sms_outbox_depth", "sms_lane_paused", "sms_messages_total"} <= referenced

    def exported(name: str) -> bool:
        return name in defined or any(name == base + suffix for base in defined for suffix in ("_bucket", "_count"))

    assert sorted(name for name in referenced if not exported(name)) == []
