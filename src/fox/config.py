"""The experiment config: schema validation, grid expansion, run ids, and the resolved per-run config.

One schema (config.schema.yaml beside this file) is the truth for every key; Snakemake validates the same file
at parse time. A bad value fails with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import torch
import yaml

from fox.model import LanguageModel, model_config
from fox.model.config import (
    COMPONENTS,
    PRESETS,
    RECURRENT_ARCHS,
    canonical_variant,
    default_components,
    parse_variant,
    peak_lr,
)

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
TOKENIZER_VOCAB = {"bytes": 257, "gpt2": 50257}

RUN_ID = re.compile(r"^(?P<model>fox|transformer|mamba2|hgrn2|deltanet)(?:-(?P<block>llama|pro))?"
                    r"-(?P<size>[a-z0-9]+)-ctx(?P<context>\d+)-(?P<acp>acp|dense)(?P<variant>(?:-(?:no|with)_[a-z]+)*)"
                    r"(?:-(?P<tag>[a-z0-9]+))?$")
VARIANT_WORDS = {"+": "with", "-": "no"}  # a Table 3 edit in a run id: "-qknorm" -> "-no_qknorm"


CADENCE = ("log_every_steps", "keep_checkpoints", "checkpoint_every_tokens", "val_every_steps", "val_windows",
           "compile", "compile_memory_budget", "profile_step")
"""Train keys that change what is logged and kept, or how the same computation runs (compile), never the
trajectory beyond rounding: changing them neither retrains nor reruns."""


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
        components = default_components(cell["model"], cell["block"]) | parse_variant(
            cell["model"], cell["block"], cell.get("variant", ""))
        if cell["acp"] and not components["forget_gate"]:
            raise ConfigError(f"config: grid[{cell['block_index']}].acp=true with model={cell['model']}"
                              f"{' and variant ' + repr(cell['variant']) if 'variant' in cell else ''}: ACP "
                              "prunes forget-gate attention, allowed only for models with a forget gate")
    for cell in expand_grid(config):
        train = {**config["train"], **cell["train"]}
        per_pass = cell["context"] * train["micro_batch_size"]
        if train["tokens_per_step"] % per_pass:
            raise ConfigError(f"config: train.tokens_per_step={train['tokens_per_step']}: must be a multiple of "
                              f"context x micro_batch_size = {cell['context']} x {train['micro_batch_size']} "
                              f"(run {run_id(cell)})")
    if config["corpus"]["source"] == "zarr" and config["corpus"]["windows"] != "documents":
        raise ConfigError("config: corpus.windows='packed' with corpus.source='zarr': a zarr corpus holds "
                          "fixed-length documents without separators; allowed is 'documents'")
    if config["average"]["last_k"] > config["train"]["keep_checkpoints"]:
        raise ConfigError(f"config: average.last_k={config['average']['last_k']}: must be <= "
                          f"train.keep_checkpoints={config['train']['keep_checkpoints']} (older ones are deleted)")
    _check_runs(config, schema)
    _check_model_and_evaluation(config)
    return config


TOKENIZER_VOCAB = {"bytes": 257, "gpt2": 50257}
"""Ids each tokenizer emits (tests check these against the real encodings): model.vocab_size may not be lower."""


def _check_runs(config: dict, schema: dict) -> None:
    """Each run's train section (the config's with its grid block's overrides) against the schema, and the
    checkpoints average.last_k will read."""
    train_schema = schema["properties"]["train"]
    for cell in expand_grid(config):
        block = f"grid[{cell['block_index']}].train"
        unknown = set(cell["train"]) - set(train_schema["properties"])
        if unknown:
            raise ConfigError(f"config: {block}: unknown key {', '.join(sorted(unknown))}; allowed are "
                              f"{', '.join(sorted(train_schema['properties']))}")
        errors = sorted(jsonschema.Draft202012Validator(train_schema).iter_errors(cell["train"]), key=lambda e: e.path)
        if errors:
            raise ConfigError(f"config: {block}.{_describe(errors[0])}")
        train = {**config["train"], **cell["train"]}
        # as fox train saves: at each step that crosses a multiple of checkpoint_every_tokens, and at the last
        per_step, every = train["tokens_per_step"], train["checkpoint_every_tokens"]
        steps = -(-train["tokens"] // per_step)
        saved = (steps if every <= per_step else steps * per_step // every) + (steps * per_step % every >= per_step)
        if config["average"]["last_k"] > min(saved, train["keep_checkpoints"]):
            raise ConfigError(f"config: average.last_k={config['average']['last_k']}: run {run_id(cell)} saves "
                              f"{saved} checkpoint(s) (train.tokens={train['tokens']}, checkpoint_every_tokens="
                              f"{train['checkpoint_every_tokens']}); lower last_k or checkpoint more often")


def _check_model_and_evaluation(config: dict) -> None:
    """Values that would fail inside a job: a vocabulary below the tokenizer's, a tracking URI MLflow cannot
    open, lm-eval continuations longer than a run's context."""
    tokenizer, vocab = config["tokenizer"]["name"], config["model"]["vocab_size"]
    if vocab is not None and vocab < TOKENIZER_VOCAB[tokenizer]:
        raise ConfigError(f"config: model.vocab_size={vocab}: must be >= {TOKENIZER_VOCAB[tokenizer]}, the ids of "
                          f"tokenizer {tokenizer!r} (null: the tokenizer's own size)")
    if config["tokenizer"]["rank_file"] is not None and tokenizer != "gpt2":
        raise ConfigError(f"config: tokenizer.rank_file={config['tokenizer']['rank_file']!r}: allowed only with "
                          f"tokenizer.name=gpt2 (name is {tokenizer!r})")
    uri = config["tracking_uri"]
    if uri is not None and not re.match(r"^(sqlite:///|https?://|(postgresql|mysql|mssql)(\+\w+)?://|databricks)", uri):
        raise ConfigError(f"config: tracking_uri={uri!r}: allowed are sqlite:///<path>, http(s)://<server>, "
                          "postgresql/mysql/mssql://..., databricks (null: sqlite under results_dir)")
    local_tasks = config["evaluate"]["lm_eval"]["local_tasks"]
    shortest = min(cell["context"] for cell in expand_grid(config))
    if local_tasks["mc_continuation_tokens"] > shortest:
        raise ConfigError(f"config: evaluate.lm_eval.local_tasks.mc_continuation_tokens="
                          f"{local_tasks['mc_continuation_tokens']}: must be <= the shortest context, {shortest}")


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


def read_yaml(path: str | Path) -> dict:
    """One config file as a mapping; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config: {where}: YAML syntax error: {problem}") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"config: {path}: must be a mapping of keys (results_dir:, grid:, ...), not a "
                          f"{type(content).__name__}")
    return content or {}


def load_config(*paths: str | Path) -> dict:
    """Read YAML (or JSON) config files, each merged over the ones before it, and validate the result."""
    config: dict = {}
    for path in paths:
        config = merge(config, read_yaml(path))
    return validate(config)


def run_id(cell: dict) -> str:
    """Run id of a grid cell, e.g. fox-pro-125m-ctx16384-acp, with a Table 3 variant (edits in canonical order)
    fox-pro-360m-ctx16384-dense-no_fgate-with_rope, or mamba2-760m-ctx16384-dense for a recurrent baseline (no
    block); parse_run_id inverts it."""
    edits = "".join(f"-{VARIANT_WORDS[sign]}_{name}" for sign, name in re.findall(r"([+-])([a-z]+)",
                                                                                 cell.get("variant", "")))
    model = cell["model"] if cell["block"] is None else f"{cell['model']}-{cell['block']}"
    tag = f"-{cell['tag']}" if cell.get("tag") else ""
    return f"{model}-{cell['size']}-ctx{cell['context']}-{'acp' if cell['acp'] else 'dense'}{edits}{tag}"


def parse_run_id(run: str) -> dict:
    """The grid cell of a run id; "variant" (in the grid's +/- spelling) only for a Table 3 variant, "tag" only
    for a tagged grid block."""
    match = RUN_ID.match(run)
    if match is None or (match["block"] is None) != (match["model"] in RECURRENT_ARCHS):
        raise ConfigError(f"run id {run!r}: expected <fox|transformer>-<llama|pro>-<size>-ctx<N>-<acp|dense>"
                          f"[-no_<component>|-with_<component>...] (components {', '.join(COMPONENTS)}) or "
                          "<mamba2|hgrn2|deltanet>-<size>-ctx<N>-<acp|dense>, either with an optional -<tag>")
    parts = {key: value for key, value in match.groupdict().items() if key != "tag" or value}
    cell = {**parts, "context": int(parts["context"]), "acp": parts["acp"] == "acp"}
    words = {word: sign for sign, word in VARIANT_WORDS.items()}
    variant = "".join(words[word] + name for word, name in re.findall(r"-(no|with)_([a-z]+)", cell.pop("variant")))
    return cell | ({"variant": variant} if variant else {})


def expand_grid(config: dict) -> list[dict]:
    """All grid cells in config order, each {model, block, size, context, acp, train, block_index}, plus the
    canonical "variant" of a Table 3 variant (none for the architecture itself) and the block's "tag". A run
    id given by two blocks is an error (a value listed twice in one block is taken once)."""
    cells, seen = [], {}
    for block_index, block in enumerate(config["grid"]):
        lists = [block["model"], block.get("block", [None]), block["size"], block["context"]]
        lists += [block.get("acp", [False]), block.get("variant", [""])]
        for model, kind, size, context, acp, variant in itertools.product(*lists):
            cell = {"model": model, "block": kind, "size": size, "context": context, "acp": acp}
            try:
                variant = canonical_variant(model, kind, variant)
            except ValueError as error:
                raise ConfigError(f"config: grid[{block_index}].{error}") from None
            if variant:
                cell["variant"] = variant
            if block.get("tag"):
                cell["tag"] = block["tag"]
            run = run_id(cell)
            if run in seen:
                if seen[run] == block_index:
                    continue                                     # a value listed twice in one block
                raise ConfigError(f"config: grid[{seen[run]}] and grid[{block_index}] both give run {run}: give one "
                                  "of the blocks a tag (grid[].tag), which suffixes its run ids")
            seen[run] = block_index
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
    if train["val_every_steps"] is None:
        train["val_every_steps"] = 10 * train["log_every_steps"]
    return {
        "run": run,
        # "variant" and "tag" only where set: the four architectures' resolved configs (and so their training
        # identity and Snakemake params) stay as they were
        "grid": {key: cell[key] for key in ("model", "block", "size", "context", "acp", "variant", "tag")
                 if key in cell},
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
        "longbench": config["longbench"],
    }


def training_settings(run_cfg: dict) -> dict:
    """What a run's training depends on: its resolved config less the logging and checkpoint cadence."""
    train = {key: value for key, value in run_cfg["train"].items() if key not in CADENCE}
    return {key: run_cfg[key] for key in ("grid", "model", "data_dir", "run_dir")} | {"train": train}


def longbench_outputs(config: dict) -> list[str]:
    """LongBench's results (the FoX paper's Table 2) when longbench.enabled: the CSV, its Markdown view, the plot."""
    if not config["longbench"]["enabled"]:
        return []
    return [f"{config['results_dir']}/{name}" for name in ("longbench.csv", "longbench.md", "plots/longbench.png")]


def load_run_config(path: str | Path) -> dict:
    """A resolved run config (runs/{run}/config.json)."""
    from fox.files import read_json

    return read_json(path)



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
