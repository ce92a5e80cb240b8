"""The vocabulary users write: llm-compressor's recipes and modifiers, and what modifiers do to a model.

A recipe (``recipe``: YAML, JSON or objects, with stages and ``targets``/``ignore``/``re:`` patterns resolved by
``targets``) holds modifiers (``modifier``, with the Event/EventType/State lifecycle of ``lifecycle``): the
pruning modifiers (``pruning_modifiers``: SparseGPT, Wanda, magnitude, OWL), the quantization modifiers
(``quantization_modifiers``: RTN, GPTQ), both built on ``layerwise_modifier``, and SpinQuant (``spinquant``, with
the online R3/R4 hooks of ``online_rotations``). The bundled recipes are the YAML files beside these modules.

Imports: ``service.algorithms``, torch, transformers and pydantic; never the engine or the job domain.
"""
