"""The experiment config: schema validation, grid expansion, run ids, and the resolved per-run config.

One schema (config.schema.yaml beside this file) is the truth for every key; Snakemake validates the same file
at parse time. A bad value fails with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import torch
import yaml

from fox.model import LanguageModel, model_config
from fox.model.config import PRESETS, RECURRENT_ARCHS, peak_lr

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
TOKENIZER_VOCAB = {"bytes": 257, "gpt2": 50257}

RUN_ID = re.compile(r"^(?P<model>fox|transformer|mamba2|hgrn2|deltanet)(?:-(?P<block>llama|pro))?"
                    r"-(?P<size>[a-z0-9]+)-ctx(?P<context>\d+)-(?P<acp>acp|dense)$")


class ConfigError(ValueError):
    """A config value is not allowed; the message names the key, the value and what is allowed."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(path) -> str:
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line for a schema violation: key, value, what is allowed."""
    key, value, rule = _key_path(error.absolute_path), error.instance, error.validator_value
    if error.validator == "enum":
        return f"{key}={value!r}: allowed are {', '.join(map(str, rule))}"
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        unknown = ", ".join(sorted(set(value) - set(error.schema.get("properties", {}))))
        return f"{key}: unknown key {unknown}; allowed are {allowed}"
    if error.validator == "required":
        return f"{key}: {error.message}"
    if error.validator == "type":
        return f"{key}={value!r}: must be of type {' or '.join(rule) if isinstance(rule, list) else rule}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if error.validator in bounds:
        return f"{key}={value!r}: must be {bounds[error.validator]} {rule}"
    if error.validator in ("minItems", "maxItems", "minLength"):
        return f"{key}={value!r}: {error.validator} is {rule}"
    if error.validator == "pattern":
        return f"{key}={value!r}: must match {rule}"
    return f"{key}={value!r}: {error.message}"


def _fill_defaults(schema: dict, instance: Any) -> None:
    """Fill the schema's defaults into instance, recursing into objects and arrays of objects."""
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                _fill_defaults(sub, instance[name])
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(schema["items"], item)


def validate(config: dict) -> dict:
    """Validated copy of config with defaults filled in; raises ConfigError on the first bad value."""
    schema = load_schema()
    config = copy.deepcopy(config)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: e.path)
    if errors:
        raise ConfigError(f"config: {_describe(errors[0])}")
    _fill_defaults(schema, config)
    for index, entry in enumerate(config["grid"]):
        _check_block_axis(index, entry)
    for cell in expand_grid(config):
        if cell["model"] != "fox" and cell["acp"]:
            raise ConfigError(f"config: grid[{cell['block_index']}].acp=true with model={cell['model']}: "
                              "ACP prunes forget-gate attention, allowed only for model fox")
    for cell in expand_grid(config):
        train = {**config["train"], **cell["train"]}
        if train.get("compile") is True and train.get("zero_stage") == 3:
            raise ConfigError(f"config: train.compile=true with train.zero_stage=3 (run {run_id(cell)}): ZeRO-3 "
                              "gathers parameters in hooks that break the compiled graph at every layer; allowed "
                              "are compile true with zero_stage 0-2, or compile auto/false with zero_stage 3")
        per_pass = cell["context"] * train["micro_batch_size"]
        if train["tokens_per_step"] % per_pass:
            raise ConfigError(f"config: train.tokens_per_step={train['tokens_per_step']}: must be a multiple of "
                              f"context x micro_batch_size = {cell['context']} x {train['micro_batch_size']} "
                              f"(run {run_id(cell)})")
    vocab, needed = config["model"]["vocab_size"], TOKENIZER_VOCAB[config["tokenizer"]["name"]]
    if vocab is not None and vocab < needed:
        raise ConfigError(f"config: model.vocab_size={vocab}: must be >= the {config['tokenizer']['name']} "
                          f"tokenizer's {needed} ids (or null to take the tokenizer's)")
    if config["corpus"]["source"] == "zarr" and config["corpus"]["windows"] != "documents":
        raise ConfigError("config: corpus.windows='packed' with corpus.source='zarr': a zarr corpus holds "
                          "fixed-length documents without separators; allowed is 'documents'")
    if config["average"]["last_k"] > config["train"]["keep_checkpoints"]:
        raise ConfigError(f"config: average.last_k={config['average']['last_k']}: must be <= "
                          f"train.keep_checkpoints={config['train']['keep_checkpoints']} (older ones are deleted)")
    return config


def _check_block_axis(index: int, entry: dict) -> None:
    """block goes with the attention models and never with the recurrent baselines, which have their own."""
    recurrent = [model for model in entry["model"] if model in RECURRENT_ARCHS]
    attention = [model for model in entry["model"] if model not in RECURRENT_ARCHS]
    if recurrent and "block" in entry:
        raise ConfigError(f"config: grid[{index}].block={entry['block']} with model={', '.join(recurrent)}: the block "
                          "(llama, pro) applies to fox and transformer only; put the recurrent baselines in a grid "
                          "entry without block")
    if attention and "block" not in entry:
        raise ConfigError(f"config: grid[{index}].block is required for model={', '.join(attention)} "
                          "(allowed: llama, pro)")


def merge(base: dict, override: dict) -> dict:
    """override over base as Snakemake merges --configfile over the workflow's configfile: mappings key by key,
    lists (e.g. grid) and scalars replaced whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(*paths: str | Path) -> dict:
    """Read YAML (or JSON) config files, each merged over the ones before it, and validate the result."""
    config: dict = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config: file {str(path)!r} does not exist")
        config = merge(config, yaml.safe_load(path.read_text()) or {})
    return validate(config)


def run_id(cell: dict) -> str:
    """Run id of a grid cell, e.g. fox-pro-125m-ctx16384-acp, or mamba2-760m-ctx16384-dense for a recurrent
    baseline (no block); parse_run_id inverts it."""
    model = cell["model"] if cell["block"] is None else f"{cell['model']}-{cell['block']}"
    return f"{model}-{cell['size']}-ctx{cell['context']}-{'acp' if cell['acp'] else 'dense'}"


def parse_run_id(run: str) -> dict:
    match = RUN_ID.match(run)
    if match is None or (match["block"] is None) != (match["model"] in RECURRENT_ARCHS):
        raise ConfigError(f"run id {run!r}: expected <fox|transformer>-<llama|pro>-<size>-ctx<N>-<acp|dense> or "
                          "<mamba2|hgrn2|deltanet>-<size>-ctx<N>-<acp|dense>")
    parts = match.groupdict()
    return {**parts, "context": int(parts["context"]), "acp": parts["acp"] == "acp"}


def expand_grid(config: dict) -> list[dict]:
    """All grid cells in config order, each {model, block, size, context, acp, train, block_index}."""
    cells, seen = [], set()
    for block_index, block in enumerate(config["grid"]):
        lists = [block["model"], block.get("block", [None]), block["size"], block["context"],
                 block.get("acp", [False])]
        for model, kind, size, context, acp in itertools.product(*lists):
            cell = {"model": model, "block": kind, "size": size, "context": context, "acp": acp}
            if run_id(cell) in seen:
                continue
            seen.add(run_id(cell))
            cells.append({**cell, "train": block.get("train", {}), "block_index": block_index})
    return cells


def run_ids(config: dict) -> list[str]:
    return [run_id(cell) for cell in expand_grid(config)]


def data_dir(config: dict) -> str:
    return f"{config['results_dir']}/data/{config['corpus']['name']}/{config['tokenizer']['name']}"


def run_dir(config: dict, run: str) -> str:
    return f"{config['results_dir']}/runs/{run}"


def resolve_run(config: dict, run: str) -> dict:
    """Everything one run needs, as plain JSON: written to runs/{run}/config.json, read by every stage."""
    cells = {run_id(cell): cell for cell in expand_grid(config)}
    if run not in cells:
        raise ConfigError(f"run {run!r} is not in the config's grid; runs are: {', '.join(cells)}")
    cell = cells[run]
    train = {**config["train"], **cell["train"]}
    unknown = set(cell["train"]) - set(config["train"])
    if unknown:
        raise ConfigError(f"config: grid[{cell['block_index']}].train: unknown key {', '.join(sorted(unknown))}; "
                          f"allowed are {', '.join(sorted(config['train']))}")
    if train["lr"] is None:  # resolved here, so the run's config.json, `snakemake -n` and MLflow show the value
        train["lr"] = peak_lr(cell["model"], cell["block"], cell["size"], train["tokens"])
    return {
        "run": run,
        "grid": {key: cell[key] for key in ("model", "block", "size", "context", "acp")},
        "experiment": config["experiment"],
        "tracking_uri": config["tracking_uri"],
        "results_dir": config["results_dir"],
        "data_dir": data_dir(config),
        "run_dir": run_dir(config, run),
        "tokenizer": {key: config["tokenizer"][key] for key in ("name", "json_escape")},
        "windows": config["corpus"]["windows"],
        "model": config["model"],
        "train": {**train, "context": cell["context"]},
        "average": config["average"],
        "evaluate": config["evaluate"],
    }


def load_run_config(path: str | Path) -> dict:
    """A resolved run config (runs/{run}/config.json)."""
    return json.loads(Path(path).read_text())


def average_mem_mb(config: dict) -> Callable[[Any], int]:
    """The averaging rule's mem_mb, as a function of the job's wildcards: the running fp32 sum plus one
    checkpoint's fp32 masters (8 bytes per parameter; the rest of a checkpoint is memory-mapped, not loaded)
    and 2 GB for Python and torch."""

    def mem_mb(wildcards) -> int:
        cell = parse_run_id(wildcards.run)
        preset = PRESETS[cell["size"]]
        vocab = config["model"]["vocab_size"] or TOKENIZER_VOCAB[config["tokenizer"]["name"]]
        if cell["block"] is None:  # a recurrent baseline: its exact count, from a model on the meta device
            return int(8 * _meta_param_count(cell, vocab) / 2**20) + 2048
        mlp = 3.5 if cell["block"] == "pro" else 4.0
        per_layer = (4 + 1 + 3 * mlp * 2 / 3) * preset.d_model**2  # attention, Pro's output gate, SwiGLU
        params = preset.n_layer * per_layer + 2 * vocab * preset.d_model
        return int(8 * params / 2**20) + 2048

    return mem_mb


def _meta_param_count(cell: dict, vocab: int) -> int:
    with torch.device("meta"):
        return LanguageModel(model_config(cell["model"], None, cell["size"], vocab_size=vocab)).param_counts()["total"]
