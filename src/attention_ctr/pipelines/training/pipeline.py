from kedro.pipeline import Node, Pipeline

from attention_ctr.pipelines import one_branch_per_model
from attention_ctr.pipelines.training.nodes import (
    apply_cold_start,
    choose_cold_start_blend,
    fit_model,
    initialise_model,
)

SHARED_INPUTS = {
    "train_samples@parquet",
    "validation_samples@parquet",
    "events@parquet",
    "feature_spec",
    "item_frequency",
    "cold_start_items",
    "cold_start_weights",
}


def create_model_pipeline() -> Pipeline:
    """One model's branch; instantiated per model under its namespace."""
    return Pipeline(
        [
            Node(
                initialise_model,
                ["feature_spec", "params:model_block", "params:training"],
                "initial_model",
                name="initialise_model",
            ),
            Node(
                fit_model,
                [
                    "initial_model",
                    "train_samples@parquet",  # read whole, or in chunks over the memory budget
                    "validation_samples@parquet",
                    "events@parquet",
                    "feature_spec",
                    "item_frequency",
                    "params:model_block",
                    "params:training",
                ],
                ["trained_model", "training_history"],
                name="fit_model",
            ),
            Node(
                choose_cold_start_blend,
                [
                    "trained_model",
                    "validation_samples@parquet",
                    "events@parquet",
                    "feature_spec",
                    "item_frequency",
                    "cold_start_items",
                    "cold_start_weights",
                    "params:model_block",
                    "params:training",
                    "params:cold_start",
                ],
                "cold_start_blend",
                name="choose_cold_start_blend",
            ),
            Node(
                apply_cold_start,
                [
                    "trained_model",
                    "item_frequency",
                    "cold_start_items",
                    "cold_start_weights",
                    "cold_start_blend",
                ],
                "model",
                name="apply_cold_start",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return one_branch_per_model(
        create_model_pipeline(),
        shared_inputs=SHARED_INPUTS,
        parameters={"params:training", "params:cold_start"},
        block_parameter="params:model_block",
    )
