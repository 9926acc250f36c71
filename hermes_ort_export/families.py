"""Every supported architecture, and turning a SOURCE (table name or local folder) into a torch model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hermes_ort.errors import HermesError

from . import bert, configs, gpt2, llama, vit
from .family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (gpt2.FAMILY, bert.FAMILY, vit.FAMILY, *llama.FAMILIES)}


def family_of_model_type(model_type: str, where: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise HermesError(f"{where}: model_type '{model_type}' is not supported; supported: {', '.join(supported)}")


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "tokenizer.model"]  # config, weights, tokenizer: no other formats


def load_source(source: str, seed: int, random_weights: bool = False) -> tuple[Family, torch.nn.Module, Path | None]:
    """(family, eval-mode torch model, local folder or None). SOURCE: a local transformers folder, a table
    name (the published model it names, or with random_weights seeded random weights of its shape), or a
    Hugging Face repository id."""
    folder = Path(source)
    if random_weights:
        if folder.is_dir():
            raise HermesError(f"--random-weights takes a table name ({', '.join(configs.NAMED)}), not a folder")
        family_name, settings = configs.named(source)
        torch.manual_seed(seed)
        return FAMILIES[family_name], FAMILIES[family_name].build(settings).eval(), None
    if not folder.is_dir():
        folder = hub_folder(source)
    if folder.is_dir():
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise HermesError(f"{folder} has no config.json: not a transformers model folder")
        family = family_of_model_type(json.loads(config_path.read_text()).get("model_type", "?"), str(config_path))
        return family, family.load(str(folder)).eval(), folder
    raise HermesError(f"{folder} is not a directory")


def hub_folder(source: str) -> Path:
    """The local snapshot of a published model: from the Hugging Face cache, else downloaded into it."""
    if "/" not in source:
        configs.named(source)  # an unknown name lists the known ones
    repo = configs.HUB.get(source, source)
    if "/" not in repo:
        raise HermesError(f"'{source}' is a test shape with no published weights: pass --random-weights for "
                          "seeded random weights of its shape")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repository, no access: the hub's many error types
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # its first sentence
        raise HermesError(f"cannot get '{source}' ({repo}) from the Hugging Face hub or its local cache: "
                          f"{type(e).__name__}: {reason}; pass --random-weights for seeded random weights "
                          f"of its shape") from e
