"""`fox average`: the mean of a run's last K checkpoints, taken over the fp32 master weights, saved with the
config that rebuilds the model.

Under bf16, DeepSpeed's module copy in a checkpoint is bf16; the fp32 masters that the optimizer updates live
in the optimizer state, and that is what is averaged:
    ZeRO 0: mp_rank_00_model_states.pt["optimizer"]["fp32_groups"]: one fp32 tensor per parameter, in the
            order of the optimizer's param groups (fox's LanguageModel.optimizer_groups)
    ZeRO 1/2: *zero_pp_rank_<r>_mp_rank_00_optim_states.pt: rank r's slice of each flat fp32 group
            ("single_partition_of_fp32_groups") and, per parameter, where its fragment lies in that slice
            ("param_slice_mappings"); a parameter is its fragments over the ranks in rank order
    fp32 without ZeRO: the module itself is fp32
Files are opened with mmap, so only the master weights are read (not the Adam moments, ~2/3 of a checkpoint);
memory holds the running sum and one checkpoint's masters, about 8 bytes per parameter (fox.config's
average_mem_mb declares it to the scheduler). ZeRO 3 goes through DeepSpeed's zero_to_fp32.

The saved file is self-contained: {"model_config": asdict(ModelConfig), "state_dict", "checkpoints": [tags],
"run"}, so evaluation needs neither DeepSpeed nor the run's config to load it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fox.files import atomic_path
from fox.model import LanguageModel, ModelConfig
from fox.tracking import Tracker
from fox.train import read_manifest
from fox.train.trainer import build_model


def _load(path: Path) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped (tensors are read when touched); a damaged file is named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"checkpoint file {path} cannot be read ({error}); delete its checkpoint folder and "
                         "its entry in checkpoints/manifest.json, or retrain") from error


def master_weights(folder: Path, model: LanguageModel, weight_decay: float) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer holds in one DeepSpeed checkpoint folder, by parameter name."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    optim_files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                         key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))
    if optim_files:
        ranks = [_load(path)["optimizer_state_dict"] for path in optim_files]
        if "param_slice_mappings" not in ranks[0]:  # ZeRO 3: DeepSpeed's own reader gathers its partitions
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        fragments: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
        for rank in ranks:
            for flat, mapping in zip(rank["single_partition_of_fp32_groups"], rank["param_slice_mappings"],
                                     strict=True):
                for name, address in mapping.items():
                    fragments[name].append(flat.narrow(0, address.start, address.numel))
        return {name: torch.cat(parts).view(shapes[name]).float().clone() for name, parts in fragments.items()}
    states = _load(folder / "mp_rank_00_model_states.pt")
    optimizer = states.get("optimizer") or {}
    if "fp32_groups" in optimizer:
        masters = {}
        names = {id(p): name for name, p in model.named_parameters()}
        for group, tensors in zip(model.optimizer_groups(weight_decay), optimizer["fp32_groups"], strict=True):
            for param, tensor in zip(group["params"], tensors, strict=True):
                if tensor.shape != param.shape:
                    raise ValueError(f"{folder}: fp32 master of {names[id(param)]} has shape {tuple(tensor.shape)}, "
                                     f"the model {tuple(param.shape)}: the checkpoint is not of this model")
                masters[names[id(param)]] = tensor.float().clone()
        return masters
    return {name: tensor.float().clone() for name, tensor in states["module"].items()}


def average_checkpoints(run_cfg: dict, out: Path) -> dict:
    """Average the last average.last_k checkpoints of the run into `out`; returns what was saved."""
    root = Path(run_cfg["run_dir"]) / "checkpoints"
    entries = read_manifest(root)
    last_k = run_cfg["average"]["last_k"]
    if len(entries) < last_k:
        raise ValueError(f"average.last_k={last_k}: {root} lists {len(entries)} checkpoint(s); train the run "
                         "to the end first, or lower average.last_k")
    tags = [entry["tag"] for entry in entries[-last_k:]]
    modules = _load(root / tags[-1] / "mp_rank_00_model_states.pt")["module"]
    # the embedding's rows are the model's vocabulary, whether it came from the tokenizer or model.vocab_size
    with torch.device("meta"):
        model = build_model(run_cfg, modules["embed.weight"].shape[0], activation_checkpointing=False)
    total: dict[str, torch.Tensor] = {}
    for tag in tags:
        masters = master_weights(root / tag, model, run_cfg["train"]["weight_decay"])
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
