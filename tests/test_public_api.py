"""The top-level API: every documented name imports from `fcmoe_hf`, and `import fcmoe_hf` stays light."""

import subprocess
import sys

import pytest

import fcmoe_hf

NAMES = [
    "MoELoraConfig", "FederatedMoETrainer", "FederatedMoETrainingArguments", "FederatedMoEMixin", "ClientUpdate",
    "FCMoEAggregator", "build_aggregator", "FederatedSimulation", "FederationArguments",
]


@pytest.mark.parametrize("name", fcmoe_hf.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(fcmoe_hf, name) is not None


def test_documented_names_are_exported_and_match_their_modules():
    from fcmoe_hf.federated import FCMoEAggregator, build_aggregator
    from fcmoe_hf.simulation import FederatedSimulation
    from fcmoe_hf.trainer import FederatedMoETrainer

    assert set(NAMES) <= set(fcmoe_hf.__all__)
    assert set(fcmoe_hf._LAZY_IMPORTS) | {"MoELoraConfig", "MoELoraModel", "__version__"} == set(fcmoe_hf.__all__)
    assert fcmoe_hf.FederatedMoETrainer is FederatedMoETrainer and fcmoe_hf.build_aggregator is build_aggregator
    assert fcmoe_hf.FCMoEAggregator is FCMoEAggregator and fcmoe_hf.FederatedSimulation is FederatedSimulation
    with pytest.raises(AttributeError, match="no_such_name"):
        fcmoe_hf.no_such_name  # noqa: B018


def test_import_registers_the_method_without_importing_the_rest():
    code = (
        "import sys, fcmoe_hf, peft.mapping as m; "
        "assert 'MOE_LORA' in m.PEFT_TYPE_TO_CONFIG_MAPPING; "
        "heavy = [n for n in ('fcmoe_hf.trainer', 'fcmoe_hf.federated', 'fcmoe_hf.simulation', 'fcmoe_hf.tasks', "
        "'fcmoe_hf.data') if n in sys.modules]; assert not heavy, heavy; "
        "from fcmoe_hf import FederatedMoETrainer; assert 'fcmoe_hf.trainer' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_readme_aggregator_example_works_as_written():
    import pathlib
    import re

    import torch

    from fcmoe_hf.federated import ClientUpdate, build_aggregator
    from fcmoe_hf.federated.aggregators import AGGREGATORS

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Adding an aggregator", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        aggregator = build_aggregator("sqrt_size", power=1.0)
        global_state = {"m.layers.0.q.moe_lora_A": torch.zeros(2, 1, 3), "m.head.weight": torch.zeros(3)}
        updates = [
            ClientUpdate(f"c{i}", n, {k: torch.full_like(v, float(i)) for k, v in global_state.items()})
            for i, n in ((1, 1), (2, 3))
        ]
        result = aggregator.aggregate(global_state, updates)
        # power=1 is FedAvg: (1 * 1 + 3 * 2) / 4
        torch.testing.assert_close(result.global_state["m.head.weight"], torch.full((3,), 1.75))
        torch.testing.assert_close(result.global_state["m.layers.0.q.moe_lora_A"], torch.full((2, 1, 3), 1.75))
    finally:
        AGGREGATORS.pop("sqrt_size", None)
