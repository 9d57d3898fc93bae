from kedro.pipeline import Node, Pipeline

from attention_ctr.pipelines import one_branch_per_model, one_group, per_model
from attention_ctr.pipelines.promotion.nodes import (
    decide_promotion,
    move_promotion_pointer,
    report_promotion,
)

# The pointer is read as `promoted_models_before` and written as `promoted_models`: two
# catalog entries for one file, so the gate can read it before the last node moves it.
POINTER_BEFORE = "promoted_models_before"


def create_model_pipeline() -> Pipeline:
    """One model's gate; instantiated per model under its namespace, like export."""
    return Pipeline(
        [
            Node(
                decide_promotion,
                ["serving_metadata", "test_metrics", POINTER_BEFORE, "params:promotion"],
                "promotion_decision",
                name="decide_promotion",
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    gates = one_branch_per_model(
        create_model_pipeline(),
        shared_inputs={POINTER_BEFORE},
        parameters={"params:promotion"},
        flat_outputs=["promotion_decision"],
    )
    pointer = Pipeline(
        [
            Node(
                move_promotion_pointer,
                {"promoted_models": POINTER_BEFORE, **per_model("promotion_decision")},
                "promoted_models",
                name="move_promotion_pointer",
            ),
            # the report reads the pointer back: what was written, after any re-decision
            Node(
                report_promotion,
                {"promoted_models": "promoted_models", **per_model("promotion_decision")},
                "promotion_report",
                name="report_promotion",
            ),
        ]
    )
    return gates + one_group(pointer, "promotion")
