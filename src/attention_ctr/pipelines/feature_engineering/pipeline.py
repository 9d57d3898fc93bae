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
)

PARAMS = "params:feature_engineering"


# The large tables are written and read here as `name@engine`: pandas frames by default, Spark
# DataFrames under `--env spark` (conf/spark/catalog.yml). Later pipelines read the same files
# as `name@pandas` or `name@parquet`.
def create_pipeline(**kwargs) -> Pipeline:
    nodes = Pipeline(
        [
            Node(
                encode_interactions,
                ["interactions", "params:ingestion.validation.behaviors"],
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
                ["positive_samples", "item_ids"],
                "item_frequency",
                name="count_item_frequency",
            ),
            Node(
                add_negative_history,
                ["sorted_events", "item_frequency", PARAMS],
                "events@engine",
                name="add_negative_history",
            ),
            Node(
                assemble_samples,
                ["positive_samples", "item_frequency", PARAMS],
                ["train_samples@engine", "validation_samples@engine", "test_samples@engine"],
                name="assemble_samples",
            ),
            Node(
                build_cold_start_tables,
                ["item_frequency", "train_samples@engine"],
                ["cold_start_items", "cold_start_weights"],
                name="build_cold_start_tables",
            ),
            Node(
                describe_features,
                [
                    "events@engine",
                    "positive_samples",
                    "item_ids",
                    "category_ids",
                    "behavior_ids",
                    "train_samples@engine",
                    "validation_samples@engine",
                    "test_samples@engine",
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
