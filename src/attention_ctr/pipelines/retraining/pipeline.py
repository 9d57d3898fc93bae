from kedro.pipeline import Pipeline

from attention_ctr.pipelines import (
    evaluation,
    export,
    feature_engineering,
    ingestion,
    promotion,
    training,
)

# In order: validate the newest raw logs, rebuild features, train every model, evaluate and
# export each, then the gate decides which new versions serve.
STAGES = (ingestion, feature_engineering, training, evaluation, export, promotion)


def create_pipeline(**kwargs) -> Pipeline:
    return sum(stage.create_pipeline() for stage in STAGES)
