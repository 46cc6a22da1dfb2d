"""cluster.yaml passes Ray's own launcher schema offline (no cloud calls), and keeps the
promises docs/cluster.md makes about it: nothing on the head listens on every interface,
MLflow binds the head's private address and proxies its artifacts to the shared storage,
every GPU worker type declares its GPUs, and the shared storage is defined in one place."""
from __future__ import annotations

import copy
import ipaddress
import re
import shlex

import pytest
import yaml

from conftest import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
HEAD_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
             "head_start_ray_commands")
# (vCPUs, GPUs) of the AWS instance types a cluster.yaml for orch may use.
AWS_INSTANCES = {
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.16xlarge": (64, 1), "g5.12xlarge": (48, 4), "g5.24xlarge": (96, 4),
    "g5.48xlarge": (192, 8), "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1),
    "g6.12xlarge": (48, 4), "g6.48xlarge": (192, 8), "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}
# How a command may learn the node's own private address.
PRIVATE_ADDRESS_SOURCES = ("get_node_ip_address", "local-ipv4", "hostname -I")
UNSPECIFIED = ("0.0.0.0", "::", "[::]", "*", "")


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text):
    return yaml.safe_load(text)


def commands(raw, keys=COMMAND_KEYS) -> list[str]:
    """The shell commands of `keys`, top level and per node type."""
    out = [cmd for key in keys for cmd in raw.get(key) or []]
    for node_type in raw["available_node_types"].values():
        out += [cmd for key in keys for cmd in node_type.get(key) or []]
    return out


def assignments(cmds: list[str], name: str) -> list[str]:
    """Right-hand sides of `NAME=...` in the commands (an env-file line or a shell one)."""
    pattern = re.compile(rf"(?<![\w$]){name}=(\S.*)")
    return [m.group(1) for cmd in cmds for line in cmd.splitlines()
            for m in pattern.finditer(line)]


def mlflow_server_args(raw) -> list[str]:
    found = [cmd for cmd in raw["head_start_ray_commands"] if "mlflow server" in cmd]
    assert len(found) == 1, "exactly one head start command starts `mlflow server`"
    tokens = shlex.split(found[0])
    return tokens[tokens.index("server") + 1:]


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def references(value: str, name: str) -> bool:
    return re.search(rf"\$\{{?{name}\b", value) is not None


def test_cluster_yaml_is_a_valid_ray_cluster_config(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(copy.deepcopy(raw))   # fills the defaults `ray up` would
    validate_config(config)                      # jsonschema + head type + worker counts
    assert config["head_node_type"] in config["available_node_types"]


def test_head_start_commands_listen_on_no_public_interface(raw):
    for cmd in raw["head_start_ray_commands"]:
        assert "0.0.0.0" not in cmd, cmd
        # Ray's default keeps the dashboard (and the job API) on 127.0.0.1: `ray dashboard`
        assert "--dashboard-host" not in cmd, cmd


def test_ray_token_authentication_stays_on(raw, text):
    assert "RAY_AUTH_MODE=disabled" not in text
    assert [v.strip("'\"") for v in assignments(commands(raw), "RAY_AUTH_MODE")] == ["token"]
    mounts = raw.get("file_mounts") or {}
    assert any(remote.endswith("/.ray/auth_token") for remote in mounts), \
        "every node needs the token: file-mount it to ~/.ray/auth_token"


def test_mlflow_server_binds_the_heads_private_address(raw):
    host = option(mlflow_server_args(raw), "--host")
    assert host is not None, "mlflow server defaults to 127.0.0.1: workers could not reach it"
    assert host not in UNSPECIFIED
    if host.startswith("$"):
        name = host.strip("${}")
        defined = assignments(commands(raw, HEAD_KEYS), name)
        assert len(defined) == 1, f"{name} is set once on the head, got {defined}"
        assert any(source in defined[0] for source in PRIVATE_ADDRESS_SOURCES), defined[0]
    else:
        address = ipaddress.ip_address(host)
        assert address.is_private and not address.is_loopback


def test_mlflow_server_proxies_artifacts_to_the_shared_storage(raw):
    args = mlflow_server_args(raw)
    destination = option(args, "--artifacts-destination")
    assert destination is not None and references(destination, "ORCH_STORAGE"), destination
    assert "--no-serve-artifacts" not in args
    assert "--default-artifact-root" not in args   # would bypass the proxy
    backend = option(args, "--backend-store-uri") or ""
    assert backend.startswith(("sqlite:////", "postgresql://")), backend


def test_shared_storage_is_defined_once_and_referenced(raw, text):
    everywhere = commands(raw)
    defined = assignments(everywhere, "ORCH_STORAGE")
    assert len(defined) == 1, f"ORCH_STORAGE is defined {len(defined)} times"
    value = defined[0].strip("'\"")
    assert re.fullmatch(r"s3://[^/\s]+/\S+", value), value
    assert text.count(value) == 1, "the S3 prefix is written out once, nowhere else"
    # it is defined in setup_commands (every node), in an env file...
    definer = next(cmd for cmd in raw["setup_commands"] if "ORCH_STORAGE=" in cmd)
    env_file = re.search(r">\s*(\S+)", definer).group(1)
    # ...that every `ray start` sources (driver, trials and actors inherit it)...
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        if "ray start" in cmd:
            sourced = max(cmd.find(f". {env_file}"), cmd.find(f"source {env_file}"))
            assert 0 <= sourced < cmd.index("ray start"), cmd
    # ...and that is used by reference (the MLflow server's destination is checked above);
    # beside it, the shared mount that holds the data and the feature cache.
    assert any(references(cmd, "ORCH_STORAGE") for cmd in everywhere)
    shared = assignments(everywhere, "ORCH_SHARED")
    assert len(shared) == 1 and shared[0].startswith("/"), shared
    assert any("mount" in cmd and references(cmd, "ORCH_SHARED") for cmd in raw["setup_commands"])
    cache = assignments(everywhere, "ORCH_CACHE_DIR")
    assert len(cache) == 1 and (references(cache[0], "ORCH_SHARED")
                                or cache[0].startswith(shared[0])), cache


def test_every_gpu_worker_type_declares_its_gpus(raw):
    workers = {name: t for name, t in raw["available_node_types"].items()
               if name != raw["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in AWS_INSTANCES, f"{name}: add {instance} to AWS_INSTANCES"
        cpus, gpus = AWS_INSTANCES[instance]
        resources = node_type["resources"]
        assert resources.get("GPU") == gpus, f"{name}: {instance} has {gpus} GPU(s)"
        assert 0 < resources.get("CPU", 0) <= cpus, name
    declared = sorted(t["resources"]["GPU"] for t in workers.values())
    assert declared[0] == 1 and declared[-1] >= 4, "a 1-GPU type and a multi-GPU type"
    assert any(t["node_config"]["InstanceType"].startswith("g5.") and t["resources"]["GPU"] == 1
               for t in workers.values()), "keep a single-A10G (g5) type"


def test_workers_are_spot_and_the_head_is_not(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    for name, node_type in types.items():
        if node_type is not head:
            assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
