"""The pieces of ``bench/train_throughput.py``: synthetic samples (``samples``), the model and DeepSpeed engine
(``engine``), the timed arms (``arms``), device timing and memory (``device``) and the results (``report``)."""
