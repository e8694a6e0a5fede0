"""Uncertainty values compared against values worked out by hand."""

import math

import pytest
import torch

from fedserve.uncertainty.summary import entropy, is_probabilities, summarize


def _tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def test_summarize_mean_variance_std_of_regression_outputs():
    # Three samples of a 2-value output: mean (3, 4); squared deviations (4, 0, 4) and
    # (4, 4, 16), so the population variances are 8/3 and 24/3 = 8.
    samples = _tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])

    result = summarize(samples)

    assert result["inference"].tolist() == [3.0, 4.0]
    assert result["variance"].tolist() == pytest.approx([8 / 3, 8.0], abs=1e-12)
    assert result["std"].tolist() == pytest.approx([1.632993161855452, 2.8284271247461903])
    assert "predictive_entropy" not in result


def test_summarize_uses_population_variance():
    # Samples 0 and 2: population variance ((0-1)² + (2-1)²) / 2 = 1; sample variance is 2.
    result = summarize(_tensor([[0.0, 5.0], [2.0, 5.0]]))

    assert result["variance"].tolist() == [1.0, 0.0]


def test_summarize_single_sample_has_zero_variance():
    result = summarize(_tensor([[0.5, 1.5]]))

    assert result["variance"].tolist() == [0.0, 0.0]
    assert result["std"].tolist() == [0.0, 0.0]


def test_summarize_without_spread_returns_only_inference():
    result = summarize(_tensor([[0.25, 0.75]]), spread=False)

    assert set(result) == {"inference"}


def test_summarize_entropies_of_probability_outputs():
    # Samples (0.2, 0.8) and (0.6, 0.4), one row each; mean (0.4, 0.6).
    # predictive: -(0.4 ln 0.4 + 0.6 ln 0.6)                     = 0.6730116670092565
    # per sample: -(0.2 ln 0.2 + 0.8 ln 0.8) = 0.5004024235381879, and 0.6730116670092565
    # expected: their mean                                       = 0.5867070452737222
    # mutual information: 0.6730116670092565 - 0.5867070452737222 = 0.0863046217355343
    samples = _tensor([[[0.2, 0.8]], [[0.6, 0.4]]])

    result = summarize(samples)

    assert result["inference"][0].tolist() == pytest.approx([0.4, 0.6])
    assert result["variance"][0].tolist() == pytest.approx([0.04, 0.04])
    assert result["std"][0].tolist() == pytest.approx([0.2, 0.2])
    assert result["predictive_entropy"].tolist() == pytest.approx([0.6730116670092565])
    assert result["expected_entropy"].tolist() == pytest.approx([0.5867070452737222])
    assert result["mutual_info"].tolist() == pytest.approx([0.0863046217355343])


def test_summarize_softmax_turns_logits_into_probabilities():
    # Logits (0, ln 3) and (ln 3, 0) give probabilities (1/4, 3/4) and (3/4, 1/4).
    # mean (1/2, 1/2): predictive entropy ln 2; each sample -(1/4 ln 1/4 + 3/4 ln 3/4)
    # = 0.5623351446188083; mutual information ln 2 - 0.5623351446188083 = 0.130812035941137.
    samples = _tensor([[[0.0, math.log(3)]], [[math.log(3), 0.0]]])

    result = summarize(samples, softmax=True)

    assert result["inference"][0].tolist() == pytest.approx([0.5, 0.5])
    assert result["variance"][0].tolist() == pytest.approx([0.0625, 0.0625])
    assert result["std"][0].tolist() == pytest.approx([0.25, 0.25])
    assert result["predictive_entropy"].tolist() == pytest.approx([math.log(2)])
    assert result["expected_entropy"].tolist() == pytest.approx([0.5623351446188083])
    assert result["mutual_info"].tolist() == pytest.approx([0.130812035941137])


def test_summarize_zero_probabilities_count_as_zero_entropy():
    # One-hot samples (1, 0) and (0, 1): each has entropy 0 (0 ln 0 = 0), the mean has ln 2.
    result = summarize(_tensor([[1.0, 0.0], [0.0, 1.0]]))

    assert result["predictive_entropy"].item() == pytest.approx(math.log(2))
    assert result["expected_entropy"].item() == 0.0
    assert result["mutual_info"].item() == pytest.approx(math.log(2))


def test_summarize_agreeing_samples_have_zero_mutual_info():
    result = summarize(_tensor([[0.3, 0.7], [0.3, 0.7]]))

    assert result["mutual_info"].item() == 0.0
    assert result["predictive_entropy"].item() == pytest.approx(
        -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    )


def test_summarize_rejects_empty_samples():
    with pytest.raises(ValueError):
        summarize(torch.empty(0, 3))


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[0.5, 0.5], [0.1, 0.9]], True),
        ([[0.5, 0.50005]], True),
        ([[0.5, 0.51]], False),
        ([[1.2, -0.2]], False),
        ([[1.0]], False),
    ],
)
def test_is_probabilities_cases(rows, expected):
    assert is_probabilities(_tensor([rows])) is expected


def test_entropy_of_uniform_distribution_is_log_of_classes():
    assert entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))
