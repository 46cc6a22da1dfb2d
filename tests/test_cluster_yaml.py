"""cluster.yaml passes Ray's own launcher schema offline (no cloud calls)."""
from __future__ import annotations

from pathlib import Path

import yaml


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())
    config = prepare_config(raw)          # fills the defaults `ray up` would
    validate_config(config)               # jsonschema + head type + worker counts
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert config["head_node_type"] in config["available_node_types"]
