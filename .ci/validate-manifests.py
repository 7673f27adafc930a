#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests offline (used by .ci/chart-check).

Every document of every file given is checked:
- Built-in kinds against the OpenAPI-derived JSON schemas that the `kubernetes-validate`
  package ships, strictly (unknown fields are errors), for each `--kubernetes-version`.
  A built-in kind without a schema (a typo in apiVersion or kind) is an error, not a warning.
- The Prometheus Operator's custom resources (ServiceMonitor, PrometheusRule of
  monitoring.coreos.com/v1), for which the package has no schema, against the small
  structural schemas below: the fields this chart sets, their types, and no unknown ones at
  the levels listed. The CRDs themselves are not available offline.
Also: every document has a name, and no two documents share kind and name.

With `--toml-dir DIR`, the `gateway.toml` of every ConfigMap is written to DIR (one file per
rendered file) so that the gateway can check it (`refiner-gateway check-config`).

Exit status: 0 when everything validates, 1 otherwise (every problem is printed).
"""

import argparse
import os
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

STRING = {"type": "string"}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": STRING,
        "namespace": STRING,
        "labels": LABELS,
        "annotations": LABELS,
    },
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": LABELS,
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}

# monitoring.coreos.com/v1 ServiceMonitor, the fields of the Prometheus Operator's CRD that
# this chart uses (https://prometheus-operator.dev/docs/api-reference/api/).
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": STRING,
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": STRING},
                    },
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": STRING,
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "authorization": {
                                "type": "object",
                                "required": ["credentials"],
                                "properties": {
                                    "type": STRING,
                                    "credentials": {
                                        "type": "object",
                                        "required": ["name", "key"],
                                        "properties": {
                                            "name": STRING,
                                            "key": STRING,
                                            "optional": {"type": "boolean"},
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                                "additionalProperties": False,
                            },
                            "metricRelabelings": {
                                "type": "array",
                                "items": {"type": "object"},
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

RULE = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "record": STRING,
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": LABELS,
        "annotations": LABELS,
    },
    "additionalProperties": False,
}

# monitoring.coreos.com/v1 PrometheusRule.
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": STRING,
                            "interval": DURATION,
                            "rules": {"type": "array", "minItems": 1, "items": RULE},
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}


def documents(path):
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def validate_custom(doc, schema):
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    problems = [
        "%s: %s" % (".".join(str(p) for p in e.path) or "(top)", e.message) for e in errors
    ]
    if doc.get("kind") == "PrometheusRule":
        names = [
            rule.get("alert") or rule.get("record")
            for group in doc.get("spec", {}).get("groups", [])
            for rule in group.get("rules", [])
        ]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append("rules defined twice: %s" % ", ".join(duplicates))
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", action="append", required=True)
    parser.add_argument("--toml-dir")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    failures = 0
    checked = 0
    for path in args.files:
        seen = set()
        docs = documents(path)
        if not docs:
            print("ERROR %s: no manifests rendered" % path)
            failures += 1
        for doc in docs:
            kind = doc.get("kind")
            api_version = doc.get("apiVersion")
            name = (doc.get("metadata") or {}).get("name")
            label = "%s %s/%s" % (path, kind, name)
            if not kind or not api_version or not name:
                print("ERROR %s: a document without apiVersion, kind or metadata.name" % path)
                failures += 1
                continue
            if (kind, name) in seen:
                print("ERROR %s: rendered twice" % label)
                failures += 1
            seen.add((kind, name))
            checked += 1
            custom = CUSTOM.get((api_version, kind))
            if custom is not None:
                problems = validate_custom(doc, custom)
                for problem in problems:
                    print("ERROR %s (structural schema): %s" % (label, problem))
                failures += len(problems)
                if not problems:
                    print("ok    %s (structural schema, custom resource)" % label)
                continue
            for version in args.kubernetes_version:
                try:
                    validated = kv.validate(doc, version, strict=True)
                    print("ok    %s against Kubernetes %s (strict)" % (label, validated))
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print("ERROR %s against Kubernetes %s: %s: %s" % (label, e.version, where, e.message))
                    failures += 1
                except kv.SchemaNotFoundError as e:
                    print("ERROR %s: %s" % (label, e.message))
                    failures += 1
                except kv.VersionNotSupportedError:
                    print("ERROR kubernetes-validate has no schemas for Kubernetes %s" % version)
                    return 1
            if args.toml_dir and kind == "ConfigMap" and "gateway.toml" in (doc.get("data") or {}):
                os.makedirs(args.toml_dir, exist_ok=True)
                target = os.path.join(
                    args.toml_dir, os.path.basename(path).rsplit(".", 1)[0] + ".toml"
                )
                with open(target, "w") as handle:
                    handle.write(doc["data"]["gateway.toml"])
    print("%d manifests checked, %d problems" % (checked, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
