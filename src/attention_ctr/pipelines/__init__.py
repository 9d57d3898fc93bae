"""The project's pipelines, and how the per-model ones are laid out."""

from __future__ import annotations

from collections.abc import Iterable

from kedro.pipeline import Pipeline

from attention_ctr.models import MODELS


def one_branch_per_model(
    template: Pipeline,
    *,
    shared_inputs: Iterable[str],
    parameters: Iterable[str],
    flat_outputs: Iterable[str] = (),
    block_parameter: str | None = None,
) -> Pipeline:
    """`template` once per model in `MODELS`, namespaced by the model's name.

    `shared_inputs` and `parameters` stay un-namespaced (one dataset for every branch);
    each of `flat_outputs` leaves branch `din` as `din_<output>` for cross-model nodes.
    `block_parameter` (e.g. `params:model_block`) is, in branch `din`, the model's whole
    parameter block `params:din` (its `model` and its own `training` overrides).
    """
    flat_outputs = tuple(flat_outputs)
    return sum(
        Pipeline(
            template,
            namespace=name,
            inputs=set(shared_inputs),
            outputs={output: f"{name}_{output}" for output in flat_outputs} or None,
            parameters={name_: name_ for name_ in parameters}
            | ({block_parameter: f"params:{name}"} if block_parameter else {}),
        )
        for name in MODELS
    )


def per_model(dataset: str) -> dict[str, str]:
    """Keyword inputs {model name: that model's flat `dataset`} for a cross-model node."""
    return {name: f"{name}_{dataset}" for name in MODELS}


def one_group(pipeline: Pipeline, name: str) -> Pipeline:
    """`pipeline`'s nodes under the namespace `name`, with their datasets' names unchanged.

    kedro-viz draws the group as one collapsible box, `kedro run --namespaces NAME` runs it,
    and kedro-airflow (`--group-by namespace`) makes it one task, so the datasets its nodes
    pass each other may stay in memory.
    """
    return Pipeline(pipeline, namespace=name, prefix_datasets_with_namespace=False)
