"""Fine-tuning DALL·E mini: encode a captioned image set with the VQGAN, then train the text model.

Example: ``dalle_flax.training.encode_dataset("photos/", vqgan="dalle-mini/vqgan_imagenet_f16_16384", out="encoded/")``.

Needs the ``[train]`` extra (optax, orbax-checkpoint, grain, pyarrow). Layout, one concept per
file: ``sources`` (image + caption readers), ``encode`` (VQGAN encoding to parquet shards),
``data`` (grain batches of the encoded shards), ``optim`` (optax optimizers and schedules),
``step`` (loss and the pure train / eval steps).
"""
