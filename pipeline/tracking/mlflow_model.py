"""The MLflow model of a trained attnpipe model (MLflow's models-from-code: MLflow stores
this file and loads it, so serving needs torch, safetensors, tokenizers and the `models`
package bundled with the model, not attnpipe itself).

Input: prompts (a list of strings, or a one-column DataFrame). Output: for a decoder,
the prompt's continuation; for an encoder-decoder, the generated target; for an encoder,
the input with every <|mask|> token filled in. Param `max_new_tokens` (default 32).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class AttnpipeModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from models.pretrained import load_for_text

        self.model, self.tok, self.family = load_for_text(context.artifacts["model"])

    def predict(self, context, model_input, params=None):  # no hints: the signature rules
        from models.generate import complete

        prompts = (
            list(model_input.iloc[:, 0]) if hasattr(model_input, "columns") else list(model_input)
        )
        max_new = int((params or {}).get("max_new_tokens", 32))
        return [
            complete(self.model, self.tok, self.family, str(prompt), max_new) for prompt in prompts
        ]


mlflow.models.set_model(AttnpipeModel())
