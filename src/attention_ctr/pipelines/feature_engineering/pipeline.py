from kedro.pipeline import Node, Pipeline

from attention_ctr.pipelines import one_group
from attention_ctr.pipelines.feature_engineering.nodes import (
    add_negative_history,
    assemble_samples,
    build_cold_start_tables,
    build_positive_samples,
    count_item_frequency,
    describe_features,
    encode_interactions,
    index_user_items,
)

PARAMS = "params:feature_engineering"


def create_pipeline(**kwargs) -> Pipeline:
    nodes = Pipeline(
        [
            Node(
                encode_interactions,
                "interactions",
                ["sorted_events", "user_ids", "item_ids", "category_ids", "behavior_ids"],
                name="encode_interactions",
            ),
            Node(
                build_positive_samples,
                ["sorted_events", PARAMS],
                "positive_samples",
                name="build_positive_samples",
            ),
            Node(
                count_item_frequency,
                ["sorted_events", "item_ids", PARAMS],
                "item_frequency",
                name="count_item_frequency",
            ),
            Node(
                index_user_items,
                ["sorted_events", "item_ids"],
                "user_item_keys",
                name="index_user_items",
            ),
            Node(
                add_negative_history,
                ["sorted_events", "user_item_keys", "item_frequency", PARAMS],
                "events@pandas",
                name="add_negative_history",
            ),
            Node(
                assemble_samples,
                ["positive_samples", "user_item_keys", "item_frequency", PARAMS],
                ["train_samples@pandas", "validation_samples@pandas", "test_samples"],
                name="assemble_samples",
            ),
            Node(
                build_cold_start_tables,
                ["item_frequency", "train_samples@pandas"],
                ["cold_start_items", "cold_start_weights"],
                name="build_cold_start_tables",
            ),
            Node(
                describe_features,
                [
                    "events@pandas",
                    "item_ids",
                    "category_ids",
                    "behavior_ids",
                    "train_samples@pandas",
                    "validation_samples@pandas",
                    "test_samples",
                    "cold_start_items",
                    "cold_start_weights",
                    PARAMS,
                ],
                ["feature_spec", "feature_report"],
                name="describe_features",
            ),
        ]
    )
    return one_group(nodes, "feature_engineering")
