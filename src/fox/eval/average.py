"""`fox average`: the mean of a run's last K checkpoints, taken over the fp32 master weights
(fox.train.fp32_state_dict), saved with the config that rebuilds the model.

One checkpoint is read at a time and added to a running sum: memory holds the sum and one checkpoint's masters,
about 8 bytes per parameter (fox.config's average_mem_mb declares it to the scheduler).

The saved file is self-contained: {"model_config": asdict(ModelConfig), "state_dict", "checkpoints": [tags],
"run"}, so evaluation needs neither DeepSpeed nor the run's config to load it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fox.data import load_manifest
from fox.files import atomic_path
from fox.model import LanguageModel, ModelConfig
from fox.tracking import Tracker
from fox.train import fp32_state_dict, read_manifest
from fox.train.trainer import build_model


def average_checkpoints(run_cfg: dict, out: Path) -> dict:
    """Average the last average.last_k checkpoints of the run into `out`; returns what was saved."""
    root = Path(run_cfg["run_dir"]) / "checkpoints"
    entries = read_manifest(root)
    last_k = run_cfg["average"]["last_k"]
    if len(entries) < last_k:
        raise ValueError(f"average.last_k={last_k}: {root} lists {len(entries)} checkpoint(s); train the run "
                         "to the end first, or lower average.last_k")
    tags = [entry["tag"] for entry in entries[-last_k:]]
    with torch.device("meta"):  # the vocabulary as training saw it (the embedding's rows carry its padding)
        model = build_model(run_cfg, load_manifest(run_cfg["data_dir"])["tokenizer"]["n_vocab"],
                            activation_checkpointing=False)
    total: dict[str, torch.Tensor] = {}
    for tag in tags:
        masters = fp32_state_dict(root, tag)
        if total and set(masters) != set(total):
            raise ValueError(f"checkpoints disagree on parameter names: {sorted(set(masters) ^ set(total))}")
        for name, tensor in masters.items():
            total[name] = total[name].add_(tensor) if name in total else tensor
        del masters
    state = {name: tensor.div_(len(tags)) for name, tensor in total.items()}
    saved = {"model_config": dataclasses.asdict(model.cfg), "state_dict": state, "checkpoints": tags,
             "run": run_cfg["run"]}
    with atomic_path(out) as tmp:
        torch.save(saved, tmp)

    tracker = Tracker(run_cfg)
    tracker.start()
    tracker.log_params({"average": {"checkpoints": ",".join(tags)}})
    tracker.end()
    print(f"[fox] {run_cfg['run']}: averaged the fp32 master weights of {', '.join(tags)} -> {out}", flush=True)
    return saved


def load_model(path: Path) -> LanguageModel:
    """The averaged model in fp32 and eval mode, on the CPU."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = LanguageModel(ModelConfig(**saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()
