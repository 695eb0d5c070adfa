"""The data a run is about to train on, checked against its config before the model is built."""

from __future__ import annotations

import math

from fox.data.loader import TrainWindows
from fox.data.shards import check_manifest, load_manifest


def training_data(run_cfg: dict) -> dict:
    """The run's data manifest, after checking that it is the data the config asks for (tokenizer, windows),
    that every training window fits (documents mode), and that train.tokens fits in train.max_epochs passes."""
    data_dir, train = run_cfg["data_dir"], run_cfg["train"]
    manifest = load_manifest(data_dir)
    check_manifest(manifest, data_dir, run_cfg["tokenizer"], run_cfg["windows"])
    windows = TrainWindows(data_dir, train["context"], 1).n_windows  # raises if a window cannot fit
    steps = math.ceil(train["tokens"] / train["tokens_per_step"])
    needed = steps * train["tokens_per_step"] // train["context"]
    if needed > windows * train["max_epochs"]:
        raise ValueError(f"train.tokens={train['tokens']}: {needed} windows of {train['context']} tokens, but the "
                         f"train split of {data_dir} holds {windows} ({needed / windows:.2f} passes); raise "
                         f"train.max_epochs (now {train['max_epochs']}) to repeat data, or train on fewer tokens")
    return manifest
