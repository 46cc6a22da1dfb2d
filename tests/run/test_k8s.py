"""k8s/rayjob.yaml passes KubeRay's own RayJob schema offline (no cluster), and keeps the
promises docs/cluster.md makes about it, as cluster.yaml does for `ray up`: the job's Ray is
the project's, MLflow is reached through its Service and proxies its artifacts to the
shared volume, every Ray pod mounts that volume where the sweep's storage_path points,
GPU workers declare their GPUs, and nothing is exposed outside the cluster.

The schema is the openAPIV3Schema of the served v1 version of KubeRay v1.7.0's RayJob CRD
(tests/run/data/kuberay-rayjob-crd-v1.7.0.json, from ray-project/kuberay at tag v1.7.0,
ray-operator/config/crd/bases/ray.io_rayjobs.yaml, Apache-2.0)."""
from __future__ import annotations

import copy
import json
import re
import shlex
from importlib.metadata import version
from urllib.parse import urlparse

import pytest
import yaml

from conftest import REPO

RAYJOB_YAML = REPO / "k8s" / "rayjob.yaml"
DOCKERFILE = REPO / "k8s" / "Dockerfile"
KUBERAY_VERSION = "v1.7.0"
CRD_SCHEMA = REPO / "tests" / "run" / "data" / f"kuberay-rayjob-crd-{KUBERAY_VERSION}.json"
# A Kubernetes object name (DNS-1123 subdomain; Services and most kinds here are labels).
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# kind -> apiVersion of every document the file may hold
KINDS = {"RayJob": "ray.io/v1", "Deployment": "apps/v1", "Service": "v1",
         "PersistentVolumeClaim": "v1"}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d is not None]


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str) -> dict:
    (doc,) = of_kind(docs, kind)
    return doc


def structural_to_json_schema(node: dict) -> dict:
    """A CRD's structural schema as a JSON Schema that means what the API server and
    `kubectl apply` (strict field validation, its default) mean by it:
    - `x-kubernetes-int-or-string`: an integer or a string (without a `type`, jsonschema
      would take anything);
    - an object with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields` is closed: kubectl rejects an unknown field
      (the API server would otherwise drop it silently, so a misspelt key would vanish);
    - the other `x-kubernetes-*` keys (list types and map keys, CEL validations) are the
      API server's to check and are dropped; formats (int32, int64, date-time) stay and
      jsonschema checks none of them unless asked."""
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":                 # a mapping of names, not a schema
            out[key] = {name: structural_to_json_schema(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_json_schema(s) for s in value]
        else:                                   # type, format, enum, pattern, required, ...
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_validator():
    jsonschema = pytest.importorskip("jsonschema")     # Ray depends on it
    data = json.loads(CRD_SCHEMA.read_text())
    assert data["kuberay_version"] == KUBERAY_VERSION and data["version"] == "v1"
    schema = structural_to_json_schema(data["openAPIV3Schema"])
    # OpenAPI v3.0's schemas are a dialect of JSON Schema draft 4
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def ray_groups(job: dict) -> dict[str, dict]:
    """The RayJob's pod specs: `head` and each worker group's by name."""
    cluster = job["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    out.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return out


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def args_of(container: dict) -> dict[str, str]:
    """`--name=value` arguments (and bare `--flag`s, as "")."""
    out = {}
    for arg in container.get("args") or []:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def mlflow_container(docs) -> dict:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def shared_claim(docs) -> dict:
    """The one ReadWriteMany claim: the storage every Ray pod shares."""
    (claim,) = [c for c in of_kind(docs, "PersistentVolumeClaim")
                if "ReadWriteMany" in c["spec"]["accessModes"]]
    return claim


def mount_of(pod: dict, container: dict, claim: str) -> str | None:
    """Where `container` of `pod` mounts the PersistentVolumeClaim `claim`."""
    volumes = {v["name"] for v in pod.get("volumes") or []
               if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim}
    paths = [m["mountPath"] for m in container.get("volumeMounts") or []
             if m["name"] in volumes]
    return paths[0] if len(paths) == 1 else None


def sweep_command(job: dict) -> list[str]:
    """The `orch sweep ...` part of the entrypoint, as words."""
    parts = [shlex.split(p) for p in job["spec"]["entrypoint"].split("&&")]
    (command,) = [p for p in parts if p[:2] == ["orch", "sweep"]]
    return command


def test_every_document_is_a_kubernetes_object_of_a_known_kind(docs):
    assert {d["kind"] for d in docs} == set(KINDS)
    for doc in docs:
        assert doc["apiVersion"] == KINDS[doc["kind"]], doc["kind"]
        name = doc["metadata"]["name"]
        assert DNS_1123.fullmatch(name) and len(name) <= 63, name
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))


def test_every_rayjob_passes_kuberays_schema(docs, rayjob_validator):
    for job in of_kind(docs, "RayJob"):
        assert not errors(rayjob_validator, job), errors(rayjob_validator, job)


@pytest.mark.parametrize("change, words", [
    (lambda j: j["spec"].update(entrypiont="orch sweep x.yaml"), "entrypiont"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"),
     "'two' is not of type 'integer'"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
     "'groupName' is a required property"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     ["resources"]["limits"].update(memory="lots"), "does not match"),
    (lambda j: j["spec"]["rayClusterSpec"].update(authOptions={"mode": "password"}),
     "'password' is not one of"),
])
def test_the_schema_check_catches_mistakes(docs, rayjob_validator, change, words):
    job = copy.deepcopy(one(docs, "RayJob"))
    change(job)
    assert any(words in e for e in errors(rayjob_validator, job)), errors(rayjob_validator, job)


def test_int_or_string_fields_take_either(rayjob_validator, docs):
    job = copy.deepcopy(one(docs, "RayJob"))
    container = ray_groups(job)["head"]["containers"][0]
    for cpu in (6, "6", "5500m"):
        container["resources"]["limits"]["cpu"] = cpu
        assert not errors(rayjob_validator, job), cpu
    container["resources"]["limits"]["cpu"] = 6.5           # a float is neither
    assert errors(rayjob_validator, job)


def test_the_other_documents_have_what_kubernetes_requires(docs):
    for claim in of_kind(docs, "PersistentVolumeClaim"):
        spec = claim["spec"]
        assert spec["accessModes"] and set(spec["accessModes"]) <= {
            "ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
        assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti)", spec["resources"]["requests"]["storage"])
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod["metadata"]["labels"].items()
    claims = {c["metadata"]["name"] for c in of_kind(docs, "PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for container in pod["spec"]["containers"]:
        assert container["name"] and container["image"]
        for mount in container["volumeMounts"]:
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] and all("port" in p for p in service["spec"]["ports"])


def test_the_job_reaches_mlflow_through_its_service(docs):
    service, container = one(docs, "Service"), mlflow_container(docs)
    for name, pod in ray_groups(one(docs, "RayJob")).items():
        for ray_container in pod["containers"]:
            uri = urlparse(env_of(ray_container).get("MLFLOW_TRACKING_URI") or "")
            assert uri.scheme == "http", name
            assert uri.hostname.split(".")[0] == service["metadata"]["name"], name
            (port,) = [p for p in service["spec"]["ports"] if p["port"] == uri.port]
    # ...whose port leads to the port the server listens on, on every interface of its pod
    target = port["targetPort"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listens = int(args_of(container)["--port"])
    assert listens == (ports[target] if isinstance(target, str) else target)
    assert args_of(container)["--host"] == "0.0.0.0"
    # and whose Host header MLflow's DNS-rebinding check lets in (it also answers /health)
    allowed = args_of(container)["--allowed-hosts"].split(",")
    assert f"{service['metadata']['name']}:{listens}" in allowed
    assert "*" not in allowed and "localhost:*" in allowed      # and `kubectl port-forward`


def test_mlflow_proxies_artifacts_to_the_shared_volume(docs):
    container = mlflow_container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    args = args_of(container)
    shared = mount_of(pod, container, shared_claim(docs)["metadata"]["name"])
    assert shared and args["--artifacts-destination"].startswith(shared + "/")
    assert "--no-serve-artifacts" not in args
    assert "--default-artifact-root" not in args            # would bypass the proxy
    # its SQLite database on a volume of its own, never the shared (NFS-like) one
    backend = args["--backend-store-uri"]
    assert backend.startswith("sqlite:////")
    db_folder = backend[len("sqlite:///"):].rsplit("/", 1)[0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[db_folder])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim != shared_claim(docs)["metadata"]["name"]
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_every_ray_pod_mounts_the_shared_volume_where_the_sweep_writes(docs):
    job = one(docs, "RayJob")
    claim = shared_claim(docs)["metadata"]["name"]
    mounts = set()
    for name, pod in ray_groups(job).items():
        for container in pod["containers"]:
            mounts.add(mount_of(pod, container, claim))
            cache = env_of(container)["ORCH_CACHE_DIR"]
            assert cache.startswith(f"{mount_of(pod, container, claim)}/"), name
    assert len(mounts) == 1 and None not in mounts, mounts   # one path, on every pod
    (mount,) = mounts
    overrides = dict(w.split("=", 1) for w in sweep_command(job)[3:] if "=" in w)
    assert overrides["storage_path"].startswith(mount + "/")


def test_the_entrypoint_runs_a_sweep_file_of_the_image(docs):
    from orchestrator.spec import load_spec
    command = sweep_command(one(docs, "RayJob"))
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert f"cd {workdir}" in one(docs, "RayJob")["spec"]["entrypoint"]
    assert re.search(rf"^COPY .*\.\s+{re.escape(workdir)}\s*$", DOCKERFILE.read_text(), re.M)
    sweep_file, *rest = command[2:]
    overrides = [w for w in rest if not w.startswith("-")]
    spec = load_spec(REPO / sweep_file, overrides)         # the file with the job's overrides
    assert spec.storage_path == dict(w.split("=", 1) for w in overrides)["storage_path"]
    assert "--yes" in rest                                  # no terminal to answer a question


def test_the_ray_of_the_job_is_the_projects(docs):
    ray = version("ray")
    job = one(docs, "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py3\d+-gpu", base), base
    images = {c["image"] for pod in ray_groups(job).values()
              for c in pod["containers"] + pod.get("initContainers", [])}
    assert len(images) == 1, images                         # one build of k8s/Dockerfile


def test_mlflows_image_is_the_projects_mlflow():
    from packaging.requirements import Requirement
    pins = re.findall(r'"(mlflow[^"]*)"', (REPO / "pyproject.toml").read_text())
    (pin,) = [Requirement(p) for p in pins if Requirement(p).name == "mlflow"]
    text = RAYJOB_YAML.read_text()
    (tag,) = re.findall(r"image:\s*ghcr\.io/mlflow/mlflow:v(\S+)", text)
    assert pin.specifier.contains(tag), (tag, str(pin.specifier))


def test_gpu_workers_declare_their_gpus_and_the_head_none(docs):
    groups = ray_groups(one(docs, "RayJob"))
    head = groups.pop("head")
    assert all("nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {})
               for c in head["containers"])
    gpus = []
    for name, pod in groups.items():
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, name      # a GPU is asked for in limits
        requests = container["resources"].get("requests", {})
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        gpus.append(int(limits["nvidia.com/gpu"]))
    assert min(gpus) == 1 and max(gpus) >= 4, "a 1-GPU group and a multi-GPU group"


def test_nothing_listens_outside_the_cluster_and_ray_asks_for_a_token(docs):
    for service in of_kind(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    cluster = one(docs, "RayJob")["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    assert cluster["authOptions"]["mode"] == "token"
    for pod in ray_groups(one(docs, "RayJob")).values():
        for container in pod["containers"]:
            assert all("hostPort" not in p for p in container.get("ports") or [])
            assert "RAY_AUTH_MODE" not in env_of(container)     # KubeRay sets it from authOptions
