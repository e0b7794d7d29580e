"""attnpipe's orchestration package: job specs, data preprocessing, training, tracking, jobs."""

__version__ = "0.1.0"
