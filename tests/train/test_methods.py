"""fracfx.train.methods and fracfx.train.recipe: the registry and the seam between a method and the loop."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from fracfx.errors import ConfigError
from fracfx.train import Method, MethodStatus, Option, Recipe, TrainConfig, available_methods, load_trained, register_method, train
from fracfx.train.methods import METHODS

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


class Counter:
    """A scheduler: counts its steps and sums the losses it saw; checkpointed through the recipe."""

    def __init__(self):
        self.steps, self.total = 0, 0.0

    def step(self, loss: float) -> None:
        self.steps += 1
        self.total += loss

    def state_dict(self):
        return {"steps": self.steps, "total": self.total}

    def load_state_dict(self, state):
        self.steps, self.total = state["steps"], state["total"]


@pytest.fixture
def counting_method():
    @register_method
    class Counting(Method):
        name = "counting-test"
        help = "FP32 training with a step counter"
        options = (Option("fraction", float, 0.5, "a fraction"),)

        def build(self, model, example_input, context):
            from fracfx.runtime import CostMeter
            from fracfx.train.methods.shared import fp32_graph

            counter = Counter()
            return Recipe(model=model, meter=CostMeter(fp32_graph(model, example_input)), schedulers={"counter": counter},
                          status=lambda: MethodStatus(32, 32, 32, extra={"steps": counter.steps}))

    yield Counting
    METHODS.pop("counting-test")


def test_the_built_in_methods_in_order():
    assert list(available_methods())[:5] == ["fp32", "static", "pfq", "dfq", "fractrain"]
    with pytest.raises(ConfigError, match="did you mean 'fractrain'"):
        TrainConfig(method="fractrian")


def test_a_registered_method_gets_its_options_checked(counting_method):
    assert TrainConfig(method="counting-test").options == {"fraction": 0.5}
    assert TrainConfig(method="counting-test", options={"fraction": 0.25}).options == {"fraction": 0.25}
    assert TrainConfig(method="counting-test", fraction=0.25).options == {"fraction": 0.25}
    with pytest.raises(ConfigError, match="did you mean 'fraction'"):
        TrainConfig(method="counting-test", options={"fractio": 0.25})
    with pytest.raises(ConfigError, match="has no option"):
        TrainConfig(method="pfq", options={"fraction": 0.25})


def test_a_recipe_names_each_checkpointed_object_once():
    with pytest.raises(ValueError, match="one name per object"):
        Recipe(model=None, meter=None, status=None, schedulers={"a": Counter()}, state={"a": Counter()})


@pytest.mark.skipif(not FASHION.exists(), reason="needs `apt-get install dataset-fashion-mnist`")
def test_the_loop_steps_and_checkpoints_a_methods_schedulers(counting_method, tmp_path):
    config = TrainConfig(method="counting-test", arch="tests.train.nets:tiny_cnn", train_subset=48, test_subset=16, batch_size=16,
                         iters=5, eval_every=2, save_folder=str(tmp_path / "run"), seed=1)
    result = train(config, progress=False, console=Console(file=io.StringIO()))
    assert [m["method_state"]["steps"] for m in result.metrics] == [2, 4, 5]
    loaded = load_trained(result.run_dir)
    counter = loaded.recipe.schedulers["counter"]
    assert counter.steps == 5 and counter.total > 0  # five iterations' cross-entropy
    assert loaded.state["method"] == {"counter": counter.state_dict()}
