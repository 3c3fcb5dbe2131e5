"""What every stage needs and none owns: errors and exit codes, atomic file writes, the console, torchrun
ranks, SIGTERM handling, onnxruntime session setup, timing statistics. Imports nothing else of the package."""
