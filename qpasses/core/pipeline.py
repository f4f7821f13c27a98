"""Pipelines as text and as YAML/JSON files.

Text: ``"fold-batchnorm,cle{iterations=3,threshold=0.5},quantize"`` (MLIR style).
File: a list of steps, each a pass name or ``{name: cle, options: {iterations: 3}}``
(also accepted: ``{cle: {iterations: 3}}``), optionally under a top-level ``pipeline`` key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qpasses.core.errors import PassError, PipelineError
from qpasses.core.pass_base import Pass
from qpasses.core.registry import Registry


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_pipeline(text: str) -> list[PassSpec]:
    specs: list[PassSpec] = []
    for step in _split_top_level(text):
        step = step.strip()
        if not step:
            continue
        if "{" in step:
            if not step.endswith("}"):
                raise PipelineError(f"pipeline step {step!r}: options must be written name{{key=value,...}}")
            name, body = step[:-1].split("{", 1)
            options: dict[str, Any] = {}
            for item in _split_top_level(body):
                if not item.strip():
                    continue
                if "=" not in item:
                    raise PipelineError(f"pipeline step {step!r}: option {item.strip()!r} is not key=value")
                k, v = item.split("=", 1)
                options[k.strip()] = v.strip()
            specs.append(PassSpec(name.strip(), options))
        else:
            specs.append(PassSpec(step))
    return specs


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise PipelineError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append("".join(cur))
    return parts


def load_pipeline_file(path: str | Path) -> list[PassSpec]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path}: cannot parse pipeline file: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "pipeline" in data:
        data = data["pipeline"]
    if data is None:
        return []
    if isinstance(data, str):
        return parse_pipeline(data)
    if not isinstance(data, list):
        raise PipelineError(f"{path}: a pipeline file holds a list of passes")
    specs = []
    for i, step in enumerate(data):
        if isinstance(step, str):
            specs.append(PassSpec(step))
        elif isinstance(step, dict) and "name" in step:
            opts = step.get("options") or {}
            extra = set(step) - {"name", "options"}
            if extra or not isinstance(opts, dict):
                raise PipelineError(f"{path}: step {i + 1} ({step['name']}): expected keys name, options")
            specs.append(PassSpec(str(step["name"]), dict(opts)))
        elif isinstance(step, dict) and len(step) == 1:
            ((name, opts),) = step.items()
            if opts is not None and not isinstance(opts, dict):
                raise PipelineError(f"{path}: step {i + 1} ({name}): options must be a mapping")
            specs.append(PassSpec(str(name), dict(opts or {})))
        else:
            raise PipelineError(f"{path}: step {i + 1} is not a pass name or {{name, options}} mapping")
    return specs


def build_passes(specs: list[PassSpec], registry: Registry) -> list[Pass]:
    passes = []
    for spec in specs:
        try:
            passes.append(registry.create_pass(spec.name, **spec.options))
        except PassError:
            raise
        except TypeError as exc:
            raise PassError(f"pass '{spec.name}': {exc}") from None
    return passes
