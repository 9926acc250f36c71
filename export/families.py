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


def load_source(source: str, seed: int) -> tuple[Family, torch.nn.Module, Path | None]:
    """(family, eval-mode torch model, local folder or None) for a table name or a transformers folder."""
    folder = Path(source)
    if folder.is_dir():
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise HermesError(f"{folder} has no config.json: not a transformers model folder")
        family = family_of_model_type(json.loads(config_path.read_text()).get("model_type", "?"), str(config_path))
        return family, family.load(str(folder)).eval(), folder
    family_name, settings = configs.named(source)
    torch.manual_seed(seed)
    return FAMILIES[family_name], FAMILIES[family_name].build(settings).eval(), None
