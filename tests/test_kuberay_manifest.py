"""deploy/kuberay/rayservice.yaml, checked without a cluster: the resource against KubeRay's
RayService CRD schema (tests/data/kuberay, unknown fields refused as `kubectl --validate=strict`
does), its serveConfigV2 against Ray Serve's own config schema, and its application arguments
by building the application they describe."""

from __future__ import annotations

import copy
import json
import lzma
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from fermi.errors import InvalidRequest
from fermi.ray_serve.app import _replica_count, app_builder
from fermi.ray_serve.scale import ScaleOptions
from fermi.settings import Settings

ROOT = Path(__file__).parent.parent
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SCHEMA = Path(__file__).parent / "data" / "kuberay" / "rayservice-v1.schema.json.xz"


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused wherever the CRD lists its fields (the API
    server would prune them silently; a typo should fail here instead)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads(lzma.open(SCHEMA).read()))
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def manifest():
    return yaml.safe_load(MANIFEST.read_text())


def test_manifest_matches_the_rayservice_crd(validator, manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(manifest)]
    assert errors == []


def test_the_schema_check_catches_a_misspelt_field(validator, manifest):
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    del broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    messages = [e.message for e in validator.iter_errors(broken)]
    assert any("rayStartParam" in m for m in messages)
    assert any("'four' is not of type 'integer'" in m for m in messages)


def test_serve_config_is_valid_and_builds_fermi(manifest):
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "fermi.ray_serve.app:app_builder"
    assert isinstance(app_builder(app.args), Application)


def test_app_builder_names_a_bad_argument():
    with pytest.raises(InvalidRequest, match="unknown argument 'replicas'"):
        app_builder({"model": "m", "replicas": 2})
    with pytest.raises(InvalidRequest, match="max_replicas must be a number"):
        app_builder({"model": "m", "max_replicas": "many"})


def test_replicas_autoscale_on_ongoing_requests_between_min_and_max():
    """Without a fixed count, Ray Serve scales on requests running + queued per replica,
    aiming at the replica's engine pool unless told otherwise."""
    settings = Settings(engine_pool=4)
    config = _replica_count(settings, ScaleOptions(min_replicas=0, max_replicas=6))
    autoscaling = config["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (0, 6)
    assert autoscaling["initial_replicas"] == 1 and autoscaling["target_ongoing_requests"] == 4
    assert _replica_count(settings, ScaleOptions(num_replicas=3)) == {"num_replicas": 3}
    with pytest.raises(InvalidRequest):
        ScaleOptions(min_replicas=5, max_replicas=2).check()
