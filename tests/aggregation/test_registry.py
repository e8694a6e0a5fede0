import pytest

from fedserve.aggregation import STRATEGIES, AggregationError, get_strategy
from fedserve.aggregation.fedavg import fedavg
from fedserve.aggregation.feddc import feddc
from fedserve.aggregation.fedprox import fedprox
from fedserve.core.models import AggregationMethod


def test_registry_names_match_training_choices():
    assert set(STRATEGIES) == set(AggregationMethod.values)


@pytest.mark.parametrize(
    ("name", "function"), [("FedAvg", fedavg), ("FedProx", fedprox), ("FedDC", feddc)]
)
def test_get_strategy_returns_registered_function(name, function):
    strategy = get_strategy(name)

    assert strategy.name == name
    assert strategy.function is function


@pytest.mark.parametrize("name", ["fedavg", "FedMedian", ""])
def test_get_strategy_rejects_unknown_name(name):
    with pytest.raises(AggregationError, match=f"Unknown aggregation method {name!r}") as caught:
        get_strategy(name)
    assert "FedAvg, FedProx, FedDC" in str(caught.value)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        STRATEGIES["Mine"] = STRATEGIES["FedAvg"]  # type: ignore[index]
