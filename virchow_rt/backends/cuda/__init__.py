"""CUDA from Python through cuda-python: the thin API layer, GPU arrays handed in by other libraries, the
slot schedule and the pipeline that overlaps copies with compute. Never imports torch."""
