"""Mini-block mass fraction of (F + λI)⁻¹ for several dampings λ, on the figures' networks.

Uses the same cached checkpoints, Fisher batches and subsets as the commands in README.md and
re-damps the restricted Fisher ``F_S`` returned by ``inverse_fisher_heatmaps`` (one pass over the
data per network and kind). Writes ``figures/damping_sweep.csv``.

Run from the repository root: ``python figures/damping_sweep.py``.
"""

import logging
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mbf_analysis.analysis import ParameterSubset, inverse_fisher_heatmaps, miniblock_mass
from mbf_analysis.checkpoints import TrainConfig, pretrained_model
from mbf_analysis.data import load_dataset
from mbf_analysis.layout import model_layouts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
SETUPS = {
    "paper-mlp / mnist16": dict(
        dataset="mnist16", model="paper-mlp", epochs=50, batch=1000, kinds=("empirical", "exact")
    ),
    "simple-cnn / fashion-mnist": dict(
        dataset="fashion-mnist", model="simple-cnn", epochs=2, batch=512, kinds=("empirical",)
    ),
}


def _subsets(model: nn.Module, name: str) -> list[ParameterSubset]:
    layouts = model_layouts(model)
    if name == "paper-mlp":
        return [ParameterSubset.whole_layer(layouts[layer]) for layer in ("fc2", "fc3", "fc6")]
    return [ParameterSubset.whole_layer(layouts["conv1"])] + [
        ParameterSubset.conv_input_channel(
            layouts["conv2"], c - 1, label=f"conv2 input channel {c}"
        )
        for c in (1, 16, 32)
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    rows = []
    for setup, cfg in SETUPS.items():
        dataset = load_dataset(cfg["dataset"], DATA)
        config = TrainConfig(model=cfg["model"], dataset=cfg["dataset"], epochs=cfg["epochs"])
        model = pretrained_model(config, dataset=dataset).double().eval()
        # the CLI's Fisher batch: seed 0, the first `batch` indices of a permutation
        index = torch.randperm(len(dataset.train_x), generator=torch.Generator().manual_seed(0))
        index = index[: cfg["batch"]]
        result = inverse_fisher_heatmaps(
            model,
            nn.CrossEntropyLoss(),
            dataset.train_x[index],
            dataset.train_y[index],
            _subsets(model, cfg["model"]),
            kinds=cfg["kinds"],
            progress=True,
        )
        for kind, fishers in result.fishers.items():
            for label, fisher in fishers.items():
                subset = result.subsets[label]
                eye = torch.eye(subset.dim, dtype=fisher.dtype)
                for damping in DAMPINGS:
                    inverse = torch.linalg.inv(fisher + damping * eye)
                    mass, area = miniblock_mass(inverse, subset.block_sizes)
                    rows.append(
                        {
                            "setup": setup,
                            "subset": label,
                            "kind": kind,
                            "mean_eig": float(fisher.trace()) / subset.dim,
                            "damping": damping,
                            "miniblock_mass": round(mass, 4),
                            "miniblock_area": round(area, 4),
                        }
                    )
    frame = pd.DataFrame(rows)
    frame.to_csv(Path(__file__).with_name("damping_sweep.csv"), index=False)
    wide = frame.pivot_table(
        index=["setup", "subset", "kind", "miniblock_area"],
        columns="damping",
        values="miniblock_mass",
        sort=False,
    )
    logging.getLogger(__name__).info("mass fraction by damping:\n%s", wide.to_string())


if __name__ == "__main__":
    main()
