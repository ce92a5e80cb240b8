"""A checkpoint in, a checkpoint out: the streaming engine, also usable alone as a library and a CLI.

``options`` (one typed ``CompressionOptions`` from the caller to the engine), ``model_source`` (a model built on
the meta device, read block by block from safetensors), ``text_data`` and ``calibration_data`` (texts and
calibration windows), ``pipeline`` (capture, calibrate, solve, propagate, one block at a time), ``data_parallel`` (the
same over N workers, each holding its share of the samples), ``block_checkpoints`` (per-block checkpoints and the
fingerprint a resume checks), ``oneshot`` (the stage runner and in-memory compression), ``compress``
(``compress_checkpoint``: disk to disk), ``export``,
``quantized_export`` and ``transform_export`` (dense, compressed-tensors and online-rotation checkpoints),
``perplexity`` (streamed evaluation), ``modelopt`` (ModelOpt's ``sparsify``/save/restore/export) and ``cli``.

Imports: ``service.algorithms`` and ``service.recipes``; never the job domain.
"""
