"""The algorithms, as pure tensor functions: weights, statistics and options in; weights, masks and losses out.

SparseGPT (``sparsegpt``), GPTQ (``gptq``), magnitude, Wanda and OWL pruning (``magnitude``, ``wanda``, ``owl``),
N:M and unstructured masks (``masks``), calibration statistics and the inverse-Hessian factor (``hessian``),
integer quantization (``quantization``), Hadamard matrices and the fast transform (``hadamard``), and the weight
fusion of rotations (``rotations``). No hooks, no logging, no devices chosen here: a function runs where its
tensors are. Each is tested against a slow, direct reference (tests/algorithms/).

Imports: torch and the standard library only, and each other; nothing else of llmpress.
"""
