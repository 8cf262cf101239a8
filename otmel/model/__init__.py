"""OT-MEL's model as pure torch (the paper's equations: Sinkhorn, correlation assignment, pooling,
matching, losses, encoders, the model and its config) and its input processors (tokeniser, image
steps). Imports only ``otmel.io`` beyond itself, and neither Ray, FAISS nor ONNX Runtime."""
