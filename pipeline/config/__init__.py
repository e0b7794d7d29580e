"""The job spec: its schema (nodes.py, schema.py), how it is read from YAML and overrides
(loader.py), and cron expressions (cron.py). It imports no job kind: a kind's own checks
(pipeline/kinds/) are passed to `load_spec`."""

from pipeline.config.cron import cron_trigger
from pipeline.config.loader import (
    Check,
    SpecError,
    checked,
    first_error,
    load_spec,
    resolved_yaml,
    validate_spec,
)
from pipeline.config.nodes import (
    CompareNode,
    DataNode,
    DeepSpeedNode,
    EvaluateNode,
    JobKind,
    JobNode,
    ModelNode,
    OptimizerNode,
    ProbeNode,
    ResourcesNode,
    RetrainNode,
    ScheduleLRNode,
    ScheduleNode,
    SourceNode,
    StorageNode,
    TokenizerNode,
    TrackingNode,
    TrainingNode,
)
from pipeline.config.schema import JobSpec, spec_warnings

__all__ = [
    "Check",
    "CompareNode",
    "DataNode",
    "DeepSpeedNode",
    "EvaluateNode",
    "JobKind",
    "JobNode",
    "JobSpec",
    "ModelNode",
    "OptimizerNode",
    "ProbeNode",
    "ResourcesNode",
    "RetrainNode",
    "ScheduleLRNode",
    "ScheduleNode",
    "SourceNode",
    "SpecError",
    "StorageNode",
    "TokenizerNode",
    "TrackingNode",
    "TrainingNode",
    "checked",
    "cron_trigger",
    "first_error",
    "load_spec",
    "resolved_yaml",
    "spec_warnings",
    "validate_spec",
]
