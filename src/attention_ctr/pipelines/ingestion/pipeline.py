from kedro.pipeline import Node, Pipeline

from attention_ctr.pipelines import one_group
from attention_ctr.pipelines.ingestion.nodes import (
    generate_synthetic_logs,
    read_behavior_logs,
    validate_behavior_logs,
)


def create_pipeline(**kwargs) -> Pipeline:
    nodes = Pipeline(
        [
            Node(
                generate_synthetic_logs,
                "params:ingestion.synthetic",
                "synthetic_behavior_logs",
                name="generate_synthetic_logs",
            ),
            Node(
                read_behavior_logs,
                ["synthetic_behavior_logs", "raw_behavior_logs", "params:ingestion.source"],
                "parsed_behavior_logs",
                name="read_behavior_logs",
            ),
            Node(
                validate_behavior_logs,
                ["parsed_behavior_logs", "params:ingestion.validation"],
                ["interactions", "quarantined_rows", "ingestion_report"],
                name="validate_behavior_logs",
            ),
        ]
    )
    return one_group(nodes, "ingestion")
