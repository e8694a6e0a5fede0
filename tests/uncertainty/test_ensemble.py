import pytest
import torch

from fedserve.uncertainty import ForwardError, NonFiniteOutputError, ensemble, summarize
from tests.uncertainty.helpers import linear, scripted


def test_ensemble_two_linear_models_exact():
    # Member 1: x·(1, 2) + 0.5 gives 3.5 and 2.5; member 2: x·(3, -1) - 0.5 gives 1.5 and 5.5.
    # Means 2.5 and 4.0; population variances ((3.5-1.5)/2)² = 1 and ((2.5-5.5)/2)² = 2.25.
    members = [linear([[1.0, 2.0]], [0.5]), linear([[3.0, -1.0]], [-0.5])]
    model_input = torch.tensor([[1.0, 1.0], [2.0, 0.0]])

    samples = ensemble.sample(members, model_input)
    result = summarize(samples)

    assert samples.shape == (2, 2, 1)
    assert result["inference"].flatten().tolist() == [2.5, 4.0]
    assert result["variance"].flatten().tolist() == [1.0, 2.25]
    assert result["std"].flatten().tolist() == [1.0, 1.5]


def test_ensemble_runs_scripted_members_in_eval_mode():
    member = scripted(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.9)))
    member.train()
    model_input = torch.ones(8, 2)

    samples = ensemble.sample([member, member], model_input)

    assert not member.training
    assert torch.equal(samples[0], samples[1])


def test_ensemble_rejects_no_members():
    with pytest.raises(ValueError):
        ensemble.sample([], torch.ones(1, 2))


def test_ensemble_members_with_different_output_shapes_fail():
    members = [linear([[1.0, 2.0]], [0.0]), linear([[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0])]

    with pytest.raises(ForwardError, match="different shapes"):
        ensemble.sample(members, torch.ones(1, 2))


def test_ensemble_non_finite_output_fails():
    members = [linear([[float("inf"), 0.0]], [0.0])]

    with pytest.raises(NonFiniteOutputError):
        ensemble.sample(members, torch.ones(1, 2))
