"""The DeepSpeed config plugin: section parsing, param groups and refusals (single process, no torchrun)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from lowrank_optim import FiraAdamW, GaLoreAdamW
from lowrank_optim.deepspeed import LowRankSection, optimizer_factory, param_groups_for, read_config

BASE = {"train_batch_size": 4, "zero_optimization": {"stage": 2}, "lowrank_optim": {"rank": 4}}


def _config(**changes) -> dict:
    config = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        config[key] = value
    return config


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 6)
        self.mlp = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)


def test_reads_path_and_strips_section(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(BASE))
    config, section = read_config(path)
    assert "lowrank_optim" not in config and config["zero_optimization"] == {"stage": 2}
    assert section.rank == 4 and section.optimizer == "galore_adamw"
    assert BASE["lowrank_optim"] == {"rank": 4}  # the caller's dict is not modified


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, "an 'optimizer' section .*'AdamW'.* silently ignore"),
        ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "elastic_checkpoint' is true"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload_param.device' is 'nvme'"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "offload_optimizer.device' is 'nvme'"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "at stage 3 is not supported"),
        ({"pipeline": {"stages": 2}}, "Pipeline and tensor parallelism"),
        ({"tensor_parallel": {"autotp_size": 2}}, "Pipeline and tensor parallelism"),
        ({"sequence_parallel_size": 2}, "sequence parallelism is not supported"),
        ({"zero_optimization": {"stage": 2, "rank": 8}}, r"\['rank'\] are inside 'zero_optimization'.*top-level"),
        ({"zero_optimization": {"stage": 2, "galore_rank": 8}}, r"\['galore_rank'\] are inside 'zero_optimization'"),
        ({"lowrank_optim": {"optimizer": "adamw"}}, "Invalid 'lowrank_optim.optimizer': 'adamw'. Must be one of"),
        ({"lowrank_optim": {"rnak": 4}}, r"Unknown key\(s\) \['rnak'\].*Allowed keys"),
        ({"lowrank_optim": {"zero3_moments": "gather"}}, "Invalid 'lowrank_optim.zero3_moments': 'gather'"),
        (
            {"lowrank_optim": {"moment_format": "4bit"}},
            r"Invalid moment_format in 'lowrank_optim.moment_format': '4bit'\. Must be one of full, 8bit",
        ),
        (
            {"lowrank_optim": {"moment_format": {"name": "8bit", "block_size": 0}}},
            r"Invalid block_size in 'lowrank_optim.moment_format': 0\. Must be an integer from 1 to 4096",
        ),
        ({"lowrank_optim": {"scale": 0.5, "alpha": 0.25}}, "sets scale=0.5 and alpha=0.25"),
        # Fira's settings for another optimizer would be dropped: refused, also at their default values.
        ({"lowrank_optim": {"gamma": 1.5}}, r"sets \['gamma'\] for optimizer 'galore_adamw', which does not read it"),
        (
            {"lowrank_optim": {"optimizer": "dct_adamw", "residual": "code", "fold_residual": True}},
            r"sets \['residual', 'fold_residual'\] for optimizer 'dct_adamw'.*Remove them or choose fira_adamw",
        ),
    ],
)
def test_refusals(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_config(_config(**changes))


def test_fira_settings_refused_for_other_optimizers_when_built_directly() -> None:
    with pytest.raises(ValueError, match=r"sets \['fold_residual'\] for optimizer 'galore_adamw'"):
        LowRankSection(fold_residual=False)
    assert LowRankSection(optimizer="fira_adamw", gamma=1.5, fold_residual=False).gamma == 1.5


def test_missing_section() -> None:
    with pytest.raises(ValueError, match="no top-level 'lowrank_optim' section"):
        read_config({"train_batch_size": 4})


def test_param_groups_and_factory() -> None:
    model = Net()
    section = LowRankSection.from_dict({"optimizer": "fira_adamw", "rank": 2, "alpha": 0.5, "target_modules": ["attn", "mlp"]})
    groups = param_groups_for(model, section)
    assert [p is model.attn.weight for p in groups[1]["params"]] == [True, False]
    assert groups[1]["alpha"] == 0.5 and groups[1]["rank"] == 2
    plain = (model.attn.bias, model.mlp.bias, model.norm.weight, model.norm.bias)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in plain}
    optimizer = optimizer_factory(section)(groups)
    assert isinstance(optimizer, FiraAdamW) and optimizer.defaults["alpha"] == 0.5
    assert optimizer.defaults["fold_residual"] is True
    explicit = LowRankSection.from_dict({"optimizer": "fira_adamw", "rank": 2, "fold_residual": False})
    assert optimizer_factory(explicit)(param_groups_for(model, explicit)).defaults["fold_residual"] is False
    assert isinstance(optimizer_factory({"rank": 2})(param_groups_for(model, {"rank": 2})), GaLoreAdamW)


def test_ds_shape_is_used() -> None:
    """Under deepspeed.zero.Init the tensors are empty and the real shape is ds_shape."""
    model = Net()
    model.attn.weight.data = torch.empty(0)
    model.attn.weight.ds_shape = torch.Size([6, 8])
    groups = param_groups_for(model, {"rank": 2, "target_modules": ["attn"]})
    assert groups[1]["params"] == [model.attn.weight]
    optimizer_factory({"rank": 2})(groups)  # validation reads ds_shape too


def test_refuses_projected_parameter_that_is_not_2d() -> None:
    # The rule shared with param_groups and convert_to_sltrain (lowrank_optim.targets).
    with pytest.raises(
        ValueError,
        match=r"pattern 'norm' matches no linear layer .*'norm' \(LayerNorm, weight \(4,\), bias \(4,\)\); only the 2-D weights",
    ):
        param_groups_for(Net(), {"rank": 2, "target_modules": ["norm"]})


def test_apollo_through_the_plugin() -> None:
    from lowrank_optim import APOLLOAdamW

    model = Net()
    section = LowRankSection.from_dict({"optimizer": "apollo_adamw", "rank": 1, "scale": 128, "scale_type": "tensor",
                                        "gamma": 1.02, "disable_nl": True, "target_modules": ["attn", "mlp"]})
    optimizer = optimizer_factory(section)(param_groups_for(model, section))
    assert isinstance(optimizer, APOLLOAdamW)
    assert (optimizer.defaults["scale_type"], optimizer.defaults["gamma"], optimizer.defaults["scale"]) == ("tensor", 1.02, 128)
    assert optimizer.defaults["disable_nl"] is True and optimizer.param_groups[1]["scale"] == 128
    with pytest.raises(ValueError, match=re.escape(
        "sets ['scale_type'] for optimizer 'galore_adamw', which does not read it: scale_type is read by apollo_adamw. "
        "Remove it or choose apollo_adamw."
    )):
        LowRankSection.from_dict({"scale_type": "channel"})
    with pytest.raises(ValueError, match=re.escape(
        "sets ['residual'] for optimizer 'apollo_adamw', which does not read it: residual is read by fira_adamw"
    )):
        LowRankSection.from_dict({"optimizer": "apollo_adamw", "residual": "code"})
    with pytest.raises(ValueError, match=re.escape(
        "sets ['gamma'] for optimizer 'dct_adamw', which does not read it: gamma is read by fira_adamw and apollo_adamw. "
        "Remove it or choose fira_adamw or apollo_adamw."
    )):
        LowRankSection.from_dict({"optimizer": "dct_adamw", "gamma": 1.01})
    with pytest.raises(ValueError, match=re.escape("Invalid 'lowrank_optim.scale_type': 'row'. Must be one of channel, tensor")):
        LowRankSection.from_dict({"optimizer": "apollo_adamw", "scale_type": "row"})
    with pytest.raises(ValueError, match=re.escape("Invalid 'lowrank_optim.disable_nl': 1. Must be true or false")):
        LowRankSection.from_dict({"optimizer": "apollo_adamw", "disable_nl": 1})


def test_moment_format_reaches_every_group() -> None:
    """``moment_format`` (a name or an object of options) is the optimizer's default for every group."""
    from lowrank_optim import Blockwise8bit

    model = Net()
    section = LowRankSection.from_dict({"rank": 2, "moment_format": {"name": "8bit", "block_size": 64}})
    optimizer = optimizer_factory(section)(param_groups_for(model, section))
    assert [group["moment_format"] for group in optimizer.param_groups] == [Blockwise8bit(block_size=64)] * 2
    assert LowRankSection.from_dict({}).moment_format == "full"
