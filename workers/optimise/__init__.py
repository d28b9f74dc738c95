"""Optimising models on a worker: quantise, merge a LoRA adapter into its base, evaluate.

Plain Python like the rest of ``workers/``: each function takes paths and parameters,
reports progress through a callback and returns a result dataclass; the control plane
(``apps/optimise``) turns rows into these calls and results back into rows.

- ``quantize``: llama.cpp's own quantiser (``llama_model_quantize``);
- ``merge``: a GGUF model written out at F16/BF16, with a LoRA adapter merged in or not;
- ``evaluate``: perplexity (llama.cpp's protocol), KL divergence against a reference
  model, and a task score on prompt -> expected-completion data.
"""
