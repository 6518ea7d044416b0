"""cluster/: the launcher config validates against the schema inside the ray package; the KubeRay
manifests parse, carry the required fields, and agree with the package (image, entrypoint, config)."""

from __future__ import annotations

import json
import os
import shlex

import jsonschema
import ray
import yaml

from aae_dist.cli import build_parser

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(path):
    with open(os.path.join(ROOT, path)) as fh:
        return yaml.safe_load(fh)


def test_launcher_config_matches_rays_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as fh:
        schema = json.load(fh)
    cfg = load("cluster/aws-gpu.yaml")
    jsonschema.validate(cfg, schema)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["max_workers"] >= 1
    assert any("aae-dist" in c for c in cfg["setup_commands"])
    assert ray.__version__ in cfg["docker"]["image"]


def image_of_dockerfile() -> str:
    text = open(os.path.join(ROOT, "cluster", "Dockerfile")).read()
    tag = [w for w in text.split() if w.startswith("aae-dist:")][0]
    import aae_dist

    assert tag == f"aae-dist:{aae_dist.__version__}"
    return tag


def containers(spec):
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def test_kuberay_raycluster():
    doc = load("cluster/kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    image = image_of_dockerfile()
    assert all(c["image"] == image for c in containers(spec))
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert gpus and all(g == "1" for g in gpus)


def test_kuberay_rayjob_runs_a_real_config():
    doc = load("cluster/kuberay/rayjob.yaml")
    assert doc["kind"] == "RayJob" and doc["spec"]["shutdownAfterJobFinishes"] is True
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    assert all(c["image"] == image_of_dockerfile() for c in containers(spec))
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "aae-dist"
    args = build_parser().parse_args(argv[1:])  # the entrypoint parses with this package's CLI
    assert args.command == "train" and args.gpu and args.storage.startswith("s3://")
    assert os.path.exists(os.path.join(ROOT, args.config))
    workers = int(args.workers)
    assert workers == sum(g["replicas"] for g in spec["workerGroupSpecs"])
