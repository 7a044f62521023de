"""Export: weights -> PyTorch reference -> fp32 / fp16 / int8 ONNX (-> TensorRT), each checked for parity.

``pipeline``, ``reference``, ``onnx_export`` and ``precision`` import torch; ``tensorrt_build`` and
``tensorrt_prep`` do not (an engine can be built on a machine without torch). Importing this package
imports none of them.
"""
