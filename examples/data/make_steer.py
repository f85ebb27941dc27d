"""Build examples/data/steer.safetensors: layer 24's mean last-position hidden state over prompts
about Paris minus the same over prompts about Rome (SmolLM2-135M). Run: python examples/data/make_steer.py"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from interp_dsl import LanguageModel

PARIS = ["The Eiffel Tower is in the city of", "The Louvre is a museum in the city of",
         "Notre-Dame cathedral is in the city of"]
ROME = ["The Colosseum is in the city of", "The Pantheon is a temple in the city of",
        "St. Peter's Basilica is in the city of"]

model = LanguageModel("smollm2-135m")


def mean_state(prompts: list[str]) -> torch.Tensor:
    with model.trace(prompts):
        h = model.model.layers[24].output[:, -1, :].mean(dim=0).save()
    return h.value


vector = mean_state(PARIS) - mean_state(ROME)
save_file({"paris_minus_rome": vector.contiguous()}, str(Path(__file__).with_name("steer.safetensors")))
print("norm", float(vector.norm()))
