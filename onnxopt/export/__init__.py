"""Export models from PyTorch, TensorFlow/Keras or ONNX files, verified numerically."""
