"""The exported model's definition: weights found and checked in each published layout, converted to timm's
key names. ``weights`` and ``transformers_layout`` import only numpy until weights are actually loaded."""
