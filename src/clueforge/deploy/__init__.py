"""Deployment: ONNX export (fp32, int8) with an equivalence check, an ONNX Runtime model that the
prediction path runs like a PyTorch one, and an HTTP server with dynamic batching."""
