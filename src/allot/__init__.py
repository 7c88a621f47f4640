"""allot: per-layer allocation of model compression.

Decide, layer by layer, how much and in which way each layer of a trained model can be compressed
under a budget, then really compress it. Public surface:

- `compress(model, data, method, budget)` -> `Result` (compressed model, plan, candidates)
- `score(model, data, method)` -> `Scored`, then `compress_scored(scored, budget)` for each of
  several budgets: the candidates are fitted and scored once
- `Data`: the data contract (calibration batches, a loss, optionally held-out evaluation)
- `Policy`: keep layers in float or pin their scheme, by name pattern
- `Refinement`: which refinement follows the plan (error feedback, fine-tuning), with its settings
- `apply(model, plan)`: rewrite a float model according to a (possibly hand-edited) plan
- `save(model, plan, directory)` / `load(directory, model_factory)`: artifacts
- `Budget`, `Plan`, and the registries of schemes, methods, error models and allocators
"""

from allot.api import Refinement, Result, Scored, compress, compress_scored, score
from allot.apply import apply
from allot.budget import Budget
from allot.data import Data, Distill, supervised
from allot.exceptions import AllotError
from allot.io import load, save
from allot.plan import LayerPlan, Plan
from allot.policy import Policy

__all__ = [
    "AllotError",
    "Budget",
    "Data",
    "Distill",
    "LayerPlan",
    "Plan",
    "Policy",
    "Refinement",
    "Result",
    "Scored",
    "apply",
    "compress",
    "compress_scored",
    "load",
    "save",
    "score",
    "supervised",
]
