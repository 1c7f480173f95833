"""Divergence cases shared by the divergence and chunked tests."""

# (name, params) for every divergence that is a sum of elementwise terms.
POINTWISE_CASES = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("total_variation", {}),
    ("chi2", {}),
    ("hellinger", {}),
    ("alpha", {"alpha": -1.0}),
    ("alpha", {"alpha": 0.0}),
    ("alpha", {"alpha": 0.3}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 1.0}),
    ("alpha", {"alpha": 2.0}),
]
